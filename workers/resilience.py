"""Riding out database outages: retry transient errors with capped exponential backoff,
logging once when an outage starts and once when it ends (not once per try)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import tenacity

from workers.store import TRANSIENT_ERRORS

T = TypeVar("T")

RETRY_INITIAL = 0.05  # seconds before the first retry
RETRY_CAP = 5.0  # seconds: the longest wait between two tries


def persistently(
    operation: Callable[[], T],
    *,
    log: Any,
    what: str,
    until: threading.Event | None = None,
    cap: float = RETRY_CAP,
) -> T:
    """Run operation, retrying transient database errors until it succeeds.

    If `until` is given, its being set stops the retries (the last error is raised), and
    the waits between tries end early when it is set.
    """

    def stop(state: tenacity.RetryCallState) -> bool:
        return until is not None and until.is_set()

    def sleep(seconds: float) -> None:
        if until is None:
            threading.Event().wait(seconds)
        else:
            until.wait(seconds)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if state.attempt_number == 1:
            error = state.outcome.exception() if state.outcome else None
            log.warning("database.unavailable", operation=what, error=str(error))

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TRANSIENT_ERRORS),
        wait=tenacity.wait_exponential_jitter(initial=RETRY_INITIAL, max=cap, jitter=RETRY_INITIAL),
        stop=stop,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    result = retrying(operation)
    tries = retrying.statistics.get("attempt_number", 1)
    if tries > 1:
        log.info("database.recovered", operation=what, tries=tries)
    return result
