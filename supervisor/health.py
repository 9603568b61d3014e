"""`taskherd health`: judge the pool from the health views, the way a monitoring check does.

Each check gives OK, WARNING or CRITICAL with a one-line message; the worst one is the
verdict and the exit code (0, 1, 2). A database that cannot be reached is UNKNOWN (3):
nothing can be judged. The facts come from the `supervisor_health`, `worker_health` and
`queue_health` views in schema.sql, so a `SELECT` in psql or sqlite3 shows the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from supervisor.config import Config
from workers.store import HealthFacts

OVERDUE_GRACE = 5.0  # seconds past its timeout before a running task counts as overdue
MIN_FAILURE_SAMPLE = 10  # finished tasks in the window before a failure rate means anything


class Level(IntEnum):
    """A check's verdict; the value is the exit code (Nagios' convention)."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.level.name.lower(), "message": self.message}


def verdict(checks: list[Check]) -> Level:
    """The worst level among the checks."""
    return max((check.level for check in checks), default=Level.OK)


def judge(facts: HealthFacts, config: Config) -> list[Check]:
    """Every check, in the order an operator reads them."""
    return [
        Check("database", Level.OK, "reachable"),
        check_supervisors(facts),
        check_workers(facts),
        check_crash_loops(facts),
        check_overdue(facts),
        check_pending_age(facts, config),
        check_failure_rate(facts, config),
    ]


def check_supervisors(facts: HealthFacts) -> Check:
    live = [s for s in facts.supervisors if s["state"] == "live"]
    stale = [s for s in facts.supervisors if s["state"] == "stale"]
    if not live:
        silent = f" ({_nodes(stale)} silent)" if stale else ""
        return Check("supervisors", Level.CRITICAL, f"no live supervisor{silent}")
    message = f"{len(live)} live ({_nodes(live)})"
    if stale:
        ages = ", ".join(f"{s['node']} {s['heartbeat_age_s']:.0f} s" for s in stale)
        return Check("supervisors", Level.WARNING, f"{message}; silent: {ages}")
    return Check("supervisors", Level.OK, message)


def check_workers(facts: HealthFacts) -> Check:
    live_sups = [s for s in facts.supervisors if s["state"] == "live" and s["status"] == "running"]
    desired = sum(s["desired_workers"] for s in live_sups)
    live = sum(s["live_workers"] for s in live_sups)
    stale = [w for w in facts.workers if w["state"] == "stale"]
    message = f"{live} of {desired} live"
    if stale:
        message += f"; {len(stale)} with stale heartbeats (workers {_ids(stale, 'worker_id')})"
    if desired and not live:
        return Check("workers", Level.CRITICAL, message)
    if live < desired or stale:
        return Check("workers", Level.WARNING, message)
    return Check("workers", Level.OK, message)


def check_crash_loops(facts: HealthFacts) -> Check:
    looping = [s for s in facts.supervisors if s["crash_streak"] >= 2 and s["state"] == "live"]
    if not looping:
        return Check("crash loops", Level.OK, "none")
    worst = max(looping, key=lambda s: s["crash_streak"])
    reason = (worst["crash_reason"] or "unknown").splitlines()[0]
    return Check(
        "crash loops",
        Level.CRITICAL,
        f"workers on {_nodes(looping)} die at start ({worst['crash_streak']} in a row): {reason}",
    )


def check_overdue(facts: HealthFacts) -> Check:
    overdue = [task for task in facts.overdue if task[2] > task[3] + OVERDUE_GRACE]
    if not overdue:
        return Check("timeouts", Level.OK, "no task running past its timeout")
    shown = ", ".join(f"{task_id} ({ran:.0f} s of {limit:g})" for task_id, _, ran, limit in overdue)
    return Check("timeouts", Level.WARNING, f"{len(overdue)} running past their timeout: {shown}")


def check_pending_age(facts: HealthFacts, config: Config) -> Check:
    ages = [(q["oldest_pending_age_s"], q["queue"]) for q in facts.queues]
    waiting = [(age, queue) for age, queue in ages if age is not None]
    pending = sum(q["pending"] for q in facts.queues)
    if not waiting:
        return Check("queues", Level.OK, f"{pending} pending, none runnable and waiting")
    age, queue = max(waiting)
    message = f"{pending} pending; oldest runnable waited {age:.0f} s (queue {queue})"
    if age > config.pending_age_critical:
        return Check("queues", Level.CRITICAL, message)
    if age > config.pending_age_warning:
        return Check("queues", Level.WARNING, message)
    return Check("queues", Level.OK, message)


def check_failure_rate(facts: HealthFacts, config: Config) -> Check:
    finished = facts.completed_recently + facts.failed_recently
    window = f"{config.failure_window:g} s"
    if finished < MIN_FAILURE_SAMPLE:
        return Check("failures", Level.OK, f"{facts.failed_recently} of {finished} in {window}")
    rate = facts.failed_recently / finished
    message = f"{facts.failed_recently} of {finished} failed in {window} ({rate:.0%})"
    if rate >= config.failure_rate_critical:
        return Check("failures", Level.CRITICAL, message)
    if rate >= config.failure_rate_warning:
        return Check("failures", Level.WARNING, message)
    return Check("failures", Level.OK, message)


def _nodes(rows: list[dict[str, Any]]) -> str:
    return ", ".join(dict.fromkeys(str(row["node"]) for row in rows))


def _ids(rows: list[dict[str, Any]], key: str) -> str:
    return ", ".join(str(row[key]) for row in rows)
