"""`taskherd bench` as a user runs it: real pools on a scratch database that it removes.

Tiny numbers keep each run short; the figures are not judged here, only that every one is
measured, the scratch database is gone afterwards and the user's database is untouched,
with or without --history.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy as sa

import supervisor.bench
from supervisor.bench import (
    HISTORY,
    NOOP,
    Bench,
    BenchError,
    BenchSettings,
    Progress,
    Scratch,
    print_table,
)
from supervisor.cli import main
from tests.helpers import wait_until
from workers import __version__
from workers.store import COMPLETED, FAILED, NewTask, Store, tasks
from workers.taskqueue import TaskQueue

pytestmark = pytest.mark.slow

TINY = ["--tasks", "200", "-w", "2", "--idle-seconds", "3", "--pickup-tasks", "5"]
TINY += ["--rescues", "1"]
BENCH_TIMEOUT = 80  # seconds; well under pytest's own timeout
FIGURES = {
    "drain_tasks_per_s",
    "enqueue_tasks_per_s",
    "enqueue_batch_tasks_per_s",
    "pickup_latency_ms",
    "rescue_s",
    "idle",
    "rss_mb",
    "raw_limit_tasks_per_s",
    "efficiency",
}
NESTED = {
    "pickup_latency_ms": {"p50", "p95"},
    "idle": {"cpu_s_per_min", "statements_per_s"},
    "rss_mb": {"supervisor", "worker"},
}


def bench(database_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run the bench; one that hangs is interrupted (so it cleans up) before pytest's timeout."""
    argv = [sys.executable, "-m", "supervisor", "--db", database_url, "bench", *TINY, *extra]
    process = subprocess.Popen(
        argv, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = process.communicate(timeout=BENCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        pytest.fail(f"the bench took over {BENCH_TIMEOUT} s: {err}")
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("TASKHERD_")}


def user_rows(database_url: str) -> dict[str, list[Any]]:
    """Every row of every table in the user's database (its own schema only)."""
    store = Store(database_url)
    try:
        with store.engine.connect() as conn:
            names = sorted(sa.inspect(conn).get_table_names())
            return {
                name: sorted(map(tuple, conn.exec_driver_sql(f'SELECT * FROM "{name}"')), key=repr)
                for name in names
            }
    finally:
        store.dispose()


def scratch_databases(database_url: str) -> set[str]:
    engine = sa.create_engine(sa.make_url(database_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            query = sa.text("SELECT datname FROM pg_database WHERE datname LIKE :pattern")
            return set(conn.execute(query, {"pattern": "taskherd_bench_%"}).scalars())
    finally:
        engine.dispose()


def own_files(directory: Path) -> list[str]:
    """The directory's files, but for SQLite's -wal and -shm companions, which come and go
    as the last connection to the user's file closes."""
    return sorted(name for name in os.listdir(directory) if not name.endswith(("-wal", "-shm")))


def test_bench_measures_every_figure_and_leaves_no_trace(database_url: str, tmp_path: Path) -> None:
    """One run (each costs some 10 s) with a little history: the figures come out beside it,
    and neither the history nor anything else the bench wrote is left behind."""
    history = ["--history", "5000"]
    TaskQueue(database_url).enqueue("user.task", {"keep": "me"})
    before = user_rows(database_url)
    sqlite = database_url.startswith("sqlite")
    scratch_before = set() if sqlite else scratch_databases(database_url)
    files_before = own_files(tmp_path)

    done = bench(database_url, "--json", *history)

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == FIGURES | {"engine", "workers", "tasks", "version"}
    assert result["engine"] == ("sqlite" if sqlite else "postgresql")
    assert (result["workers"], result["tasks"], result["version"]) == (2, 200, __version__)
    for key in FIGURES:
        values = result[key]
        if key in NESTED:
            assert set(values) == NESTED[key], key
            values = list(values.values())
        for value in values if isinstance(values, list) else [values]:
            assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
            assert value > 0, (key, value)
    assert result["efficiency"] == pytest.approx(
        result["drain_tasks_per_s"] / result["raw_limit_tasks_per_s"], abs=1e-3
    )
    assert user_rows(database_url) == before
    if sqlite:  # the scratch directory sat beside the user's file, and is gone
        assert own_files(tmp_path) == files_before
    else:
        assert scratch_databases(database_url) == scratch_before


def test_without_json_the_figures_are_a_table() -> None:
    result = {
        "engine": "sqlite", "workers": 2, "tasks": 20000, "drain_tasks_per_s": 9876.5,
        "enqueue_tasks_per_s": 2100.0, "enqueue_batch_tasks_per_s": 45000.0,
        "pickup_latency_ms": {"p50": 2.5, "p95": 4.25}, "rescue_s": 0.2, "idle":
        {"cpu_s_per_min": 0.3, "statements_per_s": 6.5}, "rss_mb": {"supervisor": 40.0,
        "worker": 38.5}, "raw_limit_tasks_per_s": 24000.0, "efficiency": 0.4115,
        "version": __version__,
    }  # fmt: skip
    out = io.StringIO()

    print_table(result, out)

    lines = out.getvalue().splitlines()
    assert lines[0] == f"taskherd {__version__} bench: sqlite, 2 workers, 20000 no-op tasks"
    table = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines[1:])
    assert table["drain"] == "9,876 tasks/s"
    assert table["raw limit"].startswith("24,000 tasks/s")
    assert table["efficiency"].startswith("0.41")
    assert table["pickup latency"] == "p50 2.5 ms, p95 4.2 ms"
    assert table["memory (RSS)"] == "supervisor 40.0 MB, worker 38.5 MB"
    assert "history" not in table
    with_history = io.StringIO()
    print_table(result, with_history, history=1_000_000)
    assert with_history.getvalue().splitlines()[:-1] == lines
    assert re.split(r"\s{2,}", with_history.getvalue().splitlines()[-1].strip()) == [
        "history",
        "1,000,000 finished rows in the table (--history)",
    ]


def test_history_is_finished_rows_of_another_type_beside_the_drain(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor.bench, "HISTORY_CHUNK", 400)  # three statements, one short
    settings = BenchSettings(database_url, workers=1, history=1000)
    store = Store(database_url)
    measuring = Bench(
        Scratch(sa.make_url(database_url), tmp_path), settings, 10, Progress(io.StringIO())
    )
    measuring.store = store
    try:
        queue = TaskQueue(database_url, store=store)
        measuring.measure_enqueue_batch(queue)  # the drain's 10 tasks, before the history

        measuring.fill_history()

        assert measuring.history_ids is not None
        first, last = measuring.history_ids
        assert first > measuring.drain_ids[1]
        now = store.now()
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(tasks).where(tasks.c.task_type == HISTORY)).all()
            drain = conn.execute(sa.select(tasks.c.id).where(tasks.c.task_type == NOOP)).all()
        assert len(rows) == 1000 and len(drain) == 10
        assert sorted(row.id for row in rows) == list(range(first, last + 1))
        statuses = [row.status for row in rows]
        assert statuses.count("completed") > statuses.count("failed") > 0
        assert statuses.count("cancelled") > 0
        for row in sorted(rows, key=lambda row: row.id):
            assert row.created_at <= row.run_at <= row.completed_at < now, row
            if row.status == "cancelled":
                assert (row.started_at, row.attempts, row.cancel_requested) == (None, 0, True)
            else:
                assert row.run_at <= row.started_at <= row.completed_at, row
                assert row.duration > 0 and row.attempts >= 1, row
        completions = [row.completed_at for row in sorted(rows, key=lambda row: row.id)]
        assert completions == sorted(completions)  # oldest first, as ids grow
        assert now - completions[0] > (now - completions[-1]) * 1000  # spread over days

        measuring.check_tasks()  # the history's failures are not the bench's

        failed = queue.enqueue(NOOP)  # a later phase's task, after the history
        with store.engine.begin() as conn:
            conn.execute(tasks.update().where(tasks.c.id == failed).values(status=FAILED))
        with pytest.raises(BenchError, match=f"task {failed} failed"):
            measuring.check_tasks()
        with store.engine.begin() as conn:
            conn.execute(tasks.update().where(tasks.c.id == failed).values(status=COMPLETED))
            drained = conn.execute(sa.select(sa.func.min(tasks.c.id))).scalar_one()
            conn.execute(tasks.update().where(tasks.c.id == drained).values(status=FAILED))
        with pytest.raises(BenchError, match=f"task {drained} failed"):
            measuring.check_tasks()
    finally:
        store.dispose()


def _settle(database_url: str, tmp_path: Path, progress: io.StringIO) -> None:
    """Bench.analyze(), the step between --history's bulk insert and the drain."""
    store = Store(database_url)
    scratch = Scratch(sa.make_url(database_url), tmp_path)
    measuring = Bench(scratch, BenchSettings(database_url, workers=1), 10, Progress(progress))
    measuring.store = store
    try:
        measuring.analyze()
    finally:
        store.dispose()


def test_the_table_is_settled_before_the_drain(database_url: str, tmp_path: Path) -> None:
    """What the bulk insert left to do in the background is done before the drain: on
    PostgreSQL a checkpoint, on SQLite the WAL written back into the database file."""
    checkpoint = sa.text("SELECT checkpoint_lsn FROM pg_control_checkpoint()")
    store = Store(database_url)
    try:
        store.enqueue([NewTask("t") for _ in range(500)])
        if store.is_sqlite:
            wal = Path(f"{store.url.database}-wal")
            assert wal.stat().st_size > 0
        else:
            with store.engine.connect() as conn:
                before = conn.execute(checkpoint).scalar_one()
        progress = io.StringIO()
        _settle(database_url, tmp_path, progress)
        if store.is_sqlite:
            assert wal.stat().st_size == 0
        else:
            with store.engine.connect() as conn:
                assert conn.execute(checkpoint).scalar_one() != before
        assert progress.getvalue() == ""
    finally:
        store.dispose()


def test_a_role_that_may_not_checkpoint_benches_all_the_same(
    postgres_url: str, tmp_path: Path
) -> None:
    """CHECKPOINT needs a superuser or pg_checkpoint: without, the step says so and goes on."""
    role = f"taskherd_bench_{os.getpid()}"
    admin = sa.create_engine(sa.make_url(postgres_url).set(drivername="postgresql+psycopg"))
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
    try:
        limited = sa.make_url(postgres_url).set(username=role).render_as_string(False)
        progress = io.StringIO()
        _settle(limited, tmp_path, progress)
        assert progress.getvalue().startswith("bench: no checkpoint before the drain: ")
        assert "pg_checkpoint" in progress.getvalue()
        assert len(progress.getvalue().splitlines()) == 1
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP ROLE {role}")
        admin.dispose()


def start_bench_and_wait_for_its_pool(
    database_url: str, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], list[psutil.Process]]:
    """A bench in its drain (long enough to be caught there), and its pool's processes."""
    argv = [sys.executable, "-m", "supervisor", "--db", database_url, "bench", "--tasks", "20000"]
    process = subprocess.Popen(
        argv,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Ctrl-C as a terminal sends it: a test run started in the background (`cmd &` from
        # a script) hands its children SIGINT ignored, and Python then keeps it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_until(lambda: list(tmp_path.glob(".taskherd-bench-*/pool-*.log")), 60)
    supervisors = wait_until(
        lambda: [p for p in psutil.Process(process.pid).children() if len(p.children()) == 2], 60
    )
    return process, [member for p in supervisors for member in (p, *p.children())]


def gone(processes: list[psutil.Process]) -> bool:
    return not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_ctrl_c_stops_the_pool_and_removes_the_scratch_database(
    sqlite_url: str, tmp_path: Path
) -> None:
    process, pool = start_bench_and_wait_for_its_pool(sqlite_url, tmp_path)
    try:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert not list(tmp_path.glob(".taskherd-bench-*"))
    assert gone(pool)


def test_a_bench_killed_outright_leaves_no_pool_running(sqlite_url: str, tmp_path: Path) -> None:
    process, pool = start_bench_and_wait_for_its_pool(sqlite_url, tmp_path)
    process.kill()  # no chance to clean up: its pool must still go (parent-death signal)
    process.wait(10)

    wait_until(lambda: gone(pool), 15, message="the pool outlived its bench")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["bench", "--tasks", "0"], "--tasks: must be"),
        (["bench", "-w", "0"], "--workers: must be"),
        (["bench", "--idle-seconds", "-1"], "--idle-seconds: must be more than 0 seconds"),
        (["bench", "--history", "-1"], "--history: must be from 0 to 100000000, not -1"),
        (["bench", "--history", "many"], "--history: must be a whole number, not 'many'"),
        (["bench", "--history", "1e6"], "--history: must be a whole number, not '1e6'"),
        (["bench", "--history", "100000001"], "--history: must be from 0 to 100000000"),
        (["--db", "mysql://x/y", "bench"], "unsupported database URL scheme"),
        (["--db", "sqlite://", "bench"], "SQLite needs a file"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("TASKHERD_"):
            monkeypatch.delenv(name)

    code = main(args)

    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and says in err, err
