"""The wake-up path on real engines: what an enqueue announces, when, and to whom; and a
listener that loses its connection or its socket comes back, logging once per outage."""

from __future__ import annotations

import os
import select
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from structlog.testing import capture_logs

from supervisor.listener import Listener
from tests.helpers import wait_until
from workers import wake
from workers.store import Store
from workers.taskqueue import TaskQueue


def received(conn: Any) -> list[wake.Announcement]:
    """The notifications a LISTENing psycopg connection has now (without blocking)."""
    conn.pgconn.consume_input()
    found = []
    while (notification := conn.pgconn.notifies()) is not None:
        found.append(wake.parse(notification.extra.decode()))
    return found


def collect(conn: Any, count: int) -> list[tuple[str | None, int]]:
    """Wait for `count` notifications; return them as (queue, count) pairs, in order."""
    found: list[wake.Announcement] = []

    def enough() -> bool:
        select.select([conn], [], [], 0.1)
        found.extend(received(conn))
        return len(found) >= count

    wait_until(enough, 5)
    return [(a.queue, a.count) for a in found]


def heard(sock: wake.WakeSocket) -> list[wake.Announcement]:
    return [wake.parse(line) for data in sock.receive() for line in data.decode().split("\n")]


@pytest.fixture
def pg_listener(postgres_url: str) -> Iterator[tuple[Store, Any]]:
    store = Store(postgres_url)
    conn = store.listen_for_tasks("test listener")
    yield store, conn
    conn.close()
    store.dispose()


def test_postgres_notifies_at_commit_once_per_queue(pg_listener: tuple[Store, Any]) -> None:
    store, listening = pg_listener
    queue = TaskQueue("", store=store)
    queue.enqueue_many("t", [{}, {}, {}], queue="a")
    queue.enqueue("t", queue="b")
    queue.enqueue("t", queue="later", delay=60)  # due later: polling finds it, no wake-up
    queue.enqueue("t", queue="long" * 1_000)  # too long for a payload: it names no queue

    assert collect(listening, 3) == [("a", 3), ("b", 1), (None, 1)]

    # Inside the caller's own transaction: nothing until it commits, then one per enqueue
    # (PostgreSQL would fold identical payloads of one transaction; the token keeps them apart).
    with store.engine.connect() as conn:
        transaction = conn.begin()
        queue.enqueue("t", queue="a", connection=conn)
        queue.enqueue("t", queue="a", connection=conn)
        canary = queue.enqueue("t", queue="canary")  # committed on its own, behind ours
        assert collect(listening, 1) == [("canary", 1)]
        assert store.get_task(canary)["status"] == "pending"
        transaction.commit()
    assert collect(listening, 2) == [("a", 1), ("a", 1)]
    assert received(listening) == []


def test_postgres_listener_reconnects_after_its_backend_is_killed(
    pg_listener: tuple[Store, Any],
) -> None:
    store, _ = pg_listener
    queue = TaskQueue("", store=store)
    with capture_logs() as logs:
        listener = Listener.for_store(store, 7, structlog.get_logger())
        assert listener.maintain(0.0)  # opened: idle workers should look once
        with store.engine.connect() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'taskherd listener (supervisor 7)'"
                )
            ).scalars()
            assert list(killed) == [True]

        def lost() -> bool:
            if listener.is_open:
                select.select([listener], [], [], 0.1)
                listener.drain(())
            return not listener.is_open

        wait_until(lost, 10)
        retry_at = listener.next_due
        assert not listener.maintain(retry_at - 0.01)  # backs off before reconnecting
        assert listener.maintain(retry_at)  # reconnected: what was missed must be looked for

        queue.enqueue("t", queue="a")
        queue.enqueue("t", queue="b")

        def drained() -> int | None:
            select.select([listener], [], [], 0.1)
            return listener.drain(("a",))

        assert wait_until(drained, 5) == 1  # queue b is not ours
        listener.close()
    events = [entry["event"] for entry in logs]
    assert events == ["wake.listening", "wake.unavailable", "wake.restored"]


def test_sqlite_enqueue_rings_live_sockets_and_clears_dead_ones(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    queue = TaskQueue("", store=store)
    directory = wake.wake_dir(str(store.url.database))
    live = wake.WakeSocket(directory, "1-100")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(os.path.join(directory, "2-200.sock"))
    dead.close()  # its supervisor died without cleaning up
    assert (os.stat(directory).st_mode & 0o777) == 0o700

    queue.enqueue_many("t", [{}, {}], queue="a")
    queue.enqueue("t", queue="later", delay=60)
    assert [(a.queue, a.count) for a in heard(live)] == [("a", 2)]
    assert sorted(os.listdir(directory)) == ["1-100.sock"]

    # A caller's own transaction rings at its commit, never at a rollback.
    user = sa.create_engine(sqlite_url)
    with user.connect() as conn:
        transaction = conn.begin()
        queue.enqueue("t", queue="rolled back", connection=conn)
        transaction.rollback()
        with conn.begin():
            queue.enqueue("t", queue="kept", connection=conn)
            assert heard(live) == []
    assert [(a.queue, a.count) for a in heard(live)] == [("kept", 1)]
    user.dispose()

    # No listener, or a wake-up directory that is not one: the enqueue goes on regardless.
    live.close()
    shutil.rmtree(directory)
    Path(directory).write_text("not a directory")
    assert queue.enqueue("t", queue="a") > 0
    store.dispose()


def test_sqlite_listener_recreates_a_removed_socket_and_logs_once_per_outage(
    sqlite_url: str,
) -> None:
    store = Store(sqlite_url)
    queue = TaskQueue("", store=store)
    directory = wake.wake_dir(str(store.url.database))
    with capture_logs() as logs:
        listener = Listener.for_store(store, 3, structlog.get_logger())
        assert listener.maintain(0.0)
        shutil.rmtree(directory)
        Path(directory).write_text("in the way")
        now = listener.next_due
        assert not listener.maintain(now)  # gone, and cannot be made again
        for _ in range(3):  # retries back off, and say nothing more
            now = listener.next_due
            assert not listener.maintain(now)
        os.remove(directory)
        assert listener.maintain(listener.next_due)  # back: idle workers look once

        queue.enqueue("t", queue="b")
        queue.enqueue_many("t", [{}, {}], queue="a")
        select.select([listener], [], [], 5)
        assert listener.drain(("a",)) == 2
        listener.close()
    assert [entry["event"] for entry in logs] == [
        "wake.listening",
        "wake.unavailable",
        "wake.restored",
    ]
    assert os.listdir(directory) == []  # closing removed our socket
    store.dispose()
