"""How `taskherd health` judges the facts it read: each check's level and the verdict."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from supervisor.config import resolve
from supervisor.health import Level, judge, verdict
from workers.store import HealthFacts

CONFIG = resolve({}, environ={})


def supervisor(**fields: Any) -> dict[str, Any]:
    row = {
        "supervisor_id": 1,
        "node": "alpha",
        "status": "running",
        "state": "live",
        "heartbeat_age_s": 1.0,
        "desired_workers": 2,
        "live_workers": 2,
        "crash_streak": 0,
        "crash_reason": None,
    }
    return row | fields


def worker(**fields: Any) -> dict[str, Any]:
    return {"worker_id": 1, "node": "alpha", "state": "idle", "heartbeat_age_s": 1.0} | fields


def facts(**fields: Any) -> HealthFacts:
    values: dict[str, Any] = {
        "now": datetime.now(UTC),
        "supervisors": [supervisor()],
        "workers": [worker(worker_id=1), worker(worker_id=2)],
        "queues": [],
    }
    return HealthFacts(**(values | fields))


def levels(health: HealthFacts) -> dict[str, Level]:
    return {check.name: check.level for check in judge(health, CONFIG)}


def test_a_healthy_pool_is_ok() -> None:
    checks = judge(facts(), CONFIG)
    assert verdict(checks) == Level.OK
    assert {check.level for check in checks} == {Level.OK}


def test_no_live_supervisor_is_critical() -> None:
    health = facts(supervisors=[supervisor(state="stale", heartbeat_age_s=90.0)], workers=[])
    assert levels(health)["supervisors"] == Level.CRITICAL
    assert verdict(judge(health, CONFIG)) == Level.CRITICAL


def test_a_silent_second_node_is_a_warning() -> None:
    health = facts(supervisors=[supervisor(), supervisor(supervisor_id=2, node="b", state="stale")])
    assert levels(health)["supervisors"] == Level.WARNING


def test_missing_and_stale_workers() -> None:
    short = facts(supervisors=[supervisor(live_workers=1)])
    assert levels(short)["workers"] == Level.WARNING
    none = facts(supervisors=[supervisor(live_workers=0)], workers=[])
    assert levels(none)["workers"] == Level.CRITICAL
    stale = facts(workers=[worker(), worker(worker_id=2, state="stale")])
    assert levels(stale)["workers"] == Level.WARNING


def test_a_crash_loop_is_critical_and_names_its_reason() -> None:
    health = facts(supervisors=[supervisor(crash_streak=5, crash_reason="could not boot: x")])
    [check] = [c for c in judge(health, CONFIG) if c.name == "crash loops"]
    assert check.level == Level.CRITICAL
    assert "5 in a row" in check.message and "could not boot: x" in check.message


def test_a_task_past_its_timeout_beyond_the_grace_is_a_warning() -> None:
    assert levels(facts(overdue=[(7, 1, 12.0, 10.0)]))["timeouts"] == Level.OK  # within grace
    assert levels(facts(overdue=[(7, 1, 30.0, 10.0)]))["timeouts"] == Level.WARNING


def test_the_oldest_runnable_task_against_both_thresholds() -> None:
    def queue(age: float | None) -> dict[str, Any]:
        return {"queue": "default", "pending": 3, "oldest_pending_age_s": age}

    assert levels(facts(queues=[queue(None)]))["queues"] == Level.OK
    assert levels(facts(queues=[queue(299.0)]))["queues"] == Level.OK
    assert levels(facts(queues=[queue(301.0)]))["queues"] == Level.WARNING
    assert levels(facts(queues=[queue(1801.0)]))["queues"] == Level.CRITICAL


def test_the_failure_rate_needs_a_sample_then_counts() -> None:
    assert levels(facts(completed_recently=0, failed_recently=9))["failures"] == Level.OK
    assert levels(facts(completed_recently=95, failed_recently=5))["failures"] == Level.OK
    assert levels(facts(completed_recently=80, failed_recently=20))["failures"] == Level.WARNING
    assert levels(facts(completed_recently=40, failed_recently=60))["failures"] == Level.CRITICAL


def test_thresholds_come_from_the_configuration() -> None:
    strict = resolve({"failure_rate_warning": "0.01", "pending_age_warning": "10"}, environ={})
    health = facts(
        completed_recently=98,
        failed_recently=2,
        queues=[{"queue": "q", "pending": 1, "oldest_pending_age_s": 11.0}],
    )
    judged = {check.name: check.level for check in judge(health, strict)}
    assert judged["failures"] == Level.WARNING
    assert judged["queues"] == Level.WARNING
