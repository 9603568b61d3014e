"""Run `python -m supervisor run` as a real subprocess and look at it through the tables."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from tests.helpers import wait_until
from workers.store import Store, task_workers, tasks
from workers.taskqueue import TaskQueue

SAMPLE_TASKS = Path(__file__).with_name("sample_tasks.py")

# Short intervals so behaviours show in seconds; each test can override.
FAST = {
    "--poll-interval": "0.05",
    "--heartbeat-interval": "0.2",
    "--heartbeat-timeout": "5",
    "--worker-timeout": "5",
    "--graceful-timeout": "5",
}


class Pool:
    """One supervisor process in its own process group, with its log in a file."""

    def __init__(
        self,
        database_url: str,
        workdir: Path,
        *,
        workers: int | None = 2,  # None: no -w flag (the config file or env decides)
        node: str = "alpha",
        options: dict[str, str] | None = None,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),  # runs the supervisor under it: ("ip", "netns", "exec", NS)
    ) -> None:
        self.database_url = database_url
        self.workdir = workdir
        shutil.copy(SAMPLE_TASKS, workdir / "sample_tasks.py")
        settings = {**FAST, **(options or {})}
        argv = [
            *prefix,
            sys.executable,
            "-m",
            "supervisor",
            "--db",
            database_url,
            "--log-format",
            "json",
            "run",
            *(["-w", str(workers)] if workers is not None else []),
            "-i",
            "sample_tasks",
            "--node",
            node,
        ]
        for flag, value in settings.items():
            argv += [flag, value]
        argv += list(extra)
        self.log_path = workdir / f"supervisor-{node}-{os.urandom(3).hex()}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            argv,
            cwd=workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env} if env is not None else None,  # extra variables
        )
        self.store = Store(database_url)
        self.queue = TaskQueue(database_url, store=self.store)

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def active_workers(self) -> dict[int, int]:
        """worker_id -> pid of this pool's active workers, as the table says."""
        with self.store.engine.connect() as conn:
            rows = (
                conn.execute(task_workers.select().where(task_workers.c.is_active)).mappings().all()
            )
        return {
            row["id"]: row["worker_pid"]
            for row in rows
            if row["worker_pid"] and _parent(row["worker_pid"]) == self.pid
        }

    def task(self, task_id: int) -> dict[str, Any]:
        return self.store.get_task(task_id)

    def running_task(self, task_id: int, timeout: float = 15) -> dict[str, Any]:
        """Wait until the task runs on one of this pool's workers; return its row."""

        def running() -> dict[str, Any] | None:
            row = self.task(task_id)
            if row["status"] == "running" and row["worker_id"] in self.active_workers():
                return row
            return None

        return wait_until(running, timeout, message=f"task {task_id} never ran")

    def task_rows(self) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            return [dict(r) for r in conn.execute(tasks.select()).mappings()]

    def events(self) -> list[dict[str, Any]]:
        """The structured log lines written so far (supervisor and workers)."""
        self._log.flush()
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        """Tear down: kill the supervisor's group and every worker, whatever their state."""
        workers = _descendants(self.pid)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(10)
        for worker in workers:
            with contextlib.suppress(psutil.Error):
                worker.kill()
        self._log.close()
        self.store.dispose()


def _parent(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def is_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
