"""The worker process: claim a task, run its handler, record the outcome, repeat.

`main` is the process target the supervisor starts. It installs its own signal
handlers first, builds its own engine, proves it is alive through shared memory
that its supervisor reads, and exits within a second if that supervisor dies.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import faulthandler
import gc
import json
import mmap
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from workers import registry
from workers.backoff import retry_delay
from workers.context import Cancelled, TaskContext
from workers.logs import configure_logging
from workers.resilience import Outage, persistently
from workers.store import (
    CANCELLED,
    TRANSIENT_ERRORS,
    Claim,
    Finished,
    LostClaim,
    Progress,
    Store,
    StoreError,
)
from workers.wake import IdleWait

POLL_INTERVAL = 1.0  # seconds between two looks at an empty queue
# Seconds between two stamps of the liveness proof, at most (WorkerArgs.liveness_interval:
# the supervisor asks for an eighth of its worker timeout when that is shorter). Also how
# soon a worker notices that its supervisor is gone.
LIVENESS_INTERVAL = 1.0
# Batch claims: a worker claims one task; while its tasks end within FAST_TASK it claims
# twice as many at the next round trip, up to its engine's cap and up to as many as its last
# task's duration suggests fit in BATCH_BUDGET; a slower task or a failure brings it back
# to one. A task running past SLOW_TASK gives back the unstarted rest of its batch.
# The caps: tasks claimed in one round trip at most. SQLite's round trip is local work
# (SQLAlchemy, BEGIN IMMEDIATE, COMMIT) that a bigger batch spreads thinner: no-op tasks
# drained 30 % faster with 128 than with 32 here. PostgreSQL's is a network round trip
# already spread thin at 32, and 128 drained a few percent slower.
MAX_BATCH_SQLITE = 128
MAX_BATCH_POSTGRES = 32
MAX_BATCH = max(MAX_BATCH_SQLITE, MAX_BATCH_POSTGRES)  # room in the shared memory
BATCH_BUDGET = 0.02  # seconds of work a batch should hold, by its tasks' durations so far
FAST_TASK = 0.005  # seconds
SLOW_TASK = 0.05  # seconds

# Exit codes the supervisor tells apart (see supervisor.process.classify_exit).
STACK_SIGNAL = signal.SIGUSR1  # dump every thread's Python stack to WorkerArgs.stack_fd

EXIT_OK = 0
EXIT_BOOT_FAILURE = 3  # cannot boot: a task module that fails to import, an unusable database
EXIT_ORPHANED = 4  # the supervisor died; the worker left rather than run unwatched
EXIT_RECYCLED_TASKS = 5  # did its share of tasks (--max-tasks-per-worker): replaced, no failure
EXIT_RECYCLED_MEMORY = 6  # grew past --max-memory-per-worker: replaced, no failure
RECYCLE_JITTER = 0.1  # limits vary by up to this share, so workers do not all recycle at once

BOOT_ERRORS: tuple[type[Exception], ...] = (registry.TaskModuleError, StoreError, *TRANSIENT_ERRORS)


class SharedState(ctypes.Structure):
    """Shared memory between one worker (writer) and its supervisor (reader)."""

    _fields_ = [
        ("beat", ctypes.c_double),  # time.monotonic() of the last liveness stamp
        ("current_task", ctypes.c_int64),  # 0 when idle
        ("processed", ctypes.c_int64),  # attempts this worker brought to an end
        ("failed", ctypes.c_int64),  # of those, the ones that failed
        ("task_timeout", ctypes.c_double),  # seconds the current task may run; 0: no limit
        ("task_deadline", ctypes.c_double),  # time.monotonic() past which it is killed
        ("cancel_task", ctypes.c_int64),  # set by the supervisor: this task's cancel was asked
        # 1 while the worker looks for work (claiming, then waiting on its wake pipe): the
        # supervisor pokes such workers when tasks are enqueued, and clears it as it pokes.
        ("wants_work", ctypes.c_int64),
        # the tasks this worker claimed and has not started (0: a free slot): if it dies, its
        # supervisor gives them back without counting an attempt
        ("unstarted", ctypes.c_int64 * MAX_BATCH),
        # bytes of whole entries in the completion journal (WorkerArgs.journal_fd)
        ("journal_bytes", ctypes.c_int64),
    ]

    def unstarted_tasks(self) -> list[int]:
        """The claimed tasks not started, as last published (the current one excluded)."""
        current = self.current_task
        return [task_id for task_id in self.unstarted if task_id and task_id != current]


def map_shared_state(fd: int) -> tuple[mmap.mmap, SharedState]:
    """Map the shared-memory file (a memfd) that carries one worker's SharedState."""
    os.ftruncate(fd, ctypes.sizeof(SharedState))
    memory = mmap.mmap(fd, ctypes.sizeof(SharedState))
    return memory, SharedState.from_buffer(memory)


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a worker process needs; sent as JSON on the worker's stdin."""

    database_url: str
    worker_id: int
    supervisor_pid: int
    node: str
    queues: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    poll_interval: float = POLL_INTERVAL
    liveness_interval: float = LIVENESS_INTERVAL
    log_format: str | None = None
    log_level: str = "info"
    max_tasks: int | None = None
    max_memory_mb: float | None = None
    shared_fd: int = -1
    stack_fd: int = -1  # where faulthandler writes every thread's stack on SIGUSR1
    journal_fd: int = -1  # where completions not yet written are kept (CompletionJournal)
    wake_fd: int = -1  # the read end of the pipe the supervisor pokes when tasks are enqueued
    sys_path: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerArgs:
        fields = json.loads(text)
        for name in ("queues", "imports", "sys_path"):
            fields[name] = tuple(fields[name])
        return cls(**fields)


def run_from_stdin() -> None:
    """Entry point of `python -m workers`: the supervisor writes WorkerArgs on stdin."""
    args = WorkerArgs.from_json(sys.stdin.read())
    sys.stdin.close()
    sys.path[:] = list(args.sys_path) or sys.path
    _memory, shared = map_shared_state(args.shared_fd)
    main(args, shared)


def main(args: WorkerArgs, shared: SharedState) -> None:
    """Process target: boot, work until told to stop, exit with a code the supervisor reads."""
    shutdown = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGTERM, lambda _signum, _frame: shutdown.set())
    if args.stack_fd >= 0:  # the supervisor asks for a diagnosis before it kills a hung worker
        faulthandler.register(STACK_SIGNAL, file=args.stack_fd, all_threads=True)
    configure_logging(args.log_format, args.log_level)
    log = structlog.get_logger().bind(worker_id=args.worker_id, pid=os.getpid(), node=args.node)
    shared.beat = time.monotonic()
    threading.Thread(
        target=_prove_alive,
        args=(shared, args.supervisor_pid, args.liveness_interval, log),
        name="liveness",
        daemon=True,
    ).start()
    try:
        registry.import_modules(args.imports)
        # booting into a database outage is no boot failure: wait for it (or for a stop)
        store = persistently(
            lambda: Store(args.database_url), what="connect", log=log, until=shutdown
        )
    except BOOT_ERRORS as error:
        log.error("worker.boot_failed", error=str(error))
        if args.stack_fd >= 0:  # the supervisor puts it in the exit reason
            os.pwrite(args.stack_fd, str(error).encode("utf-8", "replace"), 0)
        sys.exit(EXIT_BOOT_FAILURE)
    release_free_memory()
    log.info("Background worker started", queues=list(args.queues) or "*")
    worker = Worker(store, args, shared, shutdown, log)
    try:
        exit_code = worker.run()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # already stopping; a late TERM is moot
        worker.close()
        store.dispose()
    log.info("Background worker stopped", processed=shared.processed, failed=shared.failed)
    sys.exit(exit_code)


def release_free_memory() -> None:
    """Give the memory freed so far (mostly what imports left behind) back to the system:
    glibc's allocator keeps it otherwise, a few megabytes of resident memory per process.
    Called once booted. Elsewhere than glibc, nothing happens."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _rss_mb() -> float:
    """This process's resident memory in MiB (Linux: /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _prove_alive(shared: SharedState, supervisor_pid: int, interval: float, log: Any) -> None:
    """Stamp the liveness proof; leave at once if the supervisor is gone."""
    while True:
        shared.beat = time.monotonic()
        if os.getppid() != supervisor_pid:
            log.error("worker.orphaned", supervisor_pid=supervisor_pid)
            os._exit(EXIT_ORPHANED)
        time.sleep(interval)


class CompletionJournal:
    """The completions a worker computed and has not yet written, kept in memory its
    supervisor can still read after a SIGKILL (a memfd). The supervisor writes them, fenced
    like any completion, so a killed worker re-runs only the task it was in, not the finished
    ones of its batch. Entries are JSON lines; shared.journal_bytes counts the whole ones."""

    def __init__(self, fd: int, shared: SharedState) -> None:
        self.fd = fd
        self.shared = shared
        self.entries: dict[int, bytes] = {}

    def add(self, done: Finished) -> None:
        if self.fd < 0:
            return
        line = encode_finished(done)
        offset = int(self.shared.journal_bytes)
        os.pwrite(self.fd, line, offset)
        self.entries[done.claim.id] = line
        self.shared.journal_bytes = offset + len(line)  # the entry counts once it is whole

    def remove(self, task_ids: Iterable[int]) -> None:
        if self.fd < 0:
            return
        for task_id in task_ids:
            self.entries.pop(task_id, None)
        kept = b"".join(self.entries.values())
        self.shared.journal_bytes = 0
        if kept:
            os.pwrite(self.fd, kept, 0)
            self.shared.journal_bytes = len(kept)


def encode_finished(done: Finished) -> bytes:
    """One journal line: a JSON array of what the fenced write needs and what its log line
    names (the payload and the claim's other fields are left out)."""
    claim, progress = done.claim, done.progress
    entry = [claim.id, claim.worker_id, claim.attempts, claim.task_type, claim.queue]
    entry += [done.result, done.duration]
    if progress is not None:
        entry += [progress.percentage, progress.step, progress.total_steps, progress.message]
    return (json.dumps(entry) + "\n").encode("utf-8")


def read_journal(fd: int, size: int) -> list[Finished]:
    """The whole entries of a worker's completion journal (what its supervisor writes). A
    claim read back carries its fence (id, worker, attempt), type and queue, nothing more."""
    if fd < 0 or size <= 0:
        return []
    finished = []
    for line in os.pread(fd, size, 0).decode("utf-8").splitlines():
        task_id, worker_id, attempts, task_type, queue, result, duration, *progress = json.loads(
            line
        )
        claim = Claim(
            id=task_id,
            task_type=task_type,
            payload="",
            queue=queue,
            priority=0,
            attempts=attempts,
            max_attempts=0,
            timeout=None,
            worker_id=worker_id,
        )
        finished.append(
            Finished(claim, result, duration, Progress(*progress) if progress else None)
        )
    return finished


class Worker:
    """The claim-run-record loop of one worker process."""

    def __init__(
        self,
        store: Store,
        args: WorkerArgs,
        shared: SharedState,
        shutdown: threading.Event,
        log: Any,
    ) -> None:
        self.store = store
        self.args = args
        self.shared = shared
        self.shutdown = shutdown
        self.log = log
        self.outage = Outage()  # this process's view of the database: one log line per outage
        self.idle = IdleWait(args.wake_fd)
        self._runner: asyncio.Runner | None = None
        rng = random.Random()
        self.max_tasks = (
            args.max_tasks + rng.randint(0, int(args.max_tasks * RECYCLE_JITTER))
            if args.max_tasks
            else None
        )
        self.max_memory_mb = (
            args.max_memory_mb * rng.uniform(1 - RECYCLE_JITTER, 1) if args.max_memory_mb else None
        )
        self.batch_size = 1  # tasks the next round trip claims
        self._claimed = 0  # tasks the last round trip claimed
        self._slowed = False  # whether a task of that batch was slow (or failed)
        self.max_batch = MAX_BATCH_SQLITE if store.is_sqlite else MAX_BATCH_POSTGRES
        # The batch, shared with the batch guard thread under _lock: the claimed tasks not
        # started yet, the completions not written yet, and the task running since when.
        self._lock = threading.Lock()
        self._task_started = threading.Condition(self._lock)
        self._batch: list[Claim] = []
        self._finished: list[Finished] = []
        self._journal = CompletionJournal(args.journal_fd, shared)  # under _lock
        self._running: tuple[int, float] | None = None
        self._slots: dict[int, int] = {}  # task id -> its slot in shared.unstarted (under _lock)
        self._settling = threading.Lock()  # one settle at a time (the guard's or the exit's)
        threading.Thread(target=self._guard_batch, name="batch-guard", daemon=True).start()

    def run(self) -> int:
        """Work until shutdown is set or it is time to recycle; a task in flight is finished
        first, then the batch settled. Returns the exit code."""
        try:
            while not self.shutdown.is_set():
                claim = self.next_claim()
                if claim is None:
                    self.idle.wait(self.args.poll_interval, self.shutdown)
                    continue
                self.run_task(claim)
                recycle = self.recycle_code()
                if recycle is not None:
                    return recycle
            return EXIT_OK
        finally:
            self.settle("worker.stopping")

    def next_claim(self) -> Claim | None:
        """The batch's next task; else one round trip that writes the completions waiting and
        claims a new batch. None: no task is runnable (or shutdown came during an outage)."""
        with self._lock:
            if self._batch:
                return self._batch.pop(0)
        self.shared.wants_work = 1  # before the claim: a task committed after it pokes us
        claims = self.exchange(self.batch_size)
        if not claims:
            return None
        self.shared.wants_work = 0
        self._claimed, self._slowed = len(claims), False
        with self._lock:
            self._batch = claims[1:]
            self._publish_unstarted(claims)
        return claims[0]

    def exchange(self, limit: int) -> list[Claim]:
        """Write the completions waiting and claim up to limit tasks, in one transaction,
        riding out database outages until shutdown."""
        with self._lock:
            finished, self._finished = self._finished, []
        try:
            claims, lost = persistently(
                lambda: self.store.finish_and_claim(
                    self.args.worker_id, self.args.queues, finished, limit=limit
                ),
                log=self.log,
                what="complete" if finished else "claim",
                outage=self.outage,
                until=self.shutdown,
            )
        except TRANSIENT_ERRORS:  # shutdown came during an outage: settle() writes them
            with self._lock:
                self._finished[:0] = finished
            return []
        self._written(finished, lost)
        return claims

    def settle(self, event: str) -> None:
        """Write the completions waiting and give back, attempt uncounted, the tasks claimed
        and not started: before exit, or when a slow task would hold them up."""
        with self._settling:
            with self._lock:
                finished, self._finished = self._finished, []
                unstarted, self._batch = self._batch, []
            if not (finished or unstarted):
                return
            _claims, lost = persistently(
                lambda: self.store.finish_and_claim(
                    self.args.worker_id, self.args.queues, finished, release=unstarted, limit=0
                ),
                log=self.log,
                what="complete",
                outage=self.outage,
            )
            with self._lock:
                self._publish_unstarted(self._batch)
            self._written(finished, lost)
            if unstarted:
                self.log.info(event, released=[claim.id for claim in unstarted])

    def _guard_batch(self) -> None:
        """Thread: once a task has run for SLOW_TASK, settle its batch, so that the tasks
        behind it go to other workers and the completions before it are written."""
        while True:
            with self._task_started:
                while self._running is None or not (self._batch or self._finished):
                    self._task_started.wait()
                running = self._running
            time.sleep(max(0.0, running[1] + SLOW_TASK - time.monotonic()))
            with self._lock:
                still_running = self._running == running
            if still_running:
                self.settle("worker.batch_released")

    def _publish_unstarted(self, claims: list[Claim]) -> None:
        """Show the supervisor which claimed tasks are not started (under _lock). The slots
        in use are exactly those in _slots (a started task clears its own): only they are
        cleared, not all MAX_BATCH."""
        slots = self.shared.unstarted
        for index in self._slots.values():
            slots[index] = 0
        slots[: len(claims)] = [claim.id for claim in claims]
        self._slots = {claim.id: index for index, claim in enumerate(claims)}

    def _publish_started(self, claim: Claim) -> None:
        """The claimed task is started: no longer among the unstarted (under _lock)."""
        index = self._slots.pop(claim.id, None)
        if index is not None:
            self.shared.unstarted[index] = 0

    def _written(self, finished: list[Finished], lost: list[int]) -> None:
        """Log the outcome of a write of completions; drop them from the journal."""
        with self._lock:
            self._journal.remove(done.claim.id for done in finished)
        for task_id in lost:
            self.log.warning("task.claim_lost", task_id=task_id)
        for done in finished:
            if done.claim.id not in lost:
                self.log.info(
                    "task.completed",
                    task_id=done.claim.id,
                    task_type=done.claim.task_type,
                    attempt=done.claim.attempts,
                    duration=round(done.duration, 6),
                )

    def recycle_code(self) -> int | None:
        """Between tasks: the exit code to recycle with, if a limit is reached."""
        if self.max_tasks is not None and self.shared.processed >= self.max_tasks:
            self.log.info("worker.recycling", processed=self.shared.processed, limit=self.max_tasks)
            return EXIT_RECYCLED_TASKS
        if self.max_memory_mb is not None:
            rss_mb = _rss_mb()
            if rss_mb > self.max_memory_mb:
                self.log.info("worker.recycling", rss_mb=round(rss_mb), limit=self.max_memory_mb)
                return EXIT_RECYCLED_MEMORY
        return None

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
        self.idle.close()

    def _hold_timeout(self) -> Callable[[float], None]:
        """Suspend the task's timeout while a handler's write waits on the database; the
        returned release restores it, later by the seconds the database was unavailable."""
        deadline, self.shared.task_deadline = float(self.shared.task_deadline), 0.0

        def release(unavailable: float) -> None:
            if deadline:
                self.shared.task_deadline = deadline + unavailable

        return release

    def run_task(self, claim: Claim) -> None:
        """Run one claimed task to its end and record the outcome, fenced on the claim."""
        log = self.log.bind(task_id=claim.id, task_type=claim.task_type, attempt=claim.attempts)
        self.shared.current_task = claim.id
        started = time.monotonic()
        with self._lock:
            self._publish_started(claim)
            self._running = (claim.id, started)
            if self._batch or self._finished:
                self._task_started.notify()
        log.debug("task.started")
        fast = False
        try:
            fast = self._execute(claim, log, started)
        except LostClaim:
            log.warning("task.claim_lost")
        finally:
            with self._lock:
                self._running = None
            self.shared.task_deadline = 0.0
            self.shared.current_task = 0
            self.shared.processed += 1
        self._slowed = self._slowed or not fast
        took = time.monotonic() - started
        self.batch_size = 1 if self._slowed else self._next_batch_size(took)

    def _next_batch_size(self, took: float) -> int:
        """Twice the last batch, within max_batch and BATCH_BUDGET (by the last task's
        duration)."""
        fits = int(BATCH_BUDGET / took) if took > 0 else self.max_batch
        return max(1, min(self.max_batch, self._claimed * 2, fits))

    def _execute(self, claim: Claim, log: Any, started: float) -> bool:
        """Run the handler; return whether it completed within FAST_TASK. Its completion waits
        for the worker's next round trip (failures are written at once)."""
        spec = registry.get(claim.task_type)
        if spec is None:
            known = ", ".join(registry.names()) or "none"
            error = f"no handler registered for task type {claim.task_type!r} (known: {known})"
            self._fail(claim, log, error, permanent=True, started=started)
            return False
        try:
            payload = json.loads(claim.payload)
        except ValueError as exc:
            self._fail(
                claim, log, f"payload is not valid JSON: {exc}", permanent=True, started=started
            )
            return False
        timeout = claim.timeout or spec.timeout
        if timeout:  # enforced by the supervisor, which kills this process when it passes
            self.shared.task_timeout = timeout
            self.shared.task_deadline = started + timeout
        ctx = TaskContext(
            self.store,
            claim,
            self.shutdown,
            cancel_signal=lambda: self.shared.cancel_task == claim.id,
            log=log,
            outage=self.outage,
            hold_timeout=self._hold_timeout,
        )
        try:
            if spec.is_async:
                if self._runner is None:
                    self._runner = asyncio.Runner()
                value = self._runner.run(spec.handler(ctx, payload))
            else:
                value = spec.handler(ctx, payload)
        except LostClaim:
            raise
        except registry.InvalidPayload as exc:
            self._fail(
                claim, log, f"invalid payload: {exc}", permanent=True, started=started, ctx=ctx
            )
            return False
        except Cancelled as exc:
            self._fail(claim, log, f"cancelled: {exc}", cancelled=True, started=started, ctx=ctx)
            return False
        except Exception as exc:
            self._fail(claim, log, _describe(exc), started=started, ctx=ctx, spec=spec)
            return False
        try:
            result = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            error = f"the handler's result is not JSON: {exc}"
            self._fail(claim, log, error, permanent=True, started=started, ctx=ctx)
            return False
        duration = time.monotonic() - started
        progress = ctx.take_unwritten_progress()
        self.shared.task_deadline = 0.0  # the handler is done: a slow write is no timeout
        done = Finished(claim, result, duration, progress)
        with self._lock:
            self._finished.append(done)
            self._journal.add(done)
        return duration < FAST_TASK

    def _fail(
        self,
        claim: Claim,
        log: Any,
        error: str,
        *,
        started: float,
        permanent: bool = False,
        cancelled: bool = False,
        ctx: TaskContext | None = None,
        spec: registry.TaskSpec | None = None,
    ) -> None:
        base = spec.retry_backoff if spec else registry.DEFAULT_RETRY_BACKOFF
        delay = retry_delay(claim.attempts, base)
        duration = time.monotonic() - started
        progress = ctx.take_unwritten_progress() if ctx else None
        self.shared.task_deadline = 0.0  # the handler is done: a slow write is no timeout
        status = persistently(
            lambda: self.store.fail_task(
                claim,
                error,
                retry_delay=delay,
                permanent=permanent,
                cancelled=cancelled,
                duration=duration,
                progress=progress,
            ),
            log=log,
            what="fail",
            outage=self.outage,
        )
        self.shared.failed += 1
        first_line = error.splitlines()[0] if error else ""
        if status == CANCELLED:
            log.info("task.cancelled")
        elif status == "pending":
            log.warning("task.retry_scheduled", error=first_line, retry_in=round(delay, 3))
        else:
            log.error("task.failed", error=first_line, permanent=permanent)


def _describe(exc: BaseException) -> str:
    """The error as stored: type and message first, then the traceback."""
    trace = "".join(traceback.format_exception(exc)).rstrip()
    return f"{type(exc).__name__}: {exc}\n{trace}"
