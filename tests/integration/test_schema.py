"""schema.sql on real engines: idempotent, complete, private, and the claim stays on an index."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection, func, select, update

import workers.store as store_tables
from workers.store import (
    PENDING,
    SCHEMA_VERSION,
    BadDatabase,
    NewTask,
    Store,
    UtcDateTime,
    metadata,
    schema_version,
    tasks,
)

# The contract columns of DESIGN.md, "Tables".
CONTRACT_COLUMNS = {
    "tasks": {
        "id",
        "queue",
        "task_type",
        "payload",
        "status",
        "priority",
        "run_at",
        "created_at",
        "started_at",
        "completed_at",
        "duration",
        "attempts",
        "max_attempts",
        "timeout",
        "unique_key",
        "worker_id",
        "progress_percentage",
        "current_step",
        "total_steps",
        "progress_message",
        "result",
        "last_error",
        "error_history",
        "execution_log",
        "cancel_requested",
    },
    "task_workers": {
        "id",
        "worker_pid",
        "hostname",
        "supervisor_id",
        "is_active",
        "current_task_id",
        "last_heartbeat",
        "started_at",
        "stopped_at",
        "processed_tasks_count",
        "failed_tasks_count",
        "exit_code",
        "exit_reason",
        "queues",
    },
    "supervisors": {
        "id",
        "hostname",
        "pid",
        "started_at",
        "last_heartbeat",
        "desired_workers",
        "status",
        "version",
    },
}

CLAIM_INDEXES = ("tasks_claim_by_queue", "tasks_claim_any_queue")


def table_columns(store: Store, table: str) -> set[str]:
    with store.engine.connect() as conn:
        return {column["name"] for column in sa.inspect(conn).get_columns(table)}


HEALTH_VIEWS = ("supervisor_health", "worker_health", "queue_health")  # dependents first


def rows_of(store: Store, view: str) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(row) for row in conn.execute(sa.text(f"SELECT * FROM {view}")).mappings()]


def version_rows(store: Store) -> list[int]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(schema_version.c.version)).scalars())


# -- creation and version ------------------------------------------------------------


def test_init_schema_twice_is_harmless_and_reports_the_version(store: Store) -> None:
    assert SCHEMA_VERSION == 3
    assert store.init_schema() == 3
    assert store.init_schema() == 3
    assert version_rows(store) == [3]
    store.check_schema()


def test_init_schema_upgrades_a_version_1_schema(store: Store) -> None:
    worker = store.register_worker(store.register_supervisor("n", 1, 0.0, 1, "0"), "n", [])
    with store.engine.begin() as conn:  # what a version 1 database looked like
        for view in HEALTH_VIEWS:
            conn.exec_driver_sql(f"DROP VIEW {view}")
        conn.exec_driver_sql("ALTER TABLE task_workers DROP COLUMN rss_mb")
        for column in ("heartbeat_timeout", "crash_streak", "crash_reason"):
            conn.exec_driver_sql(f"ALTER TABLE supervisors DROP COLUMN {column}")
        conn.execute(update(schema_version).values(version=1))
    with pytest.raises(BadDatabase, match="run `taskherd init-db` to upgrade"):
        store.check_schema()

    assert store.init_schema() == SCHEMA_VERSION
    store.check_schema()
    assert "rss_mb" in table_columns(store, "task_workers")
    assert {"heartbeat_timeout", "crash_streak", "crash_reason"} <= table_columns(
        store, "supervisors"
    )
    assert rows_of(store, "supervisor_health")[0]["crash_streak"] == 0  # views back, up to date
    assert version_rows(store) == [SCHEMA_VERSION]
    with store.engine.connect() as conn:
        ids = conn.execute(select(store_tables.task_workers.c.id)).scalars().all()
    assert ids == [worker]  # rows survive the upgrade


def test_init_schema_keeps_existing_rows(store: Store) -> None:
    [task_id] = store.enqueue([NewTask("job")])
    store.init_schema()
    assert store.get_task(task_id)["status"] == PENDING


def test_init_schema_on_an_empty_database_creates_everything(store: Store) -> None:
    with store.engine.begin() as conn:
        for view in HEALTH_VIEWS:
            conn.exec_driver_sql(f"DROP VIEW {view}")
    metadata.drop_all(store.engine)
    with pytest.raises(BadDatabase, match="init-db"):
        store.check_schema()
    assert store.init_schema() == SCHEMA_VERSION
    store.check_schema()
    with store.engine.connect() as conn:
        names = set(sa.inspect(conn).get_table_names())
    assert {"tasks", "task_workers", "supervisors", "schema_version"} <= names


def test_tables_have_every_contract_and_code_column(store: Store) -> None:
    for table, contract in CONTRACT_COLUMNS.items():
        in_database = table_columns(store, table)
        in_code = {column.name for column in metadata.tables[table].columns}
        assert contract <= in_code, (table, contract - in_code)
        assert contract <= in_database, (table, contract - in_database)
        assert in_code <= in_database, (table, in_code - in_database)
    assert set(metadata.tables) == set(CONTRACT_COLUMNS) | {"schema_version"}
    assert table_columns(store, "schema_version") >= {"version"}


def test_claim_and_rescue_indexes_exist(store: Store) -> None:
    with store.engine.connect() as conn:
        names = {index["name"] for index in sa.inspect(conn).get_indexes("tasks")}
    assert set(CLAIM_INDEXES) | {"tasks_running_by_worker", "tasks_unique_key"} <= names


def test_newer_schema_is_refused(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(schema_version).values(version=SCHEMA_VERSION + 1))
    with pytest.raises(BadDatabase, match="newer"):
        store.check_schema()
    with pytest.raises(BadDatabase, match="newer"):
        store.init_schema()
    assert version_rows(store) == [SCHEMA_VERSION + 1], "init_schema touched a newer schema"


# -- SQLite files and bad URLs --------------------------------------------------------


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_file_created_by_store_is_private(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    with umask(0):  # a permissive umask must not widen the file
        store = Store(f"sqlite:///{path}", create=True)
        try:
            store.init_schema()
            store.enqueue([NewTask("job")])
            wal_files = [p for p in tmp_path.iterdir() if p != path]
            assert mode(path) == 0o600
            for side_file in wal_files:  # -wal and -shm follow the database file's mode
                assert mode(side_file) == 0o600, side_file
        finally:
            store.dispose()


def test_missing_sqlite_file_without_create_is_bad_database(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    with pytest.raises(BadDatabase, match="init-db"):
        Store(f"sqlite:///{path}")
    assert not path.exists()


@pytest.mark.parametrize(
    "content",
    [b"this is not a database\n" * 200, b"\x00\x01\x02garbage" * 1000],
    ids=["text", "binary"],
)
def test_file_that_is_not_sqlite_is_bad_database(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(BadDatabase, match="not a SQLite database"):
        Store(f"sqlite:///{path}")
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    "url",
    [
        "mysql://user@localhost/taskherd",
        "oracle://user@localhost/taskherd",
        "mssql+pyodbc://user@dsn",
        "sqlite://",
        "sqlite:///:memory:",
        "not a url at all",
    ],
)
def test_unsupported_url_is_bad_database(url: str) -> None:
    with pytest.raises(BadDatabase):
        Store(url)


# -- the claim query stays on an index ------------------------------------------------


def candidate_select(store: Store, queues: list[str], limit: int = 5) -> sa.Select[Any]:
    """Mirror of the candidate SELECT inside Store.claim_tasks."""
    now: Any = sa.literal(datetime.now(UTC), UtcDateTime) if store.is_sqlite else func.now()
    candidates = select(tasks.c.id).where(tasks.c.status == PENDING, tasks.c.run_at <= now)
    if queues:
        candidates = candidates.where(tasks.c.queue.in_(queues))
    candidates = candidates.order_by(tasks.c.priority.desc(), tasks.c.run_at, tasks.c.id).limit(
        limit
    )
    if not store.is_sqlite:
        candidates = candidates.with_for_update(skip_locked=True)
    return candidates


@contextmanager
def explaining(conn: Connection, prefix: str) -> Iterator[None]:
    """Send the next statements with `prefix` in front, with the very parameters the store binds."""

    def rewrite(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> tuple[str, Any]:
        return prefix + statement, parameters

    sa.event.listen(conn, "before_cursor_execute", rewrite, retval=True)
    try:
        yield
    finally:
        sa.event.remove(conn, "before_cursor_execute", rewrite)


def fill_with_history(store: Store, finished: int) -> None:
    """Many finished tasks, as after weeks of work, and a few pending ones in three queues."""
    store.enqueue([NewTask("old", queue=("a", "b", "c")[i % 3]) for i in range(finished)])
    with store.engine.begin() as conn:
        conn.execute(update(tasks).values(status="completed", completed_at=func.now()))
    store.enqueue([NewTask("new", queue=("a", "b", "c")[i % 3], priority=i % 4) for i in range(30)])


QUEUE_CASES = [[], ["a"], ["a", "b"]]


@pytest.mark.parametrize("queues", QUEUE_CASES, ids=["any-queue", "one-queue", "two-queues"])
def test_sqlite_claim_query_uses_a_claim_index(sqlite_url: str, queues: list[str]) -> None:
    store = Store(sqlite_url)
    try:
        fill_with_history(store, 3000)
        with store.engine.connect() as conn, explaining(conn, "EXPLAIN QUERY PLAN "):
            plan = [row[-1] for row in conn.execute(candidate_select(store, queues))]
    finally:
        store.dispose()
    text = "\n".join(plan)
    assert any(index in text for index in CLAIM_INDEXES), text
    assert not any(line.strip() == "SCAN tasks" for line in plan), text


@pytest.mark.parametrize("queues", QUEUE_CASES, ids=["any-queue", "one-queue", "two-queues"])
def test_postgresql_claim_query_uses_a_claim_index(postgres_url: str, queues: list[str]) -> None:
    store = Store(postgres_url)
    try:
        fill_with_history(store, 3000)
        with store.engine.connect() as conn:
            conn.execute(sa.text("ANALYZE tasks"))
            with explaining(conn, "EXPLAIN "):
                plan = [row[0] for row in conn.execute(candidate_select(store, queues))]
            conn.rollback()
    finally:
        store.dispose()
    text = "\n".join(plan)
    assert any(index in text for index in CLAIM_INDEXES), text
    assert "Seq Scan on tasks" not in text, text


@pytest.mark.parametrize(("query", "expected"), [("", 1), ("?synchronous=FULL", 2)])
def test_sqlite_durability_is_chosen_in_the_url(tmp_path: Path, query: str, expected: int) -> None:
    store = Store(f"sqlite:///{tmp_path / 'd.db'}{query}", create=True)
    try:
        store.init_schema()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == expected  # 1 NORMAL
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            checkpoint = conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()
            assert checkpoint == store_tables.SQLITE_CHECKPOINT_PAGES
    finally:
        store.dispose()


def test_the_hot_statements_write_task_statuses_into_the_sql(store: Store) -> None:
    """The claim, the batch completion and the release name each status as a literal: a
    bound status would make SQLite prepare the statement anew at every execution (to match
    it against a partial index's WHERE), and keep PostgreSQL's generic plan off the index."""
    statements = {
        "claim, any queue": store._claim_statement(()),
        "claim, two queues": store._claim_statement(("a", "b")),
        "complete": store._complete_statement(False),
        "complete with progress": store._complete_statement(True),
        "release": store._release_statement(),
    }
    for name, statement in statements.items():
        compiled = statement.compile(dialect=store.engine.dialect)
        sql = str(compiled)
        compared = "pending" if name.startswith("claim") else "running"
        assert f"tasks.status = '{compared}'" in sql, (name, sql)
        # what is bound: the status set, never one compared (a SET takes no index's WHERE)
        bound = [bind.value for bind in compiled.bind_names]
        assert bound.count(store_tables.RUNNING) + bound.count(store_tables.PENDING) <= 1, (
            name,
            bound,
        )


def test_only_task_statuses_are_written_into_the_sql() -> None:
    with pytest.raises(ValueError, match="not a task status"):
        store_tables._status_is("pending' OR 1=1 --")


@pytest.mark.parametrize("query", ["?synchronous=OFF", "?cache=shared"])
def test_sqlite_url_parameters_that_would_lose_data_or_mean_nothing_are_refused(
    tmp_path: Path, query: str
) -> None:
    with pytest.raises(BadDatabase):
        Store(f"sqlite:///{tmp_path / 'd.db'}{query}", create=True)
    assert not (tmp_path / "d.db").exists()
