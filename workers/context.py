"""The task context a handler receives: progress, log, and the cancel and shutdown flags."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from workers.resilience import Outage, persistently
from workers.store import TRANSIENT_ERRORS, Claim, Progress, Store

PROGRESS_INTERVAL = 1.0  # seconds: at most one progress write per task in this time
LOG_LEVELS = ("debug", "info", "warning", "error")


class Cancelled(Exception):
    """Raised by a handler (or ctx.raise_if_cancelled()) to end its task `cancelled`."""


class TaskContext:
    """What a running handler can do with its task. Writes are fenced on the claim."""

    def __init__(
        self,
        store: Store,
        claim: Claim,
        shutdown: threading.Event,
        *,
        progress_interval: float = PROGRESS_INTERVAL,
        cancel_signal: Callable[[], bool] | None = None,
        log: Any = None,
        outage: Outage | None = None,
        hold_timeout: Callable[[], Callable[[float], None]] | None = None,
    ) -> None:
        self._store = store
        self._claim = claim
        self._shutdown = shutdown
        self._progress_interval = progress_interval
        self._last_write = -math.inf
        self._unwritten: Progress | None = None
        self._cancel_requested = False
        self._cancel_signal = cancel_signal
        self._log = log if log is not None else structlog.get_logger().bind(task_id=claim.id)
        self._outage = outage if outage is not None else Outage()
        # Holds the task's timeout while a write waits on the database; the returned release
        # puts it back, later by the seconds the database was unavailable (not the task's).
        self._hold_timeout = hold_timeout or (lambda: lambda _seconds: None)

    @property
    def task_id(self) -> int:
        return self._claim.id

    @property
    def attempt(self) -> int:
        return self._claim.attempts

    @property
    def max_attempts(self) -> int:
        return self._claim.max_attempts

    @property
    def worker_id(self) -> int:
        return self._claim.worker_id

    @property
    def cancel_requested(self) -> bool:
        """True once `taskherd cancel` asked for this task: within about a second (the
        supervisor forwards it), or at the next progress write, whichever comes first."""
        if not self._cancel_requested and self._cancel_signal is not None:
            self._cancel_requested = self._cancel_signal()
        return self._cancel_requested

    @property
    def shutdown_requested(self) -> bool:
        """True once the worker was asked to stop: finish soon, or checkpoint."""
        return self._shutdown.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancel_requested:
            raise Cancelled(f"task {self.task_id} was cancelled")

    def progress(
        self,
        percentage: float,
        *,
        step: str | None = None,
        total_steps: int | None = None,
        message: str | None = None,
    ) -> None:
        """Report progress (0-100). Written at most once a second; the last report always is."""
        if not 0 <= percentage <= 100:
            raise ValueError(f"progress must be between 0 and 100, not {percentage}")
        self._unwritten = Progress(float(percentage), step, total_steps, message)
        if time.monotonic() - self._last_write >= self._progress_interval:
            self._write_progress()

    def _write_progress(self) -> None:
        """Write the last report. While the database is unavailable the report is kept, for
        the next write (a second later) or the task's final write: the handler goes on."""
        if self._unwritten is None:
            return
        progress, self._unwritten = self._unwritten, None
        self._last_write = started = time.monotonic()
        release, unavailable = self._hold_timeout(), 0.0
        try:
            cancel = self._store.record_progress(self._claim, progress)
        except TRANSIENT_ERRORS as error:  # on SQLite, after its busy timeout
            unavailable = time.monotonic() - started
            self._outage.failed(self._log, "progress", error)
            self._unwritten = progress
            return
        finally:
            release(unavailable)
        self._outage.succeeded(self._log)
        if cancel:
            self._cancel_requested = True

    def take_unwritten_progress(self) -> Progress | None:
        """The last report not yet written, for the task's final write to carry."""
        progress, self._unwritten = self._unwritten, None
        return progress

    def log(self, level: str, message: str, **data: Any) -> None:
        """Append {timestamp, level, message, data} to the task's execution_log (waiting, while
        the database is unavailable, until the entry is written)."""
        if level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
        entry = {
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": level,
            "message": str(message),
            "data": data,
        }
        started, release = time.monotonic(), self._hold_timeout()
        try:
            persistently(
                lambda: self._store.append_log(self._claim, entry),
                what="log",
                log=self._log,
                outage=self._outage,
            )
        finally:
            recovered = self._outage.recovered_at
            waited_out_an_outage = recovered is not None and recovered >= started
            release(time.monotonic() - started if waited_out_an_outage else 0.0)
