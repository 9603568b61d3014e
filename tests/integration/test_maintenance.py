"""Periodic maintenance on one node at a time, and connections that cannot hang on a vanished
peer (the partition tests in tests/acceptance/test_partition.py cut real links).

Time is aged with SQL UPDATEs, never waited for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select, update

from tests.helpers import wait_until
from workers.store import (
    COMPLETED,
    MAINTENANCE_LOCK,
    POSTGRES_CONNECT_OPTIONS,
    SCHEMA_VERSION,
    TRANSIENT_ERRORS,
    NewTask,
    Store,
    _postgres_connect_args,
    task_workers,
    tasks,
)

NODE = "node-a"


@pytest.fixture
def postgres_store(postgres_url: str) -> Iterator[Store]:
    store = Store(postgres_url)
    yield store
    store.dispose()


def stale_running_task(store: Store) -> int:
    """A task held by a worker whose heartbeat is an hour old (its node is gone)."""
    supervisor_id = store.register_supervisor(NODE, os.getpid(), 0.0, 1, "test")
    worker_id = store.register_worker(supervisor_id, NODE, ())
    [task_id] = store.enqueue([NewTask("job")])
    [claim] = store.claim_tasks(worker_id, ())
    assert claim.id == task_id
    with store.engine.begin() as conn:
        conn.execute(
            update(task_workers)
            .where(task_workers.c.id == worker_id)
            .values(last_heartbeat=store.now() - timedelta(hours=1))
        )
    return task_id


def finished_tasks(store: Store, ages: list[timedelta]) -> list[int]:
    """Completed tasks that finished that long ago."""
    ids = store.enqueue([NewTask("job") for _ in ages])
    now = store.now()
    with store.engine.begin() as conn:
        for task_id, age in zip(ids, ages, strict=True):
            conn.execute(
                update(tasks)
                .where(tasks.c.id == task_id)
                .values(status=COMPLETED, completed_at=now - age)
            )
    return ids


def remaining(store: Store) -> set[int]:
    with store.engine.connect() as conn:
        return set(conn.execute(select(tasks.c.id)).scalars())


def test_maintenance_waits_while_another_node_holds_the_lock(postgres_store: Store) -> None:
    store = postgres_store
    task_id = stale_running_task(store)
    [old] = finished_tasks(store, [timedelta(days=2)])
    with store.engine.connect() as other_node, other_node.begin():
        assert other_node.execute(MAINTENANCE_LOCK).scalar_one() is True
        assert store.rescue_stale_tasks(30) == ([], [])
        assert store.purge_finished(86_400) is None
        assert store.get_task(task_id)["status"] == "running"
        assert old in remaining(store)
    # the other node's transaction ended, and its lock with it
    rescued, lost = store.rescue_stale_tasks(30)
    assert [task.id for task in rescued] == [task_id] and len(lost) == 1
    assert store.purge_finished(86_400) == {"tasks": 1, "workers": 0, "supervisors": 0}


def test_purge_finished_deletes_old_rows_a_batch_at_a_time(store: Store) -> None:
    old = finished_tasks(store, [timedelta(days=3)] * 3)
    recent = finished_tasks(store, [timedelta(hours=1)])
    [pending] = store.enqueue([NewTask("job")])

    first = store.purge_finished(86_400, batch=2)
    second = store.purge_finished(86_400, batch=2)

    assert first is not None and second is not None
    assert (first["tasks"], second["tasks"]) == (2, 1)
    assert remaining(store) == {*recent, pending}
    assert not set(old) & remaining(store)


def test_url_settings_win_over_the_connection_defaults() -> None:
    url = sa.make_url(
        "postgresql+psycopg://u@h/db?keepalives_idle=30&options=-c%20statement_timeout%3D5s"
    )
    args = _postgres_connect_args(url)
    assert "keepalives_idle" not in args  # the URL's own value is used
    assert args["tcp_user_timeout"] == POSTGRES_CONNECT_OPTIONS["tcp_user_timeout"]
    assert args["options"].startswith("-c idle_in_transaction_session_timeout=")
    assert args["options"].endswith(" -c statement_timeout=5s")  # the last -c wins


def test_a_session_silent_inside_a_transaction_is_ended_and_its_locks_freed(
    postgres_url: str, postgres_store: Store
) -> None:
    # A process frozen (or cut off) mid-transaction: the server ends its session after the
    # idle-in-transaction timeout (here shortened in the URL), and its locks go with it.
    frozen = Store(f"{postgres_url}?options=-c%20idle_in_transaction_session_timeout%3D300")
    pid_query = select(func.pg_backend_pid())
    try:
        with frozen.engine.connect() as conn:
            conn.begin()
            assert conn.execute(MAINTENANCE_LOCK).scalar_one() is True
            backend = conn.execute(pid_query).scalar_one()

            def ended() -> bool:
                with postgres_store.engine.connect() as observer:
                    sessions = observer.execute(
                        sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                        {"pid": backend},
                    ).scalar_one()
                return sessions == 0

            wait_until(ended, 10, message="the silent session was never ended")
            assert postgres_store.purge_finished(86_400) is not None  # the lock is free
            # the frozen process wakes: a transient error, which callers already retry
            with pytest.raises(TRANSIENT_ERRORS):
                conn.execute(select(1))
        assert frozen.now()  # and a fresh connection works
    finally:
        frozen.dispose()


def test_a_node_booting_beside_busy_ones_takes_no_ddl_locks(
    postgres_url: str, postgres_store: Store
) -> None:
    impatient = Store(f"{postgres_url}?options=-c%20lock_timeout%3D500")
    try:
        with postgres_store.engine.connect() as busy_node, busy_node.begin():
            busy_node.execute(update(tasks).where(tasks.c.id == -1).values(priority=0))
            assert impatient.ensure_schema() == SCHEMA_VERSION  # no lock taken, no wait
            with pytest.raises(sa.exc.OperationalError, match="lock timeout"):
                impatient.init_schema()  # what boot did before: it waited on the busy node
    finally:
        impatient.dispose()


def test_ensure_schema_creates_a_missing_schema(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/fresh.db", create=True)
    try:
        assert store.ensure_schema() == SCHEMA_VERSION
        store.check_schema()  # raises unless the schema is there, at this version
    finally:
        store.dispose()
