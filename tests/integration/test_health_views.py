"""The health views in schema.sql, read with plain SQL on both engines, and Store.health().

Ages are judged by the database clock, so the tests move rows back in time with an UPDATE
rather than waiting.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from workers.store import Claim, NewTask, Store, WorkerStats, supervisors, task_workers, tasks


def rows(store: Store, view: str) -> list[dict[str, object]]:
    """What an operator sees with `SELECT * FROM <view>` in psql or sqlite3."""
    with store.engine.connect() as conn:
        return [dict(row) for row in conn.execute(sa.text(f"SELECT * FROM {view}")).mappings()]


def age_by(store: Store, table: sa.Table, row_id: int, column: str, seconds: float) -> None:
    """Move one timestamp back by `seconds`."""
    with store.engine.begin() as conn:
        moment = conn.execute(sa.select(table.c[column]).where(table.c.id == row_id)).scalar_one()
        conn.execute(
            sa.update(table)
            .where(table.c.id == row_id)
            .values({column: moment - timedelta(seconds=seconds)})
        )


def new_task(**fields: object) -> NewTask:
    values: dict[str, object] = {"task_type": "t", "payload": "{}", "queue": "default"}
    values.update(fields)
    return NewTask(**values)  # type: ignore[arg-type]


@pytest.fixture
def pool(store: Store) -> tuple[int, int, int]:
    """A supervisor (heartbeat timeout 10 s) with two workers; the first one is busy."""
    supervisor = store.register_supervisor("alpha", 100, 1.0, 3, "test", heartbeat_timeout=10.0)
    busy = store.register_worker(supervisor, "alpha", ())
    idle = store.register_worker(supervisor, "alpha", ())
    store.enqueue([new_task()])
    [claim] = store.claim_tasks(busy, (), 1)
    store.record_heartbeats(
        supervisor,
        {busy: WorkerStats(claim.id, 0, 0, 12.5), idle: WorkerStats(None, 3, 1, 11.0)},
    )
    return supervisor, busy, idle


def test_worker_health_shows_busy_idle_and_stale_workers(
    store: Store, pool: tuple[int, int, int]
) -> None:
    supervisor, busy, idle = pool
    age_by(store, task_workers, idle, "last_heartbeat", 25)  # past its supervisor's 10 s

    by_id = {row["worker_id"]: row for row in rows(store, "worker_health")}

    assert set(by_id) == {busy, idle}
    assert by_id[busy]["state"] == "busy"
    assert by_id[busy]["current_task_id"] is not None
    assert by_id[busy]["rss_mb"] == 12.5
    assert by_id[idle]["state"] == "stale"
    assert 24 < float(by_id[idle]["heartbeat_age_s"]) < 60  # type: ignore[arg-type]
    assert by_id[idle]["processed"] == 3 and by_id[idle]["failed"] == 1
    assert by_id[busy]["node"] == "alpha" and by_id[busy]["supervisor_id"] == supervisor


def test_supervisor_health_counts_live_workers_and_shows_a_crash_loop(
    store: Store, pool: tuple[int, int, int]
) -> None:
    supervisor, _busy, idle = pool
    store.record_heartbeats(supervisor, {}, crash_streak=4, crash_reason="exited with code 3")
    age_by(store, task_workers, idle, "last_heartbeat", 25)
    stopped = store.register_supervisor("beta", 200, 1.0, 2, "test")
    store.set_supervisor_status(stopped, "stopped")

    [row] = rows(store, "supervisor_health")  # stopped supervisors are not listed

    assert row["supervisor_id"] == supervisor
    assert row["state"] == "live"
    assert row["desired_workers"] == 3
    assert row["live_workers"] == 1  # the stale one does not count
    assert row["crash_streak"] == 4
    assert row["crash_reason"] == "exited with code 3"

    age_by(store, supervisors, supervisor, "last_heartbeat", 30)
    [row] = rows(store, "supervisor_health")
    assert row["state"] == "stale"


def test_queue_health_counts_depths_waiting_time_and_recent_failures(store: Store) -> None:
    waiting, delayed, _other = store.enqueue(
        [new_task(), new_task(delay=3600.0), new_task(queue="mail")]
    )
    age_by(store, tasks, waiting, "run_at", 120)
    worker = store.register_worker(store.register_supervisor("a", 1, 1.0, 1, "t"), "a", ())
    old_failure, recent_failure = store.enqueue(
        [new_task(queue="mail", max_attempts=1), new_task(queue="mail", max_attempts=1)]
    )
    for task_id in (old_failure, recent_failure):
        claim = _claim(store, worker, task_id)
        store.fail_task(claim, "boom", retry_delay=0.0)
    age_by(store, tasks, old_failure, "completed_at", 2 * 3600)

    by_queue = {row["queue"]: row for row in rows(store, "queue_health")}

    assert by_queue["default"]["pending"] == 2
    assert by_queue["default"]["running"] == 0
    # the delayed task is not runnable yet: the oldest wait is the aged one's
    assert 119 < float(by_queue["default"]["oldest_pending_age_s"]) < 180  # type: ignore[arg-type]
    assert by_queue["mail"]["pending"] == 1
    assert by_queue["mail"]["failed_last_hour"] == 1
    assert delayed


def test_store_health_judges_recent_failures_and_overdue_tasks(store: Store) -> None:
    worker = store.register_worker(store.register_supervisor("a", 1, 1.0, 1, "t"), "a", ())
    done, failed, overdue = store.enqueue(
        [new_task(), new_task(max_attempts=1), new_task(timeout=5.0)]
    )
    store.complete_task(_claim(store, worker, done), "null", 0.1)
    store.fail_task(_claim(store, worker, failed), "boom", retry_delay=0.0)
    _claim(store, worker, overdue)
    age_by(store, tasks, overdue, "started_at", 60)

    facts = store.health(failure_window=600)

    assert (facts.completed_recently, facts.failed_recently) == (1, 1)
    [(task_id, worker_id, ran, limit)] = facts.overdue
    assert (task_id, worker_id, limit) == (overdue, worker, 5.0)
    assert 59 < ran < 120


def _claim(store: Store, worker: int, task_id: int) -> Claim:
    """Claim exactly this task (the others are made not runnable for the moment)."""
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(tasks).where(tasks.c.id != task_id, tasks.c.status == "pending")
            .values(priority=-1000)
        )  # fmt: skip
        conn.execute(sa.update(tasks).where(tasks.c.id == task_id).values(priority=1000))
    [claim] = store.claim_tasks(worker, (), 1)
    assert claim.id == task_id
    return claim
