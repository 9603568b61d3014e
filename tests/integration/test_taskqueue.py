"""TaskQueue.enqueue on real engines: defaults, batches, the caller's transaction, unique keys."""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select

from tests.helpers import wait_until
from workers import registry, task
from workers.store import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    NewTask,
    Store,
    UnknownTask,
    tasks,
)
from workers.taskqueue import MAX_PAYLOAD_BYTES, InvalidTask, TaskQueue

SLACK = timedelta(seconds=2)


def resize_image(ctx: Any, payload: Any) -> Any:
    return payload


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Handlers registered by a test are gone after it; the ones before it are back."""
    saved = dict(registry._registry)
    registry._registry.clear()
    yield
    registry._registry.clear()
    registry._registry.update(saved)


@pytest.fixture
def queue(store: Store) -> TaskQueue:
    return TaskQueue(store.masked_url, store=store)


def count(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(tasks)).scalar_one())


# -- ids and defaults ----------------------------------------------------------------


def test_enqueue_returns_new_ids(queue: TaskQueue, store: Store) -> None:
    first = queue.enqueue("send_mail", {"to": "a@example.com"})
    second = queue.enqueue("send_mail", {"to": "b@example.com"})
    assert isinstance(first, int)
    assert second > first
    row = store.get_task(first)
    assert (row["task_type"], row["status"], row["attempts"]) == ("send_mail", PENDING, 0)
    assert json.loads(row["payload"]) == {"to": "a@example.com"}
    assert row["cancel_requested"] is False
    assert json.loads(row["error_history"]) == []
    assert json.loads(row["execution_log"]) == []


def test_enqueue_without_payload_stores_an_empty_object(queue: TaskQueue, store: Store) -> None:
    assert store.get_task(queue.enqueue("tick"))["payload"] == "{}"


def test_unregistered_task_gets_module_defaults(
    queue: TaskQueue, store: Store, clean_registry: None
) -> None:
    row = store.get_task(queue.enqueue("unknown_here"))
    assert row["queue"] == registry.DEFAULT_QUEUE
    assert row["max_attempts"] == registry.DEFAULT_MAX_RETRIES + 1
    assert row["timeout"] is None
    assert row["priority"] == 0


def test_registered_task_supplies_queue_retries_and_timeout(
    queue: TaskQueue, store: Store, clean_registry: None
) -> None:
    task("resize_image", queue="media", max_retries=5, timeout=60)(resize_image)
    row = store.get_task(queue.enqueue("resize_image", {"path": "a.png"}))
    assert (row["queue"], row["max_attempts"], row["timeout"]) == ("media", 6, 60.0)


def test_explicit_options_override_the_registration(
    queue: TaskQueue, store: Store, clean_registry: None
) -> None:
    task("resize_image", queue="media", max_retries=5, timeout=60)(resize_image)
    task_id = queue.enqueue(
        "resize_image", {}, queue="urgent", max_retries=0, timeout=5, priority=-3
    )
    row = store.get_task(task_id)
    assert (row["queue"], row["max_attempts"], row["timeout"], row["priority"]) == (
        "urgent",
        1,
        5.0,
        -3,
    )


def test_max_retries_n_means_n_plus_one_attempts(queue: TaskQueue, store: Store) -> None:
    for retries in (0, 1, 3, 10):
        task_id = queue.enqueue("job", max_retries=retries)
        assert store.get_task(task_id)["max_attempts"] == retries + 1


def test_delay_postpones_the_task(queue: TaskQueue, store: Store) -> None:
    before = store.now()
    task_id = queue.enqueue("job", delay=600)
    after = store.now()
    run_at = store.get_task(task_id)["run_at"]
    assert (
        before + timedelta(seconds=600) - SLACK <= run_at <= after + timedelta(seconds=600) + SLACK
    )
    assert store.claim_tasks(1, []) == []


# -- batches -------------------------------------------------------------------------


def test_enqueue_many_returns_ids_in_payload_order(queue: TaskQueue, store: Store) -> None:
    payloads = [{"n": n} for n in range(25)]
    ids = queue.enqueue_many("job", payloads, priority=2)
    assert len(ids) == 25
    assert len(set(ids)) == 25
    for task_id, payload in zip(ids, payloads, strict=True):
        row = store.get_task(task_id)
        assert json.loads(row["payload"]) == payload
        assert row["priority"] == 2


def test_enqueue_many_writes_every_option_to_every_row(queue: TaskQueue, store: Store) -> None:
    before = store.now()
    ids = queue.enqueue_many(
        "job", [{"n": 1}, None], queue="mail", max_retries=5, delay=600, timeout=2.5
    )
    after = store.now()
    for task_id, payload in zip(ids, ['{"n":1}', "{}"], strict=True):
        row = store.get_task(task_id)
        assert row["payload"] == payload
        assert (row["queue"], row["status"], row["attempts"]) == ("mail", PENDING, 0)
        assert (row["max_attempts"], row["timeout"]) == (6, 2.5)
        assert (row["error_history"], row["execution_log"]) == ("[]", "[]")
        assert not row["cancel_requested"]
        assert before - SLACK <= row["created_at"] <= after + SLACK
        assert row["run_at"] - row["created_at"] == pytest.approx(timedelta(seconds=600), abs=SLACK)
    assert store.claim_tasks(1, []) == []  # delayed


def test_a_batch_stores_each_row_exactly_as_one_enqueue_would(store: Store) -> None:
    """A batch travels as arrays (PostgreSQL) or one JSON document (SQLite): every text
    arrives unchanged, and SQLite's timestamps are stored in the very form the claim
    compares as text."""
    texts = ['{"s":"\\u00fc \\"q\\" \\n"}', '{"s":"ü «»"}', "[1,2.5,null]", '"plain"']
    one = store.enqueue([NewTask("t", payload=texts[0], queue="q ü", priority=-3)])
    batch = store.enqueue(
        [NewTask("t", payload=text, queue="q ü", priority=-3, timeout=1.25) for text in texts]
    )
    assert [store.get_task(i)["payload"] for i in batch] == texts
    assert {(store.get_task(i)["queue"], store.get_task(i)["priority"]) for i in batch} == {
        ("q ü", -3)
    }
    if store.is_sqlite:
        stored = sa.select(
            sa.func.length(tasks.c.run_at),
            sa.func.length(tasks.c.created_at),
            sa.func.typeof(tasks.c.run_at),
            sa.func.typeof(tasks.c.timeout),
        )
        with store.engine.connect() as conn:
            single = conn.execute(stored.where(tasks.c.id == one[0])).one()
            many = set(conn.execute(stored.where(tasks.c.id.in_(batch))).all())
        assert many == {(single[0], single[1], "text", "real")}


def test_enqueue_many_on_an_autocommit_connection_returns_each_rows_id(
    database_url: str, queue: TaskQueue, store: Store
) -> None:
    """Each statement commits on its own there: no batch-wide id arithmetic may be trusted."""
    user = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        with user.connect() as conn:
            ids = queue.enqueue_many("job", [{"n": n} for n in range(5)], connection=conn)
    finally:
        user.dispose()
    assert [json.loads(store.get_task(task_id)["payload"]) for task_id in ids] == [
        {"n": n} for n in range(5)
    ]


def test_concurrent_batches_each_get_the_ids_of_their_own_rows(
    database_url: str, store: Store
) -> None:
    """Batch ids are worked out (SQLite: from the table's sequence; PostgreSQL: taken from
    it first), not read back row by row: enqueuers racing must still get their own rows."""
    queues = [TaskQueue(database_url) for _ in range(3)]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(queues))

    def enqueue(number: int, queue: TaskQueue) -> None:
        try:
            start.wait(timeout=10)
            ids: list[int] = []
            for batch in range(20):
                payloads = [{"by": number, "batch": batch, "n": n} for n in range(50)]
                ids += queue.enqueue_many("job", payloads)
            got[number] = ids
        except BaseException as error:  # reported to the test thread below
            errors.append(error)

    threads = [threading.Thread(target=enqueue, args=item) for item in enumerate(queues)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for queue in queues:
        queue.store.dispose()

    assert not errors, errors
    with store.engine.connect() as conn:
        payloads = dict(conn.execute(select(tasks.c.id, tasks.c.payload)).all())
    assert len(payloads) == 3 * 20 * 50
    for number, ids in got.items():
        expected = [{"by": number, "batch": b, "n": n} for b in range(20) for n in range(50)]
        assert [json.loads(payloads[task_id]) for task_id in ids] == expected


def test_enqueue_many_of_nothing(queue: TaskQueue, store: Store) -> None:
    assert queue.enqueue_many("job", []) == []
    assert count(store) == 0


def test_enqueue_many_with_one_bad_payload_writes_nothing(queue: TaskQueue, store: Store) -> None:
    payloads: list[Any] = [{"n": 1}, {"n": 2}, {"n": {3}}, {"n": 4}]
    with pytest.raises(InvalidTask):
        queue.enqueue_many("job", payloads)
    assert count(store) == 0


# -- the caller's transaction --------------------------------------------------------


orders_metadata = sa.MetaData()
orders = sa.Table(
    "test_orders",
    orders_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("item", sa.Text, nullable=False),
)


@pytest.fixture
def caller(database_url: str) -> Iterator[sa.Engine]:
    """The application's own engine on the same database, with a table of its own."""
    application = Store(database_url)
    orders_metadata.create_all(application.engine)
    yield application.engine
    application.dispose()


def test_enqueue_in_callers_transaction_commits_with_it(
    queue: TaskQueue, store: Store, caller: sa.Engine
) -> None:
    with caller.connect() as conn:
        transaction = conn.begin()
        conn.execute(orders.insert().values(id=1, item="book"))
        task_id = queue.enqueue("ship_order", {"order": 1}, connection=conn)
        with pytest.raises(UnknownTask):
            store.get_task(task_id)  # not visible before the caller commits
        transaction.commit()
    assert store.get_task(task_id)["status"] == PENDING
    with caller.connect() as conn:
        assert conn.execute(select(orders.c.item)).scalar_one() == "book"


def test_enqueue_in_callers_transaction_is_gone_with_its_rollback(
    queue: TaskQueue, store: Store, caller: sa.Engine
) -> None:
    with caller.connect() as conn:
        transaction = conn.begin()
        conn.execute(orders.insert().values(id=1, item="book"))
        task_id = queue.enqueue("ship_order", {"order": 1}, connection=conn)
        batch = queue.enqueue_many("ship_order", [{"order": 2}, {"order": 3}], connection=conn)
        transaction.rollback()
    for gone in [task_id, *batch]:
        with pytest.raises(UnknownTask):
            store.get_task(gone)
    assert count(store) == 0
    with caller.connect() as conn:
        assert conn.execute(select(func.count()).select_from(orders)).scalar_one() == 0


def test_enqueue_many_in_callers_transaction_commits_with_it(
    queue: TaskQueue, store: Store, caller: sa.Engine
) -> None:
    with caller.begin() as conn:
        ids = queue.enqueue_many("job", [{"n": 1}, {"n": 2}], connection=conn)
    assert [json.loads(store.get_task(i)["payload"]) for i in ids] == [{"n": 1}, {"n": 2}]


# -- unique keys ---------------------------------------------------------------------


def test_unique_key_while_pending_returns_the_same_task(queue: TaskQueue, store: Store) -> None:
    first = queue.enqueue("report", {"day": 1}, unique_key="report:2024-01-01")
    again = queue.enqueue("report", {"day": 2}, unique_key="report:2024-01-01")
    other = queue.enqueue("report", {"day": 1}, unique_key="report:2024-01-02")
    assert again == first
    assert other != first
    assert count(store) == 2
    assert json.loads(store.get_task(first)["payload"]) == {"day": 1}


def test_unique_key_while_running_returns_the_same_task(queue: TaskQueue, store: Store) -> None:
    first = queue.enqueue("report", unique_key="k")
    [claim] = store.claim_tasks(1, [])
    assert claim.id == first
    assert store.get_task(first)["status"] == RUNNING
    assert queue.enqueue("report", unique_key="k") == first
    assert count(store) == 1


def test_unique_key_after_the_task_finished_gives_a_new_task(
    queue: TaskQueue, store: Store
) -> None:
    for ending in (COMPLETED, FAILED, CANCELLED):
        key = f"report:{ending}"
        first = queue.enqueue("report", unique_key=key)
        if ending == CANCELLED:
            store.cancel_task(first)
        else:
            [claim] = store.claim_tasks(1, [])
            assert claim.id == first
            if ending == COMPLETED:
                store.complete_task(claim, "null", 0.1)
            else:
                store.fail_task(claim, "boom", retry_delay=0.0, permanent=True)
        assert store.get_task(first)["status"] == ending
        second = queue.enqueue("report", unique_key=key)
        assert second != first, ending
        assert store.get_task(second)["status"] == PENDING
        assert queue.enqueue("report", unique_key=key) == second
        assert store.get_task(first)["status"] == ending
        store.cancel_task(second)  # out of the way of the next claim


# -- invalid input -------------------------------------------------------------------


INVALID: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "set-payload": (("job", {1, 2}), {}),
    "nan-payload": (("job", float("nan")), {}),
    "inf-in-payload": (("job", {"x": math.inf}), {}),
    "object-payload": (("job", object()), {}),
    "bytes-payload": (("job", b"raw"), {}),
    "oversized-payload": (("job", "x" * MAX_PAYLOAD_BYTES), {}),
    "negative-delay": (("job", {}), {"delay": -1}),
    "nan-delay": (("job", {}), {"delay": math.nan}),
    "text-delay": (("job", {}), {"delay": "5"}),
    "text-priority": (("job", {}), {"priority": "high"}),
    "float-priority": (("job", {}), {"priority": 1.5}),
    "bool-priority": (("job", {}), {"priority": True}),
    "none-priority": (("job", {}), {"priority": None}),
    "negative-retries": (("job", {}), {"max_retries": -1}),
    "zero-timeout": (("job", {}), {"timeout": 0}),
    "negative-timeout": (("job", {}), {"timeout": -5}),
    "empty-unique-key": (("job", {}), {"unique_key": ""}),
    "empty-queue": (("job", {}), {"queue": ""}),
    "empty-task-type": (("", {}), {}),
    "blank-task-type": (("   ", {}), {}),
}


def test_invalid_task_is_refused_and_nothing_written(queue: TaskQueue, store: Store) -> None:
    accepted = []
    for case, (args, options) in INVALID.items():
        with contextlib.suppress(InvalidTask):
            accepted.append((case, queue.enqueue(*args, **options)))
    assert accepted == [], "accepted invalid tasks"
    assert count(store) == 0
    with pytest.raises(InvalidTask):
        queue.enqueue_many("job", [{}], priority="high")
    assert count(store) == 0


def test_payload_size_limit_is_in_bytes_of_json(store: Store) -> None:
    small = TaskQueue(store.masked_url, store=store, max_payload_bytes=100)
    at_limit = "x" * 98  # 100 bytes with its quotes
    small.enqueue("job", at_limit)
    with pytest.raises(InvalidTask, match="over the limit"):
        small.enqueue("job", at_limit + "x")
    assert count(store) == 1


# -- PostgreSQL's one-statement enqueue: the driver's cursor, in autocommit ------------------


def pooled_connections_in_autocommit(store: Store) -> list[bool]:
    """Whether each connection the pool holds is in autocommit."""
    with contextlib.ExitStack() as stack:
        size = store.engine.pool.size()
        held = [stack.enter_context(store.engine.connect()) for _ in range(size)]
        return [conn.connection.driver_connection.autocommit for conn in held]


def test_a_failed_enqueue_raises_sqlalchemys_error_and_spoils_no_connection(
    postgres_url: str,
) -> None:
    """The error is SQLAlchemy's (what callers catch, as for any other statement), nothing is
    written, and the pool's connections are transactional still: a transaction begun on
    any of them after the failure rolls back whole."""
    store = Store(postgres_url)
    queue = TaskQueue(postgres_url, store=store)
    try:
        with pytest.raises(sa.exc.DataError):
            queue.enqueue("nul\x00in the type")  # text cannot hold NUL in PostgreSQL
        assert count(store) == 0
        assert not any(pooled_connections_in_autocommit(store))
        with pytest.raises(RuntimeError), store.engine.begin() as conn:
            queue.enqueue("in a transaction", connection=conn)
            raise RuntimeError("the caller's transaction fails")
        assert count(store) == 0
        _the_next_enqueue_goes_through(store, queue)
    finally:
        store.dispose()


def _the_next_enqueue_goes_through(store: Store, queue: TaskQueue) -> None:
    """After a failed enqueue: the next one is written, and no pooled connection is left
    in autocommit."""
    queue.enqueue("after the failure")
    assert count(store) == 1
    assert not any(pooled_connections_in_autocommit(store))


def test_an_enqueue_whose_connection_dies_mid_statement_fails_cleanly_and_the_next_one_works(
    postgres_url: str,
) -> None:
    """The server ends the session while the enqueue waits inside its statement (held up by
    a table lock): the caller gets SQLAlchemy's OperationalError, the dead connection leaves
    the pool, nothing was written, and the next enqueue goes through on a fresh one."""
    store = Store(postgres_url)
    queue = TaskQueue(postgres_url, store=store)
    outcome: list[BaseException | int] = []
    try:
        with store.engine.connect() as holder, store.engine.connect() as watcher:
            holder.execute(sa.text("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE"))
            watcher.execution_options(isolation_level="AUTOCOMMIT")  # activity seen live

            def enqueue() -> None:
                try:
                    outcome.append(queue.enqueue("held up"))
                except BaseException as error:
                    outcome.append(error)

            thread = threading.Thread(target=enqueue)
            thread.start()
            waiting = sa.text(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            )
            pid = wait_until(lambda: watcher.execute(waiting).scalar(), timeout=10)
            watcher.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            holder.rollback()  # the lock goes
        thread.join(timeout=10)
        assert not thread.is_alive()
        [error] = outcome
        assert isinstance(error, sa.exc.OperationalError), repr(error)
        assert error.connection_invalidated
        assert count(store) == 0
        _the_next_enqueue_goes_through(store, queue)
    finally:
        store.dispose()
