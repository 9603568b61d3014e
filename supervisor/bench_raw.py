"""The raw limit for `taskherd bench`: bare processes claiming rows of a scratch table.

Each process loops, with nothing of taskherd in the way (the database driver only): claim
ten pending rows in one statement, then mark them completed in one statement, until none
are left. The durability is taskherd's own: on SQLite, WAL, `synchronous` and the busy
timeout of workers.store, each statement in its own `BEGIN IMMEDIATE` transaction; on
PostgreSQL, autocommit (every commit as durable as the server makes it) and
`FOR UPDATE SKIP LOCKED`.

The bench starts `python -m supervisor.bench_raw` once per worker and talks to it on its
pipes: the settings as one JSON line on stdin (never the command line: the URL may hold a
password), `ready` back once connected, then a `go` line, and at the end one JSON line:
`{"rows": n, "started": t0, "finished": t1}` in time.monotonic(), one clock for every
process on the host.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from typing import Any

import sqlalchemy as sa

from workers.store import (
    SQLITE_BUSY_TIMEOUT_MS,
    SQLITE_CHECKPOINT_PAGES,
    SQLITE_SYNCHRONOUS,
    SQLITE_SYNCHRONOUS_LEVELS,
)

RAW_TABLE = "taskherd_bench_raw"
CLAIM_BATCH = 10

SQLITE_CLAIM = (
    f"UPDATE {RAW_TABLE} SET status = 'running', worker = ? WHERE id IN "
    f"(SELECT id FROM {RAW_TABLE} WHERE status = 'pending' ORDER BY id LIMIT {CLAIM_BATCH}) "
    "RETURNING id"
)
POSTGRES_CLAIM = (
    f"UPDATE {RAW_TABLE} SET status = 'running', worker = %s WHERE id IN "
    f"(SELECT id FROM {RAW_TABLE} WHERE status = 'pending' ORDER BY id LIMIT {CLAIM_BATCH} "
    "FOR UPDATE SKIP LOCKED) RETURNING id"
)
POSTGRES_COMPLETE = f"UPDATE {RAW_TABLE} SET status = 'completed' WHERE id = ANY(%s)"


def connect(url: sa.URL) -> Any:
    """A bare DB-API connection in autocommit mode, with taskherd's durability settings
    (on SQLite, the URL's `?synchronous=` as workers.store reads it)."""
    synchronous = str(url.query.get("synchronous", SQLITE_SYNCHRONOUS)).upper()
    url = url.difference_update_query(["synchronous"])
    if url.get_backend_name() == "sqlite":
        if synchronous not in SQLITE_SYNCHRONOUS_LEVELS:
            raise ValueError(f"unknown SQLite synchronous level {synchronous!r}")
        conn = sqlite3.connect(str(url.database), isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_CHECKPOINT_PAGES}")
        return conn
    import psycopg

    params: dict[str, Any] = url.translate_connect_args(username="user", database="dbname")
    params.update(url.query)
    return psycopg.connect(**params, autocommit=True)


def create_table(url: sa.URL, rows: int) -> None:
    """The scratch table, holding `rows` pending rows and an index like taskherd's claim index."""
    conn = connect(url)
    try:
        if url.get_backend_name() == "sqlite":
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                f"CREATE TABLE {RAW_TABLE} (id INTEGER PRIMARY KEY, status TEXT NOT NULL, "
                "worker INTEGER)"
            )
            conn.execute(
                f"CREATE INDEX {RAW_TABLE}_pending ON {RAW_TABLE} (id) WHERE status = 'pending'"
            )
            conn.executemany(
                f"INSERT INTO {RAW_TABLE} (id, status) VALUES (?, 'pending')",
                ((n,) for n in range(1, rows + 1)),
            )
            conn.execute("COMMIT")
        else:
            conn.execute(
                f"CREATE TABLE {RAW_TABLE} (id BIGINT PRIMARY KEY, status TEXT NOT NULL, "
                "worker INTEGER)"
            )
            conn.execute(
                f"CREATE INDEX {RAW_TABLE}_pending ON {RAW_TABLE} (id) WHERE status = 'pending'"
            )
            conn.execute(
                f"INSERT INTO {RAW_TABLE} (id, status) "
                "SELECT n, 'pending' FROM generate_series(1, %s) AS n",
                (rows,),
            )
            conn.execute(f"ANALYZE {RAW_TABLE}")
    finally:
        conn.close()


def drain(conn: Any, sqlite: bool, worker: int) -> tuple[int, float]:
    """Claim ten, complete ten, until nothing is left; return the rows this process did and
    when its last completion was committed."""
    done, finished = 0, time.monotonic()
    while True:
        if sqlite:
            conn.execute("BEGIN IMMEDIATE")
            ids = [row[0] for row in conn.execute(SQLITE_CLAIM, (worker,)).fetchall()]
            conn.execute("COMMIT")
            if not ids:
                return done, finished
            marks = ",".join("?" * len(ids))
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"UPDATE {RAW_TABLE} SET status = 'completed' WHERE id IN ({marks})", ids)
            conn.execute("COMMIT")
        else:
            ids = [row[0] for row in conn.execute(POSTGRES_CLAIM, (worker,)).fetchall()]
            if not ids:
                return done, finished
            conn.execute(POSTGRES_COMPLETE, (ids,))
        done += len(ids)
        finished = time.monotonic()


def main() -> None:
    """One bare claimer: settings on stdin, `ready`, wait for `go`, drain, report."""
    settings = json.loads(sys.stdin.readline())
    url = sa.make_url(settings["url"])
    conn = connect(url)
    sqlite = url.get_backend_name() == "sqlite"
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    started = time.monotonic()
    rows, finished = drain(conn, sqlite, int(settings["worker"]))
    conn.close()
    print(json.dumps({"rows": rows, "started": started, "finished": finished}), flush=True)


if __name__ == "__main__":
    main()
