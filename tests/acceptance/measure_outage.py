"""A database outage in the middle of a busy pool, and the time back to full throughput.

    python -m tests.acceptance.measure_outage [sqlite|postgresql] [RUNS] [OUTAGE_SECONDS] [MODE]

Two supervisors (nodes alpha with 2 workers, beta with 1) work through a backlog of short
tasks; one long task with a timeout runs on alpha. The database goes away for
OUTAGE_SECONDS (default 12): PostgreSQL is stopped (`pg_ctl stop -m MODE`, MODE fast by
default, or immediate; a private server, never the shared one) and started again; SQLite's
write lock is held by another process. The long task's handler returns during the outage,
and its timeout passes then too.

Prints, per run, the time from the database's return to the pool's full throughput: the
start of the first one-second window after the return in which tasks complete at
FULL_SPEED_SHARE of the rate measured before the outage.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

from tests.acceptance.pool import Pool
from tests.helpers import wait_until
from tests.private_postgres import PrivatePostgres
from workers.store import Store, tasks

OUTAGE = 12.0  # seconds the database is away: over the heartbeat timeout and the task timeout
HEARTBEAT_TIMEOUT = 5.0  # seconds (pool option): shorter than the outage, on purpose
SHORT_TASK = 0.1  # seconds each backlog task sleeps
BACKLOG = 150  # short tasks: enough to measure before the outage and well after it
BASELINE_TASKS = 30  # completions before the outage that set the pre-outage rate
LONG_TASK = 3.0  # seconds the long task's handler runs (it returns during the outage)
LONG_TIMEOUT = 5.0  # its timeout: it passes during the outage, after the handler returned
WINDOW = 1.0  # seconds: the window in which throughput is judged
FULL_SPEED_SHARE = 0.8  # of the pre-outage rate, counts as full speed
DETECT_TIMEOUT = 9.0  # seconds for every process to notice (SQLite: a 5 s busy timeout first)


class SqliteWriteLock:
    """Another process holds the SQLite file's write lock (BEGIN EXCLUSIVE) until released.

    In WAL mode this is the strongest lock another process can take while the pool has the
    file open: it blocks every writer (claims, completions, heartbeats, rescues) while
    readers go on, as WAL promises. `PRAGMA locking_mode=EXCLUSIVE`, which would also shut
    readers out, cannot be had at all while any other connection is open.
    """

    HOLDER = "\n".join(
        (
            "import sqlite3, sys",
            "con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)",
            "con.execute('BEGIN EXCLUSIVE')",
            "print('locked', flush=True)",
            "sys.stdin.readline()",
            "con.execute('ROLLBACK')",
            "con.close()",
            "print('released', flush=True)",
        )
    )

    def __init__(self, path: str) -> None:
        self.path = path
        self.holder: subprocess.Popen[str] | None = None

    def cut(self) -> None:
        self.holder = subprocess.Popen(
            [sys.executable, "-c", self.HOLDER, self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._expect("locked")

    def restore(self) -> None:
        holder = self._holder()
        if holder.stdin is not None:
            holder.stdin.write("\n")
            holder.stdin.flush()
        self._expect("released")
        holder.wait(10)

    def close(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(10)

    def _holder(self) -> subprocess.Popen[str]:
        if self.holder is None:
            raise RuntimeError("the lock is not held")
        return self.holder

    def _expect(self, word: str) -> None:
        out = self._holder().stdout
        line = out.readline().strip() if out is not None else ""
        if line != word:
            raise RuntimeError(f"the lock holder said {line!r}, not {word!r}")


class PostgresStop:
    """The private PostgreSQL server stopped (`pg_ctl stop -m MODE`) and started again."""

    def __init__(self, server: PrivatePostgres, mode: str = "fast") -> None:
        self.server = server
        self.mode = mode

    def cut(self) -> None:
        self.server.stop(self.mode)

    def restore(self) -> None:
        self.server.start()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.server.start()


@dataclass
class Timeline:
    """What happened around one outage, in the host's epoch seconds."""

    pools: dict[str, Pool]  # node name -> its supervisor
    long_task: int
    cut_at: float = 0.0
    # The database's return: when the restore command began (the lock's release; the server's
    # start, so its start-up time counts against us). Figures are measured from here.
    restore_at: float = 0.0
    back_at: float = 0.0  # the restore command returned: the database takes writes again
    baseline_rate: float = 0.0  # tasks per second before the outage
    pids_before: dict[str, int] = field(default_factory=dict)
    cpu_share: dict[str, float] = field(default_factory=dict)  # of one core, during the outage

    def completions(self) -> list[float]:
        """completed_at of every completed task, sorted (epoch seconds)."""
        return _completed(self.pools["alpha"])

    def full_speed_after(self) -> float | None:
        """Seconds from the return to the first window at full speed, None if never."""
        after = [t for t in self.completions() if t >= self.restore_at]
        needed = FULL_SPEED_SHARE * self.baseline_rate * WINDOW
        for i, start in enumerate(after):
            if sum(1 for t in after[i:] if t < start + WINDOW) >= needed:
                return start - self.restore_at
        return None

    def first_completion_after(self) -> float | None:
        after = [t for t in self.completions() if t >= self.restore_at]
        return after[0] - self.restore_at if after else None


def processes(pools: dict[str, Pool]) -> dict[str, int]:
    """name -> pid of every supervisor and worker: alpha, alpha/worker-3, ..."""
    names = {}
    for node, pool in pools.items():
        names[node] = pool.pid
        for worker_id, pid in pool.active_workers().items():
            names[f"{node}/worker-{worker_id}"] = pid
    return names


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    seconds = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            seconds[name] = times.user + times.system
    return seconds


def start_pools(start: Callable[..., Pool], database_url: str) -> dict[str, Pool]:
    """alpha (2 workers, queues default and slow) and beta (1 worker, default only)."""
    options = {"--heartbeat-timeout": str(HEARTBEAT_TIMEOUT)}
    alpha = start(
        database_url,
        workers=2,
        node="alpha",
        options=options,
        extra=["-q", "default", "-q", "slow"],
    )
    beta = start(database_url, workers=1, node="beta", options=options, extra=["-q", "default"])
    pools = {"alpha": alpha, "beta": beta}
    wait_until(
        lambda: [_booted(p) for p in pools.values()] == [2, 1],
        30,
        message="the pools did not boot",
    )
    return pools


def _booted(pool: Pool) -> int:
    """How many of the pool's active workers have booted (reached their loop)."""
    started = {e.get("pid") for e in pool.events() if e.get("event") == "Background worker started"}
    active = set(pool.active_workers().values())
    return len(active) if active <= started else -1


def ride_out(pools: dict[str, Pool], cut: Any, seconds: float = OUTAGE) -> Timeline:
    """Backlog, baseline, long task, cut, hold, restore; returns the timeline."""
    alpha = pools["alpha"]
    alpha.queue.enqueue_many("sleep", [{"seconds": SHORT_TASK}] * BACKLOG)

    def baseline() -> list[float] | None:
        done = _completed(alpha)
        return done if len(done) >= BASELINE_TASKS else None

    completed_before = wait_until(baseline, 30, message="the backlog did not start") or []
    long_task = alpha.queue.enqueue(
        "sleep", {"seconds": LONG_TASK}, queue="slow", priority=10, timeout=LONG_TIMEOUT
    )
    outage = Timeline(pools, long_task, baseline_rate=_rate(completed_before))
    alpha.running_task(long_task)
    outage.pids_before = processes(pools)

    outage.cut_at = time.time()
    cut.cut()
    # every process notices: the supervisors at their heartbeat, the workers at their
    # next claim or completion (on SQLite each first try waits out the 5 s busy timeout)
    wait_until(
        lambda: _noticed(pools) >= set(outage.pids_before.values()),
        DETECT_TIMEOUT,
        interval=0.1,
        message="not every process logged database.unavailable",
    )
    cpu_from, cpu_start = time.monotonic(), cpu_seconds(outage.pids_before)
    time.sleep(max(0.0, outage.cut_at + seconds - time.time()))  # the outage itself
    cpu_end, elapsed = cpu_seconds(outage.pids_before), time.monotonic() - cpu_from
    outage.cpu_share = {
        name: (cpu_end[name] - cpu_start[name]) / elapsed for name in cpu_start if name in cpu_end
    }
    outage.restore_at = time.time()
    cut.restore()
    outage.back_at = time.time()
    return outage


def finish(outage: Timeline, timeout: float = 40) -> None:
    """Wait until every task is completed, and past the rescue hold-off of every node."""
    alpha = outage.pools["alpha"]
    wait_until(
        lambda: _statuses(alpha) == {"completed"},
        timeout,
        interval=0.1,
        message="not every task completed after the outage",
    )
    hold_off = outage.back_at + HEARTBEAT_TIMEOUT + 1.0  # rescues may run again from here
    time.sleep(max(0.0, hold_off - time.time()))  # a rescue that should not happen gets its chance


def events_since(pools: dict[str, Pool], moment: float) -> list[dict[str, Any]]:
    """Every pool's log lines (supervisors and workers) stamped at or after moment (epoch)."""
    return [
        event
        for pool in pools.values()
        for event in pool.events()
        if "timestamp" not in event  # kept: better counted than missed
        or datetime.fromisoformat(event["timestamp"]).timestamp() >= moment
    ]


def _noticed(pools: dict[str, Pool]) -> set[int]:
    return {
        event["pid"]
        for pool in pools.values()
        for event in pool.events()
        if event.get("event") == "database.unavailable"
    }


def _completed(pool: Pool) -> list[float]:
    with pool.store.engine.connect() as conn:
        stamps = conn.execute(
            sa.select(tasks.c.completed_at).where(tasks.c.status == "completed")
        ).scalars()
        return sorted(stamp.timestamp() for stamp in stamps)


def _statuses(pool: Pool) -> set[str]:
    with pool.store.engine.connect() as conn:
        return set(conn.execute(sa.select(tasks.c.status).distinct()).scalars())


def _rate(stamps: list[float]) -> float:
    """Tasks per second over these completion times, the first few (start-up) left out."""
    steady = stamps[5:]
    return (len(steady) - 1) / (steady[-1] - steady[0])


@contextlib.contextmanager
def database(engine: str, mode: str = "fast") -> Iterator[tuple[str, Callable[[], Any]]]:
    """A fresh database with the schema, and a factory for its outage."""
    with tempfile.TemporaryDirectory() as workdir:
        if engine == "sqlite":
            path = str(Path(workdir) / "outage.db")
            url = f"sqlite:///{path}"
            Store(url, create=True).init_schema()
            yield url, lambda: SqliteWriteLock(path)
            return
        server = PrivatePostgres()
        try:
            server.start()
            url = server.create_database()
            store = Store(url)
            store.init_schema()
            store.dispose()
            yield url, lambda: PostgresStop(server, mode)
        finally:
            server.destroy()


def measure(engine: str, runs: int, seconds: float, mode: str = "fast") -> list[float]:
    figures = []
    for run in range(runs):
        with database(engine, mode) as (url, make_cut), tempfile.TemporaryDirectory() as workdir:
            full = measure_once(url, make_cut(), Path(workdir), seconds, f"{engine} run {run + 1}")
            if full is not None:
                figures.append(full)
    return figures


def measure_once(url: str, cut: Any, workdir: Path, seconds: float, title: str) -> float | None:
    """One outage on a fresh pool; prints and returns the time back to full throughput."""
    pools: list[Pool] = []

    def start(database_url: str, **kwargs: Any) -> Pool:
        pool = Pool(database_url, workdir, **kwargs)
        pools.append(pool)
        return pool

    try:
        outage = ride_out(start_pools(start, url), cut, seconds)
        finish(outage)
        full, first = outage.full_speed_after(), outage.first_completion_after()
    finally:
        cut.close()
        for pool in pools:
            pool.close()
    print(
        f"{title}: outage {seconds:g} s; first completion {_ms(first)} and full throughput "
        f"({FULL_SPEED_SHARE:.0%} of {outage.baseline_rate:.1f} tasks/s) {_ms(full)} after "
        f"the database's return; restoring took {(outage.back_at - outage.restore_at) * 1000:.0f}"
        " ms"
    )
    return full


def _ms(value: float | None) -> str:
    return "never" if value is None else f"{value * 1000:.0f} ms"


def main() -> None:
    engine = sys.argv[1] if len(sys.argv) > 1 else "sqlite"
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else OUTAGE
    mode = sys.argv[4] if len(sys.argv) > 4 else "fast"
    figures = measure(engine, runs, seconds, mode)
    if figures:
        print(
            f"{engine}: return -> full throughput: median {statistics.median(figures) * 1000:.0f}"
            f" ms, worst {max(figures) * 1000:.0f} ms over {len(figures)} runs"
        )


if __name__ == "__main__":
    main()
