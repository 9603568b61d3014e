"""`taskherd health` and `taskherd status` against real pools: healthy, stopped, crash-looping.

The crash loop: a task module that imports in the supervisor but raises in every worker.
The supervisor must back off (1 s, 2 s, 4 s ... up to 60 s), log the loop once, show it in
`status`, report it CRITICAL in `health`, and stay nearly idle meanwhile.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.acceptance.pool import Pool
from tests.acceptance.test_cli import clean_env, taskherd
from tests.helpers import wait_until

StartPool = Callable[..., Pool]
CRASHING_TASKS = Path(__file__).with_name("crashing_tasks.py")


def health(pool: Pool) -> tuple[int, dict[str, str]]:
    """Exit code and {check: status} of `taskherd health --json`."""
    done = taskherd("--db", pool.database_url, "health", "--json", env=clean_env())
    report = json.loads(done.stdout)
    assert report["exit_code"] == done.returncode, done.stderr
    return done.returncode, {c["check"]: c["status"] for c in report["checks"]}


def test_health_is_ok_for_a_running_pool_and_critical_once_it_stopped(
    start_pool: StartPool,
) -> None:
    pool = start_pool(workers=2)
    wait_until(lambda: len(pool.active_workers()) == 2, 15, message="the pool never came up")
    task_id = pool.queue.enqueue("sleep", {"seconds": 0.01})
    wait_until(lambda: pool.task(task_id)["status"] == "completed", 15)

    code, checks = health(pool)
    assert code == 0, checks
    assert set(checks.values()) == {"ok"}

    text = taskherd("--db", pool.database_url, "health", env=clean_env())
    assert text.returncode == 0
    assert text.stdout.startswith("OK: all checks passed")
    assert "2 of 2 live" in text.stdout

    pool.signal(signal.SIGTERM)
    assert pool.wait(30) == 0
    code, checks = health(pool)
    assert code == 2
    assert checks["supervisors"] == "critical"


def test_crash_loop_backs_off_shows_in_status_and_health_and_costs_little_cpu(
    start_pool: StartPool, tmp_path: Path
) -> None:
    shutil.copy(CRASHING_TASKS, tmp_path / "crashing_tasks.py")
    pool = start_pool(workers=2, extra=["-i", "crashing_tasks"])

    def crash_loop_events() -> list[dict[str, object]]:
        return [e for e in pool.events() if e.get("event") == "supervisor.crash_loop"]

    wait_until(crash_loop_events, 20, message="no crash loop was reported")
    supervisor = psutil.Process(pool.pid)
    cpu_before = sum(supervisor.cpu_times()[:2])
    spawned_before = sum(1 for e in pool.events() if e.get("event") == "worker.spawned")
    watched = time.monotonic()

    # status shows the loop and its reason, once the next heartbeat has written it
    def status_shows_it() -> str | None:
        done = taskherd("--db", pool.database_url, "status", env=clean_env())
        return done.stdout if "CRASH LOOP" in done.stdout else None

    status = wait_until(status_shows_it, 10, message="status never showed the crash loop")
    assert "could not boot" in status
    assert "the task module cannot start here" in status
    code, checks = health(pool)
    assert code == 2
    assert checks["crash loops"] == "critical"
    # at most a worker that is still booting (before its crash) counts as live
    assert checks["workers"] in ("warning", "critical")

    # Watch the backing-off supervisor for a few seconds more.
    wait_until(lambda: time.monotonic() - watched >= 4, 10)
    elapsed = time.monotonic() - watched
    cpu = sum(supervisor.cpu_times()[:2]) - cpu_before
    spawned = sum(1 for e in pool.events() if e.get("event") == "worker.spawned") - spawned_before
    # 2 workers respawned after 1, 2, 4 ... s: a handful of spawns, not hundreds
    assert spawned <= 8, spawned
    assert cpu < 0.25 * elapsed, f"the supervisor used {cpu:.2f} s of CPU in {elapsed:.1f} s"
    assert len(crash_loop_events()) == 1  # logged once per streak
    assert pool.process.poll() is None  # the supervisor itself stays up
