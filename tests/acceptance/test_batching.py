"""Batch claims keep every guarantee: order, fencing, attempts, and no task held up.

A worker claims one task, then (while its tasks end within workers.worker.FAST_TASK) up to
its engine's cap at a time: 1, 2, 4, 8, 16, ... So the 18th task of a fresh worker's run is
the third of a batch of sixteen: a task there that stops its own worker leaves thirteen
claimed, unstarted.
"""

from __future__ import annotations

import itertools
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.acceptance.pool import Pool
from tests.helpers import wait_until
from workers.store import tasks
from workers.worker import MAX_BATCH_POSTGRES, MAX_BATCH_SQLITE

StartPool = Callable[..., Pool]

# Tasks per fresh worker's run, and the index of the signalling task in it: the 18th
# (third of a batch of 16), or the 191st (the 64th of a batch of up to 128, SQLite's cap).
SEGMENTS = {"small batch": (30, 17), "big batch": (260, 190)}


def _segments(
    pool: Pool, tmp_path: Path, signum: int, count: int, size: tuple[int, int]
) -> tuple[list[int], list[int]]:
    """Enqueue, in one transaction, count segments of quick `record` tasks, each with a
    signal_self task at its signal index; return the record task ids and the signalling
    ones."""
    records, signallers = [], []
    length, signal_at = size
    with pool.store.engine.begin() as conn:
        for segment in range(count):
            for index in range(length):
                if index == signal_at:
                    marker = tmp_path / f"signalled-{segment}"
                    payload: dict[str, Any] = {"signal": int(signum), "marker": str(marker)}
                    signallers.append(pool.queue.enqueue("signal_self", payload, connection=conn))
                else:
                    record = {"file": str(tmp_path / "ran")}
                    records.append(pool.queue.enqueue("record", record, connection=conn))
    return records, signallers


@pytest.mark.parametrize("size", SEGMENTS.values(), ids=SEGMENTS.keys())
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_unstarted_tasks_of_a_stopped_worker_get_their_attempt_back(
    start_pool: StartPool, tmp_path: Path, signum: signal.Signals, size: tuple[int, int]
) -> None:
    """SIGKILL mid-batch: the started task counts its attempt, the supervisor gives the
    unstarted ones theirs back. SIGTERM: the worker releases them itself before it exits."""
    pool = start_pool(workers=1)
    wait_until(lambda: len(pool.active_workers()) == 1, 15)
    records, signallers = _segments(pool, tmp_path, signum, count=2, size=size)
    every = records + signallers
    wait_until(lambda: all(pool.task(i)["status"] == "completed" for i in every), 60)

    # Every quick task ran exactly once, on one attempt: the ones finished before the kill
    # were written by the supervisor from the worker's journal, those never started were
    # given back without counting an attempt.
    runs = Counter(int(line) for line in (tmp_path / "ran").read_text().split())
    assert {i: runs[i] for i in records} == dict.fromkeys(records, 1)
    assert {i: pool.task(i)["attempts"] for i in records} == dict.fromkeys(records, 1)
    expected = 2 if signum == signal.SIGKILL else 1  # a kill counts the attempt it cut short
    assert [pool.task(i)["attempts"] for i in signallers] == [expected] * len(signallers)
    event = "task.released" if signum == signal.SIGKILL else "worker.stopping"
    released = [e["released"] for e in pool.events() if e.get("event") == event]
    assert any(released), f"no batch was cut short: no {event} event with tasks"
    if size == SEGMENTS["big batch"]:  # past what a batch of sixteen can leave
        assert max(map(len, released)) > 16, [len(ids) for ids in released]
    for ids in released:  # (a batch may hold a signaller rescued earlier, run once more)
        assert set(ids) <= set(every) and all(runs[i] == 1 for i in ids if i in records)


def test_order_holds_under_batch_claims(start_pool: StartPool, tmp_path: Path) -> None:
    """One worker, batch claims: tasks still run by priority, then age, then id."""
    pool = start_pool(workers=1, options={"--poll-interval": "30"})
    wait_until(lambda: len(pool.active_workers()) == 1, 15)
    record = {"file": str(tmp_path / "ran")}
    gate = pool.queue.enqueue("sleep", {"seconds": 1})  # holds the worker while we enqueue
    pool.running_task(gate)
    low = [pool.queue.enqueue("record", record, priority=0) for _ in range(30)]
    high = [pool.queue.enqueue("record", record, priority=5) for _ in range(30)]
    wait_until(lambda: all(pool.task(i)["status"] == "completed" for i in low + high), 30)
    assert [int(line) for line in (tmp_path / "ran").read_text().split()] == high + low


def test_a_slow_task_does_not_hold_up_its_batch_while_another_worker_is_idle(
    start_pool: StartPool, tmp_path: Path
) -> None:
    """A batch with a slow task followed by quick ones: the quick ones run on the other
    worker long before the slow one ends (its worker gives them back after SLOW_TASK).

    The other worker is held busy while the first warms up to batches of sixteen on 15
    quick tasks (1 + 2 + 4 + 8), so the slow task opens its next batch, fifteen quick ones
    behind it; then the other worker is let go, idle, to take the fifteen given back."""
    pool = start_pool(workers=2)
    wait_until(lambda: len(pool.active_workers()) == 2, 15)
    record = {"file": str(tmp_path / "ran")}
    for round_ in range(5):  # a quick task slower than FAST_TASK on a loaded machine resets
        gate = tmp_path / f"gate-{round_}"  # the batch size: then try again
        holder = pool.queue.enqueue("hold", {"until": str(gate)})
        pool.running_task(holder)
        with pool.store.engine.begin() as conn:  # one commit: the worker sees them all at once
            quick = [pool.queue.enqueue("record", record, connection=conn) for _ in range(15)]
            slow = pool.queue.enqueue("sleep", {"seconds": 3}, connection=conn)
            quick += [pool.queue.enqueue("record", record, connection=conn) for _ in range(20)]
        pool.running_task(slow)
        gate.touch()

        def quick_done(ids: list[int] = quick) -> bool:
            return all(pool.task(i)["status"] == "completed" for i in ids)

        wait_until(quick_done, 2.5, message="the quick tasks waited behind the slow one")
        assert pool.task(slow)["status"] == "running"  # the quick ones did not wait for it
        assert all(pool.task(i)["attempts"] == 1 for i in quick)
        if any(e.get("event") == "worker.batch_released" for e in pool.events()):
            break
        wait_until(lambda slow=slow: pool.task(slow)["status"] == "completed", 10)
    else:
        pytest.fail("no slow task was ever batched with quick ones: the guard went untested")
    released = [e for e in pool.events() if e.get("event") == "worker.batch_released"]
    assert all(entry["released"] for entry in released)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_quick_tasks_are_claimed_up_to_the_engines_cap_at_once(
    start_pool: StartPool, tmp_path: Path, request: pytest.FixtureRequest, engine: str
) -> None:
    """Batches of quick tasks start at one, at most double from one round trip to the next,
    and grow to the engine's cap (SQLite 128, PostgreSQL 32), never past it. The tasks of
    one claim share its started_at."""
    fixture = "sqlite_url" if engine == "sqlite" else "postgres_url"
    pool = start_pool(request.getfixturevalue(fixture), workers=1)
    wait_until(lambda: len(pool.active_workers()) == 1, 15)
    record = {"file": str(tmp_path / "ran")}
    ids = pool.queue.enqueue_many("record", [record] * 1500)
    wait_until(lambda: all(pool.task(i)["status"] == "completed" for i in ids), 30)
    with pool.store.engine.connect() as conn:
        claimed = sa.select(tasks.c.started_at).where(tasks.c.id.in_(ids)).order_by(tasks.c.id)
        batches = list(Counter(started_at for (started_at,) in conn.execute(claimed)).values())
    cap = MAX_BATCH_SQLITE if engine == "sqlite" else MAX_BATCH_POSTGRES
    assert batches[0] == 1 and max(batches) == cap
    assert all(size <= 2 * before for before, size in itertools.pairwise(batches)), batches
    assert sorted(int(line) for line in (tmp_path / "ran").read_text().split()) == ids
