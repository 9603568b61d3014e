"""One listener per supervisor: it hears that tasks were enqueued, so idle workers start now.

PostgreSQL: a dedicated connection LISTENs on the channel enqueuers NOTIFY (at their commit).
SQLite: a datagram socket beside the database file, which enqueuers on this host poke after
their commit (workers/wake.py). The supervisor puts the listener's file descriptor in its one
blocking wait; when it is readable, `drain()` says how many tasks were announced in the
queues this supervisor serves, and the supervisor pokes as many idle workers.

The listener never takes the supervisor down: on any error it closes, logs once per outage,
and `maintain()` (called every tick) reopens it with back-off. Polling covers the gap, and a
listener that (re)opens reports it so that every idle worker looks once for what it missed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from workers import wake
from workers.store import TRANSIENT_ERRORS, Store

RETRY_INITIAL = 0.5  # seconds before reopening a listener that was lost
RETRY_CAP = 30.0  # seconds: the longest wait between two attempts
SOCKET_CHECK_INTERVAL = 1.0  # seconds between two looks that our socket file is still there


class ListenerLost(Exception):
    """The listener cannot hear anything any more (connection lost, socket removed)."""


class Source(Protocol):
    """Where announcements come from: a LISTENing connection or a datagram socket."""

    description: str  # for the logs
    check_interval: float  # seconds between two `healthy()` checks

    def fileno(self) -> int: ...

    def receive(self) -> list[str] | None:
        """The payloads waiting; None: some may have been lost (wake every idle worker)."""
        ...

    def healthy(self) -> bool: ...

    def close(self) -> None: ...


class PostgresSource:
    """A connection LISTENing on the NOTIFY channel."""

    description = f"LISTEN {wake.CHANNEL}"
    check_interval = float("inf")  # a lost connection makes its socket readable: no checks

    def __init__(self, store: Store, name: str) -> None:
        import psycopg

        self._errors: tuple[type[Exception], ...] = (psycopg.Error, OSError)
        opening: tuple[type[Exception], ...] = (*TRANSIENT_ERRORS, *self._errors)
        try:
            self._conn: Any = store.listen_for_tasks(name)
        except opening as error:
            raise ListenerLost(_first_line(error)) from error

    def fileno(self) -> int:
        return int(self._conn.fileno())

    def receive(self) -> list[str] | None:
        pgconn = self._conn.pgconn
        try:
            pgconn.consume_input()  # non-blocking; raises once the server closed the connection
            payloads: list[str] = []
            while (notification := pgconn.notifies()) is not None:
                payloads.append(notification.extra.decode("utf-8", "replace"))
        except self._errors as error:
            raise ListenerLost(_first_line(error)) from error
        return payloads

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        with contextlib.suppress(*self._errors):  # broken already: its socket is closed anyway
            self._conn.close()


class SocketSource:
    """A datagram socket in `<database file>.wake/`, named after this supervisor."""

    check_interval = SOCKET_CHECK_INTERVAL

    def __init__(self, directory: str, name: str) -> None:
        try:
            self._socket = wake.WakeSocket(directory, name)
        except OSError as error:
            raise ListenerLost(f"{directory}: {error.strerror or error}") from error
        self.description = self._socket.path
        self._backlog = _datagram_backlog()

    def fileno(self) -> int:
        return self._socket.fileno()

    def receive(self) -> list[str] | None:
        datagrams = self._socket.receive()
        if len(datagrams) >= self._backlog:  # the queue was full: later datagrams were dropped
            return None
        return [line for data in datagrams for line in data.decode("utf-8", "replace").split("\n")]

    def healthy(self) -> bool:
        return self._socket.still_bound()

    def close(self) -> None:
        self._socket.close()


class Listener:
    """A source of announcements that reopens itself with back-off, logging once per outage."""

    def __init__(
        self,
        open_source: Callable[[], Source],
        log: Any,
        *,
        retry_initial: float = RETRY_INITIAL,
        retry_cap: float = RETRY_CAP,
    ) -> None:
        self._open_source = open_source
        self.log = log
        self.retry_initial = retry_initial
        self.retry_cap = retry_cap
        self.source: Source | None = None
        self.next_due = 0.0  # when maintain() has work: reopen, or check the source
        self._delay = retry_initial
        self._down_since: float | None = None
        self._ever_opened = False

    @classmethod
    def for_store(cls, store: Store, supervisor_id: int, log: Any) -> Listener:
        """The listener for this store's engine, named after the supervisor."""
        if store.is_sqlite:
            directory = wake.wake_dir(str(store.url.database))
            name = f"{supervisor_id}-{os.getpid()}"
            return cls(lambda: SocketSource(directory, name), log)
        application = f"taskherd listener (supervisor {supervisor_id})"
        return cls(lambda: PostgresSource(store, application), log)

    @property
    def is_open(self) -> bool:
        return self.source is not None

    def fileno(self) -> int:
        if self.source is None:
            raise ValueError("the listener is closed")
        return self.source.fileno()

    def maintain(self, now: float) -> bool:
        """Reopen the listener when due, or close it if it went deaf. True when it has just
        opened: whatever was announced while it was closed went unheard."""
        if now < self.next_due:
            return False
        if self.source is not None:
            if self.source.healthy():
                self.next_due = now + self.source.check_interval
                return False
            self._lose(f"{self.source.description} is gone", now, retry_now=True)
        try:
            source = self._open_source()
        except ListenerLost as error:
            self._lose(str(error), now)
            return False
        self._opened(source, now)
        return True

    def drain(self, queues: Sequence[str]) -> int | None:
        """Tasks announced in these queues (none: every queue) since the last drain;
        None: an unknown number."""
        if self.source is None:
            return 0
        try:
            payloads = self.source.receive()
        except ListenerLost as error:
            self._lose(str(error), time.monotonic())
            return 0
        if payloads is None:
            return None
        tasks = 0
        for announcement in map(wake.parse, payloads):
            if announcement.queue is None or not queues or announcement.queue in queues:
                tasks += announcement.count
        return tasks

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None

    def _opened(self, source: Source, now: float) -> None:
        self.source = source
        self._delay = self.retry_initial
        self.next_due = now + source.check_interval
        via = source.description
        if self._down_since is not None and self._ever_opened:
            self.log.info("wake.restored", via=via, down_for=round(now - self._down_since, 1))
        elif not self._ever_opened:
            self.log.info("wake.listening", via=via)
        self._down_since = None
        self._ever_opened = True

    def _lose(self, why: str, now: float, *, retry_now: bool = False) -> None:
        """Close the source; the first failure of an outage is logged, the rest are not."""
        self.close()
        if self._down_since is None:
            self._down_since = now
            self.log.warning("wake.unavailable", error=why, fallback="polling")
        self.next_due = now if retry_now else now + self._delay
        if not retry_now:
            self._delay = min(self.retry_cap, self._delay * 2)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _datagram_backlog() -> int:
    """How many datagrams a unix socket queues before dropping (Linux: max_dgram_qlen)."""
    try:
        with open("/proc/sys/net/unix/max_dgram_qlen") as handle:
            return max(1, int(handle.read()))
    except (OSError, ValueError):
        return 10
