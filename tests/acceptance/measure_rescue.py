"""Measure SIGKILL of a busy worker -> its task back, and -> a replacement registered.

    python -m tests.acceptance.measure_rescue [RUNS]

Prints the median and the worst of RUNS kills (default 10) on a fresh SQLite file.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.acceptance.pool import Pool
from tests.helpers import wait_until
from workers.store import Store


def measure(runs: int) -> tuple[list[float], list[float]]:
    back: list[float] = []
    replaced: list[float] = []
    with tempfile.TemporaryDirectory() as workdir:
        url = f"sqlite:///{Path(workdir) / 'measure.db'}"
        Store(url, create=True).init_schema()
        pool = Pool(url, Path(workdir), workers=2)
        try:
            for _ in range(runs):
                task_back, replacement = kill_one(pool)
                back.append(task_back)
                replaced.append(replacement)
        finally:
            pool.close()
    return back, replaced


def kill_one(pool: Pool) -> tuple[float, float]:
    """SIGKILL the worker running a fresh task; seconds until the task is back, and until
    a replacement is registered."""
    task_id = pool.queue.enqueue("sleep", {"seconds": 60}, max_retries=0)
    victim = pool.running_task(task_id, 30)["worker_id"]
    killed = time.monotonic()
    os.kill(pool.active_workers()[victim], signal.SIGKILL)
    wait_until(lambda: pool.task(task_id)["status"] != "running", 10, interval=0.001)
    task_back = time.monotonic() - killed
    wait_until(lambda: len(set(pool.active_workers()) - {victim}) == 2, 10, interval=0.001)
    return task_back, time.monotonic() - killed


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    back, replaced = measure(runs)
    for name, values in (("task back", back), ("replacement registered", replaced)):
        print(
            f"SIGKILL -> {name}: median {statistics.median(values) * 1000:.1f} ms, "
            f"worst {max(values) * 1000:.1f} ms over {runs} runs"
        )


if __name__ == "__main__":
    main()
