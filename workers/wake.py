"""Waking idle workers the moment tasks are enqueued; polling stays the fallback.

How an enqueue reaches a sleeping worker:

- PostgreSQL: the enqueue transaction sends ``pg_notify(CHANNEL, payload)`` once per queue
  (store.py), so the notification is delivered at commit, never for a rollback, also when
  the caller enqueues inside its own transaction. Each supervisor keeps one connection
  LISTENing (supervisor/listener.py).
- SQLite: each supervisor binds a unix datagram socket in ``<database file>.wake/`` (a 0700
  directory beside the file). After the commit, the enqueuer sends one datagram to every
  socket there (`ring`): non-blocking, errors ignored, sockets of dead supervisors removed.
  Only enqueuers on the same host, running as the same user, can ring; the tasks of any
  other are found by polling.

The supervisor then pokes idle workers through a pipe per worker; a worker's idle wait
(`IdleWait`) returns on a poke, on a signal (SIGTERM), or after the poll interval.

A payload tells how many tasks became ready in one queue: ``<count>:<token>:<queue>``. The
token (the first task's id) keeps PostgreSQL from folding two enqueues of one transaction
into one notification; an empty queue means "some queue". Delayed tasks are not announced:
polling finds them when they fall due.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, event

CHANNEL = "taskherd_tasks"  # PostgreSQL: the channel enqueuers NOTIFY and supervisors LISTEN on
WAKE_DIR_SUFFIX = ".wake"  # SQLite: <database file>.wake/ holds one socket per supervisor
SOCKET_SUFFIX = ".sock"
MAX_PAYLOAD_BYTES = 4_000  # PostgreSQL takes up to 8,000; a longer one names no queue
MAX_SUN_PATH = 107  # bytes a unix socket address may hold on Linux (108 with the NUL)
RECEIVE_BYTES = 65_536


@dataclass(frozen=True)
class Announcement:
    """`count` tasks became ready in `queue` (None: in some queue; the payload did not say)."""

    queue: str | None
    count: int


def payloads(ready: Iterable[tuple[str, int]]) -> list[str]:
    """One payload per queue, for the (queue, task id) pairs of tasks runnable now."""
    counts: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for queue, task_id in ready:
        counts[queue] = counts.get(queue, 0) + 1
        tokens.setdefault(queue, task_id)
    return [_encode(counts[queue], tokens[queue], queue) for queue in counts]


def queue_part(queue: str) -> str:
    """What follows ``1:<id>:`` in the payload of one task whose id is not known yet (an
    INSERT that notifies from its own RETURNING): as `payloads` encodes it, for any id."""
    return _encode(1, 2**63 - 1, queue).split(":", 2)[2]


def _encode(count: int, token: int, queue: str) -> str:
    text = f"{count}:{token}:{queue}"
    if "\n" in queue or len(text.encode("utf-8")) > MAX_PAYLOAD_BYTES:
        return f"{count}:{token}:"
    return text


def parse(payload: str) -> Announcement:
    """Read one payload; anything unexpected counts as one task in some queue."""
    count, _, rest = payload.partition(":")
    _token, _, queue = rest.partition(":")
    try:
        tasks = int(count)
    except ValueError:
        return Announcement(None, 1)
    return Announcement(queue or None, max(tasks, 1))


# -- SQLite: a datagram socket per supervisor, beside the database file ---------------


def wake_dir(database: str) -> str:
    """The directory that holds the wake-up sockets of the supervisors of this SQLite file."""
    return database + WAKE_DIR_SUFFIX


def ring(directory: str, messages: Sequence[str]) -> None:
    """Send the payloads, as one datagram, to every supervisor socket in directory.

    Never blocks and never raises: a missing or unusable directory means nobody listens
    (polling finds the tasks); a full socket buffer means its supervisor is awake already.
    """
    if not messages:
        return
    data = "\n".join(messages).encode("utf-8")
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        names = [name for name in os.listdir(dir_fd) if name.endswith(SOCKET_SUFFIX)]
        for name in names:
            _send(directory, dir_fd, name, data)
    except OSError:
        return
    finally:
        os.close(dir_fd)


_sender: socket.socket | None = None


def _send(directory: str, dir_fd: int, name: str, data: bytes) -> None:
    global _sender
    if _sender is None:
        _sender = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
    try:
        _sender.sendto(data, _address(directory, dir_fd, name))
    except ConnectionRefusedError:  # a socket nobody is bound to: its supervisor is dead
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
    except OSError:  # a full buffer, a socket that is not one, one gone meanwhile: no matter
        pass


def _address(directory: str, dir_fd: int, name: str) -> str:
    """A socket's address; a path too long for one goes through /proc/self/fd (Linux)."""
    path = os.path.join(directory, name)
    if len(os.fsencode(path)) <= MAX_SUN_PATH:
        return path
    return f"/proc/self/fd/{dir_fd}/{name}"


# The rings a caller's own SQLite transaction owes at its commit (enqueue with connection=).
_owed: weakref.WeakKeyDictionary[Connection, tuple[str, list[str]]] = weakref.WeakKeyDictionary()
_owed_lock = threading.Lock()


def ring_at_commit(connection: Connection, directory: str, messages: Sequence[str]) -> None:
    """Ring when the caller commits its transaction on `connection`; never on a rollback.

    SQLAlchemy announces a commit just before it happens. That is soon enough and never too
    soon: until the commit the caller holds SQLite's write lock, and a woken worker's claim
    (BEGIN IMMEDIATE) waits for it, so it sees the committed tasks, never uncommitted ones.
    A connection in autocommit mode never commits through SQLAlchemy: polling finds those.
    """
    if not messages:
        return
    with _owed_lock:
        _, owed = _owed.setdefault(connection, (directory, []))
        owed.extend(messages)
    if not event.contains(connection, "commit", _pay_at_commit):
        event.listen(connection, "commit", _pay_at_commit)
        event.listen(connection, "rollback", _forget_at_rollback)


def _pay_at_commit(connection: Connection) -> None:
    with _owed_lock:
        owed = _owed.pop(connection, None)
    if owed is not None:
        ring(*owed)


def _forget_at_rollback(connection: Connection) -> None:
    with _owed_lock:
        _owed.pop(connection, None)


class WakeSocket:
    """A supervisor's bound datagram socket in the wake directory (SQLite)."""

    def __init__(self, directory: str, name: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, name + SOCKET_SUFFIX)
        self._socket = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name + SOCKET_SUFFIX, dir_fd=dir_fd)
                self._socket.bind(_address(directory, dir_fd, name + SOCKET_SUFFIX))
                os.chmod(name + SOCKET_SUFFIX, 0o600, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
            self._inode = os.stat(self.path).st_ino
        except OSError:
            self._socket.close()
            raise

    def fileno(self) -> int:
        return self._socket.fileno()

    def receive(self) -> list[bytes]:
        """Every datagram waiting (without blocking)."""
        received: list[bytes] = []
        while True:
            try:
                received.append(self._socket.recv(RECEIVE_BYTES))
            except BlockingIOError:
                return received

    def still_bound(self) -> bool:
        """Whether enqueuers can still find our socket (the directory may have been removed)."""
        try:
            return os.stat(self.path).st_ino == self._inode
        except OSError:
            return False

    def close(self) -> None:
        if self.still_bound():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self._socket.close()


# -- the worker's side ----------------------------------------------------------------


class IdleWait:
    """A worker's wait for work: returns when its supervisor pokes its wake pipe, when a
    signal arrives (SIGTERM must stop an idle worker at once), or after the timeout."""

    def __init__(self, wake_fd: int) -> None:
        self._wake_fd = wake_fd
        self._signal_read, self._signal_write = os.pipe()
        for fd in (self._signal_read, self._signal_write):
            os.set_blocking(fd, False)
        self._poll = select.poll()
        self._poll.register(self._signal_read, select.POLLIN)
        if wake_fd >= 0:
            os.set_blocking(wake_fd, False)
            self._poll.register(wake_fd, select.POLLIN)

    def wait(self, timeout: float, shutdown: threading.Event) -> bool:
        """Sleep until poked, signalled or timed out; True if poked."""
        if threading.current_thread() is threading.main_thread():
            # Every time: a task's event loop may have taken the wake-up fd meanwhile.
            signal.set_wakeup_fd(self._signal_write, warn_on_full_buffer=False)
        if shutdown.is_set():  # a signal that came before the wake-up fd was ours
            return False
        ready = {fd for fd, _ in self._poll.poll(max(0.0, timeout) * 1000)}
        _drain(self._signal_read)
        if self._wake_fd in ready:
            if not _drain(self._wake_fd):  # end of file: the supervisor is gone (we exit soon)
                self._poll.unregister(self._wake_fd)
                self._wake_fd = -1
                return False
            return True
        return False

    def close(self) -> None:
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)
        os.close(self._signal_read)
        os.close(self._signal_write)


def _drain(fd: int) -> bool:
    """Read everything waiting in a non-blocking pipe; False at end of file."""
    try:
        while True:
            if not os.read(fd, 4096):
                return False
    except BlockingIOError:
        return True
