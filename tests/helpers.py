"""Test helpers: wait on conditions with deadlines, never fixed sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Timeout(AssertionError):
    pass


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.02, message: str = ""
) -> T:
    """Return predicate()'s first truthy value; fail the test if none comes within timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise Timeout(message or f"condition not met within {timeout} s")
        time.sleep(interval)
