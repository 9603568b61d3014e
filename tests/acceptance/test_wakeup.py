"""Idle workers start an enqueued task at once, not after the poll interval.

Every pool here polls every 30 s, so a task that starts within a second or two was started by
the wake-up, not by a poll. The supervisor logs `wake.poked` (debug) for every poke.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.acceptance.pool import Pool
from tests.helpers import wait_until
from workers import wake
from workers.store import UnknownTask

SLOW_POLL = {"--poll-interval": "30"}
AT_ONCE = 1.5  # seconds: "at once" on a loaded 2-core machine, against a 30 s poll


@pytest.fixture(autouse=True)
def debug_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKHERD_LOG_LEVEL", "debug")  # for the supervisor's wake.poked


def ready(pool: Pool, workers: int) -> None:
    """Wait until the pool listens for enqueues and its workers have booted and are idle."""
    wait_until(lambda: has_event(pool, "wake.listening"), 20, message="never listened")
    probe = pool.queue.enqueue("echo_async", {}, queue="alpha")
    wait_until(lambda: pool.task(probe)["status"] == "completed", 20)
    started = lambda: count(pool, "Background worker started") == workers  # noqa: E731
    wait_until(started, 20, message="workers never booted")


def has_event(pool: Pool, name: str) -> bool:
    return count(pool, name) > 0


def count(pool: Pool, name: str) -> int:
    return sum(1 for event in pool.events() if event.get("event") == name)


def pokes(pool: Pool) -> int:
    """Workers poked so far because tasks were announced (not the look after a (re)open)."""
    return sum(
        len(event["workers"])
        for event in pool.events()
        if event.get("event") == "wake.poked" and event.get("why") == "announced"
    )


def starts_within(pool: Pool, task_id: int, seconds: float) -> float:
    """Wait until the task completes; fail unless that took under `seconds`. Returns it."""
    began = time.monotonic()
    wait_until(lambda: pool.task(task_id)["status"] == "completed", 10, interval=0.005)
    took = time.monotonic() - began
    assert took < seconds, f"task {task_id} took {took:.2f} s: woken by a poll, not at once"
    return took


def test_idle_pool_starts_a_task_at_once_for_its_own_queues_and_stops_at_once(
    database_url: str, start_pool: Callable[..., Pool]
) -> None:
    options = {**SLOW_POLL, "--graceful-timeout": "30"}  # no kill can hide a slow stop
    pool = start_pool(database_url, workers=2, options=options, extra=["-q", "alpha"])
    ready(pool, 2)
    before = pokes(pool)

    other = pool.queue.enqueue("echo_async", {}, queue="beta")  # not served here
    ours = pool.queue.enqueue("echo_async", {}, queue="alpha")
    starts_within(pool, ours, AT_ONCE)
    assert pokes(pool) - before == 1  # one task, one worker: beta woke nobody
    assert pool.task(other)["status"] == "pending"

    began = time.monotonic()
    pool.signal(signal.SIGTERM)
    assert pool.wait(timeout=20) == 0
    assert time.monotonic() - began < 5  # idle workers left at once, not after their poll
    assert count(pool, "worker.killed") == 0


def test_a_delayed_task_starts_when_due_though_idle_workers_no_longer_poll(
    database_url: str, start_pool: Callable[..., Pool]
) -> None:
    """With wake-ups on, idle workers look by themselves only every IDLE_WORKER_POLL (30 s);
    the supervisor looks for them every poll interval, and pokes one for the task come due."""
    pool = start_pool(database_url, workers=2, options={"--poll-interval": "0.5"})
    ready(pool, 2)
    delay = 1.0
    task_id = pool.queue.enqueue("echo_async", {}, delay=delay)
    starts_within(pool, task_id, delay + 2 * AT_ONCE)
    looks = [e for e in pool.events() if e.get("event") == "wake.poked" and e.get("why") == "look"]
    assert looks and looks[-1]["tasks"] == 1


def test_task_enqueued_in_callers_transaction_starts_after_commit_and_never_before(
    database_url: str, start_pool: Callable[..., Pool], tmp_path: Path
) -> None:
    pool = start_pool(database_url, workers=2, options=SLOW_POLL)
    ready(pool, 2)
    marker = tmp_path / "ran"
    user = sa.create_engine(database_url)  # the application's own engine
    try:
        with user.connect() as conn:
            transaction = conn.begin()
            held = pool.queue.enqueue("record", {"file": str(marker)}, connection=conn)
            if user.dialect.name == "postgresql":
                # The pool hears and runs a task enqueued after ours, while ours waits unseen.
                canary = pool.queue.enqueue("echo_async", {})
                starts_within(pool, canary, AT_ONCE)
            with pytest.raises(UnknownTask):
                pool.task(held)
            assert not marker.exists()
            poked = pokes(pool)
            transaction.commit()
        starts_within(pool, held, AT_ONCE)
        assert pokes(pool) > poked
        assert marker.read_text().split() == [str(held)]
    finally:
        user.dispose()


def listener_backends(pool: Pool) -> list[int]:
    with pool.store.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name LIKE 'taskherd listener%'"
            )
        )
        return [int(pid) for pid in rows.scalars()]


def test_postgres_listener_killed_reconnects_and_wakes_again(
    postgres_url: str, start_pool: Callable[..., Pool]
) -> None:
    pool = start_pool(postgres_url, workers=2, options=SLOW_POLL)
    ready(pool, 2)
    [first] = listener_backends(pool)
    with pool.store.engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
    wait_until(lambda: has_event(pool, "wake.unavailable"), 10)
    during = pool.queue.enqueue("echo_async", {})  # may go unheard: found when it reconnects
    wait_until(lambda: has_event(pool, "wake.restored"), 10)
    [second] = listener_backends(pool)
    assert second != first
    wait_until(lambda: pool.task(during)["status"] == "completed", 5)

    after = pool.queue.enqueue("echo_async", {})
    starts_within(pool, after, AT_ONCE)
    assert count(pool, "wake.unavailable") == 1
    assert pool.process.poll() is None


def test_sqlite_wake_dir_removed_falls_back_to_polling_then_comes_back(
    sqlite_url: str, start_pool: Callable[..., Pool]
) -> None:
    pool = start_pool(sqlite_url, workers=2, options={"--poll-interval": "1"})
    ready(pool, 2)
    directory = wake.wake_dir(str(pool.store.url.database))
    shutil.rmtree(directory)
    Path(directory).write_text("in the way")  # the supervisor cannot make it again
    wait_until(lambda: has_event(pool, "wake.unavailable"), 10)

    poked = pokes(pool)
    polled = pool.queue.enqueue("echo_async", {})  # no socket to ring: only a poll finds it
    wait_until(lambda: pool.task(polled)["status"] == "completed", 10)
    assert pokes(pool) == poked

    os.remove(directory)
    wait_until(lambda: has_event(pool, "wake.restored"), 10)
    assert os.listdir(directory)  # our socket is back
    woken = pool.queue.enqueue("echo_async", {})
    wait_until(lambda: pool.task(woken)["status"] == "completed", 10)
    wait_until(lambda: pokes(pool) == poked + 1, 5, message="the wake-up did not come back")
    assert pool.process.poll() is None
