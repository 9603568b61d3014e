"""`taskherd status --watch` against a real pool: plain frames into a pipe, a redrawn screen
on a terminal (a real pseudo-terminal), and a clean exit on Ctrl-C either way."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Callable

from tests.acceptance.pool import Pool
from tests.acceptance.test_cli import clean_env, cli_argv
from tests.helpers import wait_until

StartPool = Callable[..., Pool]


def read_until(fd: int, done: Callable[[str], bool], timeout: float) -> str:
    """Read fd until done(text so far) or the deadline; return the text."""
    text = ""
    deadline = time.monotonic() + timeout
    while not done(text):
        left = deadline - time.monotonic()
        assert left > 0, f"never saw what was expected; got:\n{text[-2000:]}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"the output ended early:\n{text[-2000:]}"
            text += chunk.decode("utf-8", "replace")
    return text


def busy_pool(start_pool: StartPool) -> Pool:
    pool = start_pool(workers=2)
    task_id = pool.queue.enqueue("sleep", {"seconds": 30})
    pool.running_task(task_id)
    wait_until(lambda: pool.task(task_id)["progress_percentage"], 10)
    return pool


def test_watch_into_a_pipe_prints_plain_frames_and_stops_cleanly_on_ctrl_c(
    start_pool: StartPool,
) -> None:
    pool = busy_pool(start_pool)
    watcher = subprocess.Popen(
        cli_argv(["--db", pool.database_url, "status", "--watch", "--interval", "0.2"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert watcher.stdout is not None
        text = read_until(watcher.stdout.fileno(), lambda t: t.count("finished:") >= 2, 20)
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 0
    finally:
        watcher.kill()
    assert "\x1b" not in text  # no escape codes outside a terminal
    assert "sleep" in text and "%" in text  # the running task with its progress bar
    assert "RSS" in text and "CPU" in text
    assert "idle" in text  # the other worker
    assert watcher.stderr is not None and watcher.stderr.read() == b""


def test_watch_on_a_terminal_redraws_in_place_and_restores_the_cursor(
    start_pool: StartPool,
) -> None:
    pool = busy_pool(start_pool)
    controller, terminal = pty.openpty()
    watcher = subprocess.Popen(
        cli_argv(["--db", pool.database_url, "status", "--watch", "--interval", "0.2"]),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=clean_env(),
    )
    os.close(terminal)
    try:
        read_until(controller, lambda t: t.count("\x1b[H\x1b[2J") >= 2, 20)
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 0
        rest = read_until(controller, lambda t: "\x1b[?25h" in t, 10)
        assert "Traceback" not in rest
    finally:
        watcher.kill()
        os.close(controller)
