"""The sd_notify client and what the supervisor tells systemd, against a real datagram socket."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from supervisor.notify import Notifier, PoolView, ServiceReporter


class Listener:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        """Every datagram received so far (all were sent before we look: sends are synchronous)."""
        found = []
        while True:
            try:
                found.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return found

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: an AF_UNIX path holds at most 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="th-") as name:
        yield Path(name)


@pytest.fixture
def listener(short_dir: Path) -> Iterator[Listener]:
    listening = Listener(str(short_dir / "notify.sock"))
    yield listening
    listening.close()


def notifier_for(listener: Listener, **environ: str) -> Notifier:
    return Notifier.from_environment({"NOTIFY_SOCKET": listener.address, **environ})


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready("up")
    assert not notifier.watchdog()
    assert not notifier.stopping()


def test_messages_arrive_as_one_datagram_each(listener: Listener) -> None:
    notifier = notifier_for(listener)
    assert notifier.ready("2/2 workers, 0 running, 0 pending")
    assert notifier.status("a status\nthat was two lines")
    assert notifier.stopping()
    assert notifier.extend_timeout(12.5)
    assert listener.messages() == [
        "READY=1\nSTATUS=2/2 workers, 0 running, 0 pending",
        "STATUS=a status that was two lines",
        "STOPPING=1",
        "EXTEND_TIMEOUT_USEC=12500000",
    ]


def test_an_abstract_socket_is_reached_through_its_at_sign() -> None:
    listening = Listener(f"@taskherd-test-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        assert Notifier.from_environment({"NOTIFY_SOCKET": listening.address}).ready()
        assert listening.messages() == ["READY=1"]
    finally:
        listening.close()


def test_watchdog_follows_watchdog_usec(listener: Listener) -> None:
    notifier = notifier_for(listener, WATCHDOG_USEC="2000000")
    assert notifier.watchdog_interval == 2.0
    assert notifier.watchdog()
    assert listener.messages() == ["WATCHDOG=1"]


def test_watchdog_meant_for_another_pid_is_not_ours(listener: Listener) -> None:
    other = notifier_for(listener, WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid() + 1))
    assert other.watchdog_interval is None
    assert not other.watchdog()
    ours = notifier_for(listener, WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid()))
    assert ours.watchdog()
    assert listener.messages() == ["WATCHDOG=1"]


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_no_or_malformed_watchdog_usec_means_no_watchdog(listener: Listener, usec: str) -> None:
    notifier = notifier_for(listener, WATCHDOG_USEC=usec)
    assert notifier.enabled
    assert not notifier.watchdog()
    assert listener.messages() == []


def test_unset_keeps_the_variables_from_child_processes(listener: Listener) -> None:
    environ = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}
    Notifier.from_environment(environ, unset=True)
    assert environ == {}


def test_an_unsupported_address_disables_notify() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "relative/path"})
    assert not notifier.enabled
    assert [e["event"] for e in logs] == ["systemd.notify_socket_unsupported"]


def test_a_socket_that_is_gone_never_raises_and_is_logged_once(short_dir: Path) -> None:
    path = str(short_dir / "gone.sock")
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    with capture_logs() as logs:
        assert not notifier.ready()
        assert not notifier.status("still nobody")
        listening = Listener(path)
        try:
            assert notifier.status("now somebody")
            assert listening.messages() == ["STATUS=now somebody"]
        finally:
            listening.close()
    assert [e["event"] for e in logs] == ["systemd.notify_failed", "systemd.notify_recovered"]
    assert "gone.sock" in logs[0]["address"]


# -- what the supervisor loop says, and when -------------------------------------------


def view(**changes: object) -> PoolView:
    fields: dict[str, object] = {
        "desired": 2,
        "up": 2,
        "alive": 2,
        "responsive": 2,
        "stopping": False,
        "drain_deadline": None,
    }
    fields.update(changes)
    return PoolView(**fields)  # type: ignore[arg-type]


def test_ready_once_every_worker_is_up_then_status_on_change(listener: Listener) -> None:
    reporter = ServiceReporter(notifier_for(listener), status_interval=2.0)
    counts = iter([(0, 5), (1, 4)])
    reporter.update(100.0, view(up=1), lambda: next(counts))
    assert listener.messages() == ["STATUS=1/2 workers, 0 running, 5 pending"]
    reporter.update(100.5, view(), lambda: pytest.fail("counted again before the interval"))
    assert listener.messages() == ["READY=1\nSTATUS=2/2 workers, 0 running, 5 pending"]
    reporter.update(101.0, view(), lambda: pytest.fail("counted again before the interval"))
    assert listener.messages() == []  # nothing changed: nothing sent
    reporter.update(102.0, view(up=1), lambda: next(counts))
    reporter.update(103.0, view(up=2), lambda: None)
    reporter.update(104.5, view(up=2), lambda: None)
    assert listener.messages() == [
        "STATUS=1/2 workers, 1 running, 4 pending",
        "STATUS=2/2 workers, 1 running, 4 pending",  # READY=1 is not sent twice
        "STATUS=2/2 workers, database unavailable",
    ]


def test_watchdog_every_quarter_interval_and_the_loop_wakes_for_it(listener: Listener) -> None:
    reporter = ServiceReporter(notifier_for(listener, WATCHDOG_USEC="4000000"))
    seen = []
    for tick in range(9):  # 4 s of ticks, a quarter second apart
        reporter.update(50.0 + tick * 0.5, view(), lambda: (0, 0))
        seen += [m for m in listener.messages() if m == "WATCHDOG=1"]
        due = reporter.next_due()
        assert due is not None and due - (50.0 + tick * 0.5) <= 1.0  # never later than 1/4
    assert len(seen) == 5  # at 50, 51, 52, 53, 54


def test_no_watchdog_means_the_loop_need_not_wake(listener: Listener) -> None:
    assert ServiceReporter(notifier_for(listener)).next_due() is None


def test_stop_sends_stopping_once_and_extends_while_the_drain_progresses(
    listener: Listener,
) -> None:
    reporter = ServiceReporter(notifier_for(listener), drain_kill_margin=10.0)
    reporter.update(10.0, view(), lambda: (0, 0))
    listener.messages()
    draining = view(stopping=True, alive=2, responsive=2, drain_deadline=40.0)
    reporter.update(10.0, draining, lambda: pytest.fail("no counting while stopping"))
    first = listener.messages()
    assert first[0] == "STOPPING=1\nSTATUS=stopping: 2 workers finishing"
    assert first[1].startswith("EXTEND_TIMEOUT_USEC=40000000\n")  # 30 s left + 10 s margin
    reporter.update(10.5, draining, lambda: None)
    assert listener.messages() == []  # at most one report a second
    # one worker hangs: no progress until a worker finishes
    hanging = view(stopping=True, alive=2, responsive=1, drain_deadline=40.0)
    reporter.update(11.0, hanging, lambda: None)
    assert listener.messages() == []
    reporter.update(
        12.0, view(stopping=True, alive=1, responsive=0, drain_deadline=40.0), lambda: None
    )
    assert listener.messages()[0].startswith("EXTEND_TIMEOUT_USEC=38000000\n")
    # past its own deadline the supervisor kills: no more time asked for
    reporter.update(
        41.0, view(stopping=True, alive=1, responsive=1, drain_deadline=40.0), lambda: None
    )
    assert listener.messages() == []


def test_a_quick_stop_asks_for_no_time(listener: Listener) -> None:
    reporter = ServiceReporter(notifier_for(listener))
    reporter.update(5.0, view(stopping=True, drain_deadline=None), lambda: None)
    assert listener.messages() == ["STOPPING=1\nSTATUS=stopping: 2 workers finishing"]


def test_a_disabled_reporter_never_counts() -> None:
    reporter = ServiceReporter.disabled()
    reporter.update(1.0, view(), lambda: pytest.fail("counted without systemd"))
    assert not reporter.enabled
