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
    """Append this task's id to a file: the side effect that counts executions; then work
    for payload['work_ms'] milliseconds, if given."""
    with Path(payload["file"]).open("a") as out:
        out.write(f"{ctx.task_id}\n")
    time.sleep(payload.get("work_ms", 0) / 1000)
    return int(ctx.task_id)


@task("flaky", max_retries=2, retry_backoff=0.05)
def flaky(ctx: Any, payload: dict[str, Any]) -> str:
    """Fails on its first attempt, succeeds on the next."""
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return "recovered"


@task("echo_async")
async def echo_async(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """An async handler: runs on the worker's event loop."""
    return {"echo": payload}


@task("report")
def report(ctx: Any, payload: dict[str, Any]) -> None:
    """Reports progress faster than it is written, and logs two lines."""
    ctx.log("info", "starting", steps=10)
    for step in range(1, 11):
        ctx.progress(step * 10, step=f"step {step}", total_steps=10, message="working")
    ctx.log("warning", "done")


@task("picky")
def picky(ctx: Any, payload: dict[str, Any]) -> None:
    """Rejects every payload: a permanent failure, no retry."""
    from workers import InvalidPayload

    raise InvalidPayload("size must be a positive integer")


@task("poison", max_retries=2)
def poison(ctx: Any, payload: dict[str, Any]) -> None:
    """Kills its own worker process, every time: by a signal, an exit, or a segfault."""
    import ctypes
    import signal

    how = payload["how"]
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(7)
    elif how == "segfault":
        ctypes.string_at(0)
    raise ValueError(f"unknown way to die: {how}")


@task("cancellable")
def cancellable(ctx: Any, payload: dict[str, Any]) -> None:
    """Works until cancelled, checking ctx.cancel_requested without writing progress."""
    Path(payload["started"]).touch()
    while True:
        ctx.raise_if_cancelled()
        time.sleep(0.01)


@task("stubborn")
def stubborn(ctx: Any, payload: dict[str, Any]) -> None:
    """Ignores cancellation."""
    Path(payload["started"]).touch()
    time.sleep(60)


@task("hog", max_retries=0)
def hog(ctx: Any, payload: dict[str, Any]) -> None:
    """Moves its worker into a memory-limited cgroup, then allocates until the kernel's OOM
    killer ends the process."""
    Path(payload["cgroup_procs"]).write_text(str(os.getpid()))
    chunks = []
    for _ in range(1000):  # 10 GB at most: far past any limit the test sets
        chunk = bytearray(10 * 2**20)
        chunk[::4096] = b"\1" * len(chunk[::4096])  # touch every page
        chunks.append(chunk)
    raise RuntimeError("the memory limit never hit")


@task("signal_self", max_retries=3)
def signal_self(ctx: Any, payload: dict[str, Any]) -> None:
    """The first time (no payload['marker'] file yet), send payload['signal'] to this worker."""
    try:
        os.close(os.open(payload["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), int(payload["signal"]))  # SIGTERM: the worker stops after this task


@task("hold")
def hold(ctx: Any, payload: dict[str, Any]) -> None:
    """Keep this worker busy until the file payload['until'] exists."""
    while not Path(payload["until"]).exists():
        time.sleep(0.01)
