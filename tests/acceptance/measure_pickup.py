"""Measure pickup latency: enqueue -> the handler starts, on an idle pool.

    python -m tests.acceptance.measure_pickup [--tasks 200] [--gap 0.05] [-w 2]
        [--engine sqlite|postgresql|both] [--wake on|off|both] [--poll-interval 1.0]

Runs `python -m supervisor run` (production intervals) on a fresh SQLite file and, when
TASKHERD_TEST_POSTGRES_URL is set, on a fresh PostgreSQL database (dropped afterwards),
with the wake-up on (`--wake-up on`) and off (polling only). Tasks are enqueued one by one,
`--gap` seconds apart; a handler stamps time.time() when it starts. Prints p50 and p95 from
just before the enqueue call, and from its return (the commit), and the CPU seconds the
supervisor and its workers spent during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import sqlalchemy as sa

from tests.acceptance.pool import Pool
from tests.helpers import wait_until
from workers.store import Store

PROBE = """
import time
from workers import task

@task("pickup_probe", max_retries=0)
def pickup_probe(ctx, payload):
    return time.time()
"""

PRODUCTION = {  # the defaults, not the tests' fast intervals
    "--heartbeat-interval": "2",
    "--heartbeat-timeout": "30",
    "--worker-timeout": "30",
    "--graceful-timeout": "30",
}


@contextmanager
def database(engine: str, workdir: Path) -> Iterator[str]:
    """A fresh database holding the schema."""
    if engine == "sqlite":
        url = f"sqlite:///{workdir / 'pickup.db'}"
        store = Store(url, create=True)
        store.init_schema()
        store.dispose()
        yield url
        return
    admin_url = os.environ.get("TASKHERD_TEST_POSTGRES_URL")
    if not admin_url:
        raise SystemExit("set TASKHERD_TEST_POSTGRES_URL to measure PostgreSQL")
    admin = sa.create_engine(
        sa.make_url(admin_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
    )
    name = f"taskherd_pickup_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        store = Store(url)
        store.init_schema()
        store.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (user + system)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            times = process.cpu_times()
            total += times.user + times.system
    except psutil.Error:
        pass
    return total


def measure(
    engine: str, wake: bool, tasks: int, gap: float, workers: int, poll: float
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, database(engine, Path(tmp)) as url:
        workdir = Path(tmp)
        (workdir / "pickup_probe.py").write_text(PROBE)
        options = {**PRODUCTION, "--poll-interval": str(poll), "--wake-up": "on" if wake else "off"}
        pool = Pool(url, workdir, workers=workers, options=options, extra=["-i", "pickup_probe"])
        try:
            booted = lambda: sum(  # noqa: E731
                e.get("event") == "Background worker started" for e in pool.events()
            )
            wait_until(lambda: booted() == workers, 30, message="the pool never booted")
            if wake:
                wait_until(
                    lambda: any(e.get("event") == "wake.listening" for e in pool.events()), 30
                )
            for _ in range(5):  # warm up: every code path imported, connections open
                warm = pool.queue.enqueue("pickup_probe", {})
                wait_until(lambda w=warm: pool.task(w)["status"] == "completed", 30)  # type: ignore[misc]
            time.sleep(1.0)  # let every worker settle into its idle wait
            cpu_before = cpu_seconds(pool.pid)
            sent: list[tuple[int, float, float]] = []
            start = time.monotonic()
            for i in range(tasks):
                delay = start + i * gap - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                before = time.time()
                task_id = pool.queue.enqueue("pickup_probe", {})
                sent.append((task_id, before, time.time()))
            ids = [task_id for task_id, _, _ in sent]
            wait_until(lambda: all_done(pool, ids), 60 + 2 * poll, message="tasks never ran")
            cpu = cpu_seconds(pool.pid) - cpu_before
            started = {row["id"]: json.loads(row["result"]) for row in pool.task_rows()}
        finally:
            pool.close()
    from_call = [(started[i] - before) * 1000 for i, before, _ in sent]
    from_commit = [(started[i] - after) * 1000 for i, _, after in sent]
    return {
        "p50_ms": percentile(from_call, 50),
        "p95_ms": percentile(from_call, 95),
        "p50_after_commit_ms": percentile(from_commit, 50),
        "p95_after_commit_ms": percentile(from_commit, 95),
        "cpu_s": cpu,
    }


def all_done(pool: Pool, ids: list[int]) -> bool:
    rows = {row["id"]: row["status"] for row in pool.task_rows()}
    return all(rows.get(task_id) == "completed" for task_id in ids)


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between two enqueues")
    parser.add_argument("-w", "--workers", type=int, default=2)
    parser.add_argument("--engine", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--wake", choices=("on", "off", "both"), default="both")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    args = parser.parse_args()
    engines = ("sqlite", "postgresql") if args.engine == "both" else (args.engine,)
    wakes = (True, False) if args.wake == "both" else (args.wake == "on",)
    print(
        f"{args.tasks} tasks {args.gap * 1000:g} ms apart, {args.workers} idle workers, "
        f"poll interval {args.poll_interval:g} s"
    )
    print(
        f"{'engine':<11} {'wake-up':<8} {'p50 ms':>8} {'p95 ms':>8}   after commit: "
        f"{'p50':>6} {'p95':>6}   cpu s"
    )
    for engine in engines:
        for wake in wakes:
            r = measure(engine, wake, args.tasks, args.gap, args.workers, args.poll_interval)
            print(
                f"{engine:<11} {'on' if wake else 'off':<8} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f}"
                f"   {'':>13} {r['p50_after_commit_ms']:6.1f} {r['p95_after_commit_ms']:6.1f}"
                f"   {r['cpu_s']:5.2f}",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
