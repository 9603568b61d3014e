"""Riding out database outages: retry transient errors with capped exponential backoff,
logging once when an outage starts and once when it ends (not once per try).

Each process keeps one `Outage`: every operation that fails or succeeds tells it, so a
process logs `database.unavailable` once per outage however many operations wait on the
database meanwhile, and `database.recovered` once when one goes through again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
import tenacity

from workers.backoff import retry_delay
from workers.store import TRANSIENT_ERRORS

T = TypeVar("T")

RETRY_INITIAL = 0.1  # seconds: the first retry comes 0.05-0.1 s after the first failure
# Seconds: the longest wait between two tries, hence the longest a process stays idle once
# the database is back. Keep it well under the heartbeat timeout: a supervisor's heartbeats
# must resume before any other node's rescue hold-off (one heartbeat timeout) runs out.
RETRY_CAP = 2.0


def outage_delay(failures: int, initial: float = RETRY_INITIAL, cap: float = RETRY_CAP) -> float:
    """Seconds to wait after `failures` tries in a row failed: exponential, capped, jittered."""
    return retry_delay(failures, initial, cap)


class Outage:
    """One process's view of whether the database is reachable, and how long it was not."""

    def __init__(self, *, initial: float = RETRY_INITIAL, cap: float = RETRY_CAP) -> None:
        self.initial, self.cap = initial, cap  # seconds: the backoff between two tries
        self.down_since: float | None = None  # time.monotonic() of the first failure
        self.recovered_at: float | None = None  # time.monotonic() the last outage ended
        self.failures = 0  # tries failed in a row

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def next_delay(self) -> float:
        """How long to wait before the next try."""
        return outage_delay(max(1, self.failures), self.initial, self.cap)

    def failed(self, log: Any, operation: str, error: BaseException) -> None:
        """A try failed with a transient error; logs only the first of an outage."""
        self.failures += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("database.unavailable", operation=operation, error=_first_line(error))

    def succeeded(self, log: Any) -> None:
        """A try went through; ends the outage, if there was one, with one log line."""
        if self.down_since is not None:
            now = time.monotonic()
            log.info(
                "database.recovered",
                down_for=round(now - self.down_since, 1),
                tries=self.failures + 1,
            )
            self.down_since, self.recovered_at = None, now
        self.failures = 0


def persistently(
    operation: Callable[[], T],
    *,
    what: str,
    log: Any = None,
    outage: Outage | None = None,
    until: threading.Event | None = None,
) -> T:
    """Run operation, retrying transient database errors (tenacity) until it succeeds.

    Pass the process's `outage` so that it logs once per outage, not once per operation.
    If `until` is given, its being set stops the retries (the last error is raised), and
    the waits between tries end early when it is set.
    """
    log = log if log is not None else structlog.get_logger()
    state = outage if outage is not None else Outage()

    def attempt() -> T:
        try:
            result = operation()
        except TRANSIENT_ERRORS as error:
            state.failed(log, what, error)
            raise
        state.succeeded(log)
        return result

    def sleep(seconds: float) -> None:
        (until or threading.Event()).wait(seconds)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TRANSIENT_ERRORS),
        wait=lambda _state: state.next_delay(),
        stop=lambda _state: until is not None and until.is_set(),
        sleep=sleep,
        reraise=True,
    )
    return retrying(attempt)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
