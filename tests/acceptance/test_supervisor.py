"""The pool under real signals: killed, stopped and orphaned workers, drains, dead nodes.

Each test starts `python -m supervisor run` as a subprocess, signals PIDs read from
`task_workers`, and waits on rows with deadlines. Deadlines tell behaviours apart
("at once" vs "after a timeout") with margins for a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable

import sqlalchemy as sa

from tests.acceptance.pool import Pool, is_running
from tests.helpers import wait_until
from workers.store import NewTask, Store, task_workers

StartPool = Callable[..., Pool]


def test_kill_worker_while_task_in_flight(start_pool: StartPool, database_url: str) -> None:
    pool = start_pool(database_url, workers=2)
    task_id = pool.queue.enqueue("sleep", {"seconds": 30})
    row = pool.running_task(task_id)
    victim = row["worker_id"]
    pid = pool.active_workers()[victim]

    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def rescued() -> bool:
        now = pool.task(task_id)
        return now["status"] == "pending" or (
            now["status"] == "running" and now["worker_id"] != victim
        )

    wait_until(rescued, 1.0, interval=0.005, message="the task was not rescued within 1 s")
    wait_until(
        lambda: len(set(pool.active_workers()) - {victim}) == 2,
        max(0.0, killed_at + 1.0 - time.monotonic()),
        interval=0.005,
        message="no replacement registered within 1 s of the kill",
    )
    row = pool.task(task_id)
    assert row["attempts"] >= 1
    history = json.loads(row["error_history"])
    assert history[0]["attempt"] == 1
    assert history[0]["worker_id"] == victim
    assert "SIGKILL" in history[0]["error"]
    wait_until(lambda: pool.task(task_id)["attempts"] == 2, 5, message="not re-claimed")
    exited = [e for e in pool.events() if e.get("event") == "worker.exited"]
    assert exited[0]["worker_id"] == victim and exited[0]["exit_code"] == -9


def test_a_rescued_task_wakes_an_idle_worker_at_once(
    start_pool: StartPool, database_url: str
) -> None:
    """With a 30 s poll, the rescued task runs again on the idle worker, not on the
    replacement that claims as soon as it has booted."""
    pool = start_pool(database_url, workers=2, options={"--poll-interval": "30"})
    workers = set(wait_until(lambda: (w := pool.active_workers()) and len(w) == 2 and w, 15))
    task_id = pool.queue.enqueue("sleep", {"seconds": 30})
    victim = pool.running_task(task_id)["worker_id"]
    [idle] = workers - {victim}
    os.kill(pool.active_workers()[victim], signal.SIGKILL)

    wait_until(lambda: pool.task(task_id)["attempts"] == 2, 10, message="never ran again")
    assert pool.task(task_id)["worker_id"] == idle


def test_stopped_worker_is_killed_and_replaced(start_pool: StartPool) -> None:
    worker_timeout = 2.0
    # the heartbeat timeout is far off: only the worker timeout can explain a rescue in time
    options = {"--worker-timeout": str(worker_timeout), "--heartbeat-timeout": "30"}
    pool = start_pool(workers=1, options=options)
    task_id = pool.queue.enqueue("sleep", {"seconds": 30})
    row = pool.running_task(task_id)
    victim = row["worker_id"]
    pid = pool.active_workers()[victim]

    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    wait_until(
        lambda: (
            (victim not in pool.active_workers() and pool.task(task_id)["worker_id"] != victim)
            or pool.task(task_id)["status"] == "pending"
        ),
        worker_timeout + 3.0,  # a tick (1 s), the stack wait, the rescue: on a loaded machine
        message="the stopped worker's task was not rescued",
    )
    elapsed = time.monotonic() - stopped_at
    assert elapsed >= worker_timeout - 0.3, "killed before the worker timeout"
    assert not is_running(pid)
    wait_until(lambda: len(pool.active_workers()) == 1, 2, message="no replacement")
    with pool.store.engine.connect() as conn:
        reason = conn.execute(
            sa.select(task_workers.c.exit_reason).where(task_workers.c.id == victim)
        ).scalar_one()
    assert "unresponsive" in reason
    error = json.loads(pool.task(task_id)["error_history"])[0]["error"]
    assert "unresponsive" in error
    assert "no stack: the process did not answer" in error  # a stopped process cannot


def test_supervisor_sigkill_leaves_no_orphans(start_pool: StartPool) -> None:
    first = start_pool(workers=2)
    task_id = first.queue.enqueue("sleep", {"seconds": 30})
    first.running_task(task_id)
    pids = list(first.active_workers().values())
    assert len(pids) == 2

    first.signal(signal.SIGKILL)
    first.wait(5)
    killed_at = time.monotonic()
    wait_until(
        lambda: not any(is_running(pid) for pid in pids),
        2.0,
        message="orphaned workers kept running",
    )
    assert time.monotonic() - killed_at <= 2.0
    assert first.task(task_id)["status"] == "running"  # nobody has rescued it yet

    started_at = time.monotonic()
    second = start_pool(workers=1)
    wait_until(
        lambda: (
            second.task(task_id)["attempts"] == 2 or second.task(task_id)["status"] == "pending"
        ),
        2.0 + 1.0,  # interpreter start-up on a loaded machine, then the boot rescue
        interval=0.01,
        message="the new supervisor did not rescue the orphaned task",
    )
    assert time.monotonic() - started_at <= 3.0
    history = json.loads(second.task(task_id)["error_history"])
    assert "lost with its supervisor" in history[0]["error"]
    events = [e["event"] for e in second.events()]
    assert "supervisor.predecessor_dead" in events


def test_sigterm_lets_running_task_finish(start_pool: StartPool, database_url: str) -> None:
    pool = start_pool(database_url, workers=2, options={"--graceful-timeout": "10"})
    task_id = pool.queue.enqueue("sleep", {"seconds": 1.5})
    pool.running_task(task_id)
    wait_until(lambda: count_events(pool, "Background worker started") == 2, 10)

    pool.signal(signal.SIGTERM)
    assert pool.wait(15) == 0
    row = pool.task(task_id)
    assert row["status"] == "completed"
    assert row["attempts"] == 1
    assert_all_rows_inactive(pool.store)
    assert count_events(pool, "Background worker stopped") == 2
    stopped = [e for e in pool.events() if e["event"] == "Background worker stopped"]
    assert all(e["worker_id"] and e["pid"] for e in stopped)
    assert count_events(pool, "supervisor.stopped") == 1


def test_sigterm_kills_task_past_graceful_timeout(start_pool: StartPool) -> None:
    pool = start_pool(workers=1, options={"--graceful-timeout": "1"})
    task_id = pool.queue.enqueue("sleep", {"seconds": 60})
    pool.running_task(task_id)

    stopped_at = time.monotonic()
    pool.signal(signal.SIGTERM)
    assert pool.wait(15) == 0
    assert time.monotonic() - stopped_at < 10
    row = pool.task(task_id)
    assert row["status"] == "pending"
    assert row["attempts"] == 0  # the interrupted attempt is given back
    assert "graceful timeout" in row["last_error"]
    assert_all_rows_inactive(pool.store)


def test_second_sigint_stops_at_once(start_pool: StartPool) -> None:
    pool = start_pool(workers=1, options={"--graceful-timeout": "60"})
    task_id = pool.queue.enqueue("sleep", {"seconds": 60})
    pool.running_task(task_id)

    pool.signal(signal.SIGINT)
    wait_until(lambda: any(e.get("event") == "supervisor.stopping" for e in pool.events()), 5)
    pool.signal(signal.SIGINT)
    assert pool.wait(10) == 0  # far sooner than the 60 s graceful timeout
    row = pool.task(task_id)
    assert row["status"] == "pending"
    assert_all_rows_inactive(pool.store)


def test_stale_node_tasks_rescued_after_heartbeat_timeout(
    start_pool: StartPool, sqlite_url: str
) -> None:
    heartbeat_timeout = 3.0
    ghost = Store(sqlite_url)
    ghost_supervisor = ghost.register_supervisor("ghost", 999_999, 0.0, 1, "0")
    ghost_worker = ghost.register_worker(ghost_supervisor, "ghost", [])
    task_id = ghost.enqueue([NewTask("sleep", '{"seconds": 0.1}')])[0]
    assert [c.id for c in ghost.claim_tasks(ghost_worker, [])] == [task_id]
    silent_since = time.monotonic()  # the ghost's last heartbeat is its registration

    pool = start_pool(workers=1, options={"--heartbeat-timeout": str(heartbeat_timeout)})
    wait_until(lambda: pool.task(task_id)["status"] == "completed", heartbeat_timeout + 5)
    with pool.store.engine.connect() as conn:
        row = (
            conn.execute(sa.select(task_workers).where(task_workers.c.id == ghost_worker))
            .mappings()
            .one()
        )
    assert not row["is_active"]
    rescued = [e for e in pool.events() if e.get("event") == "task.rescued"]
    assert rescued and rescued[0]["task_id"] == task_id
    assert time.monotonic() - silent_since >= heartbeat_timeout
    history = json.loads(pool.task(task_id)["error_history"])
    assert "no heartbeat" in history[0]["error"]
    ghost.dispose()


def count_events(pool: Pool, name: str) -> int:
    return sum(1 for event in pool.events() if event.get("event") == name)


def assert_all_rows_inactive(store: Store) -> None:
    with store.engine.connect() as conn:
        active = conn.execute(
            sa.select(sa.func.count()).select_from(task_workers).where(task_workers.c.is_active)
        ).scalar_one()
        statuses = conn.execute(sa.text("SELECT status FROM supervisors")).scalars().all()
    assert active == 0
    assert set(statuses) == {"stopped"}
