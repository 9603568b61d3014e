"""`taskherd cancel` on a running task: honoured at once, or enforced after the grace."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.acceptance.pool import Pool
from tests.helpers import wait_until

StartPool = Callable[..., Pool]


def cancel(pool: Pool, task_id: int) -> float:
    """Cancel through the CLI; return when the command returned."""
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "--db", pool.database_url, "cancel", str(task_id)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "cancellation requested" in done.stdout
    return time.monotonic()


def test_cancelled_running_task_that_honours_it_ends_cancelled(
    start_pool: StartPool, tmp_path: Path
) -> None:
    pool = start_pool(workers=1)
    marker = tmp_path / "started"
    task_id = pool.queue.enqueue("cancellable", {"started": str(marker)})
    wait_until(marker.exists, 15)
    worker = pool.running_task(task_id)["worker_id"]

    requested = cancel(pool, task_id)
    wait_until(lambda: pool.task(task_id)["status"] == "cancelled", 5)
    assert time.monotonic() - requested <= 1.5  # forwarded within a second, plus the write
    assert worker in pool.active_workers()  # the worker stopped its task and lives on


def test_cancelled_task_that_ignores_it_is_killed_after_the_grace(
    start_pool: StartPool, tmp_path: Path
) -> None:
    grace = 1.0
    pool = start_pool(workers=1, options={"--cancel-grace": str(grace)})
    marker = tmp_path / "started"
    task_id = pool.queue.enqueue("stubborn", {"started": str(marker)}, max_retries=3)
    wait_until(marker.exists, 15)
    worker = pool.running_task(task_id)["worker_id"]

    requested = cancel(pool, task_id)
    wait_until(lambda: pool.task(task_id)["status"] == "cancelled", grace + 5)
    assert time.monotonic() - requested >= grace
    row = pool.task(task_id)
    assert row["attempts"] == 1  # cancelled, not retried
    assert "was cancelled" in row["last_error"]
    wait_until(lambda: set(pool.active_workers()) - {worker}, 5, message="no replacement")
