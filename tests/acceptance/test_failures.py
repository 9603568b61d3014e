"""Tasks that kill their worker, and tasks that run past their timeout."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

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


def memory_cgroup(tmp_name: str, limit_bytes: int) -> Path | None:
    """A child of this process's memory cgroup with a hard limit (cgroup v1 or v2), or None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            base, limit_file = (
                Path("/sys/fs/cgroup/memory") / path.lstrip("/"),
                "memory.limit_in_bytes",
            )
            break
    else:  # v2: one unified hierarchy
        path = Path("/proc/self/cgroup").read_text().strip().rpartition(":")[2]
        base, limit_file = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
    child = base / tmp_name
    try:
        child.mkdir()
        (child / limit_file).write_text(str(limit_bytes))
    except OSError:
        with contextlib.suppress(OSError):
            child.rmdir()
        return None
    return child


def test_a_worker_killed_by_the_oom_killer_is_named_so(start_pool: StartPool) -> None:
    cgroup = memory_cgroup(f"taskherd-oom-{os.getpid()}", 200 * 2**20)
    if cgroup is None:
        if os.environ.get("CI"):
            pytest.fail("cannot create a memory cgroup to run the OOM killer in")
        pytest.skip("cannot create a memory cgroup here (needs root and a memory controller)")
    try:
        pool = start_pool(workers=1)
        procs = str(cgroup / "cgroup.procs")
        task_id = pool.queue.enqueue("hog", {"cgroup_procs": procs}, max_retries=0)
        wait_until(lambda: pool.task(task_id)["status"] == "failed", 60)
        [entry] = json.loads(pool.task(task_id)["error_history"])
        assert "killed by the kernel's OOM killer (SIGKILL): out of memory" in entry["error"]
        exited = [e for e in pool.events() if e.get("event") == "worker.exited"]
        assert "OOM killer" in exited[0]["exit_reason"]
        wait_until(lambda: len(pool.active_workers()) == 1, 10, message="no replacement worker")
    finally:
        wait_until(lambda: not (cgroup / "cgroup.procs").read_text().strip(), 10)
        cgroup.rmdir()
