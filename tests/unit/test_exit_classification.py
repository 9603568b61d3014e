"""How the supervisor names a worker's end, and how it tells a live PID from a reused one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from supervisor.process import classify_exit, is_same_process
from workers.worker import EXIT_BOOT_FAILURE, EXIT_ORPHANED


def test_clean_exit() -> None:
    assert classify_exit(0, None) == "exited cleanly"


def test_sigkill_names_the_signal_and_suggests_oom_when_the_kernel_log_is_unreadable() -> None:
    reason = classify_exit(-signal.SIGKILL, None)
    assert "SIGKILL" in reason
    assert "out of memory" in reason


def test_sigkill_by_the_oom_killer_says_so() -> None:
    reason = classify_exit(-signal.SIGKILL, None, oom_killed=True)
    assert reason == "killed by the kernel's OOM killer (SIGKILL): out of memory"


def test_sigkill_not_by_the_oom_killer_names_only_the_signal() -> None:
    assert classify_exit(-signal.SIGKILL, None, oom_killed=False) == "killed by SIGKILL"


def test_sigterm_names_the_signal() -> None:
    assert classify_exit(-signal.SIGTERM, None) == "killed by SIGTERM"


def test_unknown_signal_number_still_classified() -> None:
    assert classify_exit(-200, None) == "killed by signal 200"


def test_boot_failure() -> None:
    assert EXIT_BOOT_FAILURE == 3
    assert classify_exit(3, None).startswith("could not boot")


def test_boot_failure_carries_what_the_worker_reported() -> None:
    reason = classify_exit(3, None, boot_error="cannot import myapp.tasks: RuntimeError: no")
    assert reason == "could not boot: cannot import myapp.tasks: RuntimeError: no"


def test_orphaned_worker() -> None:
    assert EXIT_ORPHANED == 4
    assert classify_exit(4, None) == "left because its supervisor died"


def test_other_exit_code() -> None:
    assert classify_exit(1, None) == "exited with code 1"


def test_vanished_without_exit_code() -> None:
    assert classify_exit(None, None) == "vanished"


@pytest.mark.parametrize("exit_code", [0, -9, -15, 1, 3, None])
def test_our_kill_reason_wins_over_the_exit_code(exit_code: int | None) -> None:
    reason = "hung: no liveness proof for 30 s"
    assert classify_exit(exit_code, reason) == reason


def test_is_same_process_for_our_own_pid_and_start_time() -> None:
    started = psutil.Process(os.getpid()).create_time()
    assert is_same_process(os.getpid(), started)


def test_is_same_process_without_recorded_start_time() -> None:
    assert is_same_process(os.getpid(), None)


@pytest.mark.parametrize("offset", [-100.0, -1.0, 1.0, 3600.0])
def test_reused_pid_is_not_the_same_process(offset: float) -> None:
    started = psutil.Process(os.getpid()).create_time()
    assert not is_same_process(os.getpid(), started + offset)


def test_pid_that_does_not_exist() -> None:
    # The kernel hands out PIDs below pid_max, never pid_max itself.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert not psutil.pid_exists(pid_max)
    assert not is_same_process(pid_max, None)
    assert not is_same_process(pid_max, 1_700_000_000.0)


@pytest.mark.parametrize("pid", [None, 0])
def test_no_pid_recorded(pid: int | None) -> None:
    assert not is_same_process(pid, None)
