"""The supervisor as systemd sees it: sd_notify messages read from a real datagram socket.

The test binds the socket that systemd would, names it in NOTIFY_SOCKET with WATCHDOG_USEC
set, runs the real `python -m supervisor run`, and asserts on what arrives and when.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from supervisor import Supervisor
from tests.acceptance.pool import SAMPLE_TASKS, Pool
from tests.helpers import wait_until
from workers.store import Store, supervisors

StartPool = Callable[..., Pool]
WATCHDOG_USEC = 2_000_000  # systemd's WatchdogSec=2s: pings expected every 0.5 s


class NotifySocket:
    """systemd's side of NOTIFY_SOCKET: records every datagram with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, str]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((time.monotonic(), data.decode()))

    def messages(self) -> list[str]:
        return [text for _, text in list(self.received)]

    def times(self, text: str) -> list[float]:
        return [at for at, message in list(self.received) if message == text]

    def index(self, predicate: Callable[[str], bool]) -> int:
        return next(i for i, text in enumerate(self.messages()) if predicate(text))

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        def found() -> str | None:
            return next((text for text in self.messages() if predicate(text)), None)

        return wait_until(
            found, timeout, message=f"no {what} within {timeout} s: {self.messages()}"
        )

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    with tempfile.TemporaryDirectory(prefix="th-") as name:  # AF_UNIX paths are short
        listening = NotifySocket(Path(name) / "notify")
        yield listening
        listening.close()


def supervisor_heartbeat(database_url: str) -> datetime:
    store = Store(database_url)
    try:
        with store.engine.connect() as conn:
            return conn.execute(sa.select(supervisors.c.last_heartbeat)).scalar_one()  # type: ignore[no-any-return]
    finally:
        store.dispose()


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_supervisor_tells_systemd_ready_status_watchdog_and_stopping(
    start_pool: StartPool, database_url: str, notify_socket: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    pool = start_pool(database_url, workers=2, env=env)
    for _ in range(3):
        pool.queue.enqueue("sleep", {"seconds": 0}, delay=3600)

    ready = notify_socket.wait_for(lambda m: m.startswith("READY=1"), 20, "READY=1")
    assert ready == "READY=1\nSTATUS=2/2 workers, 0 running, 3 pending"
    workers = pool.active_workers()
    assert len(workers) == 2
    for pid in workers.values():  # children do not inherit the variables (nor talk to systemd)
        assert not set(_environ_of(pid)) & {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}

    # long enough to outlast the pings below by a few seconds of drain, short of the 5 s
    # graceful timeout once the drain begins
    task_id = pool.queue.enqueue("sleep", {"seconds": 6})
    pool.running_task(task_id)
    notify_socket.wait_for(lambda m: m == "STATUS=2/2 workers, 1 running, 3 pending", 10, "STATUS")
    wait_until(lambda: len(notify_socket.times("WATCHDOG=1")) >= 6, 10, message="few pings")

    pool.signal(signal.SIGTERM)
    stopping = notify_socket.wait_for(lambda m: m.startswith("STOPPING=1"), 10, "STOPPING=1")
    assert stopping.startswith("STOPPING=1\nSTATUS=stopping: ")
    # the idle worker leaves at once; the busy one finishes its task, asking for time meanwhile
    extend = notify_socket.wait_for(
        lambda m: m.startswith("EXTEND_TIMEOUT_USEC=") and "stopping: 1 worker finishing" in m,
        10,
        "EXTEND_TIMEOUT_USEC while the last worker finishes",
    )
    usec = int(re.match(r"EXTEND_TIMEOUT_USEC=(\d+)\n", extend)[1])  # type: ignore[index]
    assert 0 < usec <= (5 + 10) * 1_000_000  # graceful timeout (Pool's 5 s) + the kill margin
    assert pool.wait(20) == 0
    assert pool.task(task_id)["status"] == "completed"  # the drain finished it

    order = [
        notify_socket.index(lambda m: m.startswith("READY=1")),
        notify_socket.index(lambda m: "1 running" in m),
        notify_socket.index(lambda m: m.startswith("STOPPING=1")),
        notify_socket.index(lambda m: m.startswith("EXTEND_TIMEOUT_USEC=")),
    ]
    assert order == sorted(order), notify_socket.messages()
    assert sum(m.startswith("READY=1") for m in notify_socket.messages()) == 1
    pings = notify_socket.times("WATCHDOG=1")
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # a quarter of WatchdogSec apart; never near the whole of it (loaded 2-core margins)
    assert 0.3 < statistics.median(gaps) < 1.0, gaps
    assert max(gaps) < WATCHDOG_USEC / 1_000_000, gaps


def test_a_pool_that_cannot_boot_never_reports_ready(
    start_pool: StartPool, notify_socket: NotifySocket
) -> None:
    """SQLite only: the boot fails before any database work, whatever the engine."""
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    pool = start_pool(env=env, extra=["-i", "no_such_module_anywhere"])
    assert pool.wait(20) == 2
    assert not any(m.startswith("READY=1") for m in notify_socket.messages())


def test_embedded_pool_leaves_systemd_to_its_application(
    sqlite_url: str,
    tmp_path: Path,
    notify_socket: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLite only (engine irrelevant): start() never speaks for the application's process."""
    # the name test_embedded.py uses: the registry is per process and knows that module
    (tmp_path / "embedded_tasks.py").write_text(SAMPLE_TASKS.read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    pool = Supervisor(sqlite_url, workers=2, imports=["embedded_tasks"], heartbeat_interval=0.2)
    pool.start()
    try:
        wait_until(
            lambda: len(pool.workers) == 2 and all(h.booted for h in list(pool.workers.values())),
            20,
        )
        first = supervisor_heartbeat(sqlite_url)
        wait_until(  # the loop turned for over a second: two watchdog periods and more
            lambda: (supervisor_heartbeat(sqlite_url) - first).total_seconds() > 1.0, 10
        )
    finally:
        pool.stop(timeout=5)
        sys.modules.pop("embedded_tasks", None)  # as test_embedded.py leaves it
    assert notify_socket.messages() == []
    assert os.environ["NOTIFY_SOCKET"] == str(notify_socket.path)  # the application's, untouched
