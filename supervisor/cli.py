"""`taskherd`: parse -> build the frozen config -> validate -> run one command.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input. Every error is
one line on stderr (`taskherd: error: ...`); the traceback only at --log-level debug.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import sqlalchemy as sa

from supervisor import health
from supervisor.config import (
    OPTIONS,
    Config,
    ConfigError,
    Option,
    mask_loosely,
    parse_duration,
    resolve,
)
from supervisor.embed import build_supervisor
from supervisor.text import age, span, table_lines
from workers.logs import configure_logging
from workers.registry import TaskModuleError
from workers.store import (
    FINISHED,
    STATUSES,
    TRANSIENT_ERRORS,
    BadDatabase,
    Store,
    UnknownTask,
    WrongState,
    mask_url,
)
from workers.taskqueue import (
    MAX_PRIORITY,
    MAX_RETRIES,
    MAX_SECONDS,
    MIN_PRIORITY,
    InvalidTask,
    TaskQueue,
)

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
ERROR_COLUMN_WIDTH = 60
MAX_ID = 2**63 - 1  # a BIGINT
MAX_LIMIT = 10_000_000
MAX_HISTORY = 100_000_000  # bench --history: finished rows written before the drain
MAX_WATCH_INTERVAL = 3600.0


class UsageError(Exception):
    """The command line or an input file is malformed: exit code 2."""


BAD_INPUT: tuple[type[Exception], ...] = (
    UsageError,
    ConfigError,
    BadDatabase,
    UnknownTask,
    WrongState,
    InvalidTask,
    TaskModuleError,
)

# What keeps `health` from reading its facts: it then reports UNKNOWN.
UNREADABLE: tuple[type[Exception], ...] = (BadDatabase, *TRANSIENT_ERRORS)

Handler = Callable[[argparse.Namespace, Config], int]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (raised, printed by main)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# -- entry point -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        return _report(error, EXIT_BAD_INPUT, debug=False)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else EXIT_OK
    debug = _wants_debug(args)
    url = args.database_url or os.environ.get("TASKHERD_DATABASE_URL")
    try:
        config = resolve(_flags(args), os.environ, args.config)
        handler: Handler = args.handler
        return handler(args, config)
    except BAD_INPUT as error:
        return _report(error, EXIT_BAD_INPUT, debug, url)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        return _report(error, EXIT_FAILURE, debug, url, runtime=True)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {option.name: getattr(args, option.name, None) for option in OPTIONS}


def _wants_debug(args: argparse.Namespace) -> bool:
    level = args.log_level or os.environ.get("TASKHERD_LOG_LEVEL") or ""
    return level.strip().lower() == "debug"


def _report(
    error: BaseException,
    code: int,
    debug: bool,
    url: str | None = None,
    *,
    runtime: bool = False,
) -> int:
    """One line on stderr (the traceback before it at debug level), no password; return code."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else type(error).__name__
    if runtime:
        message = f"{type(error).__name__}: {message}"
    print(f"taskherd: error: {_redact(message, url)}", file=sys.stderr)
    return code


def _redact(message: str, url: str | None) -> str:
    """The message with the database password (and the raw URL) replaced."""
    if not url:
        return message
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):  # unparsable: mask it by hand
        return message.replace(url, mask_loosely(url))
    message = message.replace(url, mask_url(parsed))
    return message.replace(parsed.password, "***") if parsed.password else message


# -- the parser ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; global and `run` options come from the config table."""
    parser = _Parser(
        prog="taskherd",
        description="Durable background tasks in a SQL table, run by a supervised worker pool.",
        allow_abbrev=False,
    )
    _add_options(parser, "global")
    parser.add_argument("--config", metavar="FILE", help="a TOML config file (env TASKHERD_CONFIG)")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        sub.set_defaults(handler=handler)
        return sub

    command("init-db", cmd_init_db, "create or upgrade the schema (idempotent)")

    run = command("run", cmd_run, "run the supervisor and its worker pool (blocks)")
    _add_options(run, "run")

    enqueue = command("enqueue", cmd_enqueue, "enqueue a task and print its id")
    enqueue.add_argument("task_type", metavar="TYPE")
    source = enqueue.add_mutually_exclusive_group()
    source.add_argument("--payload", metavar="JSON", help="the payload as JSON (default {})")
    source.add_argument("--payload-file", metavar="F", help="read the JSON payload from a file")
    source.add_argument(
        "--batch", metavar="FILE", help="one JSON payload per line ('-' for stdin): one id per line"
    )
    enqueue.add_argument("-q", "--queue", help="the queue (default: 'default')")
    enqueue.add_argument("--priority", type=_priority, default=0, help="higher runs first")
    enqueue.add_argument(
        "--max-retries", type=_retries, metavar="N", help="retries after the first try"
    )
    enqueue.add_argument("--delay", type=_seconds(0.0, "0 or more"), default=0.0, metavar="S")
    enqueue.add_argument("--timeout", type=_seconds(0.0, "more than 0"), metavar="S")
    enqueue.add_argument(
        "--unique-key", metavar="K", help="no second unfinished task with this key"
    )
    _add_options(enqueue, "enqueue")

    status = command("status", cmd_status, "supervisors, workers and queue depths")
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true")
    shown.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    status.add_argument(
        "--interval",
        type=_seconds(0.0, "more than 0", MAX_WATCH_INTERVAL),
        default=2.0,
        metavar="S",
        help="seconds between two frames of --watch (default 2)",
    )

    tasks = command("tasks", cmd_tasks, "list tasks, newest first")
    tasks.add_argument("--status", type=_status(STATUSES), metavar="S")
    tasks.add_argument("-q", "--queue")
    tasks.add_argument("--limit", type=_limit, default=50, metavar="N")
    tasks.add_argument("--json", action="store_true")

    show = command("show", cmd_show, "one task: progress, result, errors, execution log")
    show.add_argument("task_id", type=_task_id, metavar="ID")
    show.add_argument("--json", action="store_true")

    retry = command("retry", cmd_retry, "put a failed or cancelled task back to pending")
    retry.add_argument("task_id", type=_task_id, metavar="ID")

    cancel = command("cancel", cmd_cancel, "cancel a pending task, or ask a running one to stop")
    cancel.add_argument("task_id", type=_task_id, metavar="ID")

    purge = command("purge", cmd_purge, "delete finished tasks and stopped process rows")
    purge.add_argument("--older-than", type=_duration, required=True, metavar="DURATION")
    purge.add_argument(
        "--status",
        type=_status(FINISHED),
        action="append",
        metavar="S",
        help=f"repeatable (default: {', '.join(FINISHED)})",
    )

    health = command(
        "health", cmd_health, "judge the pool: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN"
    )
    health.add_argument("--json", action="store_true")
    _add_options(health, "health")

    configuration = command(
        "config", cmd_config, "print the effective configuration and where each value came from"
    )
    configuration.add_argument("--json", action="store_true")

    command("demo", cmd_demo, "a self-contained tour on a temporary SQLite file")
    _add_bench(command("bench", cmd_bench, "measure taskherd against the database's own limit"))
    return parser


def _add_options(parser: argparse.ArgumentParser, scope: str) -> None:
    """Flags from the config table; values stay text until resolve() reads them."""
    for option in OPTIONS:
        if option.scope != scope:
            continue
        parser.add_argument(
            *option.flags,
            dest=option.name,
            action="append" if option.kind.is_list else "store",
            metavar=option.metavar,
            help=_option_help(option),
        )


def _option_help(option: Option) -> str:
    if "default" in option.help:
        return f"{option.help}; env {option.env}"
    value = option.default()
    shown = ",".join(value) or "none" if isinstance(value, tuple) else str(value)
    return f"{option.help} (default {shown}; env {option.env})"


# -- argument types (an ArgumentTypeError becomes a one-line usage error) ---------------


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


def _whole(low: int, high: int) -> Callable[[str], int]:
    """A whole number from low to high (what the columns hold and what is sane)."""

    def parse(text: str) -> int:
        value = _integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
        return value

    return parse


_priority = _whole(MIN_PRIORITY, MAX_PRIORITY)
_retries = _whole(0, MAX_RETRIES)
_limit = _whole(1, MAX_LIMIT)
_history = _whole(0, MAX_HISTORY)


def _task_id(text: str) -> int:
    value = _integer(text)
    if not 1 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"a task id is a positive number, not {value}")
    return value


def _seconds(low: float, wording: str, high: float = MAX_SECONDS) -> Callable[[str], float]:
    """A number of seconds: above low ('more than') or from low ('0 or more'), up to high."""
    strict = wording.startswith("more")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {wording} seconds, not {text}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g} seconds, not {text}")
        return value

    return parse


def _status(allowed: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(allowed)}, not {text!r}")
        return text

    return parse


def _duration(text: str) -> float:
    """90s, 30m, 12h, 7d (a bare number is seconds) -> seconds."""
    try:
        return parse_duration(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# -- commands --------------------------------------------------------------------------


@contextmanager
def _opened(config: Config) -> Iterator[Store]:
    """An existing database holding the schema; never creates a SQLite file."""
    store = Store(config.database_url)
    try:
        store.check_schema()
        yield store
    finally:
        store.dispose()


def cmd_init_db(args: argparse.Namespace, config: Config) -> int:
    store = Store(config.database_url, create=True)
    try:
        version = store.init_schema()
    finally:
        store.dispose()
    print(f"schema version {version} ready in {mask_url(config.database_url)}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    configure_logging(config.log_format, config.log_level)
    if os.getcwd() not in sys.path:  # `-i myapp.tasks` from the project's directory
        sys.path.insert(0, os.getcwd())
    supervisor = build_supervisor(config)
    # SIGHUP: the same flags, the environment and the config file read again
    supervisor.reloader = lambda: resolve(_flags(args), os.environ, args.config).supervisor_kwargs()
    supervisor.run()
    return EXIT_OK


def cmd_enqueue(args: argparse.Namespace, config: Config) -> int:
    if args.batch is not None and args.unique_key is not None:
        raise UsageError("--unique-key cannot be used with --batch: each task needs its own key")
    options: dict[str, Any] = {
        "queue": args.queue,
        "priority": args.priority,
        "max_retries": args.max_retries,
        "delay": args.delay,
        "timeout": args.timeout,
    }
    if args.batch is None:
        payload = _payload(args)
    with _opened(config) as store:
        queue = TaskQueue(
            config.database_url, store=store, max_payload_bytes=config.max_payload_bytes
        )
        if args.batch is None:
            print(queue.enqueue(args.task_type, payload, unique_key=args.unique_key, **options))
            return EXIT_OK
        payloads = _batch(args.batch, queue)
        for task_id in queue.enqueue_many(args.task_type, payloads, **options):
            print(task_id)
    return EXIT_OK


def _payload(args: argparse.Namespace) -> Any:
    if args.payload is not None:
        return _json(args.payload, "the payload")
    if args.payload_file is not None:
        return _json(_read_text(args.payload_file), f"the payload in {args.payload_file}")
    return None


def _batch(source: str, queue: TaskQueue) -> list[Any]:
    """One payload per non-blank line; any bad line rejects the batch, naming its number."""
    text = sys.stdin.read() if source == "-" else _read_text(source)
    payloads = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        payload = _json(line, f"line {number}")
        try:
            queue.encode_payload(payload)
        except InvalidTask as error:
            raise InvalidTask(f"line {number}: {error}") from error
        payloads.append(payload)
    return payloads


def _json(text: str, what: str) -> Any:
    def reject(constant: str) -> NoReturn:
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(text, parse_constant=reject)
    except ValueError as error:
        raise InvalidTask(f"{what} is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidTask(f"{what} is nested too deeply") from None


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    if args.watch:
        from supervisor.watch import watch

        with _opened(config) as store:
            watch(store, args.interval)
        return EXIT_OK
    with _opened(config) as store:
        snapshot = store.snapshot()
    if args.json:
        _print_json(snapshot)
        return EXIT_OK
    now: datetime = snapshot["now"]
    print(f"database: {mask_url(config.database_url)}")
    print()
    sups = snapshot["supervisors"]
    if sups:
        _print_table(
            ["SUPERVISOR", "NODE", "PID", "STATUS", "WORKERS", "HEARTBEAT", "STARTED", "VERSION"],
            [
                [s["id"], s["hostname"], s["pid"], s["status"], s["desired_workers"],
                 age(s["last_heartbeat"], now), age(s["started_at"], now), s["version"]]
                for s in sups
            ],
        )  # fmt: skip
        for sup in sups:
            if sup["crash_streak"] >= 2:
                reason = (sup["crash_reason"] or "unknown").splitlines()[0]
                print(
                    f"CRASH LOOP on {sup['hostname']} (supervisor {sup['id']}): "
                    f"{sup['crash_streak']} workers in a row died at start: {reason}"
                )
    else:
        print("no supervisor is running")
    print()
    workers = snapshot["workers"]
    if workers:
        _print_table(
            ["WORKER", "SUPERVISOR", "NODE", "PID", "TASK", "DONE", "FAILED", "HEARTBEAT",
             "QUEUES"],
            [
                [w["id"], w["supervisor_id"], w["hostname"], w["worker_pid"], w["current_task_id"],
                 w["processed_tasks_count"], w["failed_tasks_count"],
                 age(w["last_heartbeat"], now), w["queues"]]
                for w in workers
            ],
        )  # fmt: skip
    else:
        print("no active workers")
    print()
    queues = snapshot["queues"]
    if queues:
        _print_table(
            ["QUEUE", "PENDING", "RUNNING"],
            [[name, depth["pending"], depth["running"]] for name, depth in sorted(queues.items())],
        )
    else:
        print("no pending or running tasks")
    totals = snapshot["totals"]
    print()
    print("finished: " + ", ".join(f"{totals.get(status, 0)} {status}" for status in FINISHED))
    return EXIT_OK


def cmd_health(args: argparse.Namespace, config: Config) -> int:
    """Exit with the worst check's level; UNKNOWN (3) when the facts cannot be read."""
    try:
        with _opened(config) as store:
            facts = store.health(config.failure_window)
    except UNREADABLE as error:
        lines = str(getattr(error, "orig", None) or error).strip().splitlines()
        checks = [health.Check("database", health.Level.UNKNOWN, lines[0] if lines else "")]
    else:
        checks = health.judge(facts, config)
    level = health.verdict(checks)
    database = mask_url(config.database_url)
    if args.json:
        _print_json(
            {
                "status": level.name.lower(),
                "exit_code": int(level),
                "database": database,
                "checks": [check.as_json() for check in checks],
            }
        )
        return int(level)
    problems = [check for check in checks if check.level != health.Level.OK]
    summary = "; ".join(f"{c.name}: {c.message}" for c in problems) or "all checks passed"
    print(f"{level.name}: {summary}")
    for check in checks:
        print(f"  {check.level.name:<8}  {check.name:<11}  {check.message}")
    print(f"  database: {database}")
    return int(level)


def cmd_config(args: argparse.Namespace, config: Config) -> int:
    """Every setting, its effective value (passwords masked) and the source that set it."""
    rows: list[dict[str, Any]] = []
    for option in OPTIONS:
        value = getattr(config, option.name)
        if option.name == "database_url":
            value = mask_url(value)
        rows.append(
            {
                "name": option.name,
                "value": list(value) if isinstance(value, tuple) else value,
                "source": _source(config.sources.get(option.name, "")),
                "env": option.env,
            }
        )
    if args.json:
        _print_json({"config_file": config.config_file, "settings": rows})
        return EXIT_OK
    print(f"config file: {config.config_file or 'none'}")
    _print_table(
        ["SETTING", "VALUE", "FROM"],
        [[row["name"], _setting(row["name"], row["value"]), row["source"]] for row in rows],
    )
    return EXIT_OK


def _source(where: str) -> str:
    """'flag --db', 'env TASKHERD_WORKERS', 'file app.toml' or 'default', from resolve()'s note."""
    if where.startswith("-"):
        return f"flag {where}"
    if where.startswith("TASKHERD_"):
        return f"env {where}"
    if " in " in where:
        return f"file {where.partition(' in ')[2]}"
    return "default"


def _setting(name: str, value: Any) -> str:
    if value is None or value == []:
        return "(every queue)" if name == "queues" else "-"
    if isinstance(value, list):
        return ",".join(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def cmd_tasks(args: argparse.Namespace, config: Config) -> int:
    with _opened(config) as store:
        rows = store.list_tasks(status=args.status, queue=args.queue, limit=args.limit)
    if args.json:
        _print_json(rows)
        return EXIT_OK
    if not rows:
        print("no tasks")
        return EXIT_OK
    now = datetime.now(UTC)
    _print_table(
        ["ID", "QUEUE", "TYPE", "STATUS", "PRI", "ATTEMPTS", "PROGRESS", "CREATED", "LAST ERROR"],
        [
            [r["id"], r["queue"], r["task_type"], r["status"], r["priority"],
             f"{r['attempts']}/{r['max_attempts']}", _percent(r["progress_percentage"]),
             age(r["created_at"], now), _clip(r["last_error"])]
            for r in rows
        ],
    )  # fmt: skip
    return EXIT_OK


JSON_COLUMNS = ("payload", "result", "error_history", "execution_log")


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    with _opened(config) as store:
        task = store.get_task(args.task_id)
    for column in JSON_COLUMNS:
        task[column] = _decoded(task[column])
    if args.json:
        _print_json(task)
        return EXIT_OK
    now = datetime.now(UTC)
    fields = [
        ("task", f"{task['id']} ({task['task_type']})"),
        ("status", task["status"] + (" (cancellation requested)" if _cancel_pending(task) else "")),
        ("queue", task["queue"]),
        ("priority", task["priority"]),
        ("attempts", f"{task['attempts']} of {task['max_attempts']}"),
        ("worker", task["worker_id"]),
        ("created", _when(task["created_at"], now)),
        ("run at", _when(task["run_at"], now)),
        ("started", _when(task["started_at"], now)),
        ("completed", _when(task["completed_at"], now)),
        ("duration", None if task["duration"] is None else f"{task['duration']:.3f} s"),
        ("timeout", None if task["timeout"] is None else f"{task['timeout']:g} s"),
        ("unique key", task["unique_key"]),
        ("progress", _progress(task)),
        ("payload", _compact(task["payload"])),
        ("result", None if task["result"] is None else _compact(task["result"])),
        ("last error", task["last_error"]),
    ]
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        if value is not None and value != "":
            print(f"{name + ':':<{width + 1}} {value}")
    history = task["error_history"] or []
    print(f"\nerror history ({len(history)}):")
    for entry in history:
        entry = entry if isinstance(entry, dict) else {"error": entry}
        first = str(entry.get("error", "")).splitlines() or [""]
        print(
            f"  {entry.get('at', '')}  attempt {entry.get('attempt', '?')}"
            f"  worker {entry.get('worker_id', '?')}  {first[0]}"
        )
    log = task["execution_log"] or []
    print(f"\nexecution log ({len(log)}):")
    for entry in log:
        entry = entry if isinstance(entry, dict) else {"message": entry}
        data = entry.get("data")
        extra = f"  {_compact(data)}" if data else ""
        print(
            f"  {entry.get('timestamp', '')}  {entry.get('level', '')!s:<7}"
            f"  {entry.get('message', '')}{extra}"
        )
    return EXIT_OK


def _cancel_pending(task: dict[str, Any]) -> bool:
    return bool(task["cancel_requested"]) and task["status"] == "running"


def _progress(task: dict[str, Any]) -> str | None:
    parts: list[str] = []
    if task["progress_percentage"] is not None:
        parts.append(f"{task['progress_percentage']:.0f}%")
    if task["current_step"]:
        step = str(task["current_step"])
        parts.append(f"step {step}" + (f" of {task['total_steps']}" if task["total_steps"] else ""))
    if task["progress_message"]:
        parts.append(str(task["progress_message"]))
    return ", ".join(parts) or None


def cmd_retry(args: argparse.Namespace, config: Config) -> int:
    with _opened(config) as store:
        store.retry_task(args.task_id)
    print(f"task {args.task_id} is pending again")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, config: Config) -> int:
    with _opened(config) as store:
        outcome = store.cancel_task(args.task_id)
    if outcome == "cancelled":
        print(f"task {args.task_id} cancelled")
    else:
        print(f"task {args.task_id} is running: cancellation requested")
    return EXIT_OK


def cmd_purge(args: argparse.Namespace, config: Config) -> int:
    statuses = tuple(dict.fromkeys(args.status or FINISHED))
    with _opened(config) as store:
        removed = store.purge(args.older_than, statuses)
    print(
        f"removed {removed['tasks']} {'/'.join(statuses)} task(s), "
        f"{removed['workers']} stopped worker row(s) and "
        f"{removed['supervisors']} stopped supervisor row(s) "
        f"older than {span(args.older_than)}"
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    from supervisor.demo import run_demo

    return int(run_demo(log_format=config.log_format))


def _add_bench(bench: argparse.ArgumentParser) -> None:
    """`bench`'s options; -w is `run`'s setting (flag > TASKHERD_WORKERS > file > CPUs)."""
    bench.add_argument(
        "-w", "--workers", metavar="N", help="worker processes (default: one per CPU)"
    )
    bench.add_argument(
        "--tasks", type=_limit, metavar="N", help="no-op tasks to drain (SQLite 20000, PG 5000)"
    )
    bench.add_argument(
        "--idle-seconds",
        type=_seconds(0.0, "more than 0"),
        default=30.0,
        metavar="S",
        help="how long the idle pool is watched (default 30)",
    )
    bench.add_argument(
        "--pickup-tasks", type=_limit, default=200, metavar="N", help="(default 200)"
    )
    bench.add_argument("--rescues", type=_limit, default=3, metavar="N", help="(default 3)")
    bench.add_argument(
        "--history",
        type=_history,
        default=0,
        metavar="N",
        help="finished tasks written into the table before the drain (default 0)",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_bench(args: argparse.Namespace, config: Config) -> int:
    from supervisor.bench import BenchSettings, run_bench

    settings = BenchSettings(
        database_url=config.database_url,
        workers=config.workers,
        tasks=args.tasks,
        idle_seconds=args.idle_seconds,
        pickup_tasks=args.pickup_tasks,
        rescues=args.rescues,
        history=args.history,
    )
    return run_bench(settings, as_json=args.json)


# -- output ----------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _decoded(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), default=_json_default)


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print("\n".join(table_lines(headers, rows)))


def _when(moment: datetime | None, now: datetime) -> str | None:
    if moment is None:
        return None
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({age(moment, now)})"


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.0f}%"


def _clip(text: str | None) -> str | None:
    if not text:
        return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= ERROR_COLUMN_WIDTH else line[: ERROR_COLUMN_WIDTH - 3] + "..."
