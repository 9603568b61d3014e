"""Tell systemd how the pool is doing: the sd_notify protocol, written by hand.

A message is one datagram of `KEY=value` lines sent to the AF_UNIX socket that systemd
names in $NOTIFY_SOCKET (a leading '@' means the abstract namespace). Without
NOTIFY_SOCKET every call is a no-op, so the same code runs under systemd and anywhere else.

`Notifier` speaks the protocol; `ServiceReporter` decides what to say and when, from one
call per supervisor loop tick (see `Supervisor.notify_systemd`):

    READY=1              once every worker is up, the first time
    STATUS=...           "4/4 workers, 12 running, 340 pending", kept current
    WATCHDOG=1           every quarter of WatchdogSec, only from a loop that still turns
    STOPPING=1           when a stop begins
    EXTEND_TIMEOUT_USEC  while a graceful drain still makes progress, up to its own deadline
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import structlog

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
NOTIFY_ENV = (NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV)

SEND_TIMEOUT = 1.0  # seconds a send may block while systemd's queue is full
WATCHDOG_SHARE = 0.25  # ping every quarter of WatchdogSec: three pings can be lost
DRAIN_REPORT_INTERVAL = 1.0  # seconds between two STATUS/EXTEND_TIMEOUT messages in a drain
DRAIN_KILL_MARGIN = 10.0  # seconds after the graceful deadline to kill, reap and settle rows
STATUS_INTERVAL = 2.0  # seconds between two looks at the task counts (the heartbeat's)
USEC = 1_000_000


class Notifier:
    """An sd_notify client: one datagram per message; sending never raises."""

    def __init__(
        self, address: str | None = None, *, watchdog_usec: int | None = None, log: Any = None
    ) -> None:
        self.address = address or None
        self.watchdog_interval = watchdog_usec / USEC if watchdog_usec else None
        self.log: Any = log or structlog.get_logger()
        self._socket: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset: bool = False,
        pid: int | None = None,
    ) -> Notifier:
        """A notifier for $NOTIFY_SOCKET (disabled without it), with the watchdog systemd asked
        of this process: WATCHDOG_USEC, unless WATCHDOG_PID names another process.

        `unset` removes the three variables so that child processes do not inherit them.
        """
        environ = os.environ if environ is None else environ
        address = environ.get(NOTIFY_SOCKET_ENV) or None
        usec = _watchdog_usec(environ, os.getpid() if pid is None else pid)
        if unset:
            for name in NOTIFY_ENV:
                environ.pop(name, None)
        log = structlog.get_logger()
        if address is not None and not address.startswith(("/", "@")):
            log.warning("systemd.notify_socket_unsupported", address=address)
            address = None
        return cls(address, watchdog_usec=usec if address else None, log=log)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields as one message; False (logged once) if it did not go."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.settimeout(SEND_TIMEOUT)
            self._socket.sendto("\n".join(fields).encode(), target)
        except OSError as error:
            if not self._failing:
                self._failing = True
                self.log.warning(
                    "systemd.notify_failed", address=self.address, error=str(error) or repr(error)
                )
            return False
        if self._failing:
            self._failing = False
            self.log.info("systemd.notify_recovered", address=self.address)
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1, only when systemd asked this process for it."""
        if self.watchdog_interval is None:
            return False
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 (a SIGHUP reload began); READY=1 again when it is done."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now}", *_status(status))

    def extend_timeout(self, seconds: float, status: str | None = None) -> bool:
        """Ask for `seconds` more before systemd's start/stop timeout may fire."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * USEC))}", *_status(status))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _status(text: str | None) -> tuple[str, ...]:
    """A STATUS= field, kept to one line."""
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.split()),)


def _workers(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"


def _watchdog_usec(environ: MutableMapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC as systemd meant it for `pid`; None when absent, malformed or not ours."""
    raw_pid = environ.get(WATCHDOG_PID_ENV)
    if raw_pid and raw_pid.strip() != str(pid):
        return None
    try:
        usec = int(environ.get(WATCHDOG_USEC_ENV, ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


@dataclass(frozen=True)
class PoolView:
    """What the supervisor loop knows of its pool at one tick."""

    desired: int
    up: int  # workers running their main loop and not being killed
    alive: int  # worker processes not yet reaped
    responsive: int  # of those, the ones whose liveness proof is recent
    stopping: bool
    drain_deadline: float | None  # monotonic end of a graceful drain; None: none, or quick


TaskCounts = tuple[int, int]  # (running, pending), from one query
CountsQuery = Callable[[], TaskCounts | None]  # None: the database is unavailable


class ServiceReporter:
    """What the supervisor tells systemd, and when; `update` is called once per loop tick."""

    def __init__(
        self,
        notifier: Notifier,
        *,
        status_interval: float = STATUS_INTERVAL,
        drain_kill_margin: float = DRAIN_KILL_MARGIN,
    ) -> None:
        self.notifier = notifier
        self.status_interval = status_interval
        self.drain_kill_margin = drain_kill_margin
        self.ready_sent = False
        self.stopping_sent = False
        self._status = ""
        self._counts_text = ""
        self._next_counts = 0.0
        self._next_watchdog = 0.0
        self._next_drain_report = 0.0
        self._drain_alive: int | None = None

    @classmethod
    def disabled(cls) -> ServiceReporter:
        return cls(Notifier(None))

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    def next_due(self) -> float | None:
        """When the loop must wake for the next watchdog ping (None: no watchdog)."""
        if self.notifier.watchdog_interval is None:
            return None
        return self._next_watchdog

    def update(self, now: float, pool: PoolView, counts: CountsQuery) -> None:
        """One tick's worth: the watchdog first (this loop turns), then the state."""
        if not self.enabled:
            return
        self._ping_watchdog(now)
        if pool.stopping:
            self._report_drain(now, pool)
        else:
            self._report_running(now, pool, counts)

    def _ping_watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None or now < self._next_watchdog:
            return
        self.notifier.watchdog()
        self._next_watchdog = now + interval * WATCHDOG_SHARE

    def _report_running(self, now: float, pool: PoolView, counts: CountsQuery) -> None:
        """READY=1 the first time every worker is up; STATUS= whenever the summary changes."""
        if now >= self._next_counts:
            found = counts()
            self._counts_text = (
                f"{found[0]} running, {found[1]} pending"
                if found is not None
                else "database unavailable"
            )
            self._next_counts = now + self.status_interval
        text = f"{pool.up}/{pool.desired} workers, {self._counts_text}"
        if not self.ready_sent and pool.up >= pool.desired:
            self.ready_sent = self.notifier.ready(text)
            self._status = text if self.ready_sent else ""
        elif text != self._status:
            self._status = text if self.notifier.status(text) else ""

    def _report_drain(self, now: float, pool: PoolView) -> None:
        """STOPPING=1 once; then, while the drain progresses, more time up to its deadline.

        Progress: a worker finished since the last report, or every remaining worker still
        proves it is alive. The time asked for never passes the supervisor's own deadline
        (graceful timeout, then kill), so a wedged drain cannot hold the stop up longer.
        """
        if not self.stopping_sent:
            self.stopping_sent = True
            self.notifier.stopping(f"stopping: {_workers(pool.alive)} finishing")
        if now < self._next_drain_report:
            return
        self._next_drain_report = now + DRAIN_REPORT_INTERVAL
        finished = self._drain_alive is not None and pool.alive < self._drain_alive
        self._drain_alive = pool.alive
        deadline = pool.drain_deadline
        if pool.alive == 0 or deadline is None or now >= deadline:
            return
        if not finished and pool.responsive < pool.alive:
            return
        left = deadline - now
        self.notifier.extend_timeout(
            left + self.drain_kill_margin,
            f"stopping: {_workers(pool.alive)} finishing, {left:.0f} s left to the graceful kill",
        )
