"""SIGTTIN / SIGTTOU change the pool's size; SIGHUP reloads the configuration and replaces the
workers one by one. A running task is never dropped: the worker leaving finishes it first.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

from tests.acceptance.pool import Pool
from tests.helpers import wait_until
from workers.store import supervisors

StartPool = Callable[..., Pool]


def desired_workers(pool: Pool) -> int:
    with pool.store.engine.connect() as conn:
        return int(conn.execute(supervisors.select()).mappings().one()["desired_workers"])


def finished_once(pool: Pool, task_id: int) -> bool:
    """Completed on its first attempt, with no error on the way."""
    row = pool.task(task_id)
    return (
        row["status"] == "completed"
        and row["attempts"] == 1
        and json.loads(row["error_history"]) == []
    )


def test_ttin_adds_a_worker_and_ttou_removes_one_after_its_task(start_pool: StartPool) -> None:
    pool = start_pool(workers=2)
    wait_until(lambda: len(pool.active_workers()) == 2, 15)

    pool.signal(signal.SIGTTIN)
    wait_until(lambda: len(pool.active_workers()) == 3, 15, message="SIGTTIN added no worker")
    wait_until(lambda: desired_workers(pool) == 3, 5)

    busy = [pool.queue.enqueue("sleep", {"seconds": 1.5}) for _ in range(3)]
    wait_until(lambda: all(pool.task(i)["status"] == "running" for i in busy), 15)
    for size in (2, 1):  # one at a time: the kernel merges a signal sent twice before handled
        pool.signal(signal.SIGTTOU)
        wait_until(lambda size=size: desired_workers(pool) == size, 5)
    wait_until(lambda: len(pool.active_workers()) == 1, 20, message="SIGTTOU removed none")
    wait_until(lambda: all(finished_once(pool, i) for i in busy), 15)

    pool.signal(signal.SIGTTOU)  # never below one worker
    extra = pool.queue.enqueue("sleep", {"seconds": 0.01})
    wait_until(lambda: finished_once(pool, extra), 15)
    assert len(pool.active_workers()) == 1
    exits = [e for e in pool.events() if e.get("event") == "worker.exited"]
    assert [e["exit_reason"] for e in exits] == ["exited cleanly"] * 2


def test_hup_reloads_the_config_and_replaces_every_worker_without_dropping_a_task(
    start_pool: StartPool, tmp_path: Path
) -> None:
    config = tmp_path / "taskherd.toml"
    config.write_text("workers = 2\n")
    pool = start_pool(workers=None, env={"TASKHERD_CONFIG": str(config)})
    first = set(wait_until(lambda: (w := pool.active_workers()) and len(w) == 2 and w, 15))
    running = pool.queue.enqueue("sleep", {"seconds": 1.5})
    pool.running_task(running)

    config.write_text("workers = 3\nmax_tasks_per_worker = 1000\n")
    pool.signal(signal.SIGHUP)

    def replaced() -> bool:
        now = pool.active_workers()
        return len(now) == 3 and not set(now) & first

    wait_until(replaced, 30, message="the workers were not all replaced")
    assert finished_once(pool, running)
    assert desired_workers(pool) == 3
    [reloaded] = [e for e in pool.events() if e.get("event") == "supervisor.reloaded"]
    assert reloaded["changed"] == ["max_tasks_per_worker"]

    # a broken file changes nothing: the pool runs on with what it has
    config.write_text("workers = 'many'\n")
    pool.signal(signal.SIGHUP)
    wait_until(lambda: any(e.get("event") == "supervisor.reload_failed" for e in pool.events()), 10)
    after = pool.queue.enqueue("sleep", {"seconds": 0.01})
    wait_until(lambda: finished_once(pool, after), 15)
    assert len(pool.active_workers()) == 3
