"""The worker process: claim a task, run its handler, record the outcome, repeat.

`main` is the process target the supervisor starts. It installs its own signal
handlers first, builds its own engine, proves it is alive through shared memory
that its supervisor reads, and exits within about a second if that supervisor dies.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import faulthandler
import json
import mmap
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import structlog

from workers import registry
from workers.backoff import retry_delay
from workers.context import Cancelled, TaskContext
from workers.logs import configure_logging
from workers.resilience import Outage, persistently
from workers.store import CANCELLED, TRANSIENT_ERRORS, Claim, LostClaim, Store, StoreError
from workers.wake import IdleWait

POLL_INTERVAL = 1.0  # seconds between two looks at an empty queue
LIVENESS_INTERVAL = 0.25  # seconds between two stamps of the liveness proof

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
    ]


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
    log_format: str | None = None
    log_level: str = "info"
    max_tasks: int | None = None
    max_memory_mb: float | None = None
    shared_fd: int = -1
    stack_fd: int = -1  # where faulthandler writes every thread's stack on SIGUSR1
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
        target=_prove_alive, args=(shared, args.supervisor_pid, log), name="liveness", daemon=True
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


def _prove_alive(shared: SharedState, supervisor_pid: int, log: Any) -> None:
    """Stamp the liveness proof; leave at once if the supervisor is gone."""
    while True:
        shared.beat = time.monotonic()
        if os.getppid() != supervisor_pid:
            log.error("worker.orphaned", supervisor_pid=supervisor_pid)
            os._exit(EXIT_ORPHANED)
        time.sleep(LIVENESS_INTERVAL)


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

    def run(self) -> int:
        """Work until shutdown is set or it is time to recycle; a task in flight is finished
        first. Returns the exit code."""
        while not self.shutdown.is_set():
            self.shared.wants_work = 1  # before the claim: a task committed after it pokes us
            claims = self.claim()
            if not claims:
                self.idle.wait(self.args.poll_interval, self.shutdown)
                continue
            self.shared.wants_work = 0
            for claim in claims:
                self.run_task(claim)
            recycle = self.recycle_code()
            if recycle is not None:
                return recycle
        return EXIT_OK

    def recycle_code(self) -> int | None:
        """Between tasks: the exit code to recycle with, if a limit is reached."""
        if self.max_tasks is not None and self.shared.processed >= self.max_tasks:
            self.log.info("worker.recycling", processed=self.shared.processed, limit=self.max_tasks)
            return EXIT_RECYCLED_TASKS
        if self.max_memory_mb is not None:
            rss_mb = psutil.Process().memory_info().rss / 2**20
            if rss_mb > self.max_memory_mb:
                self.log.info("worker.recycling", rss_mb=round(rss_mb), limit=self.max_memory_mb)
                return EXIT_RECYCLED_MEMORY
        return None

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
        self.idle.close()

    def claim(self) -> list[Claim]:
        """Claim the next task, riding out database outages until shutdown."""
        try:
            return persistently(
                lambda: self.store.claim_tasks(self.args.worker_id, self.args.queues, 1),
                log=self.log,
                what="claim",
                outage=self.outage,
                until=self.shutdown,
            )
        except TRANSIENT_ERRORS:
            return []  # shutdown came during an outage

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
        log.info("task.started")
        try:
            self._execute(claim, log, started)
        except LostClaim:
            log.warning("task.claim_lost")
        finally:
            self.shared.task_deadline = 0.0
            self.shared.current_task = 0
            self.shared.processed += 1

    def _execute(self, claim: Claim, log: Any, started: float) -> None:
        spec = registry.get(claim.task_type)
        if spec is None:
            known = ", ".join(registry.names()) or "none"
            error = f"no handler registered for task type {claim.task_type!r} (known: {known})"
            self._fail(claim, log, error, permanent=True, started=started)
            return
        try:
            payload = json.loads(claim.payload)
        except ValueError as exc:
            self._fail(
                claim, log, f"payload is not valid JSON: {exc}", permanent=True, started=started
            )
            return
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
            return
        except Cancelled as exc:
            self._fail(claim, log, f"cancelled: {exc}", cancelled=True, started=started, ctx=ctx)
            return
        except Exception as exc:
            self._fail(claim, log, _describe(exc), started=started, ctx=ctx, spec=spec)
            return
        try:
            result = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            error = f"the handler's result is not JSON: {exc}"
            self._fail(claim, log, error, permanent=True, started=started, ctx=ctx)
            return
        duration = time.monotonic() - started
        progress = ctx.take_unwritten_progress()
        self.shared.task_deadline = 0.0  # the handler is done: a slow write is no timeout
        persistently(
            lambda: self.store.complete_task(claim, result, duration, progress),
            log=log,
            what="complete",
            outage=self.outage,
        )
        log.info("task.completed", duration=round(duration, 6))

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
