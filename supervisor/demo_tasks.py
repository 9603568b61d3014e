"""The task handlers `taskherd demo` runs: quick, slow with progress, flaky, and one that crashes.

They run inside real worker processes (`imports=["supervisor.demo_tasks"]`). Each is
idempotent, as every taskherd handler should be: delivery is at-least-once.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from workers import task

TICK = 0.1  # seconds between two progress reports (the context writes at most one a second)


@task("demo.add", max_retries=1)
def add(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """A quick task: add two numbers, after a short pause so the table can show it running."""
    time.sleep(float(payload.get("pause", 0.3)))
    return {"sum": payload["a"] + payload["b"]}


@task("demo.render_report", max_retries=3)
def render_report(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """A slow task that goes through named steps and reports its progress all along."""
    steps: list[str] = payload["steps"]
    seconds_per_step = float(payload.get("seconds_per_step", 1.0))
    for index, step in enumerate(steps):
        _spend(ctx, seconds_per_step, index, len(steps), step)
    ctx.progress(100, step="done", total_steps=len(steps))
    ctx.log("info", "report rendered", pages=len(steps))
    return {"pages": len(steps)}


@task("demo.flaky_upload", max_retries=3, retry_backoff=0.2)
def flaky_upload(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Fails on its first attempt (a simulated network error), succeeds on the retry."""
    ctx.progress(10, step="connecting")
    time.sleep(0.5)
    if ctx.attempt == 1:
        raise ConnectionError("upstream timed out (simulated)")
    ctx.progress(100, step="uploaded")
    return {"uploaded": payload["file"], "attempt": ctx.attempt}


@task("demo.crash_once", max_retries=2)
def crash_once(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Kills its own worker process with SIGKILL on its first attempt, like an OOM kill would.

    The supervisor sees the worker die, puts the task back, and starts a replacement;
    the second attempt runs on another worker and completes.
    """
    seconds = float(payload.get("seconds", 1.5))
    if ctx.attempt == 1:
        _spend(ctx, seconds, 0, 2, "crunching (about to crash)")
        os.kill(os.getpid(), signal.SIGKILL)
    _spend(ctx, seconds, 1, 2, "crunching again")
    return {"survived_on_attempt": ctx.attempt}


def _spend(ctx: Any, seconds: float, index: int, total: int, step: str) -> None:
    """Work for `seconds` on step number index (0-based) of total, reporting progress."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        done = index + 1 - left / seconds
        ctx.progress(100 * done / total, step=step, total_steps=total)
        time.sleep(min(left, TICK))
