"""persistently and Outage: retries with capped backoff, one log line per outage per process."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
import structlog
from structlog.testing import capture_logs

from workers.resilience import RETRY_CAP, Outage, outage_delay, persistently


def database_down() -> sa.exc.OperationalError:
    return sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused\ndetail"))


class Flaky:
    """Fails `failures` times with a transient error, then returns `value`."""

    def __init__(self, failures: int, value: str = "done") -> None:
        self.failures, self.value, self.calls = failures, value, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise database_down()
        return self.value


def test_backoff_grows_then_stays_under_the_cap() -> None:
    assert outage_delay(1) <= 0.1
    assert all(outage_delay(n) <= RETRY_CAP for n in range(1, 60))
    assert max(outage_delay(30) for _ in range(50)) > RETRY_CAP / 2


def test_operations_in_one_outage_log_it_once() -> None:
    outage, log = Outage(initial=0.001, cap=0.002), structlog.get_logger()
    with capture_logs() as events:
        outage.failed(log, "progress", database_down())  # a write that gave up, kept for later
        assert persistently(Flaky(3), what="complete", log=log, outage=outage) == "done"
        assert persistently(Flaky(0), what="claim", log=log, outage=outage) == "done"
    assert [e["event"] for e in events] == ["database.unavailable", "database.recovered"]
    assert events[0]["operation"] == "progress"
    assert events[0]["error"].endswith("connection refused")  # one line, not the whole text
    assert events[1]["tries"] == 5
    assert not outage.down and outage.recovered_at is not None


def test_retries_stop_when_the_process_is_told_to_stop() -> None:
    stop = threading.Event()
    stop.set()
    operation = Flaky(1_000)
    with capture_logs(), pytest.raises(sa.exc.OperationalError):
        persistently(operation, what="claim", until=stop)
    assert operation.calls == 1


def test_other_errors_are_not_retried() -> None:
    def broken() -> None:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        persistently(broken, what="complete")
