"""`taskherd bench`: what taskherd costs per task, next to what the database itself can do.

Everything runs on a scratch database that the bench creates and removes, whatever
happens (Ctrl-C included): on SQLite a temporary file in a temporary directory beside the
database named by --db (so it measures the same disk), on PostgreSQL a scratch database
`taskherd_bench_<random>` on the same server (or, for a role that may not create
databases, a scratch schema in the named database). The user's own tables are never read
or written.

The pool under test is the real thing: `python -m supervisor run` as a subprocess, with its
real worker processes, taskherd's default settings (no TASKHERD_* variable of the caller's
reaches it) and its log written to a file. The measurements, in order:

1. raw limit: -w bare processes claim ten rows of a scratch table per statement and mark
   them completed in one statement (supervisor.bench_raw);
2. enqueue, one call per task, then `enqueue_many` of --tasks no-op tasks;
   with --history N, N finished tasks of another type are then written into the table
   (a few INSERT ... SELECT statements), so the phases below run beside that history;
   the table is then settled as one that has run for a while (analyze());
3. drain: a pool of -w workers starts on those tasks; from the first claim (min
   started_at) to the last completion (max completed_at), as the table records them;
4. pickup latency: the idle pool, tasks enqueued 50 ms apart; from the enqueue() call to
   the handler's first line (the call's own commit included: a woken worker may start the
   task before the call has returned);
5. rescue: SIGKILL of a worker running a task, to that task's handler starting again;
6. idle: a pool of 8 idle workers; CPU of the supervisor and its workers, statements sent,
   and resident memory.

Times that cross processes are CLOCK_MONOTONIC readings, one clock for every process on a
Linux host; times read from the table are the database clock on PostgreSQL and the host
clock on SQLite, both sides of each difference from the same clock.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, TypeVar

import psutil
import sqlalchemy as sa

from supervisor import bench_raw
from supervisor.bench_tasks import STATEMENT_COUNTERS_ENV, read_counters, read_stamps
from workers import __version__
from workers.store import COMPLETED, FAILED, FINISHED, Store, normalise_url, task_workers, tasks
from workers.taskqueue import TaskQueue

DEFAULT_TASKS = {"sqlite": 20_000, "postgresql": 5_000}  # a drain of a few seconds
SINGLE_ENQUEUES = 1_000  # at most this many one-per-call enqueues (fewer with a small --tasks)
PICKUP_TASKS = 200
PICKUP_SPACING = 0.05  # seconds between two enqueues while measuring pickup latency
RESCUES = 3
IDLE_WORKERS = 8
IDLE_SECONDS = 30.0
IDLE_SETTLE = 0.5  # seconds the idle pool gets after its last worker's first claim
PHASE_TIMEOUT = 120.0  # seconds without progress before a phase gives up
POOL_STOP_TIMEOUT = 15.0  # seconds a pool gets to stop on SIGQUIT before it is killed
WAIT_STEP = 0.005  # seconds between two looks at a stamps file or a process
REFRESH = 0.2  # seconds between two looks at the table during the drain
HISTORY_CHUNK = 100_000  # --history rows written per INSERT ... SELECT (one transaction each)
HISTORY_SPAN = 30 * 86400.0  # seconds: the history's completion times spread over 30 days
HISTORY_ERROR = "RuntimeError: a failure in the bench's history"

NOOP = "taskherd.bench.noop"
STAMP = "taskherd.bench.stamp"
HISTORY = "taskherd.bench.history"  # the type of --history's finished tasks (never run)
TASK_MODULE = "supervisor.bench_tasks"

T = TypeVar("T")


class BenchError(Exception):
    """A measurement could not be made (the pool died, a phase stalled): exit code 1."""


@dataclass(frozen=True)
class BenchSettings:
    """What to measure; tasks=None means the engine's default (DEFAULT_TASKS)."""

    database_url: str
    workers: int
    tasks: int | None = None
    idle_seconds: float = IDLE_SECONDS
    pickup_tasks: int = PICKUP_TASKS
    rescues: int = RESCUES
    history: int = 0  # finished tasks written into the table before the drain


def run_bench(
    settings: BenchSettings, *, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Measure, print the figures (a table, or one JSON object), clean up; return 0."""
    url = normalise_url(settings.database_url)  # BadDatabase (exit 2) before anything starts
    engine = "sqlite" if url.get_backend_name() == "sqlite" else "postgresql"
    tasks_count = settings.tasks or DEFAULT_TASKS[engine]
    progress = Progress(err)
    with _terminate_as_interrupt(), _cleanup_shielded() as cleanup:
        cleanup.callback(progress.clear)
        scratch = cleanup.enter_context(scratch_database(url))
        bench = Bench(scratch, settings, tasks_count, progress)
        cleanup.callback(bench.close)
        figures = bench.run()
    result = {"engine": engine, "workers": settings.workers, "tasks": tasks_count}
    result |= figures
    result["version"] = __version__
    if as_json:
        print(json.dumps(result, indent=2), file=out)
    else:
        print_table(result, out, history=settings.history)
    return 0


# -- the scratch database --------------------------------------------------------------


@dataclass(frozen=True)
class Scratch:
    """A database only the bench uses, and a directory for its files (logs, stamps)."""

    url: sa.URL
    workdir: Path

    @property
    def url_text(self) -> str:
        return self.url.render_as_string(hide_password=False)


@contextlib.contextmanager
def scratch_database(url: sa.URL) -> Iterator[Scratch]:
    """Create the scratch database and directory; remove both on the way out."""
    sqlite = url.get_backend_name() == "sqlite"
    workdir = Path(
        tempfile.mkdtemp(prefix=".taskherd-bench-", dir=_beside(url) if sqlite else None)
    )
    try:
        if sqlite:
            yield Scratch(url.set(database=str(workdir / "bench.db")), workdir)
        else:
            with _postgres_scratch(url) as scratch_url:
                yield Scratch(scratch_url, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _beside(url: sa.URL) -> str | None:
    """The directory of the user's SQLite file, if the bench may write there."""
    folder = Path(str(url.database)).expanduser().resolve().parent
    return str(folder) if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK) else None


@contextlib.contextmanager
def _postgres_scratch(url: sa.URL) -> Iterator[sa.URL]:
    """A scratch database on the server of `url`; a scratch schema if the role may not
    create databases. Dropped on the way out."""
    name = f"taskherd_bench_{secrets.token_hex(6)}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            try:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE template0')
                scratch, drop = (
                    url.set(database=name),
                    f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
                )
            except sa.exc.ProgrammingError as error:
                if getattr(error.orig, "sqlstate", None) != "42501":  # insufficient privilege
                    raise
                conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
                options = f"{url.query.get('options', '')} -csearch_path={name}".strip()
                scratch = url.update_query_dict({"options": options})
                drop = f'DROP SCHEMA IF EXISTS "{name}" CASCADE'
        try:
            yield scratch
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(drop)
    finally:
        admin.dispose()


# -- the pool under test ---------------------------------------------------------------


class BenchPool:
    """`python -m supervisor run` with taskherd's defaults, on the scratch database."""

    def __init__(self, scratch: Scratch, workers: int, *, counters: Path | None = None) -> None:
        self.workers = workers
        node = f"bench-{secrets.token_hex(3)}"
        env = {
            name: value for name, value in os.environ.items() if not name.startswith("TASKHERD_")
        }
        env["TASKHERD_DATABASE_URL"] = scratch.url_text  # not on the command line: a password
        if counters is not None:
            env[STATEMENT_COUNTERS_ENV] = str(counters)
        argv = [sys.executable, "-m", "supervisor", "--log-format", "json", "run"]
        argv += ["-w", str(workers), "-i", TASK_MODULE, "--node", node]
        self.log_path = scratch.workdir / f"pool-{node}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            argv,
            cwd=scratch.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the terminal's Ctrl-C is the bench's to handle
            preexec_fn=_dies_with_parent(signal.SIGQUIT),  # its quick stop, if the bench is killed
        )
        self._children: set[int] = set()

    @property
    def pid(self) -> int:
        return self.process.pid

    def worker_pids(self) -> list[int]:
        """The live worker processes (the supervisor's children)."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.Error:
            return []
        pids = [child.pid for child in children]
        self._children.update(pids)
        return pids

    def check(self) -> None:
        """Raise BenchError if the supervisor has exited."""
        code = self.process.poll()
        if code is not None:
            raise BenchError(f"the pool under test exited with code {code}: {self._last_event()}")

    def _last_event(self) -> str:
        self._log.flush()
        for line in reversed(self.log_path.read_text(errors="replace").splitlines()):
            try:
                event = json.loads(line)
            except ValueError:
                return line.strip()[:200]
            if event.get("level") in ("error", "critical"):
                return f"{event.get('event')}: {event.get('error', '')}".strip(": ")
        return "no error logged"

    def stop(self) -> None:
        """SIGQUIT (the quick stop: nothing of value is in flight) and wait; past
        POOL_STOP_TIMEOUT, SIGKILL the supervisor and its workers."""
        self.worker_pids()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGQUIT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(POOL_STOP_TIMEOUT)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait()
        for pid in self._children:  # workers die with their supervisor; make sure
            with contextlib.suppress(psutil.Error):
                child = psutil.Process(pid)
                if child.status() != psutil.STATUS_ZOMBIE:
                    child.kill()
        self._log.close()


# -- the measurements ------------------------------------------------------------------


class Bench:
    """Every measurement, on one scratch database."""

    def __init__(self, scratch: Scratch, settings: BenchSettings, tasks: int, progress: Progress):
        self.scratch = scratch
        self.settings = settings
        self.tasks = tasks
        self.progress = progress
        self.store: Store | None = None
        self.pools: list[BenchPool] = []
        self.raw: list[subprocess.Popen[str]] = []
        self.drain_ids = (0, 0)  # the ids of the tasks the drain runs, first and last
        self.history_ids: tuple[int, int] | None = None  # the ids of --history's rows

    def run(self) -> dict[str, Any]:
        """Every measurement in order; the figures under their JSON keys."""
        import supervisor.bench_tasks  # noqa: F401 - the queue reads the tasks' defaults

        self.store = Store(self.scratch.url_text, create=True)
        self.store.init_schema()
        queue = TaskQueue(self.scratch.url_text, store=self.store)
        raw = self.measure_raw_limit()
        single = self.measure_enqueue(queue)
        batch = self.measure_enqueue_batch(queue)
        self.fill_history()
        self.analyze()
        pool = self.start_pool(self.settings.workers)
        drain = self.measure_drain(pool)
        pickup = self.measure_pickup(pool, queue)
        rescue = self.measure_rescue(pool, queue)
        self.stop_pool(pool)
        counters = self.scratch.workdir / "statements"
        counters.mkdir()
        idle_pool = self.start_pool(IDLE_WORKERS, counters=counters)
        idle, rss = self.measure_idle(idle_pool, counters)
        self.stop_pool(idle_pool)
        return {
            "drain_tasks_per_s": round(drain, 1),
            "enqueue_tasks_per_s": round(single, 1),
            "enqueue_batch_tasks_per_s": round(batch, 1),
            "pickup_latency_ms": pickup,
            "rescue_s": round(rescue, 4),
            "idle": idle,
            "rss_mb": rss,
            "raw_limit_tasks_per_s": round(raw, 1),
            "efficiency": round(drain / raw, 4),
        }

    def close(self) -> None:
        """Stop whatever still runs and close the database (on any exit, Ctrl-C included)."""
        for process in self.raw:
            if process.poll() is None:
                process.kill()
                process.wait()
        for pool in self.pools:
            pool.stop()
        if self.store is not None:
            self.store.dispose()

    @property
    def _store(self) -> Store:
        if self.store is None:
            raise RuntimeError("the bench has not started")
        return self.store

    # -- raw limit --

    def measure_raw_limit(self) -> float:
        """-w bare processes claiming ten rows per statement: the database's own limit."""
        self.progress.show(f"raw limit: {self.settings.workers} bare processes, {self.tasks} rows")
        bench_raw.create_table(self.scratch.url, self.tasks)
        settings = {"url": self.scratch.url_text}
        for number in range(1, self.settings.workers + 1):
            process = subprocess.Popen(
                [sys.executable, "-m", "supervisor.bench_raw"],
                cwd=self.scratch.workdir,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
                preexec_fn=_dies_with_parent(signal.SIGKILL),
            )
            self.raw.append(process)
            _send(process, json.dumps({**settings, "worker": number}))
        for process in self.raw:
            if _receive(process) != "ready":
                raise BenchError(f"a raw-limit process failed to start (exit {process.wait()})")
        for process in self.raw:
            _send(process, "go")
        reports = [json.loads(_receive(process)) for process in self.raw]
        for process in self.raw:
            process.wait()
        self.raw.clear()
        rows = sum(report["rows"] for report in reports)
        if rows != self.tasks:
            raise BenchError(f"the raw-limit processes completed {rows} of {self.tasks} rows")
        span = max(r["finished"] for r in reports) - min(r["started"] for r in reports)
        rate = float(rows / span)
        self.progress.done(f"raw limit: {rate:,.0f} rows/s")
        return rate

    # -- enqueue --

    def measure_enqueue(self, queue: TaskQueue) -> float:
        """One enqueue() call per task; the tasks are deleted afterwards."""
        count = min(self.tasks, SINGLE_ENQUEUES)
        self.progress.show(f"enqueue: {count} tasks, one call each")
        started = time.perf_counter()
        for _ in range(count):
            queue.enqueue(NOOP)
        rate = count / (time.perf_counter() - started)
        with self._store.engine.begin() as conn:
            conn.execute(tasks.delete())
        self.progress.done(f"enqueue: {rate:,.0f} tasks/s, one call each")
        return rate

    def measure_enqueue_batch(self, queue: TaskQueue) -> float:
        """enqueue_many() of --tasks no-op tasks in one transaction: what the drain runs."""
        self.progress.show(f"enqueue: {self.tasks} tasks in one batch")
        payloads: list[dict[str, Any]] = [{} for _ in range(self.tasks)]
        started = time.perf_counter()
        queue.enqueue_many(NOOP, payloads)
        rate = self.tasks / (time.perf_counter() - started)
        ids = sa.select(sa.func.min(tasks.c.id), sa.func.max(tasks.c.id))  # only theirs are left
        with self._store.engine.connect() as conn:
            first, last = conn.execute(ids).one()
        self.drain_ids = (int(first), int(last))
        self.progress.done(f"enqueue: {rate:,.0f} tasks/s in a batch")
        return rate

    def fill_history(self) -> None:
        """--history: that many finished tasks of another type (HISTORY), as a table that has
        run for a while holds them: 93 % completed, 5 % failed, 2 % cancelled, finished over
        the last 30 days, oldest first. HISTORY_CHUNK rows per INSERT ... SELECT."""
        total = self.settings.history
        if total <= 0:
            return
        last_id = sa.select(sa.func.max(tasks.c.id))
        statement = _history_insert(sqlite=self._store.is_sqlite)
        params: dict[str, Any] = {
            "task_type": HISTORY,
            "total": total,
            "step": HISTORY_SPAN / total,
            "error": HISTORY_ERROR,
            "error_history": json.dumps(
                [{"attempt": 4, "worker_id": None, "error": HISTORY_ERROR}]
            ),
        }
        started = time.perf_counter()
        with self._store.engine.connect() as conn:
            before = int(conn.execute(last_id).scalar() or 0)
        written = 0
        while written < total:
            self.progress.show(f"history: {written:,}/{total:,} rows")
            chunk = min(HISTORY_CHUNK, total - written)
            with self._store.engine.begin() as conn:
                conn.execute(
                    statement,
                    {**params, "first": written + 1, "last": written + chunk, "now": time.time()},
                )
            written += chunk
        with self._store.engine.connect() as conn:
            self.history_ids = (before + 1, int(conn.execute(last_id).scalar() or 0))
        seconds = time.perf_counter() - started
        self.progress.done(f"history: {total:,} finished rows in {seconds:.1f} s")

    def analyze(self) -> None:
        """The table as one that has run for a while: on PostgreSQL vacuumed, with fresh
        planner statistics, and checkpointed; on SQLite its WAL checkpointed. After
        --history's bulk insert, autovacuum would otherwise work through the new rows during
        the drain, and a checkpoint write out the pages the insert dirtied: one-time
        catch-ups that a table whose history grew day by day never sees (the checkpoint
        alone cost the drain about 10 % with 1,000,000 rows here). A role that may not
        CHECKPOINT (PostgreSQL: superuser or pg_checkpoint) skips it and says so."""
        with self._store.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            if self._store.is_sqlite:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                return
            conn.exec_driver_sql("VACUUM (ANALYZE) tasks")
            try:
                conn.exec_driver_sql("CHECKPOINT")
            except sa.exc.ProgrammingError as error:  # insufficient privilege
                reason = str(error.orig).strip().splitlines()[0]
                self.progress.note(f"bench: no checkpoint before the drain: {reason}")

    # -- the pool's figures --

    def start_pool(self, workers: int, *, counters: Path | None = None) -> BenchPool:
        pool = BenchPool(self.scratch, workers, counters=counters)
        self.pools.append(pool)
        return pool

    def stop_pool(self, pool: BenchPool) -> None:
        self.progress.show("stopping the pool")
        pool.stop()
        self.pools.remove(pool)

    def measure_drain(self, pool: BenchPool) -> float:
        """From the first claim to the last completion of the enqueued tasks, by the table."""
        # The drain's own tasks, by their primary key: a look that costs the same however
        # much history the table holds (--history), so it weighs on the drain no more.
        own = tasks.c.id.between(*self.drain_ids)
        unfinished = sa.select(sa.func.count()).where(own, tasks.c.status.not_in(FINISHED))
        last_left, last_change = self.tasks, time.monotonic()
        while True:
            pool.check()
            self.check_tasks()
            with self._store.engine.connect() as conn:
                left = int(conn.execute(unfinished).scalar_one())
            done = self.tasks - left
            self.progress.show(f"drain: {done}/{self.tasks} tasks, {self.settings.workers} workers")
            if left == 0:
                break
            if left != last_left:
                last_left, last_change = left, time.monotonic()
            elif time.monotonic() - last_change > PHASE_TIMEOUT:
                raise BenchError(f"the drain made no progress for {PHASE_TIMEOUT:g} s")
            time.sleep(REFRESH)
        summary = sa.select(
            sa.func.count(),
            sa.func.min(tasks.c.started_at),
            sa.func.max(tasks.c.completed_at),
        ).where(own, tasks.c.task_type == NOOP, tasks.c.status == COMPLETED)
        with self._store.engine.connect() as conn:
            completed, first_claim, last_completion = conn.execute(summary).one()
        if completed != self.tasks:
            raise BenchError(f"the drain completed {completed} of {self.tasks} tasks")
        span = float((last_completion - first_claim).total_seconds())
        rate = self.tasks / span
        self.progress.done(f"drain: {rate:,.0f} tasks/s ({self.tasks} tasks in {span:.2f} s)")
        return rate

    def measure_pickup(self, pool: BenchPool, queue: TaskQueue) -> dict[str, float]:
        """Idle pool, tasks enqueued PICKUP_SPACING apart: the enqueue() call -> handler."""
        stamps = self.scratch.workdir / "pickup.stamps"
        count = self.settings.pickup_tasks
        enqueued: dict[int, float] = {}
        start = time.monotonic()
        for number in range(count):
            time.sleep(max(0.0, start + number * PICKUP_SPACING - time.monotonic()))
            pool.check()
            called = time.monotonic()
            task_id = queue.enqueue(STAMP, {"stamps": str(stamps)})
            enqueued[task_id] = called
            self.progress.show(f"pickup latency: {number + 1}/{count} tasks enqueued")
        seen = self._wait(
            lambda: _all_stamped(stamps, enqueued),
            pool,
            f"{count} pickup tasks to start",
        )
        latencies = sorted((seen[(task_id, 1)] - at) * 1000 for task_id, at in enqueued.items())
        figures = {
            "p50": round(_percentile(latencies, 50), 3),
            "p95": round(_percentile(latencies, 95), 3),
        }
        self.progress.done(f"pickup latency: p50 {figures['p50']} ms, p95 {figures['p95']} ms")
        return figures

    def measure_rescue(self, pool: BenchPool, queue: TaskQueue) -> float:
        """SIGKILL the worker running a task -> the task's handler starts again; the median."""
        times: list[float] = []
        for number in range(self.settings.rescues):
            self.progress.show(f"rescue: kill {number + 1}/{self.settings.rescues}")
            times.append(self._rescue_once(pool, queue, number))
        median = float(statistics.median(times))
        self.progress.done(f"rescue: {median:.3f} s (median of {len(times)})")
        return median

    def _rescue_once(self, pool: BenchPool, queue: TaskQueue, number: int) -> float:
        """One kill: seconds from the SIGKILL to the second attempt's first line."""
        stamps = self.scratch.workdir / "rescue.stamps"
        release = self.scratch.workdir / f"release-{number}"
        task_id = queue.enqueue(STAMP, {"stamps": str(stamps), "hold": str(release)})
        self._wait(lambda: (task_id, 1) in read_stamps(stamps), pool, "a task to start")
        victim = self._worker_pid(pool, task_id)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        again = self._wait(
            lambda: read_stamps(stamps).get((task_id, 2)), pool, "the task to run again"
        )
        release.touch()
        self._wait(
            lambda: (
                self._store.get_task(task_id)["status"] == COMPLETED
                and len(pool.worker_pids()) == pool.workers
            ),
            pool,
            "the rescued task to finish and the pool to be whole",
        )
        return again - killed

    def _worker_pid(self, pool: BenchPool, task_id: int) -> int:
        """The pid of the pool's worker that holds the task (never any other process)."""
        holder = (
            sa.select(task_workers.c.worker_pid)
            .join(tasks, tasks.c.worker_id == task_workers.c.id)
            .where(tasks.c.id == task_id, tasks.c.status == "running")
        )
        with self._store.engine.connect() as conn:
            pid = conn.execute(holder).scalar()
        if pid is None or pid not in pool.worker_pids():
            raise BenchError(f"task {task_id} is not held by a worker of the pool under test")
        return int(pid)

    def measure_idle(
        self, pool: BenchPool, counters: Path
    ) -> tuple[dict[str, float], dict[str, float]]:
        """CPU and statements of the supervisor and its idle workers over idle_seconds; RSS."""
        self.progress.show(f"idle: starting {IDLE_WORKERS} workers")

        def booted() -> list[int] | None:
            workers = pool.worker_pids()
            counts = read_counters(counters)
            # a worker's first statement opens its store; its second is its first claim
            ready = len(workers) == IDLE_WORKERS and all(counts.get(p, 0) >= 2 for p in workers)
            return workers if ready and pool.pid in counts else None

        workers = self._wait(booted, pool, f"{IDLE_WORKERS} idle workers")
        time.sleep(IDLE_SETTLE)
        processes = [psutil.Process(pid) for pid in [pool.pid, *workers]]
        cpu_before, counts_before = _cpu_seconds(processes), read_counters(counters)
        started = time.monotonic()
        seconds = self.settings.idle_seconds
        while (left := started + seconds - time.monotonic()) > 0:
            pool.check()
            self.progress.show(f"idle: {IDLE_WORKERS} workers, {left:.0f} s left")
            time.sleep(min(left, REFRESH))
        elapsed = time.monotonic() - started
        cpu_after, counts_after = _cpu_seconds(processes), read_counters(counters)
        if sorted(pool.worker_pids()) != sorted(workers):
            raise BenchError("a worker was replaced while the idle pool was measured")
        statements = sum(
            counts_after.get(p.pid, 0) - counts_before.get(p.pid, 0) for p in processes
        )
        idle = {
            "cpu_s_per_min": round((cpu_after - cpu_before) / elapsed * 60, 4),
            "statements_per_s": round(statements / elapsed, 3),
        }
        rss = {
            "supervisor": round(_rss_mb(processes[0]), 1),
            "worker": round(max(_rss_mb(p) for p in processes[1:]), 1),
        }
        self.progress.done(
            f"idle: {idle['cpu_s_per_min']} CPU-s/min, {idle['statements_per_s']} statements/s"
        )
        return idle, rss

    def _wait(self, predicate: Callable[[], T | None], pool: BenchPool, what: str) -> T:
        """predicate()'s first truthy value; BenchError if the pool dies, a task fails, or
        time runs out."""
        deadline = time.monotonic() + PHASE_TIMEOUT
        next_check = 0.0
        while True:
            value = predicate()
            if value:
                return value
            pool.check()
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"gave up waiting for {what} after {PHASE_TIMEOUT:g} s")
            if now >= next_check:
                self.check_tasks()
                next_check = now + REFRESH
            time.sleep(WAIT_STEP)

    def check_tasks(self) -> None:
        """Raise BenchError if a task failed: the pool cannot run the bench's tasks.

        Only the bench's own tasks count, not the failures in --history: each range of their
        ids is a primary-key range scan (an OR of the ranges would have PostgreSQL walk every
        failed row of the history in tasks_finished at every look)."""
        failed = sa.select(tasks.c.id, tasks.c.last_error).where(
            tasks.c.status == FAILED, tasks.c.task_type.in_((NOOP, STAMP))
        )
        first, last = self.drain_ids
        if self.history_ids is None:
            own = [tasks.c.id >= first]
        else:  # the drain's tasks came before the history, the later phases' after it
            own = [tasks.c.id.between(first, last), tasks.c.id > self.history_ids[1]]
        with self._store.engine.connect() as conn:
            for ids in own:
                row = conn.execute(failed.where(ids).limit(1)).first()
                if row is not None:
                    error = (row.last_error or "no error recorded").strip().splitlines() or [""]
                    raise BenchError(f"task {row.id} failed in the pool under test: {error[0]}")


def _history_insert(*, sqlite: bool) -> sa.TextClause:
    """One INSERT ... SELECT of the history rows numbered :first to :last of :total, row i
    finishing (:total - i) * :step + 60 seconds ago. Rows are numbered by a recursive CTE on
    SQLite, generate_series on PostgreSQL; times are text in SQLAlchemy's format on SQLite
    (host clock, :now), timestamptz by the database clock on PostgreSQL."""
    if sqlite:
        numbers = (
            "WITH RECURSIVE n(i) AS (SELECT :first UNION ALL SELECT i + 1 FROM n WHERE i < :last)"
        )
        source = "n"

        def ago(seconds: str) -> str:
            return f"strftime('%Y-%m-%d %H:%M:%f', :now - ({seconds}), 'unixepoch') || '000'"

    else:
        numbers = ""
        source = "generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS n(i)"

        def ago(seconds: str) -> str:
            return f"now() - ({seconds}) * interval '1 second'"

    enqueued = ago("age + took + waited")
    return sa.text(f"""
        {numbers}
        INSERT INTO tasks (
            queue, task_type, payload, status, priority, run_at, created_at, started_at,
            completed_at, duration, attempts, max_attempts, result, last_error, error_history,
            execution_log, cancel_requested
        )
        SELECT
            'default', :task_type, '{{"order": ' || i || '}}', status, 0, {enqueued}, {enqueued},
            CASE WHEN status = 'cancelled' THEN NULL ELSE {ago("age + took")} END,
            {ago("age")},
            CASE WHEN status = 'cancelled' THEN NULL ELSE took END,
            CASE status WHEN 'completed' THEN 1 WHEN 'failed' THEN 4 ELSE 0 END,
            4,
            CASE WHEN status = 'completed' THEN '{{"ok": true}}' END,
            CASE WHEN status = 'failed' THEN :error END,
            CASE WHEN status = 'failed' THEN :error_history ELSE '[]' END,
            '[]',
            status = 'cancelled'
        FROM (
            SELECT
                i,
                CASE
                    WHEN i % 20 = 0 THEN 'failed'
                    WHEN i % 50 = 1 THEN 'cancelled'
                    ELSE 'completed'
                END AS status,
                (CAST(:total AS BIGINT) - i) * CAST(:step AS DOUBLE PRECISION) + 60.0 AS age,
                0.01 * (1 + i % 50) AS took,
                0.5 + i % 5 AS waited
            FROM {source}
        ) AS h
    """)


def _all_stamped(stamps: Path, enqueued: dict[int, float]) -> dict[tuple[int, int], float] | None:
    seen = read_stamps(stamps)
    return seen if all((task_id, 1) in seen for task_id in enqueued) else None


def _percentile(values: list[float], percent: float) -> float:
    """The value below which `percent` of the sorted values lie (linear interpolation)."""
    if len(values) == 1:
        return values[0]
    position = (len(values) - 1) * percent / 100
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    """The CPU time (user + system) the processes have used, to the nanosecond: each
    process's CPU-time clock (clock_getcpuclockid). The kernel's per-process tick counts that
    psutil reads are 10 ms samples: an idle pool's few milliseconds a second read as 0."""
    total = 0.0
    for process in processes:
        clock = ctypes.c_int()
        if _CPU_CLOCK_ID(process.pid, ctypes.byref(clock)) != 0:
            raise psutil.NoSuchProcess(process.pid)
        total += time.clock_gettime(clock.value)
    return total


def _rss_mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / 2**20


def _send(process: subprocess.Popen[str], line: str) -> None:
    if process.stdin is not None:
        process.stdin.write(line + "\n")
        process.stdin.flush()


def _receive(process: subprocess.Popen[str]) -> str:
    return process.stdout.readline().strip() if process.stdout is not None else ""


# -- output ----------------------------------------------------------------------------


class Progress:
    """One status line on stderr, redrawn in place; silent unless stderr is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self._shown = False

    def show(self, text: str) -> None:
        if self.live:
            self.stream.write(f"\r\x1b[K{text}")
            self.stream.flush()
            self._shown = True

    def done(self, text: str) -> None:
        if self.live:
            self.stream.write(f"\r\x1b[K{text}\n")
            self.stream.flush()
            self._shown = False

    def note(self, text: str) -> None:
        """A line that matters to the figures: written on a terminal or not."""
        self.clear()
        self.stream.write(f"{text}\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.live and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


def print_table(result: dict[str, Any], out: TextIO, *, history: int = 0) -> None:
    """The figures as a person reads them; history: the --history rows, if any."""
    pickup, idle, rss = result["pickup_latency_ms"], result["idle"], result["rss_mb"]
    rows = [
        ("drain", f"{result['drain_tasks_per_s']:,.0f} tasks/s"),
        ("raw limit", f"{result['raw_limit_tasks_per_s']:,.0f} tasks/s "
         f"({result['workers']} bare processes, {bench_raw.CLAIM_BATCH} rows per claim)"),
        ("efficiency", f"{result['efficiency']:.2f} (drain / raw limit)"),
        ("enqueue", f"{result['enqueue_tasks_per_s']:,.0f} tasks/s (one call per task)"),
        ("enqueue batch", f"{result['enqueue_batch_tasks_per_s']:,.0f} tasks/s (enqueue_many)"),
        ("pickup latency", f"p50 {pickup['p50']:.1f} ms, p95 {pickup['p95']:.1f} ms"),
        ("rescue", f"{result['rescue_s']:.3f} s (SIGKILL -> the task runs again, median)"),
        (f"idle ({IDLE_WORKERS} workers)", f"{idle['cpu_s_per_min']:.3f} CPU-s/min, "
         f"{idle['statements_per_s']:.1f} statements/s (supervisor + workers)"),
        ("memory (RSS)", f"supervisor {rss['supervisor']:.1f} MB, worker {rss['worker']:.1f} MB"),
    ]  # fmt: skip
    print(
        f"taskherd {result['version']} bench: {result['engine']}, {result['workers']} workers, "
        f"{result['tasks']} no-op tasks",
        file=out,
    )
    if history > 0:
        rows.append(("history", f"{history:,} finished rows in the table (--history)"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}", file=out)


# -- interruption ----------------------------------------------------------------------

_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: a forked child only calls it
_CPU_CLOCK_ID = ctypes.CDLL(None).clock_getcpuclockid
PR_SET_PDEATHSIG = 1


def _dies_with_parent(signum: int) -> Callable[[], None]:
    """A preexec_fn: the child gets signum when the bench dies, even by SIGKILL (Linux), so
    a bench killed outright leaves no pool running."""

    def arm() -> None:
        _PRCTL(PR_SET_PDEATHSIG, signum)

    return arm


@contextlib.contextmanager
def _cleanup_shielded() -> Iterator[contextlib.ExitStack]:
    """An ExitStack whose unwinding a second Ctrl-C cannot cut short."""
    stack = contextlib.ExitStack()
    try:
        yield stack
    finally:
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            stack.close()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the scratch database is removed either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
