"""Database outages: a busy pool loses its database for 12 s and carries on as if nothing
happened, on both engines.

PostgreSQL: a private server (never the shared one) is stopped with `pg_ctl stop -m fast`
and started again. SQLite: another process holds the file's write lock (see
`SqliteWriteLock` for why that is the strongest lock WAL lets anyone take). Two supervisors
(nodes alpha and beta) are cut off together; a long task with a timeout runs on alpha, its
handler returns during the outage and its timeout passes then too.

What must hold: no process crashes or is replaced, nobody rescues, kills or disowns on the
strength of heartbeats that could not be written, every task completes on its first
attempt with an empty error history, the long task's result is written once the database
is back, each process logs the outage once, nobody spins while waiting, and the pool is at
full throughput within 5 s of the database's return. Each engine's run takes about 22 s;
the handler-level test below about 6 s (SQLite's 5 s busy timeout, once).
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from structlog.testing import capture_logs

from tests.acceptance.measure_outage import (
    FULL_SPEED_SHARE,
    OUTAGE,
    PostgresStop,
    SqliteWriteLock,
    events_since,
    finish,
    processes,
    ride_out,
    start_pools,
)
from tests.acceptance.pool import Pool, is_running
from tests.private_postgres import PrivatePostgres, Unavailable
from workers import TaskQueue
from workers.context import TaskContext
from workers.store import SQLITE_BUSY_TIMEOUT_MS, NewTask, Store, supervisors, task_workers

pytestmark = pytest.mark.slow

StartPool = Callable[..., Pool]

FULL_SPEED_WITHIN = 5.0  # seconds from the database's return (the contract)
MAX_CPU_SHARE = 0.1  # of one core, per process, while the database is away (idle: ~0.01)
# Events that would mean someone acted on the outage as if processes or tasks were lost.
NEVER = (
    "task.rescued",
    "task.claim_lost",
    "task.retry_scheduled",
    "task.failed",
    "task.timed_out",
    "worker.lost",
    "worker.disowned",
    "worker.hung",
    "worker.exited",
    "worker.spawned",  # a replacement
    "supervisor.crash_loop",
)


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of our own, to stop and start (skipped where none can run)."""
    server: PrivatePostgres | None = None
    try:
        server = PrivatePostgres()
        server.start()
    except (Unavailable, RuntimeError, OSError) as error:
        if server is not None:
            server.destroy()
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL outage test: {error}")
        pytest.skip(f"no private PostgreSQL server for the outage test: {error}")
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(params=["sqlite", "postgresql"])
def outage(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[tuple[str, Any]]:
    """A fresh database with the schema, and the means to take it away and give it back."""
    cut: SqliteWriteLock | PostgresStop
    if request.param == "sqlite":
        url = sqlite_url
        cut = SqliteWriteLock(str(sa.make_url(url).database))
    else:
        server: PrivatePostgres = request.getfixturevalue("private_postgres")
        url = server.create_database()
        store = Store(url)
        store.init_schema()
        store.dispose()
        cut = PostgresStop(server)
    try:
        yield url, cut
    finally:
        cut.close()  # whatever happened, the database is back for the next test


def test_pool_rides_out_a_database_outage(start_pool: StartPool, outage: tuple[str, Any]) -> None:
    url, cut = outage
    pools = start_pools(start_pool, url)
    timeline = ride_out(pools, cut, OUTAGE)
    finish(timeline)
    alpha = pools["alpha"]

    # Nothing crashed, nothing was replaced: the same processes, all alive, all active rows.
    assert processes(pools) == timeline.pids_before
    assert all(is_running(pid) for pid in timeline.pids_before.values())
    with alpha.store.engine.connect() as conn:
        active = conn.execute(
            sa.select(task_workers.c.worker_pid).where(task_workers.c.is_active)
        ).scalars()
        statuses = conn.execute(sa.select(supervisors.c.status)).scalars().all()
    workers = [pid for name, pid in timeline.pids_before.items() if "/worker-" in name]
    assert sorted(active) == sorted(workers)  # none declared lost, none replaced
    assert statuses == ["running", "running"]

    # No task lost, none retried, none with an error from the outage.
    rows = alpha.task_rows()
    assert Counter(row["status"] for row in rows) == Counter({"completed": len(rows)})
    assert all(row["attempts"] == 1 and row["error_history"] == "[]" for row in rows)

    # The long task's handler returned during the outage; its result was written after it
    # (the worker logs task.completed once the write commits; on SQLite completed_at is when
    # the successful try began, which may be inside the outage, waiting on the lock).
    long_task = alpha.task(timeline.long_task)
    returned_at = long_task["started_at"].timestamp() + long_task["duration"]
    assert timeline.cut_at < returned_at < timeline.restore_at
    [written] = [
        event
        for event in alpha.events()
        if event.get("event") == "task.completed" and event.get("task_id") == timeline.long_task
    ]
    assert datetime.fromisoformat(written["timestamp"]).timestamp() >= timeline.restore_at
    holder = f"alpha/worker-{long_task['worker_id']}"
    assert json.loads(long_task["result"])["pid"] == timeline.pids_before[holder]

    # Each process logged the outage once and its end once; nobody acted on it.
    events = events_since(pools, timeline.cut_at)
    for name, pid in timeline.pids_before.items():
        mine = Counter(event["event"] for event in events if event.get("pid") == pid)
        assert mine["database.unavailable"] == 1, (name, mine)
        assert mine["database.recovered"] == 1, (name, mine)
    acted = Counter(event["event"] for event in events if event.get("event") in NEVER)
    assert not acted, acted

    # Nobody spun while the database was away.
    for name, share in timeline.cpu_share.items():
        assert share < MAX_CPU_SHARE, f"{name} used {share:.0%} of a core during the outage"

    # Full throughput again within 5 s of the database's return.
    full_speed = timeline.full_speed_after()
    print(
        f"\n{cut.__class__.__name__}: first completion {timeline.first_completion_after():.2f} s"
        f", full throughput ({FULL_SPEED_SHARE:.0%} of {timeline.baseline_rate:.1f} tasks/s)"
        f" {'never' if full_speed is None else f'{full_speed:.2f} s'} after the database's return"
    )
    assert full_speed is not None and full_speed <= FULL_SPEED_WITHIN


def test_handler_writes_wait_out_a_locked_database(sqlite_url: str) -> None:
    """In a handler, during an outage: a progress report is kept for later instead of failing
    the task, a log line waits until it is written, and neither wait counts against the
    task's timeout (the context holds it and hands back the time the database was away)."""
    store = Store(sqlite_url)
    supervisor = store.register_supervisor("node", os.getpid(), 0.0, 1, "test")
    worker = store.register_worker(supervisor, "node", [])
    store.enqueue([NewTask("job")])
    [claim] = store.claim_tasks(worker, [])
    held: list[float] = []  # what the context handed back on each release of the timeout
    lock = SqliteWriteLock(str(sa.make_url(sqlite_url).database))
    release = threading.Timer(1.0, lock.restore)
    with capture_logs() as events:
        ctx = TaskContext(
            store,
            claim,
            threading.Event(),
            log=structlog.get_logger(),
            hold_timeout=lambda: held.append,
        )
        lock.cut()
        try:
            ctx.progress(40, step="locked out")  # gives up after SQLite's busy timeout
            release.start()
            ctx.log("info", "written once the lock is gone")
        finally:
            release.join()
            lock.close()

    busy_timeout = SQLITE_BUSY_TIMEOUT_MS / 1000
    assert held[0] >= busy_timeout - 0.1  # the progress write's wait, handed back
    assert 0.5 <= held[1] < busy_timeout  # the log line waited for the release, not longer
    assert [e["event"] for e in events] == ["database.unavailable", "database.recovered"]
    kept = ctx.take_unwritten_progress()
    assert kept is not None and kept.percentage == 40  # for the task's final write
    row = store.get_task(claim.id)
    assert row["progress_percentage"] is None
    assert [entry["message"] for entry in json.loads(row["execution_log"])] == [
        "written once the lock is gone"
    ]
    store.dispose()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_an_enqueue_after_a_server_restart_takes_a_new_connection(
    private_postgres: PrivatePostgres, mode: str
) -> None:
    """The pool's connections died with the server: the next enqueue replaces its connection
    at checkout (no round trip is spent to find that out) rather than fail."""
    url = private_postgres.create_database()
    store = Store(url)
    store.init_schema()
    queue = TaskQueue(url, store=store)
    try:
        before = queue.enqueue("t", {"n": 1})  # its connection goes back to the pool
        private_postgres.stop(mode)  # fast: the server says goodbye; immediate: a crash
        private_postgres.start()
        after = queue.enqueue("t", {"n": 2})
        assert sorted(task["id"] for task in store.list_tasks()) == [before, after]
        assert [store.get_task(i)["payload"] for i in (before, after)] == ['{"n":1}', '{"n":2}']
    finally:
        store.dispose()
