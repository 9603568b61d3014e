"""retry_delay: exponential from `base`, jittered into [d/2, d], capped at `cap`."""

from __future__ import annotations

import random

import pytest

from workers.backoff import RETRY_BACKOFF_CAP, retry_delay

SAMPLES = 200


def ceiling(attempt: int, base: float, cap: float) -> float:
    return min(cap, base * 2 ** max(0, attempt - 1))


@pytest.mark.parametrize("attempt", range(1, 16))
@pytest.mark.parametrize("base", [0.5, 1.0, 3.0])
def test_retry_delay_stays_between_half_and_full_ceiling(attempt: int, base: float) -> None:
    rng = random.Random(attempt * 1000 + int(base * 10))
    d = ceiling(attempt, base, 600.0)
    delays = [retry_delay(attempt, base, cap=600.0, rng=rng) for _ in range(SAMPLES)]
    assert all(d / 2 <= delay <= d for delay in delays), (d, min(delays), max(delays))
    # The jitter really spreads the retries over the whole band, not one point of it.
    assert min(delays) < d / 2 + d / 8
    assert max(delays) > d - d / 8


def test_retry_delay_doubles_with_each_attempt() -> None:
    rng = random.Random(7)
    for attempt in range(1, 10):
        low = min(retry_delay(attempt, 2.0, cap=10_000.0, rng=rng) for _ in range(SAMPLES))
        high = max(retry_delay(attempt, 2.0, cap=10_000.0, rng=rng) for _ in range(SAMPLES))
        expected = 2.0 * 2 ** (attempt - 1)
        assert expected / 2 <= low <= high <= expected
        # Every delay of the next attempt is at least the smallest ceiling/2 of this one doubled.
        next_low = min(retry_delay(attempt + 1, 2.0, cap=10_000.0, rng=rng) for _ in range(SAMPLES))
        assert next_low >= expected


def test_retry_delay_is_capped() -> None:
    rng = random.Random(42)
    delays = [retry_delay(attempt, 1.0, cap=30.0, rng=rng) for attempt in range(6, 60)]
    assert all(15.0 <= delay <= 30.0 for delay in delays)
    huge = [retry_delay(1000, 1.0, rng=rng) for _ in range(SAMPLES)]
    assert all(RETRY_BACKOFF_CAP / 2 <= delay <= RETRY_BACKOFF_CAP for delay in huge)


@pytest.mark.parametrize("attempt", [0, -3])
def test_retry_delay_before_the_first_attempt_is_the_base(attempt: int) -> None:
    rng = random.Random(1)
    delays = [retry_delay(attempt, 4.0, rng=rng) for _ in range(SAMPLES)]
    assert all(2.0 <= delay <= 4.0 for delay in delays)


def test_retry_delay_is_reproducible_with_a_seeded_random() -> None:
    first = [retry_delay(a, 1.5, rng=random.Random(99)) for a in range(1, 12)]
    second = [retry_delay(a, 1.5, rng=random.Random(99)) for a in range(1, 12)]
    assert first == second
