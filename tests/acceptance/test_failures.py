"""Tasks that kill their worker, and tasks that run past their timeout."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from tests.acceptance.pool import Pool
from tests.helpers import wait_until

StartPool = Callable[..., Pool]

DEATHS = {
    "sigkill": "killed by SIGKILL",
    "exit": "exited with code 7",
    "segfault": "killed by SIGSEGV",
}


def test_poison_tasks_fail_after_their_attempts_and_the_pool_serves_on(
    start_pool: StartPool,
) -> None:
    pool = start_pool(workers=2)
    poisons = {how: pool.queue.enqueue("poison", {"how": how}, max_retries=2) for how in DEATHS}
    wait_until(lambda: all(pool.task(i)["status"] == "failed" for i in poisons.values()), 30)

    for how, task_id in poisons.items():
        row = pool.task(task_id)
        assert row["attempts"] == 3
        history = json.loads(row["error_history"])
        assert [entry["attempt"] for entry in history] == [1, 2, 3]
        assert all(DEATHS[how] in entry["error"] for entry in history), history
    wait_until(lambda: len(pool.active_workers()) == 2, 5, message="the pool did not stay at 2")
    healthy = pool.queue.enqueue("sleep", {"seconds": 0.01})
    wait_until(lambda: pool.task(healthy)["status"] == "completed", 10)
    assert not any(e.get("event") == "supervisor.crash_loop" for e in pool.events())


def test_task_past_its_timeout_is_killed_and_retried_by_policy(start_pool: StartPool) -> None:
    retries = 1
    pool = start_pool(workers=1)
    task_id = pool.queue.enqueue("sleep", {"seconds": 60}, timeout=1, max_retries=retries)
    started = time.monotonic()
    wait_until(lambda: pool.task(task_id)["status"] == "failed", 15)
    elapsed = time.monotonic() - started

    row = pool.task(task_id)
    assert row["attempts"] == retries + 1
    history = json.loads(row["error_history"])
    assert len(history) == retries + 1
    assert all("timed out after 1 s" in entry["error"] for entry in history)
    # the operator sees where it was: every thread's stack, the handler's frame among them
    assert all("stack of every thread" in entry["error"] for entry in history)
    assert all('sample_tasks.py", line' in entry["error"] for entry in history), history[0]
    assert elapsed >= (retries + 1) * 1.0  # each attempt ran its full second
    timed_out = [e for e in pool.events() if e.get("event") == "task.timed_out"]
    assert [e["task_id"] for e in timed_out] == [task_id] * (retries + 1)
    wait_until(lambda: len(pool.active_workers()) == 1, 5, message="no replacement worker")
