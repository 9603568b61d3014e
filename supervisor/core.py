"""The supervisor: keeps N worker processes alive and no task stuck.

The loop, one iteration (`tick`):
    handle signals -> reap exited workers -> settle them (write the completions they left
    unwritten, release their unstarted tasks, rescue the rest) -> kill hung or overdue workers
    -> forward cancellations -> retire surplus or outdated workers -> top up to N (with
    crash back-off) -> record heartbeats -> look for work for idle workers (wake-ups on)
    -> rescue stale tasks, purge (when due; one node at a time) -> tell systemd (under
    systemd only) -> wait

The wait wakes at once when a worker exits (its process sentinel) or a signal
arrives (a wake-up pipe), so nothing is polled with sleep.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from supervisor.listener import Listener
from supervisor.notify import Notifier, PoolView, ServiceReporter
from supervisor.process import (
    CLEAN_EXITS,
    WorkerHandle,
    classify_exit,
    is_same_process,
    process_start_time,
    send_signal,
)
from supervisor.signals import SignalInbox
from workers import __version__, registry
from workers.resilience import Outage
from workers.store import PURGE_BATCH, TRANSIENT_ERRORS, Finished, Rescued, Store, WorkerStats
from workers.worker import (
    EXIT_BOOT_FAILURE,
    LIVENESS_INTERVAL,
    WorkerArgs,
    release_free_memory,
)

HEARTBEAT_INTERVAL = 2.0  # seconds between two heartbeat statements
HEARTBEAT_TIMEOUT = 30.0  # seconds of silence (database clock) before any node rescues
WORKER_TIMEOUT = 30.0  # seconds without a liveness proof before a worker is killed as hung
GRACEFUL_TIMEOUT = 30.0  # seconds running tasks get to finish on SIGTERM
CANCEL_GRACE = 10.0  # seconds a cancelled running task gets to stop before its worker is killed
STACK_WAIT = 0.3  # seconds a hung worker gets to write its stacks before the SIGKILL
CANCEL_CHECK_INTERVAL = 0.5  # seconds between two looks for cancel requests (busy workers only)
POLL_INTERVAL = 1.0  # seconds between two looks at an empty queue
# With wake-ups on, the supervisor looks at the queue every poll interval for its idle
# workers (one statement, however many are idle) and pokes as many as there are tasks; an
# idle worker then looks by itself only this seldom (should a poke ever go astray).
IDLE_WORKER_POLL = 30.0  # seconds
MAX_TICK = 1.0  # seconds: the longest the loop sleeps when nothing wakes it
CRASH_WINDOW = 5.0  # seconds: a worker dying younger than this, having done nothing, crashed
CRASH_BACKOFF_INITIAL = 1.0  # seconds before respawning after the second crash in a row
CRASH_BACKOFF_CAP = 60.0
# Seconds the supervisor waits for SQLite's write lock before it counts the database as
# unavailable for now: short, so that its loop keeps turning (and kills, on time, the hung
# worker that may be holding that lock).
SQLITE_LOCK_WAIT = 0.5
PURGE_INTERVAL = 300.0  # seconds between two periodic purges by one node (run --purge-after)
# Settings a SIGHUP cannot change: they need a restart.
RESTART_ONLY = frozenset({"database_url", "node"})


@dataclass
class _Retirement:
    """A worker that ended and whose row and tasks still need settling in the database."""

    worker_id: int
    pid: int
    exit_code: int | None
    exit_reason: str
    stats: WorkerStats
    release: bool  # put its task back without counting the attempt (shutdown kill)
    diagnosis: str | None = None  # the stacks read before a hung or timed-out worker's kill
    unstarted: tuple[int, ...] = ()  # tasks it claimed and never started: no attempt counted
    finished: tuple[Finished, ...] = ()  # completions it computed and did not write (journal)


class Supervisor:
    """A pool of worker processes on one node. `run()` blocks; `start()`/`stop()` embed it."""

    def __init__(
        self,
        database_url: str,
        *,
        workers: int | None = None,
        queues: Sequence[str] = (),
        imports: Sequence[str] = (),
        node: str | None = None,
        poll_interval: float = POLL_INTERVAL,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        worker_timeout: float = WORKER_TIMEOUT,
        graceful_timeout: float = GRACEFUL_TIMEOUT,
        cancel_grace: float = CANCEL_GRACE,
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: float | None = None,
        purge_after: float | None = None,
        purge_interval: float = PURGE_INTERVAL,
        log_format: str | None = None,
        log_level: str = "info",
        wake_up: bool = True,
    ) -> None:
        self.database_url = database_url
        self.desired = workers if workers is not None else (os.cpu_count() or 1)
        if self.desired < 1:
            raise ValueError("a pool needs at least 1 worker")
        self.queues = tuple(queues)
        self.imports = tuple(imports)
        self.node = node or socket.gethostname()
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.worker_timeout = worker_timeout
        self.graceful_timeout = graceful_timeout
        self.cancel_grace = cancel_grace
        self.max_tasks_per_worker = max_tasks_per_worker
        self.max_memory_per_worker = max_memory_per_worker
        self.purge_after = purge_after  # seconds a finished task is kept; None: forever
        self.purge_interval = purge_interval
        self.log_format = log_format
        self.log_level = log_level
        self.wake_up = wake_up  # idle workers start at once on an enqueue (else: polling only)

        self.id = 0
        self.store: Store | None = None
        self.workers: dict[int, WorkerHandle] = {}
        self.log: Any = structlog.get_logger().bind(pid=os.getpid(), node=self.node)
        self._inbox = SignalInbox()
        self._retirements: list[_Retirement] = []
        self._stopping = False
        self._quick = False
        self._stop_deadline = 0.0
        self._next_heartbeat = 0.0
        self._next_rescue = 0.0
        self._next_purge = 0.0
        self._next_spawn = 0.0
        self._next_cancel_check = 0.0
        self._next_look = 0.0
        self._crash_streak = 0
        self._crash_reason: str | None = None
        self._generation = 0  # bumped by a reload: older workers are replaced
        # () -> fresh Supervisor keyword arguments, for SIGHUP (the CLI sets it)
        self.reloader: Callable[[], dict[str, Any]] | None = None
        self._outage = Outage()  # whether the database is reachable, and since when
        self._stop_requested: str | None = None
        self._thread: threading.Thread | None = None
        self.listener: Listener | None = None  # hears enqueues (wait() opens and drains it)
        self.systemd = ServiceReporter.disabled()  # run() enables it under systemd

    # -- life cycle ------------------------------------------------------------------

    def run(self) -> None:
        """Boot, supervise until told to stop, then drain. Blocks; handles TERM, INT and QUIT."""
        self._inbox.install()
        self.systemd = ServiceReporter(
            Notifier.from_environment(unset=True), status_interval=self.heartbeat_interval
        )
        try:
            self.boot()
            release_free_memory()  # a process of its own: what booting freed goes back
            self.loop()
        finally:
            self.shutdown()

    def start(self) -> None:
        """Boot here (errors raise here), then supervise from a background thread.

        The application keeps its own signal handlers; it calls stop() from its shutdown.
        """
        try:
            self.boot()
        except BaseException:
            self.shutdown()
            raise

        def supervise() -> None:
            try:
                self.loop()
            finally:
                self.shutdown()

        self._thread = threading.Thread(target=supervise, name="taskherd-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop a started pool: running tasks get `timeout` seconds (default: graceful timeout)."""
        if timeout is not None:
            self.graceful_timeout = timeout
        self.request_stop()
        if self._thread is not None:
            self._thread.join()

    def request_stop(self, *, quick: bool = False) -> None:
        """Ask the loop to stop (from any thread); quick means kill the workers now."""
        self._stop_requested = "quick" if quick else "graceful"
        self._inbox.wake()

    def boot(self) -> None:
        """Start-up, in order: task modules, database and schema, our row, predecessors, workers."""
        registry.import_modules(self.imports)
        self.store = Store(self.database_url, create=True, busy_timeout=SQLITE_LOCK_WAIT)
        self.store.ensure_schema()
        self.id = self.store.register_supervisor(
            self.node,
            os.getpid(),
            process_start_time(os.getpid()) or 0.0,
            self.desired,
            __version__,
            self.heartbeat_timeout,
        )
        self.log = self.log.bind(supervisor_id=self.id)
        self.rescue_dead_predecessors()
        self.log.info(
            "supervisor.started",
            workers=self.desired,
            queues=list(self.queues) or "*",
            database=self.store.masked_url,
            version=__version__,
        )
        self.top_up()

    def loop(self) -> None:
        """Tick until the pool is stopped and every worker is reaped."""
        while not self.tick():
            pass

    def tick(self) -> bool:
        """One iteration of the loop; True once the pool has fully stopped."""
        self.handle_signals()
        self.reap_workers()
        self.settle_retirements()
        if self._stopping:
            self.drive_shutdown()
            if not self.workers:
                return True
        else:
            self.kill_hung_workers()
            self.forward_cancellations()
            self.retire_workers()
            self.top_up()
        self.record_heartbeats()
        if not self._stopping:
            self.look_for_work()
            self.rescue_stale_tasks()
            self.purge_finished()
        self.notify_systemd()
        self.wait()
        return False

    # -- the steps -------------------------------------------------------------------

    def handle_signals(self) -> None:
        """Act on recorded signals: TERM/INT drain, a second INT or QUIT stops at once;
        HUP reloads, TTIN/TTOU add or remove a worker."""
        for signum in self._inbox.drain():
            if signum == signal.SIGQUIT or (signum == signal.SIGINT and self._stopping):
                self.begin_stop(quick=True, why=signal.Signals(signum).name)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.begin_stop(quick=False, why=signal.Signals(signum).name)
            elif self._stopping:
                continue
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGTTIN:
                self.resize(self.desired + 1, why="SIGTTIN")
            elif signum == signal.SIGTTOU:
                self.resize(self.desired - 1, why="SIGTTOU")
        requested, self._stop_requested = self._stop_requested, None
        if requested is not None:
            self.begin_stop(quick=requested == "quick", why="requested")

    def resize(self, workers: int, *, why: str) -> None:
        """Aim for this many workers (at least 1); surplus ones finish their task and leave."""
        workers = max(1, workers)
        if workers != self.desired:
            self.log.info("supervisor.resized", workers=workers, previous=self.desired, reason=why)
            self.desired = workers

    def reload(self) -> None:
        """Re-read the configuration (SIGHUP); workers are then replaced one by one.

        A configuration that cannot be read or a module that cannot be imported changes
        nothing. The database and the node name need a restart.
        """
        if self.reloader is None:
            self.log.warning("supervisor.reload_unavailable")
            return
        told_systemd = self.systemd.ready_sent  # before READY=1, a reload is no news to it
        if told_systemd:
            self.systemd.notifier.reloading("reloading the configuration")
        try:
            settings = self.reloader()
            registry.import_modules(settings.get("imports", ()))
        except Exception as error:
            self.log.error("supervisor.reload_failed", error=str(error).splitlines()[0])
            if told_systemd:
                self.systemd.notifier.ready()
            return
        changed = {}
        for name, value in settings.items():
            if name in RESTART_ONLY or name == "workers" or getattr(self, name) == value:
                if name in RESTART_ONLY and getattr(self, name) != value:
                    self.log.warning("supervisor.reload_needs_restart", setting=name)
                continue
            changed[name] = value
            setattr(self, name, value)
        self.resize(settings.get("workers", self.desired), why="SIGHUP")
        self._generation += 1
        self.log.info("supervisor.reloaded", changed=sorted(changed), generation=self._generation)
        if told_systemd:
            self.systemd.notifier.ready()  # the workers are replaced from here, one at a time

    def retire_workers(self) -> None:
        """Scale down to N, and replace workers of an older configuration one at a time;
        each one leaves gracefully, after its current task."""
        staying = [h for h in self.workers.values() if not h.retiring and h.kill_reason is None]
        surplus = len(staying) - self.desired
        outdated = [h for h in staying if h.generation < self._generation]
        rolling = any(h.retiring for h in self.workers.values())
        if surplus > 0:
            chosen = sorted(staying, key=lambda h: bool(h.shared.current_task))[:surplus]
            why = "scaled down"
        elif outdated and not rolling:
            chosen = sorted(outdated, key=lambda h: bool(h.shared.current_task))[:1]
            why = "configuration reloaded"
        else:
            return
        for handle in chosen:
            self.log.info("worker.retiring", worker_id=handle.worker_id, pid=handle.pid, reason=why)
            handle.retiring = True
            handle.terminate()

    def begin_stop(self, *, quick: bool, why: str) -> None:
        """Stop claiming: TERM every worker (graceful) or KILL them (quick)."""
        if self._stopping and (self._quick or not quick):
            return
        first = not self._stopping
        self._stopping, self._quick = True, quick
        self._stop_deadline = time.monotonic() + (0.0 if quick else self.graceful_timeout)
        self.log.info(
            "supervisor.stopping", reason=why, quick=quick, graceful_timeout=self.graceful_timeout
        )
        if first:
            self._db(lambda store: store.set_supervisor_status(self.id, "stopping"), "stopping")
        for handle in self.workers.values():
            if quick:
                handle.kill("killed at shutdown (quick stop)", release=True)
            else:
                handle.terminate()

    def drive_shutdown(self) -> None:
        """Past the graceful deadline, KILL the workers still running."""
        if time.monotonic() < self._stop_deadline:
            return
        for handle in self.workers.values():
            if handle.kill_reason is None:
                self.log.warning(
                    "worker.killed",
                    worker_id=handle.worker_id,
                    pid=handle.pid,
                    reason="graceful timeout",
                )
                handle.kill(
                    f"killed at shutdown after the graceful timeout ({self.graceful_timeout:g} s)",
                    release=True,
                )

    def reap_workers(self) -> None:
        """Collect every exited worker; its task is rescued in settle_retirements."""
        for worker_id, handle in list(self.workers.items()):
            code = handle.exit_code
            if code is None:
                continue
            del self.workers[worker_id]
            reason = classify_exit(
                code,
                handle.kill_reason,
                oom_killed=handle.killed_by_oom() if code == -signal.SIGKILL else None,
                boot_error=handle.boot_error() if code == EXIT_BOOT_FAILURE else None,
            )
            crashed = code == EXIT_BOOT_FAILURE or (
                code not in CLEAN_EXITS
                and handle.kill_reason is None
                and self._died_at_start(handle)
            )
            (self.log.info if code in CLEAN_EXITS else self.log.warning)(
                "worker.exited",
                worker_id=worker_id,
                pid=handle.pid,
                exit_code=code,
                exit_reason=reason,
            )
            self._retirements.append(
                _Retirement(
                    worker_id,
                    handle.pid,
                    code,
                    reason,
                    handle.stats(),
                    release=handle.release_tasks,
                    diagnosis=handle.diagnosis,
                    unstarted=tuple(handle.shared.unstarted_tasks()),
                    finished=tuple(handle.unwritten_completions()),
                )
            )
            if not self._stopping:
                self._note_crash(crashed, reason)
            handle.close()
            if self._outage.down:  # it may have held SQLite's write lock: probe again at once
                self._next_heartbeat = min(self._next_heartbeat, time.monotonic())

    @staticmethod
    def _died_at_start(handle: WorkerHandle) -> bool:
        """Young and never held a task: its death is a start-up crash, not its task's doing."""
        young = time.monotonic() - handle.spawned_at < CRASH_WINDOW
        stats = handle.stats()
        return young and stats.current_task_id is None and stats.processed == 0

    def _note_crash(self, crashed: bool, reason: str) -> None:
        """Back off respawning while workers keep dying at start (a crash loop)."""
        if not crashed:
            self._end_crash_streak()
            return
        self._crash_streak += 1
        self._crash_reason = reason
        if self._crash_streak < 2:
            return
        delay = min(CRASH_BACKOFF_CAP, CRASH_BACKOFF_INITIAL * 2 ** (self._crash_streak - 2))
        self._next_spawn = time.monotonic() + delay
        if self._crash_streak == 2:
            self.log.error("supervisor.crash_loop", reason=reason, backoff=delay)

    def _end_crash_streak(self) -> None:
        """A worker outlived the crash window, or ended for a reason of its own: no loop."""
        if self._crash_streak >= 2:
            self.log.info("supervisor.crash_loop_ended", crashes=self._crash_streak)
        self._crash_streak, self._crash_reason = 0, None

    def settle_retirements(self) -> None:
        """Mark ended workers inactive and rescue their tasks (kept while the database is down)."""
        while self._retirements:
            retirement = self._retirements[0]
            rescued = self._db(lambda store, r=retirement: self._retire(store, r), "retire worker")
            if rescued is None:
                return
            self._retirements.pop(0)
            for task in rescued:
                self.log.warning(
                    "task.rescued",
                    task_id=task.id,
                    status=task.status,
                    attempts=task.attempts,
                    worker_id=retirement.worker_id,
                    pid=retirement.pid,
                    reason=retirement.exit_reason,
                )
            self._wake_for(rescued)

    def _wake_for(self, rescued: list[Rescued]) -> None:
        """Rescued tasks back in the queue are news nobody announced: wake idle workers."""
        again = sum(1 for task in rescued if task.status == "pending")
        if again and not self._stopping:
            self.wake_idle_workers(again, why="rescued")

    def _retire(self, store: Store, retirement: _Retirement) -> list[Rescued]:
        error = f"worker {retirement.worker_id} (pid {retirement.pid}) {retirement.exit_reason}"
        if retirement.diagnosis:
            error = f"{error}\n{retirement.diagnosis}"
        if retirement.finished:  # done before it died: written now, so they do not run again
            _claims, lost = store.finish_and_claim(
                retirement.worker_id, (), retirement.finished, limit=0
            )
            written = [f.claim.id for f in retirement.finished if f.claim.id not in lost]
            self.log.info(
                "task.completion_written", worker_id=retirement.worker_id, task_ids=written
            )
        released = store.release_unstarted(retirement.worker_id, retirement.unstarted)
        if released:  # claimed in its batch, never started: no attempt counted
            self.log.info("task.released", worker_id=retirement.worker_id, released=released)
        return store.retire_worker(
            retirement.worker_id,
            exit_code=retirement.exit_code,
            exit_reason=retirement.exit_reason,
            stats=retirement.stats,
            error=error,
            release=retirement.release,
        )

    def kill_hung_workers(self) -> None:
        """SIGKILL a worker whose liveness proof is older than worker_timeout, or whose task
        ran past its timeout."""
        now = time.monotonic()
        for handle in self.workers.values():
            handle.finish_diagnosis(now)
            if handle.kill_reason is not None or handle.pending_kill is not None:
                continue
            timeout = handle.overdue(now)
            if timeout is not None:
                task_id = handle.shared.current_task
                self.log.error(
                    "task.timed_out",
                    task_id=task_id,
                    worker_id=handle.worker_id,
                    pid=handle.pid,
                    timeout=timeout,
                )
                reason = f"timed out after {timeout:g} s (task {task_id})"
                handle.kill_with_diagnosis(reason, now, STACK_WAIT)
                continue
            age = handle.liveness_age(now)
            if age > self.worker_timeout:
                self.log.error(
                    "worker.hung",
                    worker_id=handle.worker_id,
                    pid=handle.pid,
                    silent_for=round(age, 1),
                )
                limit = f"worker timeout {self.worker_timeout:g} s"
                reason = f"killed: unresponsive for {age:.0f} s ({limit})"
                handle.kill_with_diagnosis(reason, now, STACK_WAIT)

    def forward_cancellations(self) -> None:
        """Tell busy workers their task was cancelled; kill those still at it after the grace."""
        now = time.monotonic()
        busy = [i for i, h in self.workers.items() if h.shared.current_task and not h.kill_reason]
        if not busy or now < self._next_cancel_check:
            return
        requests = self._db(lambda store: store.cancel_requests(busy), "cancel requests")
        if requests is None:
            return
        self._next_cancel_check = now + CANCEL_CHECK_INTERVAL
        for task_id, worker_id in requests.items():
            handle = self.workers[worker_id]
            if handle.shared.current_task != task_id:
                continue  # it finished meanwhile
            if handle.cancel_deadline is None:
                handle.shared.cancel_task = task_id
                handle.cancel_deadline = now + self.cancel_grace
                self.log.info("task.cancel_forwarded", task_id=task_id, worker_id=worker_id)
            elif now >= handle.cancel_deadline:
                self.log.warning("task.cancel_enforced", task_id=task_id, worker_id=worker_id)
                handle.kill(
                    f"killed: task {task_id} was cancelled and still ran "
                    f"{self.cancel_grace:g} s later"
                )

    def record_heartbeats(self) -> None:
        """Stamp this supervisor and its live workers, one statement per table, when due."""
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        for handle in self.workers.values():
            if not handle.pid_recorded:
                self.record_pid(handle)
        live = {
            worker_id: handle.stats(with_memory=True)
            for worker_id, handle in self.workers.items()
            if handle.liveness_age(now) <= self.worker_timeout and handle.kill_reason is None
        }
        if self._crash_streak and any(
            now - h.spawned_at > CRASH_WINDOW for h in self.workers.values()
        ):
            self._end_crash_streak()
        streak = self._crash_streak if self._crash_streak >= 2 else 0
        disowned = self._db(
            lambda store: store.record_heartbeats(
                self.id, live, streak, self._crash_reason, desired_workers=self.desired
            ),
            "heartbeat",
            probe=True,
        )
        if disowned is None:  # the database is down: probe it again after a backoff
            self._next_heartbeat = time.monotonic() + self._outage.next_delay()
            return
        self._next_heartbeat = now + self.heartbeat_interval
        for worker_id in disowned:
            handle = self.workers[worker_id]
            self.log.error("worker.disowned", worker_id=worker_id, pid=handle.pid)
            handle.kill("killed: declared lost by another node while this one was cut off")

    def look_for_work(self) -> None:
        """With wake-ups on, every poll interval while workers are idle: count the runnable
        tasks (up to the idle workers' number) and poke that many. Tasks that no enqueue
        announced (delayed ones coming due, retries after their backoff, tasks enqueued in
        autocommit on SQLite) start within a poll interval, for one statement per supervisor."""
        now = time.monotonic()
        if not self.wake_up or now < self._next_look:
            return
        idle = self._idle_workers()
        if not idle:
            return
        self._next_look = now + self.poll_interval  # (wait() wakes for it: never in the past)
        if self._outage.down:  # the heartbeat's probe finds the way back
            return
        runnable = self._db(lambda store: store.runnable_tasks(self.queues, len(idle)), "look")
        if runnable:
            self.wake_idle_workers(runnable, why="look")

    def _idle_workers(self) -> list[WorkerHandle]:
        return [
            handle
            for handle in self.workers.values()
            if handle.wants_work and not handle.retiring and handle.kill_reason is None
        ]

    def rescue_stale_tasks(self) -> None:
        """Rescue tasks whose worker's heartbeat is older than heartbeat_timeout, on any node
        (one node at a time: the store skips it while another node's maintenance runs).

        Not while our own heartbeats cannot be written, nor until a heartbeat timeout after
        an outage: the other nodes were cut off as we were, and their heartbeats are as old as
        ours until they write the next one (within the retry cap of their recovery).
        """
        now = time.monotonic()
        if now < self._next_rescue or self._outage.down:
            return
        recovered = self._outage.recovered_at
        if recovered is not None and now - recovered < self.heartbeat_timeout:
            return
        result = self._db(lambda store: store.rescue_stale_tasks(self.heartbeat_timeout), "rescue")
        if result is None:
            return
        self._next_rescue = now + self.heartbeat_interval
        rescued, lost = result
        for worker_id in lost:
            self.log.warning(
                "worker.lost", worker_id=worker_id, heartbeat_timeout=self.heartbeat_timeout
            )
        for task in rescued:
            self.log.warning(
                "task.rescued",
                task_id=task.id,
                status=task.status,
                attempts=task.attempts,
                worker_id=task.worker_id,
                reason="heartbeat lost",
            )
        self._wake_for(rescued)

    def purge_finished(self) -> None:
        """With purge_after: delete old finished tasks and stopped process rows every
        purge_interval, on one node at a time; sooner while a backlog remains."""
        now = time.monotonic()
        older_than = self.purge_after
        if older_than is None or now < self._next_purge or self._outage.down:
            return
        self._next_purge = now + self.purge_interval
        removed = self._db(lambda store: store.purge_finished(older_than), "purge")
        if not removed:  # the database is down, or another node's maintenance runs
            return
        if max(removed.values()) >= PURGE_BATCH:
            self._next_purge = now + self.heartbeat_interval
        if any(removed.values()):
            self.log.info("maintenance.purged", older_than=older_than, **removed)

    def top_up(self) -> None:
        """Spawn workers until there are N, unless backing off after crashes."""
        while len(self.workers) < self.desired and time.monotonic() >= self._next_spawn:
            if not self.spawn_worker():
                return

    def spawn_worker(self) -> bool:
        """Register a row, start the process, record its pid. False if the database is down."""
        worker_id = self._db(
            lambda store: store.register_worker(self.id, self.node, self.queues), "register worker"
        )
        if worker_id is None:  # the database is down: retry with the next heartbeat probe
            self._next_spawn = max(self._next_spawn, self._next_heartbeat)
            return False
        args = WorkerArgs(
            database_url=self.database_url,
            worker_id=worker_id,
            supervisor_pid=os.getpid(),
            node=self.node,
            queues=self.queues,
            imports=self.imports,
            poll_interval=IDLE_WORKER_POLL if self.wake_up else self.poll_interval,
            liveness_interval=min(LIVENESS_INTERVAL, self.worker_timeout / 8),
            max_tasks=self.max_tasks_per_worker,
            max_memory_mb=self.max_memory_per_worker,
            log_format=self.log_format,
            log_level=self.log_level,
            sys_path=tuple(sys.path),
        )
        handle = WorkerHandle(worker_id, args)
        handle.generation = self._generation
        self.workers[worker_id] = handle
        self.log.info("worker.spawned", worker_id=worker_id, pid=handle.pid)
        self.record_pid(handle)
        return True

    def record_pid(self, handle: WorkerHandle) -> None:
        """Write the worker's pid and start time to its row (what a successor checks)."""
        started = process_start_time(handle.pid)
        recorded = self._db(
            lambda store: store.set_worker_pid(handle.worker_id, handle.pid, started),
            "record worker pid",
        )
        handle.pid_recorded = recorded is not None

    def notify_systemd(self) -> None:
        """Under systemd (NOTIFY_SOCKET, run() only): READY=1 once all workers are up, STATUS=,
        WATCHDOG=1 from this turning loop, STOPPING=1 and EXTEND_TIMEOUT_USEC= in a drain."""
        if not self.systemd.enabled:
            return
        now = time.monotonic()
        up = [h for h in self.workers.values() if h.booted and h.kill_reason is None]
        pool = PoolView(
            desired=self.desired,
            up=len(up),
            alive=len(self.workers),
            responsive=sum(h.liveness_age(now) <= self.worker_timeout for h in up),
            stopping=self._stopping,
            drain_deadline=self._stop_deadline if self._stopping and not self._quick else None,
        )
        self.systemd.update(
            now, pool, lambda: self._db(lambda s: s.task_counts(self.queues), "task counts")
        )

    def wait(self) -> None:
        """Sleep until a worker exits, a signal arrives, or the next timed step is due."""
        now = time.monotonic()
        due = [self._next_heartbeat]
        if self._stopping:
            due.append(self._stop_deadline)
        elif len(self.workers) < self.desired:
            due.append(self._next_spawn)
        if self.wake_up and not self._stopping and self._idle_workers():
            due.append(self._next_look)
        # task deadlines share CLOCK_MONOTONIC with us: wake when the first one passes
        due.extend(d for h in self.workers.values() if (d := float(h.shared.task_deadline)))
        due.extend(h.stack_deadline for h in self.workers.values() if h.pending_kill)
        if (watchdog := self.systemd.next_due()) is not None:
            due.append(watchdog)
        listener = self.keep_listening(now)
        if listener is not None:
            due.append(listener.next_due)
        timeout = max(0.0, min(MAX_TICK, *(moment - now for moment in due)))
        waitables: list[Any] = [handle.sentinel for handle in self.workers.values()]
        waitables.append(self._inbox)
        heard = listener.fileno() if listener is not None and listener.is_open else None
        if heard is not None:
            waitables.append(heard)
        ready = multiprocessing.connection.wait(waitables, timeout)
        if listener is not None and heard in ready:
            self.wake_idle_workers(listener.drain(self.queues), why="announced")

    def keep_listening(self, now: float) -> Listener | None:
        """Open, check or reopen (with back-off) the listener that hears enqueues; close it
        when wake-ups are off. Every idle worker looks once after the listener (re)opens."""
        if not self.wake_up or self._stopping or self.store is None:
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            return None
        if self.listener is None:
            self.listener = Listener.for_store(self.store, self.id, self.log)
        if self.listener.maintain(now):
            self.wake_idle_workers(None, why="listening")
        return self.listener

    def wake_idle_workers(self, tasks: int | None, *, why: str) -> None:
        """Poke up to `tasks` workers that are looking for work (None: every one of them):
        because tasks were announced, because the listener (re)opened, or after a look.

        As many as tasks were announced, not all: with 8 idle workers, waking all of them for
        each task tripled the pool's CPU and doubled the pickup latency (the empty claims of
        the losers queue with the winner's)."""
        poked: list[int] = []
        for handle in self._idle_workers():
            if tasks is not None and len(poked) >= tasks:
                break
            handle.poke()
            poked.append(handle.worker_id)
        if poked:
            self.log.debug("wake.poked", workers=poked, tasks=tasks, why=why)

    def rescue_dead_predecessors(self) -> None:
        """At boot: settle supervisors on this node whose process is gone, and their workers."""
        store = self._store
        sups, wks = store.live_processes_on_node(self.node)
        alive = {
            row.id
            for row in sups
            if row.id == self.id or is_same_process(row.pid, row.pid_start_time)
        }
        for row in sups:
            if row.id not in alive:
                store.set_supervisor_status(row.id, "dead")
                self.log.warning(
                    "supervisor.predecessor_dead", predecessor_id=row.id, predecessor_pid=row.pid
                )
        for row in wks:
            if row.supervisor_id in alive:
                continue
            if is_same_process(row.pid, row.pid_start_time):
                send_signal(row.pid or 0, signal.SIGKILL)  # an orphan: nobody watches it
            reason = f"lost with its supervisor {row.supervisor_id}"
            rescued = store.retire_worker(
                row.id,
                exit_code=None,
                exit_reason=reason,
                error=f"worker {row.id} (pid {row.pid}) {reason}",
            )
            for task in rescued:
                self.log.warning(
                    "task.rescued",
                    task_id=task.id,
                    status=task.status,
                    worker_id=row.id,
                    pid=row.pid,
                    reason=reason,
                )

    def shutdown(self) -> None:
        """After the loop: make sure no worker outlives us and every row is settled."""
        for handle in self.workers.values():
            handle.kill("killed: the supervisor stopped unexpectedly", release=True)
        for handle in list(self.workers.values()):
            handle.process.wait()
        self._stopping = True
        self.reap_workers()
        self.settle_retirements()
        if self.store is not None:
            if self.id:
                self._db(lambda store: store.set_supervisor_status(self.id, "stopped"), "stopped")
                self.log.info("supervisor.stopped")
            self.store.dispose()
        if self.listener is not None:
            self.listener.close()
        self._inbox.close()

    # -- database access that survives outages --------------------------------------

    @property
    def _store(self) -> Store:
        if self.store is None:
            raise RuntimeError("the supervisor has not booted")
        return self.store

    def _db(self, operation: Any, what: str, *, probe: bool = False) -> Any:
        """Run one store operation and return its result, or None if the database is down
        (operations whose success matters return something else).

        The first transient error starts an outage, logged once. While it lasts only the
        heartbeat (probe=True) tries the database, at backoff intervals; everything else
        returns None at once, so the loop neither spins nor blocks on a dead database, and a
        read that a write-locked SQLite file still allows does not end the outage.
        """
        if self._outage.down and not probe:
            return None
        try:
            result = operation(self._store)
        except TRANSIENT_ERRORS as error:
            self._outage.failed(self.log, what, error)
            return None
        self._outage.succeeded(self.log)
        return result
