"""Task handlers the acceptance tests run inside real worker processes."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from workers import task


@task("sleep", max_retries=3)
def sleep(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Sleep for payload['seconds'], reporting progress; returns the worker's pid."""
    seconds = float(payload["seconds"])
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ctx.progress(100 * (1 - left / seconds), step="sleeping")
        time.sleep(min(left, 0.05))
    return {"pid": os.getpid()}


@task("record", max_retries=3)
def record(ctx: Any, payload: dict[str, Any]) -> int:
    """Append this task's id to a file: the side effect that counts executions."""
    with Path(payload["file"]).open("a") as out:
        out.write(f"{ctx.task_id}\n")
    return int(ctx.task_id)
