"""`taskherd demo`, the first thing a newcomer runs: it must finish, tell the story, and tidy up.

The demo runs as a real subprocess in its own process group, with a TMPDIR of its own,
so that anything it leaves behind (a file, a worker process) is ours to find.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

DEMO_TIMEOUT = 60.0  # seconds: the demo promises "under a minute"
RUN_DEMO = "import sys; from supervisor.demo import run_demo; sys.exit(run_demo())"
MARKER = "TASKHERD_DEMO_TEST_RUN"


def processes_marked(token: str) -> list[psutil.Process]:
    """Live processes started under this test run: they inherit the marker in their env."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER) == token and process.status() != "zombie":
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.slow
def test_demo_runs_a_rescue_and_leaves_nothing_behind(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    token = uuid.uuid4().hex
    env = {**os.environ, "TMPDIR": str(scratch), MARKER: token, "NO_COLOR": "1"}
    demo = subprocess.Popen(
        [sys.executable, "-c", RUN_DEMO],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = demo.communicate(timeout=DEMO_TIMEOUT)
    finally:
        leftovers = processes_marked(token)
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
        for process in leftovers:
            process.kill()

    assert demo.returncode == 0, f"exit {demo.returncode}\n{out}\n{err}"
    assert leftovers == [], f"processes outlived the demo: {leftovers}"
    assert list(scratch.iterdir()) == [], "the demo left files in its temporary directory"
    assert list(tmp_path.iterdir()) == [scratch], "the demo wrote into its working directory"

    summary = out[out.index("Summary:") :]
    counts = re.search(r"pending (\d+) · running (\d+) · completed (\d+) · failed (\d+)", summary)
    assert counts is not None, summary
    pending, running, completed, failed = map(int, counts.groups())
    assert (pending, running, failed) == (0, 0, 0) and completed > 0, summary
    assert f"all {completed} tasks completed" in summary
    assert re.search(
        r"rescued +task \d+ demo\.crash_once: its worker \d+ \(pid \d+\) died", summary
    )
    assert "killed by SIGKILL" in summary
    assert re.search(r"replaced +worker \d+ by worker \d+ \(pid \d+\)", summary)
    assert "retried   task" in summary
    assert "task.rescued" in summary, "the quoted log shows the rescue event"
    assert "\x1b[" not in out, "no ANSI codes when stdout is not a terminal"
