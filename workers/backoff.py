"""Retry delays: exponential, capped, with jitter so retries do not arrive together."""

from __future__ import annotations

import random

RETRY_BACKOFF_CAP = 3600.0  # seconds


def retry_delay(
    attempt: int, base: float, cap: float = RETRY_BACKOFF_CAP, rng: random.Random | None = None
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): between d/2 and d,
    where d = base * 2 ** (attempt - 1), capped at cap."""
    ceiling = min(cap, base * 2.0 ** max(0, attempt - 1))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
