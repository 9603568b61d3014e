"""The handler of the partition tests: it records when each run of a task starts and ends.

Every process appends JSON lines to payload["log"] (one write each, O_APPEND: lines of
different processes never interleave), with time.time() from the one host all namespaces
share. A run killed before it returns has a "start" line and no "end" line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from workers import task


def _note(path: str, ctx: Any, event: str) -> None:
    line = {
        "event": event,
        "task": ctx.task_id,
        "attempt": ctx.attempt,
        "worker": ctx.worker_id,
        "pid": os.getpid(),
        "at": time.time(),
    }
    with Path(path).open("a") as out:
        out.write(json.dumps(line) + "\n")


@task("stint", max_retries=3)
def stint(ctx: Any, payload: dict[str, Any]) -> dict[str, int]:
    """Work for payload['seconds'] (payload['again'] on later attempts, if given) without
    touching the database; returns who did it."""
    seconds = payload["seconds"] if ctx.attempt == 1 else payload.get("again", payload["seconds"])
    _note(payload["log"], ctx, "start")
    time.sleep(float(seconds))
    _note(payload["log"], ctx, "end")
    return {"pid": os.getpid(), "worker": int(ctx.worker_id)}
