"""One worker process as its supervisor sees it, and the reason for every way it can end."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time

import psutil

from supervisor.oom import killed_by_oom
from workers.store import Finished, WorkerStats
from workers.worker import (
    EXIT_BOOT_FAILURE,
    EXIT_OK,
    EXIT_ORPHANED,
    EXIT_RECYCLED_MEMORY,
    EXIT_RECYCLED_TASKS,
    STACK_SIGNAL,
    WorkerArgs,
    map_shared_state,
    read_journal,
)

MAX_STACK_BYTES = 64 * 1024

# Clean ends: the worker stopped when asked, or recycled itself; nothing failed.
CLEAN_EXITS = (EXIT_OK, EXIT_RECYCLED_TASKS, EXIT_RECYCLED_MEMORY)


class WorkerHandle:
    """A live worker process: its row id, its process, and the shared memory it stamps."""

    def __init__(self, worker_id: int, args: WorkerArgs) -> None:
        self.worker_id = worker_id
        self.spawned_at = time.monotonic()
        self.kill_reason: str | None = None  # set when the supervisor itself kills the worker
        self.release_tasks = False  # killed for our reasons (shutdown), not its task's
        self.cancel_deadline: float | None = None  # when a cancelled task's grace runs out
        self.pending_kill: str | None = None  # a kill waiting for the stack it asked for
        self.stack_deadline = 0.0
        self.diagnosis: str | None = None  # the stack (or why there is none) at the kill
        self.pid_recorded = False  # its row has its pid (retried while the database is down)
        self.generation = 0  # the configuration it was started with (bumped by SIGHUP)
        self.retiring = False  # asked to leave after its task (scale down, reload)
        self._psutil: psutil.Process | None = None
        fd = os.memfd_create(f"taskherd-worker-{worker_id}")
        self._stack_fd = os.memfd_create(f"taskherd-stack-{worker_id}")
        self._journal_fd = os.memfd_create(f"taskherd-journal-{worker_id}")
        wake_fd, self._wake_fd = os.pipe()  # we poke the write end when tasks are enqueued
        os.set_blocking(self._wake_fd, False)
        try:
            self._memory, self.shared = map_shared_state(fd)
            args = dataclasses.replace(args, shared_fd=fd, stack_fd=self._stack_fd, wake_fd=wake_fd)
            args = dataclasses.replace(args, journal_fd=self._journal_fd)
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers"],
                stdin=subprocess.PIPE,
                pass_fds=(fd, self._stack_fd, wake_fd, self._journal_fd),
                text=True,
                process_group=0,  # a terminal's Ctrl-C reaches the supervisor only
            )
        finally:
            os.close(fd)
            os.close(wake_fd)
        stdin = self.process.stdin
        if stdin is not None:
            stdin.write(args.to_json())
            stdin.close()
        self.sentinel = os.pidfd_open(self.process.pid)

    @property
    def exit_code(self) -> int | None:
        """None while running; else the exit code (negative: the signal that killed it)."""
        return self.process.poll()

    def close(self) -> None:
        """Release the sentinel and the shared memory of an exited worker."""
        os.close(self.sentinel)
        os.close(self._stack_fd)
        os.close(self._journal_fd)
        os.close(self._wake_fd)
        del self.shared
        self._memory.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def wants_work(self) -> bool:
        """Whether the worker is looking for work and nobody has poked it since it began."""
        return bool(self.shared.wants_work)

    def poke(self) -> None:
        """Wake the worker from its idle wait: tasks were enqueued."""
        self.shared.wants_work = 0
        # A full pipe wakes it all the same; a broken one means it has exited, not yet reaped.
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._wake_fd, b"\0")

    def liveness_age(self, now: float) -> float:
        """Seconds since the worker's last liveness proof (since its spawn, before the first)."""
        return now - max(float(self.shared.beat), self.spawned_at)

    def overdue(self, now: float) -> float | None:
        """The timeout of the task this worker runs, if that task has run past it."""
        task, deadline = self.shared.current_task, float(self.shared.task_deadline)
        if not task or not deadline or now <= deadline:
            return None
        if self.shared.current_task != task:  # it moved on while we looked
            return None
        return float(self.shared.task_timeout)

    def stats(self, with_memory: bool = False) -> WorkerStats:
        current = self.shared.current_task
        rss_mb = self.rss_mb() if with_memory else None
        return WorkerStats(current or None, self.shared.processed, self.shared.failed, rss_mb)

    def rss_mb(self) -> float | None:
        """The worker's resident memory in MiB (psutil), None if it cannot be read."""
        try:
            if self._psutil is None:  # made once: it reads /proc to know the process again
                self._psutil = psutil.Process(self.pid)
            return round(float(self._psutil.memory_info().rss) / 2**20, 1)
        except psutil.Error:
            return None

    def kill_with_diagnosis(self, reason: str, now: float, wait: float) -> None:
        """Ask for every thread's stack, then kill (from `finish_diagnosis`) after `wait`."""
        if self.pending_kill is None and self.kill_reason is None:
            self.pending_kill, self.stack_deadline = reason, now + wait
            send_signal(self.pid, STACK_SIGNAL)

    def finish_diagnosis(self, now: float) -> None:
        """Past the wait, read what the worker wrote and SIGKILL it."""
        if self.pending_kill is None or now < self.stack_deadline:
            return
        stack = os.pread(self._stack_fd, MAX_STACK_BYTES, 0).decode("utf-8", "replace").strip()
        self.diagnosis = (
            f"stack of every thread at the kill:\n{stack}"
            if stack
            else "no stack: the process did not answer (stopped, e.g. SIGSTOP, or frozen)"
        )
        self.kill(self.pending_kill)

    def kill(self, reason: str, *, release: bool = False) -> None:
        """SIGKILL, remembering why: a hung or stopped process cannot act on SIGTERM."""
        if self.kill_reason is None:
            self.kill_reason = reason
            self.release_tasks = release
        send_signal(self.pid, signal.SIGKILL)

    def unwritten_completions(self) -> list[Finished]:
        """Completions the (exited) worker computed and did not write: its journal."""
        return read_journal(self._journal_fd, int(self.shared.journal_bytes))

    def boot_error(self) -> str | None:
        """What a worker that exited with EXIT_BOOT_FAILURE wrote about why (first line)."""
        text = os.pread(self._stack_fd, MAX_STACK_BYTES, 0).decode("utf-8", "replace").strip()
        return text.splitlines()[0] if text else None

    def killed_by_oom(self) -> bool | None:
        """Whether the kernel's OOM killer killed this (SIGKILLed) worker; None: unknown."""
        return killed_by_oom(self.pid, self.spawned_at)

    @property
    def booted(self) -> bool:
        """Whether the worker reached its main function (and handles SIGTERM)."""
        return float(self.shared.beat) > 0

    def terminate(self) -> None:
        """Ask for a graceful stop; a worker still booting holds no task and is killed."""
        if self.booted:
            send_signal(self.pid, signal.SIGTERM)
        else:
            self.kill("stopped before it finished booting", release=True)


def send_signal(pid: int, signum: int) -> None:
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):  # already gone: the reaper will see it
        os.kill(pid, signum)


def classify_exit(
    exit_code: int | None,
    kill_reason: str | None,
    *,
    oom_killed: bool | None = None,
    boot_error: str | None = None,
) -> str:
    """A human reason for a worker's end, from its exit code and what we did to it.

    oom_killed: whether the kernel's log shows an OOM kill of it (None: cannot be told).
    boot_error: what a worker that could not boot reported.
    """
    if kill_reason is not None:
        return kill_reason
    if exit_code is None:
        return "vanished"
    if exit_code == EXIT_OK:
        return "exited cleanly"
    if exit_code == EXIT_BOOT_FAILURE:
        if boot_error:
            return f"could not boot: {boot_error}"
        return "could not boot (a task module failed to import, or the database is unusable)"
    if exit_code == EXIT_RECYCLED_TASKS:
        return "recycled after its share of tasks (max tasks per worker)"
    if exit_code == EXIT_RECYCLED_MEMORY:
        return "recycled: its memory passed the limit (max memory per worker)"
    if exit_code == EXIT_ORPHANED:
        return "left because its supervisor died"
    if exit_code < 0:
        name = _signal_name(-exit_code)
        if -exit_code == signal.SIGKILL and oom_killed:
            return f"killed by the kernel's OOM killer ({name}): out of memory"
        if -exit_code == signal.SIGKILL and oom_killed is None:
            return f"killed by {name} (out of memory, or an operator?)"
        return f"killed by {name}"
    return f"exited with code {exit_code}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def process_start_time(pid: int) -> float | None:
    """The process's start time (psutil), which tells a live process from a reused PID."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_same_process(pid: int | None, start_time: float | None) -> bool:
    """Whether pid is still the process that was recorded (not gone, not reused)."""
    if not pid:
        return False
    current = process_start_time(pid)
    if current is None:
        return False
    return start_time is None or abs(current - start_time) < 0.5
