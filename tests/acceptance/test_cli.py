"""The `taskherd` CLI as an operator uses it: `python -m supervisor ...` on a real SQLite file.

Bad input must exit 2 with exactly one line on stderr, no traceback, and nothing written.
The bad-input cases all start at once (each on its own copy of one database) so the file
stays fast; each is still reported as its own test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.helpers import wait_until
from workers.store import SCHEMA_VERSION, NewTask, Store, supervisors, task_workers, tasks

TASK_MODULE = """
from workers import task

@task("add")
def add(ctx, payload):
    ctx.progress(50, step="adding")
    ctx.log("info", "adding", a=payload["a"])
    return payload["a"] + payload["b"]
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without TASKHERD_* settings, plus extra."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TASKHERD_")}
    env.update(extra)
    return env


def cli_argv(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "supervisor", *args]


def taskherd(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(args),
        input=stdin,
        capture_output=True,
        text=True,
        env=env or clean_env(),
        cwd=cwd,
        timeout=60,
    )


def ok(*args: str, **kwargs: Any) -> str:
    """Run a command that must succeed; its stdout."""
    done = taskherd(*args, **kwargs)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


def show(db: str, task_id: int) -> dict[str, Any]:
    """`taskherd show ID --json`."""
    result: dict[str, Any] = json.loads(ok("--db", db, "show", str(task_id), "--json"))
    return result


def stored(db: str, task_id: int) -> dict[str, Any]:
    """The task's row, read directly (cheaper than a CLI process when show is not under test)."""
    store = Store(db)
    try:
        row = store.get_task(task_id)
    finally:
        store.dispose()
    for column in ("payload", "result", "error_history", "execution_log"):
        if row[column] is not None:
            row[column] = json.loads(row[column])
    return row


def fingerprint(url: str) -> list[list[tuple[Any, ...]]]:
    """Every row of the three tables: equal before and after means nothing was written."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                [tuple(row) for row in conn.execute(table.select().order_by(table.c.id))]
                for table in (tasks, task_workers, supervisors)
            ]
    finally:
        engine.dispose()


# -- happy paths -------------------------------------------------------------------------


def test_init_db_creates_a_private_file_and_is_idempotent(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'new.db'}"
    assert f"schema version {SCHEMA_VERSION}" in ok("--db", db, "init-db")
    assert stat.S_IMODE((tmp_path / "new.db").stat().st_mode) == 0o600
    ok("--db", db, "init-db")
    assert "no tasks" in ok("--db", db, "tasks")


def test_database_url_from_environment_and_config_file(sqlite_url: str, tmp_path: Path) -> None:
    ok("--db", sqlite_url, "enqueue", "noop")
    assert "noop" in ok("tasks", env=clean_env(TASKHERD_DATABASE_URL=sqlite_url))
    config = tmp_path / "taskherd.toml"
    config.write_text(f'database_url = "{sqlite_url}"\n', encoding="utf-8")
    assert "noop" in ok("--config", str(config), "tasks")
    assert "noop" in ok("tasks", env=clean_env(TASKHERD_CONFIG=str(config)))


def test_config_prints_every_setting_where_it_came_from_and_no_password(tmp_path: Path) -> None:
    config = tmp_path / "taskherd.toml"
    config.write_text('workers = 6\nqueues = ["mail"]\n', encoding="utf-8")
    env = clean_env(TASKHERD_CONFIG=str(config), TASKHERD_POLL_INTERVAL="0.5")
    url = "postgresql://me:s3cret@db.example:5432/jobs"
    shown = json.loads(ok("--db", url, "config", "--json", env=env))

    settings = {row["name"]: row for row in shown["settings"]}
    assert shown["config_file"] == str(config)
    assert settings["database_url"]["source"] == "flag --db"
    assert settings["database_url"]["value"] == "postgresql://me:***@db.example:5432/jobs"
    assert settings["workers"] == {
        "name": "workers", "value": 6, "source": f"file {config}", "env": "TASKHERD_WORKERS"
    }  # fmt: skip
    assert settings["queues"]["value"] == ["mail"]
    assert settings["poll_interval"]["value"] == 0.5
    assert settings["poll_interval"]["source"] == "env TASKHERD_POLL_INTERVAL"
    assert settings["graceful_timeout"]["source"] == "default"
    text = ok("--db", url, "config", env=env)
    assert "s3cret" not in text
    assert re.search(r"^workers +6 +file ", text, re.MULTILINE)


def test_enqueue_prints_the_new_id_with_every_option(sqlite_url: str, tmp_path: Path) -> None:
    out = ok(
        "--db", sqlite_url, "enqueue", "resize", "--payload", '{"path": "a.png"}',
        "-q", "media", "--priority", "7", "--max-retries", "2", "--delay", "60",
        "--timeout", "9.5", "--unique-key", "a.png",
    )  # fmt: skip
    task_id = int(out.strip())
    task = show(sqlite_url, task_id)
    assert task["payload"] == {"path": "a.png"}
    assert (task["queue"], task["priority"], task["max_attempts"]) == ("media", 7, 3)
    assert (task["timeout"], task["unique_key"], task["status"]) == (9.5, "a.png", "pending")
    again = ok("--db", sqlite_url, "enqueue", "resize", "--unique-key", "a.png")
    assert int(again) == task_id

    payload_file = tmp_path / "payload.json"
    payload_file.write_text('{"n": [1, 2]}', encoding="utf-8")
    other = int(ok("--db", sqlite_url, "enqueue", "resize", "--payload-file", str(payload_file)))
    assert stored(sqlite_url, other)["payload"] == {"n": [1, 2]}


def test_enqueue_batch_prints_one_id_per_line(sqlite_url: str, tmp_path: Path) -> None:
    out = ok("--db", sqlite_url, "enqueue", "add", "--batch", "-", stdin='{"a": 1}\n\n[2]\n"x"\n')
    ids = [int(line) for line in out.split()]
    assert len(ids) == 3
    assert [stored(sqlite_url, i)["payload"] for i in ids] == [{"a": 1}, [2], "x"]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("{}\n{}\n", encoding="utf-8")
    out = ok("--db", sqlite_url, "enqueue", "add", "--batch", str(batch), "-q", "bulk")
    assert len(out.split()) == 2


def test_tasks_lists_newest_first_and_filters(sqlite_url: str) -> None:
    ok("--db", sqlite_url, "enqueue", "job", "-q", "a")
    ok("--db", sqlite_url, "enqueue", "job", "-q", "b", "--batch", "-", stdin="{}\n{}\n")
    rows = json.loads(ok("--db", sqlite_url, "tasks", "--json"))
    assert [row["id"] for row in rows] == [3, 2, 1]
    assert rows[0]["created_at"].endswith("+00:00")  # ISO timestamps
    rows = json.loads(ok("--db", sqlite_url, "tasks", "-q", "b", "--limit", "1", "--json"))
    assert [row["id"] for row in rows] == [3]
    assert json.loads(ok("--db", sqlite_url, "tasks", "--status", "failed", "--json")) == []
    table = ok("--db", sqlite_url, "tasks", "--status", "pending").splitlines()
    assert table[0].split()[:4] == ["ID", "QUEUE", "TYPE", "STATUS"]
    assert len(table) == 4


def test_cancel_retry_and_purge(sqlite_url: str) -> None:
    pending = int(ok("--db", sqlite_url, "enqueue", "job"))
    running = int(ok("--db", sqlite_url, "enqueue", "job", "--priority", "9"))
    store = Store(sqlite_url)
    try:
        [claim] = store.claim_tasks(worker_id=1, queues=[])
    finally:
        store.dispose()
    assert claim.id == running

    assert "cancellation requested" in ok("--db", sqlite_url, "cancel", str(running))
    assert stored(sqlite_url, running)["cancel_requested"] is True
    assert "cancelled" in ok("--db", sqlite_url, "cancel", str(pending))
    assert stored(sqlite_url, pending)["status"] == "cancelled"

    assert "pending again" in ok("--db", sqlite_url, "retry", str(pending))
    assert stored(sqlite_url, pending)["status"] == "pending"

    ok("--db", sqlite_url, "cancel", str(pending))
    assert "removed 0 " in ok("--db", sqlite_url, "purge", "--older-than", "7d")
    removed = ok("--db", sqlite_url, "purge", "--older-than", "0s", "--status", "cancelled")
    assert "removed 1 cancelled task" in removed
    assert [row["id"] for row in json.loads(ok("--db", sqlite_url, "tasks", "--json"))] == [running]


def test_status_shows_supervisors_workers_and_queues(sqlite_url: str) -> None:
    ok("--db", sqlite_url, "enqueue", "job", "-q", "mail")
    store = Store(sqlite_url)
    try:
        supervisor_id = store.register_supervisor("node-a", 4242, 0.0, 2, "0.1.0")
        store.register_worker(supervisor_id, "node-a", ["mail"])
    finally:
        store.dispose()
    snapshot = json.loads(ok("--db", sqlite_url, "status", "--json"))
    assert [s["hostname"] for s in snapshot["supervisors"]] == ["node-a"]
    assert [w["queues"] for w in snapshot["workers"]] == ["mail"]
    assert snapshot["queues"] == {"mail": {"pending": 1, "running": 0}}
    human = ok("--db", sqlite_url, "status")
    assert "node-a" in human and "4242" in human and "mail" in human


def test_run_works_a_task_and_stops_cleanly_on_sigterm(sqlite_url: str, tmp_path: Path) -> None:
    (tmp_path / "cli_tasks.py").write_text(TASK_MODULE, encoding="utf-8")
    task_id = int(ok("--db", sqlite_url, "enqueue", "add", "--payload", '{"a": 2, "b": 3}'))
    log = (tmp_path / "run.log").open("w")
    process = subprocess.Popen(
        cli_argv(
            ["--db", sqlite_url, "--log-format", "json", "run", "-w", "1", "-i", "cli_tasks",
             "--node", "cli-test", "--poll-interval", "0.05", "--heartbeat-interval", "0.2",
             "--heartbeat-timeout", "5", "--worker-timeout", "5", "--graceful-timeout", "5"]
        ),
        cwd=tmp_path, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: stored(sqlite_url, task_id)["status"] == "completed", timeout=30)
        task = show(sqlite_url, task_id)
        assert task["result"] == 5
        assert [entry["message"] for entry in task["execution_log"]] == ["adding"]
        human = ok("--db", sqlite_url, "show", str(task_id))
        assert "status:" in human and "completed" in human and "adding" in human
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


# -- bad input: exit 2, one line, no traceback, nothing written --------------------------


@dataclass(frozen=True)
class Bad:
    """One bad invocation; {db} is the case's database URL, {dir} its directory."""

    name: str
    args: tuple[str, ...]
    says: str  # a fragment of the one-line message
    stdin: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    missing_db: bool = False  # {db} names a file that must still not exist afterwards
    prepare: str | None = None  # "newer": a schema from a later taskherd; "readonly": the file


BAD_INPUTS = [
    Bad("invalid JSON payload", ("--db", "{db}", "enqueue", "add", "--payload", "{nope"),
        "not valid JSON"),
    Bad("NaN payload", ("--db", "{db}", "enqueue", "add", "--payload", "NaN"), "not valid JSON"),
    Bad("payload file missing", ("--db", "{db}", "enqueue", "add", "--payload-file", "{dir}/x"),
        "cannot read"),
    Bad("bad batch line", ("--db", "{db}", "enqueue", "add", "--batch", "-"), "line 3",
        stdin='{"a": 1}\n\n{"a": \n{"a": 2}\n'),
    Bad("payload and batch", ("--db", "{db}", "enqueue", "add", "--payload", "{}", "--batch", "-"),
        "not allowed with"),
    Bad("empty task type", ("--db", "{db}", "enqueue", " "), "non-empty"),
    Bad("negative max retries", ("--db", "{db}", "enqueue", "add", "--max-retries", "-1"),
        "--max-retries"),
    Bad("negative delay", ("--db", "{db}", "enqueue", "add", "--delay", "-5"), "--delay"),
    Bad("zero timeout", ("--db", "{db}", "enqueue", "add", "--timeout", "0"), "--timeout"),
    Bad("priority not a number", ("--db", "{db}", "enqueue", "add", "--priority", "high"),
        "--priority"),
    Bad("negative limit", ("--db", "{db}", "tasks", "--limit", "-1"), "--limit"),
    Bad("unknown status", ("--db", "{db}", "tasks", "--status", "done"), "--status"),
    Bad("zero workers", ("--db", "{db}", "run", "-w", "0"), "--workers"),
    Bad("negative interval", ("--db", "{db}", "run", "--poll-interval", "-1"), "--poll-interval"),
    Bad("timeout not a number", ("--db", "{db}", "run", "--heartbeat-timeout", "soon"),
        "--heartbeat-timeout"),
    Bad("bad environment value", ("--db", "{db}", "run"), "TASKHERD_WORKERS",
        env=(("TASKHERD_WORKERS", "many"),)),
    Bad("unknown option", ("--db", "{db}", "tasks", "--colour"), "unrecognized arguments"),
    Bad("unknown command", ("--db", "{db}", "frobnicate"), "invalid choice"),
    Bad("no command", ("--db", "{db}",), "required"),
    Bad("unsupported URL scheme", ("--db", "mysql://me:s3cret@host/db", "tasks"),
        "unsupported database URL scheme"),
    Bad("unparsable URL", ("--db", "postgresql://me:s3cret@host:port/db", "tasks"),
        "invalid database URL"),
    Bad("not a SQLite file", ("--db", "sqlite:///{dir}/notes.txt", "tasks"), "not a SQLite"),
    Bad("missing database for tasks", ("--db", "{db}", "tasks"), "init-db", missing_db=True),
    Bad("missing database for enqueue", ("--db", "{db}", "enqueue", "add"), "init-db",
        missing_db=True),
    Bad("task module cannot be imported", ("--db", "{db}", "run", "-w", "1", "-i", "no_such_mod"),
        "cannot import task module 'no_such_mod'"),
    Bad("unknown task id for show", ("--db", "{db}", "show", "999"), "no task with id 999"),
    Bad("unknown task id for retry", ("--db", "{db}", "retry", "999"), "no task with id 999"),
    Bad("unknown task id for cancel", ("--db", "{db}", "cancel", "999"), "no task with id 999"),
    Bad("task id not a number", ("--db", "{db}", "show", "one"), "ID"),
    Bad("retry a pending task", ("--db", "{db}", "retry", "1"), "is pending"),
    Bad("cancel a cancelled task", ("--db", "{db}", "cancel", "2"), "is cancelled"),
    Bad("bad purge duration", ("--db", "{db}", "purge", "--older-than", "soon"), "--older-than"),
    Bad("purge pending tasks", ("--db", "{db}", "purge", "--older-than", "1d", "--status",
                                "pending"), "--status"),
    Bad("malformed config file", ("--db", "{db}", "--config", "{dir}/broken.toml", "tasks"),
        "not valid TOML"),
    Bad("unknown config key", ("--db", "{db}", "--config", "{dir}/unknown.toml", "tasks"),
        "unknown key 'colour'"),
    Bad("wrong type in config file", ("--db", "{db}", "--config", "{dir}/typed.toml", "tasks"),
        "must be a whole number"),
    # sizes and nesting
    Bad("payload over the default limit", ("--db", "{db}", "enqueue", "add", "--payload-file",
                                           "{dir}/big.json"), "over the limit of 1048576 bytes"),
    Bad("payload over a configured limit", ("--db", "{db}", "enqueue", "add", "--payload",
                                            '{"a": "0123456789"}'), "over the limit of 10 bytes",
        env=(("TASKHERD_MAX_PAYLOAD_BYTES", "10"),)),
    Bad("payload limit out of range", ("--db", "{db}", "enqueue", "add",
                                       "--max-payload-bytes", "0"), "--max-payload-bytes"),
    Bad("payload nested too deeply", ("--db", "{db}", "enqueue", "add", "--payload-file",
                                      "{dir}/deep.json"), "nested too deeply"),
    Bad("batch line over the limit", ("--db", "{db}", "enqueue", "add", "--batch", "-"),
        "line 2: the payload is", stdin='{"a": 1}\n{"a": "' + "x" * 30 + '"}\n',
        env=(("TASKHERD_MAX_PAYLOAD_BYTES", "20"),)),
    # numbers out of range: every count and interval
    Bad("priority too large", ("--db", "{db}", "enqueue", "add", "--priority", "99999999999"),
        "--priority"),
    Bad("too many retries", ("--db", "{db}", "enqueue", "add", "--max-retries", "1001"),
        "--max-retries"),
    Bad("delay too long", ("--db", "{db}", "enqueue", "add", "--delay", "1e12"), "--delay"),
    Bad("timeout too long", ("--db", "{db}", "enqueue", "add", "--timeout", "inf"), "--timeout"),
    Bad("task id too large", ("--db", "{db}", "show", "99999999999999999999"), "ID"),
    Bad("limit too large", ("--db", "{db}", "tasks", "--limit", "100000000"), "--limit"),
    Bad("too many workers", ("--db", "{db}", "run", "-w", "5000"), "--workers"),
    Bad("zero heartbeat interval", ("--db", "{db}", "run", "--heartbeat-interval", "0"),
        "--heartbeat-interval"),
    Bad("worker timeout too long", ("--db", "{db}", "run", "--worker-timeout", "1e9"),
        "--worker-timeout"),
    Bad("negative graceful timeout", ("--db", "{db}", "run", "--graceful-timeout", "-1"),
        "--graceful-timeout"),
    Bad("cancel grace not finite", ("--db", "{db}", "run", "--cancel-grace", "nan"),
        "--cancel-grace"),
    Bad("zero tasks per worker", ("--db", "{db}", "run", "--max-tasks-per-worker", "0"),
        "--max-tasks-per-worker"),
    Bad("negative memory limit", ("--db", "{db}", "run", "--max-memory-per-worker", "-5"),
        "--max-memory-per-worker"),
    Bad("heartbeat timeout not past the interval", ("--db", "{db}", "run", "--heartbeat-interval",
                                                    "5", "--heartbeat-timeout", "5"),
        "must be longer than the heartbeat interval"),
    Bad("failure rate over 1", ("--db", "{db}", "health", "--failure-rate-warning", "1.5"),
        "--failure-rate-warning"),
    Bad("warning past critical", ("--db", "{db}", "health", "--pending-age-warning", "100",
                                  "--pending-age-critical", "50"), "must not be more than"),
    Bad("zero watch interval", ("--db", "{db}", "status", "--watch", "--interval", "0"),
        "--interval"),
    # the database itself
    Bad("schema from a newer taskherd", ("--db", "{db}", "enqueue", "add"), "newer than this",
        prepare="newer"),
    Bad("newer schema for init-db", ("--db", "{db}", "init-db"), "upgrade taskherd",
        prepare="newer"),
    Bad("read-only database file", ("--db", "{db}", "enqueue", "add"), "is read-only",
        prepare="readonly"),
]  # fmt: skip

CONFIG_FILES = {
    "broken.toml": "workers = \n",
    "unknown.toml": "colour = 'blue'\n",
    "typed.toml": "workers = '4'\n",
    "big.json": '{"blob": "' + "x" * 2**20 + '"}',
    "deep.json": "[" * 100_000 + "]" * 100_000,
}


def prepare(db_path: Path, how: str | None) -> None:
    """Make the case's database newer than this taskherd, or read-only (even for root)."""
    if how == "newer":
        with sqlite3.connect(db_path) as conn:
            conn.execute("UPDATE schema_version SET version = 99")
        conn.close()
    elif how == "readonly":
        if os.geteuid() == 0:  # root writes through file modes: make the file immutable
            subprocess.run(["chattr", "+i", str(db_path)], check=True)
        else:
            db_path.chmod(0o400)


def unprepare(db_path: Path, how: str | None) -> None:
    if how == "readonly" and os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(db_path)], check=True)


@dataclass
class Outcome:
    case: Bad
    db_path: Path
    returncode: int
    stderr: str
    stdout: str


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Task 1 pending, task 2 cancelled."""
    path = tmp_path_factory.mktemp("template") / "taskherd.db"
    store = Store(f"sqlite:///{path}", create=True)
    try:
        store.init_schema()
        store.enqueue([NewTask("add"), NewTask("add")])
        store.cancel_task(2)
    finally:
        store.dispose()
    return path


@pytest.fixture(scope="module")
def bad_outcomes(
    template_db: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Outcome]]:
    """Start every bad invocation at once, each on its own copy of the template."""
    running = []
    for case in BAD_INPUTS:
        workdir = tmp_path_factory.mktemp("bad")
        db_path = workdir / ("absent.db" if case.missing_db else "taskherd.db")
        if not case.missing_db:
            shutil.copy(template_db, db_path)
            prepare(db_path, case.prepare)
        (workdir / "notes.txt").write_text("not a database, just some notes\n" * 50)
        for name, text in CONFIG_FILES.items():
            (workdir / name).write_text(text, encoding="utf-8")
        args = [
            arg.replace("{db}", f"sqlite:///{db_path}").replace("{dir}", str(workdir))
            for arg in case.args
        ]
        process = subprocess.Popen(
            cli_argv(args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(**dict(case.env)),
            cwd=workdir,
        )
        running.append((case, db_path, process))
    outcomes = {}
    for case, db_path, process in running:
        stdout, stderr = process.communicate(case.stdin or "", timeout=60)
        outcomes[case.name] = Outcome(case, db_path, process.returncode, stderr, stdout)
    try:
        yield outcomes
    finally:
        for case, db_path, _process in running:
            unprepare(db_path, case.prepare)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.name for case in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    case: Bad, bad_outcomes: dict[str, Outcome], template_db: Path
) -> None:
    outcome = bad_outcomes[case.name]
    lines = outcome.stderr.splitlines()
    assert outcome.returncode == 2, outcome.stderr
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("taskherd: error: ")
    assert case.says in lines[0]
    assert "Traceback" not in outcome.stderr
    assert "s3cret" not in outcome.stderr
    assert outcome.stdout == ""
    if case.missing_db:
        assert not outcome.db_path.exists()
    elif outcome.db_path.exists():
        url = f"sqlite:///{outcome.db_path}"
        assert fingerprint(url) == fingerprint(f"sqlite:///{template_db}")


def test_traceback_only_at_debug_level(sqlite_url: str) -> None:
    done = taskherd("--db", sqlite_url, "--log-level", "debug", "show", "999")
    assert done.returncode == 2
    assert "Traceback" in done.stderr
    assert done.stderr.splitlines()[-1] == "taskherd: error: no task with id 999"
