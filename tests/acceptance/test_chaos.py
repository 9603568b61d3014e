"""Chaos: workers killed and frozen at random while 2,000 tasks go through.

At the end every task is completed, none running or pending, each executed at
least once (counted by its side effect), and duplicate executions do not exceed
the kills (a worker killed after its side effect but before its completion write
runs that task twice; nothing else may).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from tests.acceptance.pool import Pool
from workers.store import tasks

StartPool = Callable[..., Pool]
TASKS = 2_000
WORKERS = 4
EVERY = 0.3  # seconds between two blows
DEADLINE = 60.0


def busy_worker_pids(pool: Pool) -> list[int]:
    with pool.store.engine.connect() as conn:
        holders = set(
            conn.execute(
                sa.select(tasks.c.worker_id).where(tasks.c.status == "running").distinct()
            ).scalars()
        )
    active = pool.active_workers()
    return [pid for worker_id, pid in active.items() if worker_id in holders]


def status_counts(pool: Pool) -> Counter[str]:
    with pool.store.engine.connect() as conn:
        rows = conn.execute(sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status))
        return Counter({status: count for status, count in rows})


def run_chaos(pool: Pool, log: Path, freeze: bool) -> dict[str, int]:
    rng = random.Random(2026)
    # 0-8 ms of work each: fast ones run in batches, slower ones alone, and the run lasts
    # long enough (a few seconds) for the blows to land
    payloads = [{"file": str(log), "work_ms": rng.randint(0, 8)} for _ in range(TASKS)]
    ids = pool.queue.enqueue_many("record", payloads, max_retries=50)
    kills = stops = 0
    frozen: list[int] = []
    deadline = time.monotonic() + DEADLINE
    while True:
        for pid in frozen:  # a freeze lasts one beat, well under the worker timeout
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        frozen.clear()
        if status_counts(pool)["completed"] == TASKS:
            break
        assert time.monotonic() < deadline, f"not done in {DEADLINE} s: {status_counts(pool)}"
        victims = busy_worker_pids(pool)
        if victims:
            victim = rng.choice(victims)
            with contextlib.suppress(ProcessLookupError):
                if freeze and rng.random() < 0.5:
                    os.kill(victim, signal.SIGSTOP)
                    frozen.append(victim)
                    stops += 1
                else:
                    os.kill(victim, signal.SIGKILL)
                    kills += 1
        time.sleep(EVERY)  # the chaos clock, not a synchronisation

    executions = Counter(int(line) for line in log.read_text().split())
    counts = status_counts(pool)
    assert counts == Counter({"completed": TASKS}), counts  # none running, pending or lost
    assert set(executions) == set(ids)  # each executed at least once
    duplicates = sum(executions.values()) - TASKS
    assert duplicates <= kills, (duplicates, kills)
    return {"tasks": TASKS, "kills": kills, "stops": stops, "duplicates": duplicates}


def test_chaos_sigkill(start_pool: StartPool, tmp_path: Path) -> None:
    pool = start_pool(workers=WORKERS)
    figures = run_chaos(pool, tmp_path / "executions.log", freeze=False)
    print("chaos sigkill:", figures)
    assert figures["kills"] > 0


def test_chaos_sigkill_and_sigstop(start_pool: StartPool, tmp_path: Path) -> None:
    pool = start_pool(workers=WORKERS)
    figures = run_chaos(pool, tmp_path / "executions.log", freeze=True)
    print("chaos sigkill+sigstop:", figures)
    assert figures["kills"] > 0 and figures["stops"] > 0
