"""The task handlers `taskherd bench` runs, and its statement counter.

The bench's pools import this module (`-i supervisor.bench_tasks`) in the supervisor and
in every worker, before either builds its engine. Two handlers:

- `taskherd.bench.noop` does nothing: the drain measures taskherd, not a handler.
- `taskherd.bench.stamp` appends `task_id attempt time.monotonic()` to a file the moment
  it starts, then optionally holds until a release file exists. CLOCK_MONOTONIC is one
  clock for every process on a Linux host, so the bench compares these stamps with its
  own readings directly.

When STATEMENT_COUNTERS_ENV names a directory, importing this module also counts every
SQL statement the process sends through SQLAlchemy (transaction control excluded) in an
8-byte counter shared with the bench through a file named after the pid: no write, no
system call per statement, and nothing at all outside the bench.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from workers import task

STATEMENT_COUNTERS_ENV = "TASKHERD_BENCH_STATEMENT_COUNTERS"
HOLD_STEP = 0.005  # seconds between two looks for a stamp task's release file
HOLD_LIMIT = 120.0  # seconds a held task waits at most for its release
TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")


@task("taskherd.bench.noop", max_retries=0)
def noop(ctx: Any, payload: dict[str, Any]) -> None:
    """Nothing: what a queue costs per task is everything around this call."""


@task("taskherd.bench.stamp", max_retries=3)
def stamp(ctx: Any, payload: dict[str, Any]) -> None:
    """Record when this attempt started; then hold until payload["hold"] exists, if given."""
    started = time.monotonic()
    line = f"{ctx.task_id} {ctx.attempt} {started:.6f}\n".encode()
    fd = os.open(payload["stamps"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)  # one write of a short line to an O_APPEND file: never interleaved
    finally:
        os.close(fd)
    hold = payload.get("hold")
    if hold is None:
        return
    deadline = started + HOLD_LIMIT
    while not os.path.exists(hold) and not ctx.shutdown_requested and time.monotonic() < deadline:
        time.sleep(HOLD_STEP)


def read_stamps(path: Path) -> dict[tuple[int, int], float]:
    """(task id, attempt) -> the monotonic time that attempt started, from a stamps file."""
    if not path.exists():
        return {}
    stamps: dict[tuple[int, int], float] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            stamps[(int(parts[0]), int(parts[1]))] = float(parts[2])
    return stamps


# -- the statement counter -------------------------------------------------------------


class _Counter:
    """One process's statement count, in a memory-mapped file its bench reads."""

    def __init__(self, directory: Path) -> None:
        fd = os.open(directory / str(os.getpid()), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, ctypes.sizeof(ctypes.c_int64))
            self._memory = mmap.mmap(fd, ctypes.sizeof(ctypes.c_int64))
        finally:
            os.close(fd)
        self.value = ctypes.c_int64.from_buffer(self._memory)

    def count(self, _conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if not statement.lstrip()[:9].upper().startswith(TRANSACTION_CONTROL):
            self.value.value += 1


def _install_counter() -> _Counter | None:
    directory = os.environ.get(STATEMENT_COUNTERS_ENV)
    if not directory:
        return None
    counter = _Counter(Path(directory))
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", counter.count)
    return counter


def read_counters(directory: Path) -> dict[int, int]:
    """pid -> statements counted so far, for every process that counted in directory."""
    counts: dict[int, int] = {}
    for path in directory.iterdir():
        data = path.read_bytes()
        if path.name.isdigit() and len(data) == ctypes.sizeof(ctypes.c_int64):
            counts[int(path.name)] = int.from_bytes(data, sys.byteorder, signed=True)
    return counts


_COUNTER = _install_counter()
