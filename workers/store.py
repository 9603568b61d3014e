"""The task store: every SQL statement taskherd runs, on SQLite and PostgreSQL.

Each operation is one short method that returns plain dataclasses. Every move
of a task out of ``running`` is one guarded UPDATE, fenced on the claim
``(id, worker_id, attempts)`` and checked by its row count. Dialect
differences live here and nowhere else.
"""

from __future__ import annotations

import importlib
import json
import os
import select as io_select  # (sqlalchemy.select is the query builder)
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    Table,
    Text,
    case,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import DateTime, TypeDecorator

from workers import wake

SCHEMA_VERSION = 3

# Statements that bring a schema of version N-1 up to N; schema.sql then adds what is missing.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE task_workers ADD COLUMN rss_mb DOUBLE PRECISION",),
    3: (
        "ALTER TABLE supervisors ADD COLUMN heartbeat_timeout DOUBLE PRECISION",
        "ALTER TABLE supervisors ADD COLUMN crash_streak INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE supervisors ADD COLUMN crash_reason TEXT",
    ),
}
SQLITE_BUSY_TIMEOUT_MS = 5_000
# The worker's round trip waits for SQLite's write lock in steps of 50 us, doubling up to
# 100 ms (the driver's own steps are 1, 2, 5, 10, ... 100 ms: too coarse for a lock held for
# a fraction of a millisecond, and the same once the lock is held for long).
SQLITE_LOCK_STEP = 0.00005  # seconds
SQLITE_LOCK_STEP_CAP = 0.1  # seconds
# SQLite's durability, chosen in the URL (sqlite:///taskherd.db?synchronous=FULL) so every
# process that opens the file agrees. NORMAL (in WAL mode): a power cut may lose the last
# commits; FULL: every commit reaches the disk before it returns.
SQLITE_SYNCHRONOUS = "NORMAL"
SQLITE_SYNCHRONOUS_LEVELS = ("NORMAL", "FULL", "EXTRA")
# The commit that takes SQLite's WAL past this many pages (4 KiB each) copies them into the
# database file, with a sync of both at any level: 4x SQLite's default, so a busy pool pays
# those syncs a quarter as often (+15 % drain measured by `taskherd bench`), for a WAL file
# of up to 16 MiB. Under NORMAL the commits since the last checkpoint are those a power cut
# may lose (the kernel's writeback also saves them within about 30 s).
SQLITE_CHECKPOINT_PAGES = 4_000
MAX_ERROR_LENGTH = 8_000
# PostgreSQL: one NOTIFY per payload, sent at commit (wake.py describes the payloads).
NOTIFY = sa.text(
    "SELECT pg_notify(:channel, payload) FROM unnest(CAST(:payloads AS text[])) AS payload"
)
# Batch inserts (Store._insert_many_*): SQLite's last id given, PostgreSQL's next ids.
LAST_TASK_ID = sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'tasks'")
# (The sequence is looked up once, in an InitPlan: by name per row it cost 10 us a row.)
NEXT_TASK_IDS = sa.text(
    "SELECT nextval((SELECT pg_get_serial_sequence('tasks', 'id'))::regclass) "
    "FROM generate_series(1, :count)"
)
# libpq options of the supervisor's listening connection: give up connecting after 3 s, and
# notice a server that vanished without a word (a cut link) within about 25 s.
LISTENER_CONNECT_OPTIONS = {
    "connect_timeout": 3,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "pending",
    "running",
    "completed",
    "failed",
    "cancelled",
)
PROGRESS_COLUMNS = ("progress_percentage", "current_step", "total_steps", "progress_message")
# Batches of rows that one statement writes (Store._batch_rows): their columns and types.
# Finished tasks (Store._complete_statement): the fence, the outcome, then, for tasks whose
# last progress is not written yet, PROGRESS_COLUMNS.
DONE_PROGRESS = ("percentage", "step", "total_steps", "message")
DONE: dict[str, Any] = {
    "id": sa.BigInteger,
    "worker": sa.BigInteger,
    "attempt": Integer,
    "outcome": Text,
    "took": Float,
    **dict(zip(DONE_PROGRESS, (Float, Text, Integer, Text), strict=True)),
}
# Workers' heartbeats (Store._worker_beat_statement).
BEAT: dict[str, Any] = {
    "id": sa.BigInteger,
    "task": sa.BigInteger,
    "processed": Integer,
    "failed": Integer,
    "rss": Float,
}
# New tasks (Store._insert_rows_statement): PostgreSQL takes the ids from the sequence first
# and computes run_at from the delay by its own clock; SQLite takes run_at as stored.
NEW: dict[str, Any] = {
    "queue": Text,
    "task_type": Text,
    "payload": Text,
    "priority": Integer,
    "max_attempts": Integer,
    "timeout": Float,
}
NEW_POSTGRES = {"id": sa.BigInteger, **NEW, "delay": Float}
NEW_SQLITE = {**NEW, "run_at": Text}
STATUSES = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED)
FINISHED = (COMPLETED, FAILED, CANCELLED)

# Errors a caller may retry: the database is busy, restarting or unreachable.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (sa.exc.OperationalError, sa.exc.InterfaceError)


class StoreError(Exception):
    """A problem with the database that a retry will not fix."""


class BadDatabase(StoreError):
    """The URL, the file or the schema is unusable: bad input, exit code 2."""


class UnknownTask(StoreError):
    """No task has that id."""


class WrongState(StoreError):
    """The task exists but its status does not allow the operation."""


class LostClaim(StoreError):
    """The task was rescued and may be re-claimed elsewhere: this worker's write changed nothing."""


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on both engines (SQLite stores it as naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)


metadata = MetaData()

tasks = Table(
    "tasks",
    metadata,
    Column("id", sa.BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("queue", Text, nullable=False),
    Column("task_type", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("run_at", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime),
    Column("completed_at", UtcDateTime),
    Column("duration", Float),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("timeout", Float),
    Column("unique_key", Text),
    Column("worker_id", sa.BigInteger),
    Column("progress_percentage", Float),
    Column("current_step", Text),
    Column("total_steps", Integer),
    Column("progress_message", Text),
    Column("result", Text),
    Column("last_error", Text),
    Column("error_history", Text, nullable=False),
    Column("execution_log", Text, nullable=False),
    Column("cancel_requested", Boolean, nullable=False),
)

task_workers = Table(
    "task_workers",
    metadata,
    Column("id", sa.BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("worker_pid", Integer),
    Column("pid_start_time", Float),
    Column("hostname", Text, nullable=False),
    Column("supervisor_id", sa.BigInteger, nullable=False),
    Column("is_active", Boolean, nullable=False),
    Column("current_task_id", sa.BigInteger),
    Column("last_heartbeat", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("stopped_at", UtcDateTime),
    Column("processed_tasks_count", Integer, nullable=False),
    Column("failed_tasks_count", Integer, nullable=False),
    Column("exit_code", Integer),
    Column("exit_reason", Text),
    Column("queues", Text, nullable=False),
    Column("rss_mb", Float),
)

supervisors = Table(
    "supervisors",
    metadata,
    Column("id", sa.BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("hostname", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("pid_start_time", Float),
    Column("started_at", UtcDateTime, nullable=False),
    Column("last_heartbeat", UtcDateTime, nullable=False),
    Column("stopped_at", UtcDateTime),
    Column("desired_workers", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("version", Text, nullable=False),
    Column("heartbeat_timeout", Float),
    Column("crash_streak", Integer, nullable=False),
    Column("crash_reason", Text),
)

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))


@dataclass(frozen=True)
class NewTask:
    """A task to enqueue; the payload is already JSON text."""

    task_type: str
    payload: str = "{}"
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 4
    delay: float = 0.0
    timeout: float | None = None
    unique_key: str | None = None


@dataclass(frozen=True)
class Claim:
    """A task this worker holds: the fence for every write about it is (id, worker_id, attempts)."""

    id: int
    task_type: str
    payload: str
    queue: str
    priority: int
    attempts: int
    max_attempts: int
    timeout: float | None
    worker_id: int


@dataclass(frozen=True)
class Finished:
    """A task its handler completed, whose outcome the worker has yet to write."""

    claim: Claim
    result: str  # JSON
    duration: float  # seconds
    progress: Progress | None = None


@dataclass(frozen=True)
class Rescued:
    """A task taken back from a worker that is gone, and the status it was given."""

    id: int
    status: str
    attempts: int
    worker_id: int


@dataclass(frozen=True)
class Progress:
    """The progress fields of a task, as the handler last reported them."""

    percentage: float | None = None
    step: str | None = None
    total_steps: int | None = None
    message: str | None = None


@dataclass(frozen=True)
class WorkerStats:
    """What a supervisor knows about one live worker at a heartbeat."""

    current_task_id: int | None
    processed: int
    failed: int
    rss_mb: float | None = None


@dataclass
class HealthFacts:
    """Rows of the health views, and the counts `taskherd health` judges beside them."""

    now: datetime
    supervisors: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    queues: list[dict[str, Any]]
    completed_recently: int = 0
    failed_recently: int = 0
    overdue: list[tuple[int, int | None, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class ProcessRow:
    """A supervisor or worker row, enough to tell whether its process still lives."""

    id: int
    pid: int | None
    pid_start_time: float | None
    supervisor_id: int | None = None


def _history_limit(text: str) -> str:
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 3] + "..."


def schema_text() -> str:
    """The schema file shipped inside the package (the top-level schema.sql)."""
    return resources.files("workers").joinpath("schema.sql").read_text(encoding="utf-8")


def schema_statements(dialect: str) -> list[str]:
    """The schema's statements for one engine, with the other engine's lines left out."""
    other = {"sqlite": "-- postgresql", "postgresql": "-- sqlite"}[dialect]
    own = f"-- {dialect}"
    kept: list[str] = []
    for line in schema_text().splitlines():
        stripped = line.rstrip()
        if stripped.endswith(other):
            continue
        if stripped.endswith(own):
            stripped = stripped[: -len(own)].rstrip()
        kept.append(stripped)
    text = "\n".join(line for line in kept if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in text.split(";\n") if statement.strip()]


def normalise_url(url: str) -> sa.URL:
    """Parse a database URL; only SQLite files and PostgreSQL (psycopg 3) are accepted."""
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError) as error:
        raise BadDatabase("invalid database URL: use sqlite:///FILE or postgresql://...") from error
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise BadDatabase("SQLite needs a file: sqlite:///path/to/taskherd.db")
        unknown = sorted(set(parsed.query) - {"synchronous"})
        if unknown:
            raise BadDatabase(f"unknown SQLite URL parameter {unknown[0]!r} (known: synchronous)")
        level = str(parsed.query.get("synchronous", SQLITE_SYNCHRONOUS)).upper()
        if level not in SQLITE_SYNCHRONOUS_LEVELS:
            raise BadDatabase(
                f"synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS_LEVELS)}, not {level!r}"
            )
        return parsed.set(drivername="sqlite")
    raise BadDatabase(
        f"unsupported database URL scheme {parsed.drivername!r}: use sqlite:///FILE or postgresql://..."
    )


def mask_url(url: str | sa.URL) -> str:
    """The URL as it may be shown or logged: the password replaced by ***."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (sa.exc.ArgumentError, ValueError):
        return "<invalid URL>"
    return parsed.render_as_string(hide_password=True)


def _create_private_file(path: Path) -> None:
    """Create an empty SQLite file readable by its owner only (0600)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    except OSError as error:
        raise BadDatabase(f"cannot create {path}: {error.strerror}") from error
    os.close(fd)


def _install_sqlite_settings(engine: Engine, synchronous: str, busy_timeout_ms: int) -> None:
    """WAL, a busy timeout, and transactions we begin ourselves (IMMEDIATE unless read-only)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {synchronous}")
        cursor.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_CHECKPOINT_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Only the store's writes take the write lock up front; any other transaction is
        # deferred, so a read never queues behind a writer (WAL lets it read past one).
        immediate = connection.get_execution_options().get("taskherd_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# libpq options of every pooled PostgreSQL connection, so that a cut link or a dead host is an
# error within seconds rather than a statement that hangs for the kernel's ~15 minutes: give up
# connecting after 5 s; fail a connection whose data stays unacknowledged for 10 s; probe an
# idle one after 5 s of silence (3 probes, 2 s apart). Any of them set in the URL wins.
POSTGRES_CONNECT_OPTIONS: dict[str, int] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # milliseconds
}
# The server's side of the same, per session (options=-c ..., before any options in the URL).
# A client cut off inside a transaction leaves its session "idle in transaction", holding its
# row locks and the maintenance lock, until the server notices -- by default after its own TCP
# keepalives, two hours. taskherd sends a transaction's statements back to back, so 5 s of
# silence inside one means the client is gone (or frozen): the server ends the session and
# its locks go with it. Its keepalives free the slot of a vanished idle client within ~25 s.
POSTGRES_SESSION_SETTINGS: dict[str, str] = {
    "idle_in_transaction_session_timeout": "5s",
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
}
# Periodic maintenance (the stale-heartbeat rescue, the periodic purge) runs on one node at a
# time: it takes this advisory lock inside its transaction, and skips its turn if another node
# holds it. Being transaction-scoped, the lock ends with the transaction, or with its session
# when its node dies or is cut off (POSTGRES_SESSION_SETTINGS): it cannot outlive its holder.
MAINTENANCE_LOCK = sa.text("SELECT pg_try_advisory_xact_lock(hashtext('taskherd.maintenance'))")
PURGE_BATCH = 10_000  # rows per table a periodic purge deletes at most: the lock stays short


def _postgres_connect_args(url: sa.URL) -> dict[str, Any]:
    """POSTGRES_CONNECT_OPTIONS and POSTGRES_SESSION_SETTINGS, under what the URL sets."""
    given = dict(url.query)
    ours = " ".join(f"-c {name}={value}" for name, value in POSTGRES_SESSION_SETTINGS.items())
    extra = given.get("options")
    options = f"{ours} {extra}" if isinstance(extra, str) else ours  # the last -c wins
    defaults = {key: value for key, value in POSTGRES_CONNECT_OPTIONS.items() if key not in given}
    return {**defaults, "options": options}


def _install_postgres_settings(engine: Engine) -> None:
    """A connection the server ended is replaced at checkout, or else a transient error."""

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        # A pre-ping without a round trip: an idle connection receives nothing, unless the
        # server is ending it (a restart, a terminated backend: its last words, then EOF).
        # Anything waiting on the socket, or a closed one, and the pool connects afresh,
        # rather than fail the first statement after a restart. (A vanished host sends
        # nothing: its statements fail after the TCP timeouts, as a round trip would.)
        if dbapi_connection.closed or io_select.select([dbapi_connection.fileno()], [], [], 0)[0]:
            raise sa.exc.DisconnectionError("the server ended this idle connection")

    @event.listens_for(engine, "handle_error")
    def _on_error(context: Any) -> BaseException | None:
        # e.g. the idle-in-transaction timeout above ended the session of a process that was
        # frozen mid-transaction: psycopg calls that an InternalError, yet a retry on a new
        # connection is exactly right.
        error = context.sqlalchemy_exception
        if context.is_disconnect and error is not None and not isinstance(error, TRANSIENT_ERRORS):
            return sa.exc.OperationalError(
                context.statement,
                context.parameters,
                context.original_exception,
                connection_invalidated=True,
            )
        return None


def _dialect(name: str) -> Any:
    """sqlalchemy.dialects.<name> (sqlite or postgresql): imported by the processes that use
    that engine only, so each keeps the other's megabytes out of its memory."""
    return importlib.import_module(f"sqlalchemy.dialects.{name}")


def _status_is(*statuses: str) -> ColumnElement[bool]:
    """The task's status is one of these, written into the SQL as literals, not bound: a
    partial index's WHERE (status = 'pending', ...) then matches when the statement is
    prepared. Bound, SQLite prepares the statement anew at every execution to compare the
    value, and PostgreSQL's generic plan cannot use the index."""
    unknown = set(statuses) - set(STATUSES)
    if unknown:
        raise ValueError(f"not a task status: {sorted(unknown)}")
    literals: list[ColumnElement[Any]] = [sa.literal_column(f"'{status}'") for status in statuses]
    if len(literals) == 1:
        return tasks.c.status == literals[0]
    return tasks.c.status.in_(literals)


def _fenced_on(task_id: Any, worker_id: Any, attempt: Any) -> ColumnElement[bool]:
    """The fence of every write about a claimed task: still running, by the same worker, in
    the same attempt (values, parameters, or the columns of a batch of rows)."""
    return sa.and_(
        tasks.c.id == task_id,
        _status_is(RUNNING),
        tasks.c.worker_id == worker_id,
        tasks.c.attempts == attempt,
    )


def _stale(cutoff: ColumnElement[datetime]) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """An active worker, and a running or stopping supervisor, silent since the cutoff."""
    return (
        sa.and_(task_workers.c.is_active, task_workers.c.last_heartbeat < cutoff),
        sa.and_(
            supervisors.c.status.in_(("running", "stopping")), supervisors.c.last_heartbeat < cutoff
        ),
    )


def _holder_alive() -> ColumnElement[bool]:
    """A running task's worker is still active: per task, a primary-key look-up, cheap however
    many old workers pile up."""
    return (
        select(task_workers.c.id)
        .where(task_workers.c.id == tasks.c.worker_id, task_workers.c.is_active)
        .exists()
    )


class Store:
    """The database as taskherd sees it. Each process builds its own."""

    def __init__(self, url: str, *, create: bool = False, busy_timeout: float | None = None):
        """busy_timeout: seconds a SQLite write waits for the write lock (default
        SQLITE_BUSY_TIMEOUT_MS); PostgreSQL ignores it."""
        self.url = normalise_url(url)
        self.sqlite_synchronous = str(self.url.query.get("synchronous", SQLITE_SYNCHRONOUS))
        self.url = self.url.difference_update_query(["synchronous"])
        self.dialect = self.url.get_backend_name()
        self.is_sqlite = self.dialect == "sqlite"
        if self.is_sqlite:
            path = Path(str(self.url.database))
            if not path.exists():
                if not create:
                    raise BadDatabase(f"no database at {path}: run `taskherd init-db` first")
                _create_private_file(path)
            self.engine = sa.create_engine(self.url, poolclass=sa.pool.QueuePool, pool_size=2)
            wait_ms = SQLITE_BUSY_TIMEOUT_MS if busy_timeout is None else int(busy_timeout * 1000)
            _install_sqlite_settings(self.engine, self.sqlite_synchronous.upper(), wait_ms)
        else:
            self.engine = sa.create_engine(
                self.url,
                pool_size=2,
                max_overflow=4,
                connect_args=_postgres_connect_args(self.url),
            )
            _install_postgres_settings(self.engine)
        self._statements: dict[Any, Any] = {}  # the hot path's, built once (_statement)
        self._kept: Connection | None = None  # the worker's own connection (_round_trip)
        self._kept_thread: int | None = None  # the thread that opened it (it alone uses it)
        self._open()

    def _open(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except sa.exc.DatabaseError as error:
            if self.is_sqlite and not isinstance(error, sa.exc.OperationalError):
                raise BadDatabase(f"{self.url.database} is not a SQLite database") from error
            if self.is_sqlite:
                raise BadDatabase(f"cannot open {self.url.database}: {error.orig}") from error
            raise

    def dispose(self) -> None:
        if self._kept is not None:  # the worker's own connection (_round_trip)
            self._kept.close()
            self._kept = None
        self.engine.dispose()

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    # -- transactions and dialect helpers ------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite); BadDatabase if the file is read-only."""
        try:
            with self.engine.connect() as conn:
                conn.execution_options(taskherd_write=True)
                with conn.begin():
                    yield conn
        except sa.exc.OperationalError as error:
            if self.is_sqlite and "readonly database" in str(error.orig):
                raise BadDatabase(
                    f"{self.url.database} is read-only: taskherd must be able to write it"
                ) from error
            raise

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only transaction (a deferred BEGIN on SQLite: it never waits for writers)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _now(self, delay: float = 0.0) -> ColumnElement[datetime]:
        """Now plus delay seconds, by the database clock (SQLite shares the host's)."""
        if self.is_sqlite:
            return sa.literal(datetime.now(UTC) + timedelta(seconds=delay), UtcDateTime)
        if delay:
            return func.now() + sa.literal(timedelta(seconds=delay), sa.Interval)
        return func.now()

    def _now_text(self) -> ColumnElement[str]:
        if self.is_sqlite:
            return sa.literal(datetime.now(UTC).isoformat(timespec="microseconds"), Text)
        return func.to_char(func.timezone("UTC", func.now()), 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')

    def _json_object(self, *pairs: Any) -> ColumnElement[Any]:
        if self.is_sqlite:
            return func.json_object(*pairs)
        return func.jsonb_build_object(*pairs)

    def _json_append(self, column: sa.Column[str], entry: ColumnElement[Any]) -> ColumnElement[str]:
        """column (a JSON array as text) with entry appended."""
        if self.is_sqlite:
            return func.json_insert(column, "$[#]", entry)
        jsonb = sa.cast(column, _dialect("postgresql").JSONB)
        array = jsonb.op("||")(func.jsonb_build_array(entry))
        return sa.cast(array, Text)

    def _history_entry(self, error: str) -> ColumnElement[Any]:
        return self._json_object(
            "at",
            self._now_text(),
            "attempt",
            tasks.c.attempts,
            "worker_id",
            tasks.c.worker_id,
            "error",
            sa.literal(_history_limit(error), Text),
        )

    def _fence(self, claim: Claim) -> ColumnElement[bool]:
        return _fenced_on(claim.id, claim.worker_id, claim.attempts)

    def _insert(self, table: Table) -> Any:
        return _dialect(self.dialect).insert(table)

    # -- schema ----------------------------------------------------------------------

    def init_schema(self) -> int:
        """Apply schema.sql (idempotent); return the schema version now in place."""
        with self._write() as conn:
            if not self.is_sqlite:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('taskherd.schema'))"))
            found = self._version(conn)
            if found is not None and found > SCHEMA_VERSION:
                raise BadDatabase(
                    f"the schema is version {found}, newer than this taskherd "
                    f"(version {SCHEMA_VERSION}): upgrade taskherd"
                )
            for version in range((found or SCHEMA_VERSION) + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS.get(version, ()):
                    conn.exec_driver_sql(statement)
            for statement in schema_statements(self.dialect):
                conn.exec_driver_sql(statement)
            conn.execute(update(schema_version).values(version=SCHEMA_VERSION))
            return SCHEMA_VERSION

    def check_schema(self) -> None:
        """Raise BadDatabase unless this database holds the schema this code expects."""
        with self._read() as conn:
            found = self._version(conn)
        if found is None:
            raise BadDatabase(f"{self.masked_url} has no taskherd schema: run `taskherd init-db`")
        if found > SCHEMA_VERSION:
            raise BadDatabase(
                f"the schema is version {found}, newer than this taskherd "
                f"(version {SCHEMA_VERSION}): upgrade taskherd"
            )
        if found < SCHEMA_VERSION:
            raise BadDatabase(f"the schema is version {found}: run `taskherd init-db` to upgrade")

    def _version(self, conn: Connection) -> int | None:
        if not sa.inspect(conn).has_table("schema_version"):
            return None
        return conn.execute(select(func.max(schema_version.c.version))).scalar()

    def now(self) -> datetime:
        """The database clock (on SQLite, the host's: the only one that writes there)."""
        with self._read() as conn:
            return self._clock(conn)

    def _clock(self, conn: Connection) -> datetime:
        if self.is_sqlite:
            return datetime.now(UTC)
        value: datetime = conn.execute(select(func.now())).scalar_one()
        return value

    # -- enqueue ---------------------------------------------------------------------

    def enqueue(self, new: Sequence[NewTask], connection: Connection | None = None) -> list[int]:
        """Insert tasks and return their ids in order; a unique key already held returns that id.

        Idle workers are woken once the tasks are committed (see wake.py): on PostgreSQL by a
        NOTIFY in the same transaction, on SQLite by a datagram after the commit.
        """
        if connection is not None:
            ids = self._enqueue(connection, new)
            if self.is_sqlite:
                wake.ring_at_commit(connection, self._wake_dir, self._announcements(new, ids))
            return ids
        if not self.is_sqlite and len(new) == 1 and new[0].unique_key is None:
            return [self._enqueue_one_postgres(new[0])]
        with self._write() as conn:
            ids = self._enqueue(conn, new)
        if self.is_sqlite:
            wake.ring(self._wake_dir, self._announcements(new, ids))
        return ids

    def _enqueue(self, conn: Connection, new: Sequence[NewTask]) -> list[int]:
        if not new:
            return []
        if any(item.unique_key is not None for item in new):
            insert = self._task_insert()
            ids = [self._enqueue_unique(conn, insert, item) for item in new]
        elif len(new) == 1:
            insert = self._statement("insert-one", self._task_insert_returning)
            ids = [int(conn.execute(insert, self._task_row(new[0])).scalar_one())]
        elif self.is_sqlite:
            ids = self._insert_many_sqlite(conn, new)
        else:
            ids = self._insert_many_postgres(conn, new)
        if not self.is_sqlite:
            self._notify(conn, self._announcements(new, ids))
        return ids

    def _enqueue_one_postgres(self, item: NewTask) -> int:
        """One task in one autocommit statement that inserts it and, from its RETURNING,
        notifies (unless delayed): one round trip and one commit, where a transaction takes
        four round trips (BEGIN, INSERT, NOTIFY, COMMIT)."""
        row = self._task_row(item)
        if item.delay:  # not announced: polling finds it when it falls due
            statement = self._statement("insert-one", self._task_insert_returning)
            with self.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                return int(conn.execute(statement, row).scalar_one())
        compiled = self._compiled("insert-notify", self._insert_notify_statement)
        params = compiled.construct_params({**row, "wake_queue": wake.queue_part(item.queue)})
        with self._driver_autocommit(compiled.string) as cursor:
            cursor.execute(compiled.string, params)
            return int(cursor.fetchone()[0])

    def _compiled(self, key: Any, build: Callable[[], Any]) -> Any:
        """A statement built and compiled once for this engine: the driver's own SQL."""
        return self._statement(
            ("compiled", key), lambda: build().compile(dialect=self.engine.dialect)
        )

    @contextmanager
    def _driver_autocommit(self, statement: str) -> Iterator[Any]:
        """A cursor of a pooled connection in autocommit, for a one-statement write without
        SQLAlchemy's execution around it: a third of an enqueue's time on PostgreSQL here. A
        driver error comes out as SQLAlchemy's (OperationalError, IntegrityError, ...), and a
        connection goes back to the pool only as it came: after an error it is closed. (Types
        whose values SQLAlchemy would convert have no place in such a statement: the driver
        gets the values as given.)"""
        pooled = self.engine.raw_connection()
        driver: Any = pooled.driver_connection
        driver_error = self.engine.dialect.loaded_dbapi.Error
        try:
            driver.autocommit = True
            with driver.cursor() as cursor:
                yield cursor
            driver.autocommit = False
        except driver_error as error:
            broken = self.engine.dialect.is_disconnect(error, pooled.dbapi_connection, None)
            pooled.invalidate(error)
            raise sa.exc.DBAPIError.instance(
                statement, None, error, driver_error, connection_invalidated=broken
            ) from error
        except BaseException:
            pooled.invalidate()
            raise
        finally:
            pooled.close()

    def _insert_notify_statement(self) -> Any:
        """PostgreSQL: WITH new AS (INSERT ... RETURNING id) SELECT id, pg_notify(...) FROM
        new; the payload as wake.payloads writes it for one task (see wake.queue_part)."""
        # the row's values as parameters (in a CTE, an INSERT takes no columns from them)
        names = [name for name in self._task_row(NewTask("")) if name != "delay"]
        columns = {name: sa.bindparam(name, type_=tasks.c[name].type) for name in names}
        new = self._task_insert().values(columns).returning(tasks.c.id).cte("new")
        payload = func.concat("1:", new.c.id, ":", sa.bindparam("wake_queue", type_=Text))
        return select(new.c.id, func.pg_notify(wake.CHANNEL, payload))

    def _insert_many_sqlite(self, conn: Connection, new: Sequence[NewTask]) -> list[int]:
        """Every row in one statement (_insert_rows_statement), no RETURNING (SQLite would
        run it row by row). The ids follow from AUTOINCREMENT: while this transaction holds
        the write lock, each new row's id is one more than the last id ever given, so the
        batch took the `len(new)` ids that end at the table's sequence number now."""
        driver: Any = conn.connection.dbapi_connection
        if driver.isolation_level is None and not driver.in_transaction:
            # The caller's connection commits each statement (autocommit): another writer's
            # rows could come between ours, so each row reports its own id.
            returning = self._statement("insert-one", self._task_insert_returning)
            return [int(conn.execute(returning, self._task_row(i)).scalar_one()) for i in new]
        now = datetime.now(UTC)
        # as the column stores it (text): the column type's own processor, for this dialect
        stored: Any = tasks.c.run_at.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
        run_at: dict[float, str] = {}  # by delay: a batch mostly has one
        rows = []
        for item in new:
            due = run_at.get(item.delay)
            if due is None:
                due = run_at[item.delay] = stored(now + timedelta(seconds=item.delay))
            rows.append([*self._new_row(item), due])
        params = {"created": now, **self._batch_params("new", list(NEW_SQLITE), rows)}
        conn.execute(self._statement("insert-rows", self._insert_rows_statement), params)
        last = conn.execute(LAST_TASK_ID).scalar_one()
        return list(range(last - len(new) + 1, last + 1))

    def _insert_many_postgres(self, conn: Connection, new: Sequence[NewTask]) -> list[int]:
        """Take len(new) ids from the table's identity sequence, in order, then insert every
        row in one statement (_insert_rows_statement)."""
        ids = list(conn.execute(NEXT_TASK_IDS, {"count": len(new)}).scalars())
        rows = [
            [task_id, *self._new_row(item), item.delay]
            for task_id, item in zip(ids, new, strict=True)
        ]
        params = self._batch_params("new", list(NEW_POSTGRES), rows)
        conn.execute(self._statement("insert-rows", self._insert_rows_statement), params)
        return ids

    @staticmethod
    def _new_row(item: NewTask) -> list[Any]:
        """A new task's values in NEW's order."""
        return [
            item.queue,
            item.task_type,
            item.payload,
            item.priority,
            item.max_attempts,
            item.timeout,
        ]

    def _insert_rows_statement(self) -> Any:
        """INSERT INTO tasks SELECT ... FROM the batch as rows `new` (_batch_rows): whatever
        the batch's size one short statement, where a VALUES list would cost the driver time
        per row to parse. PostgreSQL computes run_at from each delay and created_at by its
        own clock; SQLite is given both (parameter `created`)."""
        columns = NEW_SQLITE if self.is_sqlite else NEW_POSTGRES
        new = self._batch_rows("new", columns)
        if self.is_sqlite:
            when = [new.c.run_at, sa.bindparam("created", type_=UtcDateTime)]
        else:
            one_second: ColumnElement[Any] = sa.literal_column("interval '1 second'")
            when = [func.now() + new.c.delay * one_second, func.now()]
        names = [*NEW, "status", "attempts", "error_history", "execution_log"]
        names += ["cancel_requested", "run_at", "created_at"]
        values = [*(new.c[name] for name in NEW), sa.literal(PENDING), sa.literal(0)]
        values += [sa.literal("[]"), sa.literal("[]"), sa.false(), *when]
        if self.is_sqlite:  # the rows take their ids in the batch's order
            return sa.insert(tasks).from_select(names, select(*values).order_by(new.c.position))
        names.insert(0, "id")
        values.insert(0, new.c.id)
        return sa.insert(tasks).from_select(names, select(*values))

    @staticmethod
    def _announcements(new: Sequence[NewTask], ids: Sequence[int]) -> list[str]:
        """Wake-up payloads for the tasks runnable now, one per queue (delayed ones: none)."""
        ready = zip(new, ids, strict=True)
        return wake.payloads((item.queue, task_id) for item, task_id in ready if not item.delay)

    def _notify(self, conn: Connection, payloads: Sequence[str]) -> None:
        """PostgreSQL: NOTIFY the listening supervisors, delivered when this transaction commits."""
        if payloads:
            conn.execute(NOTIFY, {"channel": wake.CHANNEL, "payloads": list(payloads)})

    @property
    def _wake_dir(self) -> str:
        return wake.wake_dir(str(self.url.database))

    def listen_for_tasks(self, application_name: str) -> Any:
        """PostgreSQL: a new connection (outside the pool, autocommit) LISTENing on the channel
        enqueuers NOTIFY; TCP keepalives let it notice a vanished server."""
        cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
        options = {**LISTENER_CONNECT_OPTIONS, "application_name": application_name, **cparams}
        conn = self.engine.dialect.connect(*cargs, **options, autocommit=True)
        try:
            conn.execute(f"LISTEN {wake.CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _task_insert(self) -> Any:
        """INSERT for one new task (PostgreSQL: run_at and created_at by the database clock)."""
        if self.is_sqlite:
            return self._insert(tasks)
        delay = sa.bindparam("delay", type_=sa.Interval)
        return self._insert(tasks).values(run_at=func.now() + delay, created_at=func.now())

    def _task_insert_returning(self) -> Any:
        return self._task_insert().returning(tasks.c.id)

    def _task_row(self, item: NewTask) -> dict[str, Any]:
        row: dict[str, Any] = {
            "queue": item.queue,
            "task_type": item.task_type,
            "payload": item.payload,
            "status": PENDING,
            "priority": item.priority,
            "attempts": 0,
            "max_attempts": item.max_attempts,
            "timeout": item.timeout,
            "unique_key": item.unique_key,
            "error_history": "[]",
            "execution_log": "[]",
            "cancel_requested": False,
        }
        if self.is_sqlite:
            now = datetime.now(UTC)
            row["run_at"] = now + timedelta(seconds=item.delay)
            row["created_at"] = now
        else:
            row["delay"] = timedelta(seconds=item.delay)
        return row

    def _enqueue_unique(self, conn: Connection, insert: Any, item: NewTask) -> int:
        """Insert, or return the id of the unfinished task that holds the same unique key."""
        row = self._task_row(item)
        if item.unique_key is None:
            return int(conn.execute(insert.returning(tasks.c.id), row).scalar_one())
        guarded = insert.on_conflict_do_nothing(
            index_elements=[tasks.c.unique_key],
            index_where=sa.and_(tasks.c.unique_key.is_not(None), _status_is(PENDING, RUNNING)),
        ).returning(tasks.c.id)
        holder = select(tasks.c.id).where(
            tasks.c.unique_key == item.unique_key, _status_is(PENDING, RUNNING)
        )
        while True:  # the holder may finish between our insert and our look-up
            new_id = conn.execute(guarded, row).scalar()
            if new_id is None:
                new_id = conn.execute(holder).scalar()
            if new_id is not None:
                return int(new_id)

    # -- the worker's side -----------------------------------------------------------

    def claim_tasks(self, worker_id: int, queues: Sequence[str], limit: int = 1) -> list[Claim]:
        """Claim up to limit runnable tasks: priority DESC, run_at, id; attempts + 1."""
        claims, _lost = self.finish_and_claim(worker_id, queues, limit=limit)
        return claims

    def finish_and_claim(
        self,
        worker_id: int,
        queues: Sequence[str],
        finished: Sequence[Finished] = (),
        *,
        release: Sequence[Claim] = (),
        limit: int = 1,
    ) -> tuple[list[Claim], list[int]]:
        """The worker's one round trip per batch, in one transaction: running -> completed for
        the finished tasks, running -> pending with the attempt given back for the released
        (never started) ones, then claim up to limit more (priority DESC, run_at, id).

        Every write is fenced on its claim; returns the new claims and the ids of the tasks
        whose claim was lost (their outcome is not written)."""
        now = self._clock_params()
        lost: list[int] = []
        with self._round_trip(one_statement=not (finished or release)) as conn:
            for with_progress in (False, True):
                group = [done for done in finished if (done.progress is not None) == with_progress]
                if group:
                    lost += self._complete_all(conn, group, with_progress, now)
            release_statement = self._statement("release", self._release_statement)
            released = []
            for claim in release:
                if conn.execute(release_statement, self._fence_params(claim)).rowcount != 1:
                    lost.append(claim.id)
                else:
                    released.append((claim.queue, claim.id))
            if released and not self.is_sqlite:  # idle workers take them at once
                self._notify(conn, wake.payloads(released))
            rows = []
            if limit > 0:
                named = tuple(queues)
                claim_statement = self._statement(("claim", named), self._claim_statement, named)
                params = {**now, "claimer": worker_id, "batch": limit}
                rows = list(conn.execute(claim_statement, params).all())
        if released and self.is_sqlite:
            wake.ring(self._wake_dir, wake.payloads(released))
        # RETURNING gives the rows in the update's order: put them back in claim order. Rows
        # are unpacked, not read by name (a microsecond per name).
        ordered = sorted(
            (
                (-priority, run_at, task_id),
                Claim(
                    id=task_id,
                    task_type=task_type,
                    payload=payload,
                    queue=queue,
                    priority=priority,
                    attempts=attempts,
                    max_attempts=max_attempts,
                    timeout=timeout,
                    worker_id=worker_id,
                ),
            )
            for (
                task_id,
                task_type,
                payload,
                queue,
                priority,
                attempts,
                max_attempts,
                timeout,
                run_at,
            ) in rows
        )
        claims = [claim for _order, claim in ordered]
        return claims, lost

    @contextmanager
    def _round_trip(self, *, one_statement: bool = False) -> Iterator[Connection]:
        """The worker's write transaction, on a connection it keeps: no pool checkout, no
        pre-ping. On SQLite the write lock is waited for in short steps (SQLITE_LOCK_STEP):
        the driver's busy handler sleeps 1, 2, 5, ... ms, far longer than a round trip
        holds the lock. Other threads take the pool's way (_write).

        one_statement: the caller runs one statement (a claim with nothing to complete). On
        PostgreSQL it then runs in autocommit, its own transaction: one round trip, where
        BEGIN and COMMIT would add two (0.2 ms of an idle pool's 3 ms pickup here)."""
        if self._kept_thread not in (None, threading.get_ident()):
            with self._write() as conn:
                yield conn
            return
        if self._kept is None:
            self._kept = self.engine.connect()
            self._kept_thread = threading.get_ident()  # for good: it stays this thread's
            self._kept.execution_options(taskherd_write=True)
            if self.is_sqlite:
                self._kept.exec_driver_sql("PRAGMA busy_timeout = 0")
                self._kept.commit()
        conn = self._kept
        autocommit = one_statement and not self.is_sqlite
        try:
            if autocommit:
                conn.execution_options(isolation_level="AUTOCOMMIT")
            with self._begin_kept(conn):  # commits, or rolls back on an error
                yield conn
            if autocommit:  # back to transactions, at the server's own isolation level
                conn.execution_options(isolation_level=self.engine.dialect.default_isolation_level)
        except BaseException as error:
            self._kept = None  # a new connection next time
            conn.invalidate()
            conn.close()
            if self.is_sqlite and "readonly database" in str(getattr(error, "orig", "")):
                raise BadDatabase(
                    f"{self.url.database} is read-only: taskherd must be able to write it"
                ) from error
            raise

    def _begin_kept(self, conn: Connection) -> sa.RootTransaction:
        """Begin the kept connection's write transaction (see _round_trip)."""
        if not self.is_sqlite:
            return conn.begin()
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        step = SQLITE_LOCK_STEP
        while True:
            try:
                return conn.begin()
            except sa.exc.OperationalError as error:
                if "locked" not in str(error.orig) or time.monotonic() > deadline:
                    raise
            conn.rollback()
            time.sleep(step)
            step = min(step * 2, SQLITE_LOCK_STEP_CAP)

    def _complete_all(
        self, conn: Connection, finished: list[Finished], with_progress: bool, now: dict[str, Any]
    ) -> list[int]:
        """running -> completed for the finished tasks, in one statement; the ids lost."""
        statement = self._statement(
            ("complete", with_progress), self._complete_statement, with_progress
        )
        rows = [self._done_row(done, with_progress) for done in finished]
        names = list(DONE)[: len(rows[0])]  # the progress columns only with progress
        params = {**now, **self._batch_params("done", names, rows)}
        if conn.execute(statement, params).rowcount == len(finished):
            return []
        # Some claims were lost (rare): the tasks that are not now completed under our fence.
        query = select(tasks.c.id, tasks.c.status, tasks.c.worker_id, tasks.c.attempts).where(
            tasks.c.id.in_([done.claim.id for done in finished])
        )
        claims = {done.claim.id: done.claim for done in finished}
        ours = set()
        for row in conn.execute(query):
            fence = (COMPLETED, claims[row.id].worker_id, claims[row.id].attempts)
            if (row.status, row.worker_id, row.attempts) == fence:
                ours.add(row.id)
        return [task_id for task_id in claims if task_id not in ours]

    @staticmethod
    def _done_row(done: Finished, with_progress: bool) -> list[Any]:
        """One finished task as a row of _complete_statement's `done` (DONE's order)."""
        claim = done.claim
        row: list[Any] = [claim.id, claim.worker_id, claim.attempts, done.result, done.duration]
        if with_progress:
            progress = done.progress or Progress()
            row += [progress.percentage, progress.step, progress.total_steps, progress.message]
        return row

    def release_unstarted(self, worker_id: int, task_ids: Sequence[int]) -> list[int]:
        """Give back, attempt uncounted, the tasks a gone worker had claimed but never
        started (its supervisor read them from its shared memory); return their ids."""
        if not task_ids:
            return []
        statement = (
            update(tasks)
            .where(
                tasks.c.id.in_(list(task_ids)),
                tasks.c.worker_id == worker_id,
                _status_is(RUNNING),
            )
            .values(status=PENDING, attempts=tasks.c.attempts - 1)
            .returning(tasks.c.id, tasks.c.queue)
        )
        with self._write() as conn:
            released = [(row.queue, row.id) for row in conn.execute(statement)]
            if released and not self.is_sqlite:
                self._notify(conn, wake.payloads(released))
        if released and self.is_sqlite:
            wake.ring(self._wake_dir, wake.payloads(released))
        return [task_id for _queue, task_id in released]

    # The hot path's statements are built once per Store and reused with bound parameters:
    # SQLAlchemy then finds each one's compiled form without rebuilding it or its cache key.
    # (No parameter may be named after a column: SQLAlchemy would add it to the SET clause.)

    def _statement(self, key: Any, build: Callable[..., Any], *args: Any) -> Any:
        statement = self._statements.get(key)
        if statement is None:
            statement = self._statements[key] = build(*args)
        return statement

    def _batch_rows(self, name: str, columns: Mapping[str, Any]) -> Any:
        """A batch of rows as a table `name` of one statement, whatever the batch's size a
        short one: PostgreSQL takes one array per column (unnest over parameters
        `<name>_<column>`), SQLite one JSON array of rows (json_each over parameter `<name>`).
        _batch_params gives the parameters."""
        if not self.is_sqlite:
            arrays = [
                sa.bindparam(f"{name}_{column}", type_=_dialect("postgresql").ARRAY(kind))
                for column, kind in columns.items()
            ]
            typed = [sa.column(column, kind) for column, kind in columns.items()]
            return func.unnest(*arrays).table_valued(*typed).render_derived(name=name)
        each = func.json_each(sa.bindparam(name, type_=Text)).table_valued("value", "key")
        picks = [
            sa.type_coerce(func.json_extract(each.c.value, f"$[{index}]"), kind).label(column)
            for index, (column, kind) in enumerate(columns.items())
        ]
        return select(*picks, each.c.key.label("position")).subquery(name)  # position: 0, 1, ...

    def _batch_params(
        self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> dict[str, Any]:
        """The parameters of _batch_rows(name, columns) for rows in the columns' order."""
        if self.is_sqlite:
            return {name: json.dumps(rows)}
        arrays = zip(columns, zip(*rows, strict=True), strict=True)
        return {f"{name}_{column}": list(values) for column, values in arrays}

    def _now_param(self) -> ColumnElement[datetime]:
        """Now by the database clock, as a parameter `at` on SQLite (the host's clock)."""
        if self.is_sqlite:
            return sa.bindparam("at", type_=UtcDateTime)
        return func.now()

    @staticmethod
    def _fence_params(claim: Claim) -> dict[str, Any]:
        return {
            "fence_id": claim.id,
            "fence_worker": claim.worker_id,
            "fence_attempt": claim.attempts,
        }

    @staticmethod
    def _param_fence() -> ColumnElement[bool]:
        """_fence with its values as the parameters _fence_params names."""
        return _fenced_on(
            sa.bindparam("fence_id", type_=Integer),
            sa.bindparam("fence_worker", type_=Integer),
            sa.bindparam("fence_attempt", type_=Integer),
        )

    def _claim_statement(self, queues: tuple[str, ...]) -> Any:
        now = self._now_param()
        candidates = select(tasks.c.id).where(_status_is(PENDING), tasks.c.run_at <= now)
        if queues:
            candidates = candidates.where(tasks.c.queue.in_(queues))
        candidates = candidates.order_by(tasks.c.priority.desc(), tasks.c.run_at, tasks.c.id).limit(
            sa.bindparam("batch", type_=Integer)
        )
        if self.is_sqlite:
            picked: ColumnElement[bool] = tasks.c.id.in_(candidates.scalar_subquery())
        else:
            # A materialized CTE: PostgreSQL may otherwise re-run a LIMIT subquery per row
            # and claim more than `limit` tasks.
            chosen = candidates.with_for_update(skip_locked=True).cte("chosen")
            picked = tasks.c.id == chosen.prefix_with("MATERIALIZED").c.id
        return (
            update(tasks)
            .where(picked, _status_is(PENDING))
            .values(
                status=RUNNING,
                worker_id=sa.bindparam("claimer", type_=Integer),
                attempts=tasks.c.attempts + 1,
                started_at=now,
                progress_percentage=None,
                current_step=None,
                total_steps=None,
                progress_message=None,
            )
            .returning(
                tasks.c.id,
                tasks.c.task_type,
                tasks.c.payload,
                tasks.c.queue,
                tasks.c.priority,
                tasks.c.attempts,
                tasks.c.max_attempts,
                tasks.c.timeout,
                # only to order the claims: as stored, unconverted (SQLite's text sorts as
                # the time does, as the claim's own comparison relies on)
                sa.type_coerce(tasks.c.run_at, Text).label("run_at"),
            )
        )

    def _complete_statement(self, with_progress: bool) -> Any:
        """running -> completed for a batch of finished tasks, each fenced on its own claim:
        an UPDATE ... FROM the batch as rows `done` (DONE), whatever the batch's size one
        short statement."""
        names = list(DONE)[: None if with_progress else -len(DONE_PROGRESS)]
        done = self._batch_rows("done", {name: DONE[name] for name in names})
        progress = {}
        if with_progress:
            pairs = zip(PROGRESS_COLUMNS, DONE_PROGRESS, strict=True)
            progress = {column: done.c[name] for column, name in pairs}
        return (
            update(tasks)
            .where(_fenced_on(done.c.id, done.c.worker, done.c.attempt))
            .values(
                status=COMPLETED,
                result=done.c.outcome,
                completed_at=self._now_param(),
                duration=done.c.took,
                **progress,
            )
        )

    def _release_statement(self) -> Any:
        return (
            update(tasks)
            .where(self._param_fence())
            .values(status=PENDING, attempts=tasks.c.attempts - 1)
        )

    def _progress_values(self, progress: Progress | None) -> dict[str, Any]:
        if progress is None:
            return {}
        return {
            "progress_percentage": progress.percentage,
            "current_step": progress.step,
            "total_steps": progress.total_steps,
            "progress_message": progress.message,
        }

    def complete_task(
        self, claim: Claim, result: str, duration: float, progress: Progress | None = None
    ) -> None:
        """running -> completed, with the JSON result; LostClaim if the claim is gone."""
        statement = (
            update(tasks)
            .where(self._fence(claim))
            .values(
                status=COMPLETED,
                result=result,
                completed_at=self._now(),
                duration=duration,
                **self._progress_values(progress),
            )
        )
        self._fenced(statement, claim)

    def fail_task(
        self,
        claim: Claim,
        error: str,
        *,
        retry_delay: float,
        permanent: bool = False,
        cancelled: bool = False,
        duration: float | None = None,
        progress: Progress | None = None,
    ) -> str:
        """running -> pending (attempts left), failed, or cancelled (asked for, or the handler
        raised Cancelled); return the new status."""
        retry = not (permanent or cancelled) and claim.attempts < claim.max_attempts
        outcome = CANCELLED if cancelled else PENDING if retry else FAILED
        status = case((tasks.c.cancel_requested, CANCELLED), else_=outcome)
        values: dict[str, Any] = {
            "status": status,
            "last_error": _history_limit(error),
            "error_history": self._json_append(tasks.c.error_history, self._history_entry(error)),
            "duration": duration,
            **self._progress_values(progress),
        }
        if retry:
            values["run_at"] = self._now(retry_delay)
            values["completed_at"] = case((tasks.c.cancel_requested, self._now()), else_=None)
        else:
            values["completed_at"] = self._now()
        statement = update(tasks).where(self._fence(claim)).values(**values)
        statement = statement.returning(tasks.c.status)
        with self._write() as conn:
            new_status = conn.execute(statement).scalar()
        if new_status is None:
            raise LostClaim(claim.id)
        return str(new_status)

    def record_progress(self, claim: Claim, progress: Progress) -> bool:
        """Write the task's progress; return whether cancellation was requested."""
        statement = (
            update(tasks)
            .where(self._fence(claim))
            .values(**self._progress_values(progress))
            .returning(tasks.c.cancel_requested)
        )
        with self._write() as conn:
            cancel = conn.execute(statement).scalar()
        if cancel is None:
            raise LostClaim(claim.id)
        return bool(cancel)

    def append_log(self, claim: Claim, entry: Mapping[str, Any]) -> None:
        """Append one entry to the task's execution_log."""
        text = sa.literal(json.dumps(entry), Text)
        value: ColumnElement[Any] = (
            func.json(text) if self.is_sqlite else sa.cast(text, _dialect("postgresql").JSONB)
        )
        statement = (
            update(tasks)
            .where(self._fence(claim))
            .values(execution_log=self._json_append(tasks.c.execution_log, value))
        )
        self._fenced(statement, claim)

    def _fenced(self, statement: sa.Update, claim: Claim) -> None:
        with self._write() as conn:
            if conn.execute(statement).rowcount != 1:
                raise LostClaim(claim.id)

    # -- the supervisor's side -------------------------------------------------------

    def register_supervisor(
        self,
        node: str,
        pid: int,
        pid_start_time: float,
        desired_workers: int,
        version: str,
        heartbeat_timeout: float | None = None,
    ) -> int:
        now = self._now()
        statement = (
            supervisors.insert()
            .values(
                hostname=node,
                pid=pid,
                pid_start_time=pid_start_time,
                started_at=now,
                last_heartbeat=now,
                desired_workers=desired_workers,
                status="running",
                version=version,
                heartbeat_timeout=heartbeat_timeout,
                crash_streak=0,
            )
            .returning(supervisors.c.id)
        )
        with self._write() as conn:
            return int(conn.execute(statement).scalar_one())

    def set_supervisor_status(self, supervisor_id: int, status: str) -> None:
        values: dict[str, Any] = {"status": status, "last_heartbeat": self._now()}
        if status in ("stopped", "dead"):
            values["stopped_at"] = self._now()
        with self._write() as conn:
            conn.execute(
                update(supervisors).where(supervisors.c.id == supervisor_id).values(**values)
            )

    def register_worker(self, supervisor_id: int, node: str, queues: Sequence[str]) -> int:
        """A row for a worker about to be started; its pid follows with set_worker_pid."""
        now = self._now()
        statement = (
            task_workers.insert()
            .values(
                hostname=node,
                supervisor_id=supervisor_id,
                is_active=True,
                last_heartbeat=now,
                started_at=now,
                processed_tasks_count=0,
                failed_tasks_count=0,
                queues=",".join(queues) or "*",
            )
            .returning(task_workers.c.id)
        )
        with self._write() as conn:
            return int(conn.execute(statement).scalar_one())

    def set_worker_pid(self, worker_id: int, pid: int, pid_start_time: float | None) -> bool:
        """Record the process of a registered worker; True once written."""
        with self._write() as conn:
            conn.execute(
                update(task_workers)
                .where(task_workers.c.id == worker_id)
                .values(worker_pid=pid, pid_start_time=pid_start_time)
            )
        return True

    def record_heartbeats(
        self,
        supervisor_id: int,
        workers: Mapping[int, WorkerStats],
        crash_streak: int = 0,
        crash_reason: str | None = None,
        desired_workers: int | None = None,
    ) -> set[int]:
        """Stamp the supervisor (with its crash streak) and all its live workers: one statement
        per table.

        Returns the workers another node has declared lost meanwhile (their rows are no
        longer active): their tasks were rescued, and they must not go on. A supervisor
        declared dead is running again.
        """
        clock = self._clock_params()
        params = {
            **clock,
            "stamped_id": supervisor_id,
            "streak": crash_streak,
            "reason": crash_reason,
            "desired": desired_workers,
        }
        rows = [
            [worker_id, stats.current_task_id, stats.processed, stats.failed, stats.rss_mb]
            for worker_id, stats in workers.items()
        ]
        with self._write() as conn:
            conn.execute(
                self._statement("beat-supervisor", self._supervisor_beat_statement), params
            )
            if not rows:
                return set()
            beat = self._statement("beat-workers", self._worker_beat_statement)
            params = {**clock, **self._batch_params("beat", list(BEAT), rows)}
            stamped = conn.execute(beat, params).scalars()
            return set(workers) - set(stamped)

    def _clock_params(self) -> dict[str, Any]:
        """The parameter `at` of the statements that use _now_param (SQLite only)."""
        return {"at": datetime.now(UTC)} if self.is_sqlite else {}

    def _supervisor_beat_statement(self) -> Any:
        return (
            update(supervisors)
            .where(supervisors.c.id == sa.bindparam("stamped_id", type_=Integer))
            .values(
                last_heartbeat=self._now_param(),
                status=case(
                    (supervisors.c.status == "dead", "running"), else_=supervisors.c.status
                ),
                stopped_at=None,
                crash_streak=sa.bindparam("streak", type_=Integer),
                crash_reason=sa.bindparam("reason", type_=Text),
                desired_workers=func.coalesce(
                    sa.bindparam("desired", type_=Integer), supervisors.c.desired_workers
                ),
            )
        )

    def _worker_beat_statement(self) -> Any:
        """The heartbeats of all the supervisor's workers (BEAT), in one statement that
        returns the rows it stamped: a row another node declared lost (no longer active) is
        left alone, and missing from them."""
        beat = self._batch_rows("beat", BEAT)
        return (
            update(task_workers)
            .where(task_workers.c.id == beat.c.id, task_workers.c.is_active)
            .values(
                last_heartbeat=self._now_param(),
                current_task_id=beat.c.task,
                processed_tasks_count=beat.c.processed,
                failed_tasks_count=beat.c.failed,
                rss_mb=beat.c.rss,
            )
            .returning(task_workers.c.id)
        )

    def cancel_requests(self, worker_ids: Sequence[int]) -> dict[int, int]:
        """task id -> worker id, for running tasks of these workers whose cancel was requested."""
        if not worker_ids:
            return {}
        query = select(tasks.c.id, tasks.c.worker_id).where(
            _status_is(RUNNING),
            tasks.c.worker_id.in_(list(worker_ids)),
            tasks.c.cancel_requested,
        )
        with self._read() as conn:
            return {row.id: row.worker_id for row in conn.execute(query)}

    def retire_worker(
        self,
        worker_id: int,
        *,
        exit_code: int | None,
        exit_reason: str,
        stats: WorkerStats | None = None,
        error: str | None = None,
        release: bool = False,
    ) -> list[Rescued]:
        """Mark a worker gone and, in the same transaction, rescue the tasks it held.

        release: the worker was stopped by us, not by its task; the attempt is not counted.
        """
        values: dict[str, Any] = {
            "is_active": False,
            "stopped_at": self._now(),
            "exit_code": exit_code,
            "exit_reason": exit_reason,
            "current_task_id": None,
        }
        if stats is not None:
            values["processed_tasks_count"] = stats.processed
            values["failed_tasks_count"] = stats.failed
        with self._write() as conn:
            conn.execute(
                update(task_workers).where(task_workers.c.id == worker_id).values(**values)
            )
            return self._rescue(
                conn,
                tasks.c.worker_id == worker_id,
                error or f"worker {worker_id} {exit_reason}",
                release=release,
            )

    def rescue_stale_tasks(self, heartbeat_timeout: float) -> tuple[list[Rescued], list[int]]:
        """Rescue the tasks of workers silent for heartbeat_timeout (database clock), any node.

        Returns the rescued tasks and the ids of the workers declared lost; nothing while
        another node's maintenance holds the lock (it is doing the same).
        """
        anything = self._statement("anything-stale", self._anything_stale_statement)
        params = self._stale_cutoff_params(heartbeat_timeout)
        with self._read() as conn:  # the usual answer, read without taking a write lock
            if not conn.execute(anything, params).scalar():
                return [], []
        stale_worker, stale_supervisor = _stale(self._stale_cutoff())
        error = f"worker lost: no heartbeat for more than {heartbeat_timeout:g} s"
        with self._write() as conn:
            if not self._maintenance_lock(conn):
                return [], []
            lost = list(
                conn.execute(
                    update(task_workers)
                    .where(stale_worker)
                    .values(
                        is_active=False,
                        stopped_at=self._now(),
                        exit_reason=f"heartbeat lost (silent for over {heartbeat_timeout:g} s)",
                    )
                    .returning(task_workers.c.id),
                    params,
                ).scalars()
            )
            conn.execute(
                update(supervisors)
                .where(stale_supervisor)
                .values(status="dead", stopped_at=self._now()),
                params,
            )
            rescued = self._rescue(conn, ~_holder_alive(), error)
        return rescued, lost

    def _stale_cutoff(self) -> ColumnElement[datetime]:
        """The moment before which a heartbeat is stale: the parameter `cutoff` on SQLite (the
        host's clock), now() minus the parameter `age` on PostgreSQL (the database's)."""
        if self.is_sqlite:
            return sa.bindparam("cutoff", type_=UtcDateTime)
        return func.now() - sa.bindparam("age", type_=sa.Interval)

    def _stale_cutoff_params(self, heartbeat_timeout: float) -> dict[str, Any]:
        """The parameter of _stale_cutoff for this heartbeat timeout."""
        age = timedelta(seconds=heartbeat_timeout)
        return {"cutoff": datetime.now(UTC) - age} if self.is_sqlite else {"age": age}

    def _anything_stale_statement(self) -> Any:
        """Whether rescue_stale_tasks has anything to do: a worker or supervisor silent since
        the cutoff, or a running task whose worker is no longer active."""
        stale_worker, stale_supervisor = _stale(self._stale_cutoff())
        return select(
            sa.or_(
                select(task_workers.c.id).where(stale_worker).exists(),
                select(supervisors.c.id).where(stale_supervisor).exists(),
                select(tasks.c.id).where(_status_is(RUNNING), ~_holder_alive()).exists(),
            )
        )

    def _rescue(
        self, conn: Connection, which: ColumnElement[bool], error: str, *, release: bool = False
    ) -> list[Rescued]:
        """The one retry-or-fail decision for tasks whose worker is gone: now, not after backoff.

        A rescue counts the attempt; a release (we stopped the worker) gives it back.
        """
        used_up = sa.false() if release else tasks.c.attempts >= tasks.c.max_attempts
        status = case((tasks.c.cancel_requested, CANCELLED), (used_up, FAILED), else_=PENDING)
        finished = sa.or_(tasks.c.cancel_requested, used_up)
        extra = {"attempts": tasks.c.attempts - 1} if release else {}
        statement = (
            update(tasks)
            .where(_status_is(RUNNING), which)
            .values(
                **extra,
                status=status,
                run_at=self._now(),
                completed_at=case((finished, self._now()), else_=None),
                last_error=_history_limit(error),
                error_history=self._json_append(tasks.c.error_history, self._history_entry(error)),
            )
            .returning(tasks.c.id, tasks.c.status, tasks.c.attempts, tasks.c.worker_id)
        )
        return [Rescued(r.id, r.status, r.attempts, r.worker_id) for r in conn.execute(statement)]

    def live_processes_on_node(self, node: str) -> tuple[list[ProcessRow], list[ProcessRow]]:
        """Supervisors and workers on this node that the table still believes alive."""
        with self._read() as conn:
            sups = conn.execute(
                select(supervisors.c.id, supervisors.c.pid, supervisors.c.pid_start_time).where(
                    supervisors.c.hostname == node,
                    supervisors.c.status.in_(("running", "stopping")),
                )
            ).all()
            wks = conn.execute(
                select(
                    task_workers.c.id,
                    task_workers.c.worker_pid,
                    task_workers.c.pid_start_time,
                    task_workers.c.supervisor_id,
                ).where(task_workers.c.hostname == node, task_workers.c.is_active)
            ).all()
        return (
            [ProcessRow(r.id, r.pid, r.pid_start_time) for r in sups],
            [ProcessRow(r.id, r.worker_pid, r.pid_start_time, r.supervisor_id) for r in wks],
        )

    # -- operators -------------------------------------------------------------------

    def get_task(self, task_id: int) -> dict[str, Any]:
        with self._read() as conn:
            row = conn.execute(select(tasks).where(tasks.c.id == task_id)).mappings().first()
        if row is None:
            raise UnknownTask(f"no task with id {task_id}")
        return dict(row)

    def list_tasks(
        self, *, status: str | None = None, queue: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        columns = [
            tasks.c.id,
            tasks.c.queue,
            tasks.c.task_type,
            tasks.c.status,
            tasks.c.priority,
            tasks.c.attempts,
            tasks.c.max_attempts,
            tasks.c.run_at,
            tasks.c.created_at,
            tasks.c.started_at,
            tasks.c.completed_at,
            tasks.c.duration,
            tasks.c.worker_id,
            tasks.c.progress_percentage,
            tasks.c.last_error,
        ]
        query = select(*columns).order_by(tasks.c.id.desc()).limit(limit)
        if status is not None:
            query = query.where(_status_is(status))
        if queue is not None:
            query = query.where(tasks.c.queue == queue)
        with self._read() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def retry_task(self, task_id: int) -> None:
        """failed or cancelled -> pending, runnable now, with one more attempt allowed."""
        statement = (
            update(tasks)
            .where(tasks.c.id == task_id, _status_is(FAILED, CANCELLED))
            .values(
                status=PENDING,
                run_at=self._now(),
                completed_at=None,
                cancel_requested=False,
                max_attempts=sa.func.max(tasks.c.max_attempts, tasks.c.attempts + 1)
                if self.is_sqlite
                else func.greatest(tasks.c.max_attempts, tasks.c.attempts + 1),
            )
        )
        self._operator_update(statement, task_id, "retried", (FAILED, CANCELLED))

    def cancel_task(self, task_id: int) -> str:
        """pending -> cancelled at once; running -> cancel requested. Returns what happened."""
        with self._write() as conn:
            done = conn.execute(
                update(tasks)
                .where(tasks.c.id == task_id, _status_is(PENDING))
                .values(status=CANCELLED, completed_at=self._now(), cancel_requested=True)
            ).rowcount
            if done:
                return CANCELLED
            requested = conn.execute(
                update(tasks)
                .where(tasks.c.id == task_id, _status_is(RUNNING))
                .values(cancel_requested=True)
            ).rowcount
            if requested:
                return "cancel_requested"
            status = conn.execute(select(tasks.c.status).where(tasks.c.id == task_id)).scalar()
        if status is None:
            raise UnknownTask(f"no task with id {task_id}")
        raise WrongState(
            f"task {task_id} is {status}: only pending or running tasks can be cancelled"
        )

    def _operator_update(
        self, statement: sa.Update, task_id: int, verb: str, allowed: Sequence[str]
    ) -> None:
        with self._write() as conn:
            if conn.execute(statement).rowcount == 1:
                return
            status = conn.execute(select(tasks.c.status).where(tasks.c.id == task_id)).scalar()
        if status is None:
            raise UnknownTask(f"no task with id {task_id}")
        raise WrongState(
            f"task {task_id} is {status}: only {' or '.join(allowed)} tasks can be {verb}"
        )

    def purge(self, older_than: float, statuses: Sequence[str]) -> dict[str, int]:
        """Delete finished tasks and stopped process rows older than older_than seconds."""
        cutoff = self._now(-older_than)
        with self._write() as conn:
            removed_tasks = conn.execute(
                tasks.delete().where(_status_is(*statuses), tasks.c.completed_at < cutoff)
            ).rowcount
            removed_workers = conn.execute(
                task_workers.delete().where(
                    ~task_workers.c.is_active, task_workers.c.stopped_at < cutoff
                )
            ).rowcount
            removed_supervisors = conn.execute(
                supervisors.delete().where(
                    supervisors.c.status.in_(("stopped", "dead")), supervisors.c.stopped_at < cutoff
                )
            ).rowcount
        return {
            "tasks": removed_tasks,
            "workers": removed_workers,
            "supervisors": removed_supervisors,
        }

    def activity(self, failures: int = 5) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The running tasks with their progress, and the latest failed tasks (newest first)."""
        with self._read() as conn:
            running = conn.execute(
                select(
                    tasks.c.id,
                    tasks.c.task_type,
                    tasks.c.worker_id,
                    tasks.c.started_at,
                    tasks.c.progress_percentage,
                    tasks.c.current_step,
                    tasks.c.progress_message,
                ).where(_status_is(RUNNING))
            ).mappings()
            failed = conn.execute(
                select(tasks.c.id, tasks.c.task_type, tasks.c.completed_at, tasks.c.last_error)
                .where(_status_is(FAILED))
                .order_by(tasks.c.completed_at.desc())
                .limit(failures)
            ).mappings()
            return [dict(row) for row in running], [dict(row) for row in failed]

    def health(self, failure_window: float) -> HealthFacts:
        """What `taskherd health` judges: the health views, plus the tasks that finished within
        the last failure_window seconds and the running tasks past their timeout."""
        with self._read() as conn:
            now = self._clock(conn)
            sups = conn.execute(sa.text("SELECT * FROM supervisor_health ORDER BY supervisor_id"))
            wks = conn.execute(sa.text("SELECT * FROM worker_health ORDER BY worker_id"))
            queues = conn.execute(sa.text("SELECT * FROM queue_health ORDER BY queue"))
            facts = HealthFacts(
                now=now,
                supervisors=[dict(row) for row in sups.mappings()],
                workers=[dict(row) for row in wks.mappings()],
                queues=[dict(row) for row in queues.mappings()],
            )
            since = self._now(-failure_window)
            finished = conn.execute(
                select(tasks.c.status, func.count())
                .where(_status_is(COMPLETED, FAILED), tasks.c.completed_at > since)
                .group_by(tasks.c.status)
            ).all()
            overdue = conn.execute(
                select(tasks.c.id, tasks.c.worker_id, tasks.c.started_at, tasks.c.timeout).where(
                    _status_is(RUNNING), tasks.c.timeout.is_not(None)
                )
            ).all()
        counts = {status: count for status, count in finished}
        facts.completed_recently = counts.get(COMPLETED, 0)
        facts.failed_recently = counts.get(FAILED, 0)
        facts.overdue = [
            (row.id, row.worker_id, (now - row.started_at).total_seconds(), row.timeout)
            for row in overdue
            if row.started_at is not None and (now - row.started_at).total_seconds() > row.timeout
        ]
        return facts

    def ensure_schema(self) -> int:
        """init_schema(), unless the schema is already this version (what a supervisor's boot
        calls). So a node starting beside busy ones takes no DDL locks: even CREATE INDEX IF
        NOT EXISTS on an existing index takes a SHARE lock on its table, which waits for the
        other nodes' writes, stalls the ones behind it, and can deadlock with them."""
        with self._read() as conn:
            found = self._version(conn)
        return SCHEMA_VERSION if found == SCHEMA_VERSION else self.init_schema()

    def _maintenance_lock(self, conn: Connection) -> bool:
        """Take the maintenance lock for this transaction; False if another node holds it.

        SQLite: always True; its write lock already lets one writer in at a time, and one
        file has one host.
        """
        if self.is_sqlite:
            return True
        return bool(conn.execute(MAINTENANCE_LOCK).scalar_one())

    def purge_finished(self, older_than: float, batch: int = PURGE_BATCH) -> dict[str, int] | None:
        """The periodic purge (`run --purge-after`): what `purge` deletes with the default
        statuses, at most `batch` rows per table, under the maintenance lock.

        Returns the rows deleted per table, or None if another node's maintenance holds the
        lock.
        """
        cutoff = self._now(-older_than)
        targets = (
            ("tasks", tasks, sa.and_(_status_is(*FINISHED), tasks.c.completed_at < cutoff)),
            (
                "workers",
                task_workers,
                sa.and_(~task_workers.c.is_active, task_workers.c.stopped_at < cutoff),
            ),
            (
                "supervisors",
                supervisors,
                sa.and_(
                    supervisors.c.status.in_(("stopped", "dead")), supervisors.c.stopped_at < cutoff
                ),
            ),
        )
        removed: dict[str, int] = {}
        with self._write() as conn:
            if not self._maintenance_lock(conn):
                return None
            for name, table, old in targets:
                oldest = select(table.c.id).where(old).limit(batch).scalar_subquery()
                removed[name] = conn.execute(table.delete().where(table.c.id.in_(oldest))).rowcount
        return removed

    def snapshot(self) -> dict[str, Any]:
        """What `taskherd status` shows: live supervisors, their workers, queue depths."""
        with self._read() as conn:
            now = self._clock(conn)
            sups = (
                conn.execute(
                    select(supervisors)
                    .where(supervisors.c.status.in_(("running", "stopping")))
                    .order_by(supervisors.c.id)
                )
                .mappings()
                .all()
            )
            wks = (
                conn.execute(
                    select(task_workers).where(task_workers.c.is_active).order_by(task_workers.c.id)
                )
                .mappings()
                .all()
            )
            depth = conn.execute(
                select(tasks.c.queue, tasks.c.status, func.count())
                .where(_status_is(PENDING, RUNNING))
                .group_by(tasks.c.queue, tasks.c.status)
            ).all()
            finished = conn.execute(
                select(tasks.c.status, func.count())
                .where(_status_is(*FINISHED))
                .group_by(tasks.c.status)
            ).all()
        queues: dict[str, dict[str, int]] = {}
        for queue, status, count in depth:
            queues.setdefault(queue, {PENDING: 0, RUNNING: 0})[status] = count
        return {
            "now": now,
            "supervisors": [dict(row) for row in sups],
            "workers": [dict(row) for row in wks],
            "queues": queues,
            "totals": {status: count for status, count in finished},
        }

    def runnable_tasks(self, queues: Sequence[str], limit: int) -> int:
        """How many tasks in these queues (all when empty) are runnable now, up to limit."""
        named = tuple(queues)
        counted = self._statement(("runnable", named), self._runnable_statement, named)
        with self._read() as conn:
            return int(conn.execute(counted, {**self._clock_params(), "most": limit}).scalar_one())

    def _runnable_statement(self, queues: tuple[str, ...]) -> Any:
        runnable = select(tasks.c.id).where(
            _status_is(PENDING), tasks.c.run_at <= self._now_param()
        )
        if queues:
            runnable = runnable.where(tasks.c.queue.in_(queues))
        limited = runnable.limit(sa.bindparam("most", type_=Integer)).subquery()
        return select(func.count()).select_from(limited)

    def task_counts(self, queues: Sequence[str] = ()) -> tuple[int, int]:
        """(running, pending) tasks in these queues (all when empty): the systemd STATUS line."""

        def count(status: str) -> Any:
            where = [_status_is(status)]
            if queues:
                where.append(tasks.c.queue.in_(queues))
            return select(func.count()).select_from(tasks).where(*where).scalar_subquery()

        with self._read() as conn:
            running, pending = conn.execute(select(count(RUNNING), count(PENDING))).one()
        return int(running), int(pending)
