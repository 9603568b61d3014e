"""`taskherd demo`: a self-contained tour on a temporary SQLite file.

In order: make a temporary directory, route the pool's structured log to a file
there, create the database, enqueue a mix of tasks, start a pool of worker
processes embedded in this process, watch the tables live until every task has
finished (a worker gets killed on the way and is replaced; its task is rescued),
stop the pool, print a summary, and remove the directory. Everything shown is
read from the database, as `taskherd status` and `taskherd show` would read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import psutil
import structlog

from supervisor.core import Supervisor
from supervisor.text import progress_bar
from workers import TaskQueue
from workers.logs import configure_logging
from workers.store import FINISHED, Store, UnknownTask

DEMO_WORKERS = 3
DEMO_DEADLINE = 50.0  # seconds: the tour gives up (exit 1) if the tasks are not done by then
REFRESH_INTERVAL = 0.2  # seconds between two looks at the tables
PLAIN_STATUS_INTERVAL = 1.0  # seconds between two status lines when stdout is not a terminal
STOP_TIMEOUT = 3.0  # seconds running tasks get when the tour is interrupted
POOL_SETTINGS: dict[str, Any] = {
    "poll_interval": 0.1,
    "heartbeat_interval": 0.5,
    "heartbeat_timeout": 10.0,
    "worker_timeout": 10.0,
    "graceful_timeout": STOP_TIMEOUT,
}
LOG_LEVEL = "info"
EVENTS_SHOWN = 5  # events kept under the live table
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130

REPORT_STEPS = ["fetch rows", "aggregate", "lay out", "render PDF"]

# (task type, payload, priority): higher priority runs first, so the crash comes early.
DEMO_TASKS: list[tuple[str, dict[str, Any], int]] = [
    ("demo.crash_once", {"seconds": 1.5}, 10),
    ("demo.flaky_upload", {"file": "invoice-42.pdf"}, 9),
    ("demo.render_report", {"steps": REPORT_STEPS, "seconds_per_step": 1.0}, 5),
    ("demo.render_report", {"steps": REPORT_STEPS, "seconds_per_step": 1.2}, 5),
    ("demo.render_report", {"steps": REPORT_STEPS[:3], "seconds_per_step": 1.0}, 5),
    *[("demo.add", {"a": n, "b": n * n, "pause": 0.4}, 0) for n in range(1, 7)],
]

_RESCUE_ERROR = re.compile(r"^worker (?P<worker>\d+) \(pid (?P<pid>\d+)\) (?P<reason>.*)$", re.S)


def run_demo(log_format: str | None = None) -> int:
    """Run the tour; return the exit code (0 done, 1 something went wrong, 130 interrupted).

    log_format (console or json; default: console on a terminal, JSON otherwise) is how
    the log lines quoted in the summary are shown. While the tour runs, the pool's whole
    log goes to a file in the temporary directory, so that the live view stays readable.
    """
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="taskherd-demo-"))
    out = sys.stdout
    color = _is_terminal(out) and "NO_COLOR" not in os.environ
    log_path = workdir / "pool.log"
    code = EXIT_FAILED
    try:
        with _Interrupts() as interrupts, _log_to_file(log_path):
            tour = Tour(f"sqlite:///{workdir / 'demo.db'}", out, color, interrupts, started)
            code = tour.run()
        quoted = _quote_log(log_path, log_format or ("console" if _is_terminal(out) else "json"))
        tour.print_summary(quoted)
    finally:
        if code == EXIT_FAILED:
            _print_log_tail(log_path)
        shutil.rmtree(workdir, ignore_errors=True)
    left = "left behind" if workdir.exists() else "removed"
    print(f"Cleaned up: the pool is stopped and the temporary directory is {left}.", file=out)
    if code == EXIT_OK:
        print(
            "Next: write your own task module with @task and run it: see README.md.",
            file=out,
        )
    out.flush()
    return code


# -- the tour ------------------------------------------------------------------------


@dataclass
class Observation:
    """One look at the tables: our tasks, the live workers, whether our pool still runs."""

    elapsed: float
    tasks: dict[int, dict[str, Any]]
    workers: dict[int, int]  # worker id -> pid, for active workers whose pid is recorded
    pool_running: bool


class Tour:
    """Enqueue the demo tasks, run the pool, watch it live, and account for every process."""

    def __init__(
        self,
        database_url: str,
        out: TextIO,
        color: bool,
        interrupts: _Interrupts,
        started: float,
    ) -> None:
        self.database_url = database_url
        self.out = out
        self.interrupts = interrupts
        self.started = started
        self.view: LiveView | PlainView = (
            LiveView(out, color) if _is_terminal(out) else PlainView(out)
        )
        self.story = Story(DEMO_WORKERS)
        self.final: dict[int, dict[str, Any]] = {}
        self.outcome = "interrupted"
        self.leftovers: list[int] = []
        self.elapsed = 0.0

    def run(self) -> int:
        """The whole tour; the pool is stopped and the database closed whatever happens."""
        import supervisor.demo_tasks  # noqa: F401 - the queue reads the tasks' defaults

        store = Store(self.database_url, create=True)
        try:
            store.init_schema()
            ids = self.enqueue(store)
            self.view.intro(len(ids))
            pool = Supervisor(
                self.database_url,
                workers=DEMO_WORKERS,
                imports=["supervisor.demo_tasks"],
                node="demo",
                log_format="json",
                log_level=LOG_LEVEL,
                **POOL_SETTINGS,
            )
            self.run_pool(pool, store, ids)
            self.final = {task_id: store.get_task(task_id) for task_id in ids}
        finally:
            store.dispose()
        self.elapsed = time.monotonic() - self.started
        return self.exit_code()

    def enqueue(self, store: Store) -> list[int]:
        queue = TaskQueue(self.database_url, store=store)
        return [
            queue.enqueue(task_type, payload, priority=priority)
            for task_type, payload, priority in DEMO_TASKS
        ]

    def run_pool(self, pool: Supervisor, store: Store, ids: list[int]) -> None:
        """Start the pool, watch until done, stop it, and check that no worker outlived it."""
        try:
            pool.start()
        except BaseException:
            pool.shutdown()  # boot failed part-way: kill whatever it started
            raise
        self.interrupts.on_repeat = lambda: pool.request_stop(quick=True)
        try:
            self.outcome = self.watch(store, ids, pool.id)
        finally:
            self.view.close()
            pool.stop(timeout=STOP_TIMEOUT)
        self.leftovers = _kill_leftover_workers(self.story.pids())

    def watch(self, store: Store, ids: list[int], pool_id: int) -> str:
        """Redraw until every task has finished; return how the watch ended."""
        deadline = self.started + DEMO_DEADLINE
        while True:
            observation = self.observe(store, ids, pool_id)
            self.view.show(observation, self.story.update(observation), self.story)
            if all(row["status"] in FINISHED for row in observation.tasks.values()):
                return "finished"
            if not observation.pool_running:
                return "the pool stopped on its own"
            if time.monotonic() > deadline:
                return f"not finished after {DEMO_DEADLINE:g} s"
            if self.interrupts.wait(REFRESH_INTERVAL):
                return "interrupted"

    def observe(self, store: Store, ids: list[int], pool_id: int) -> Observation:
        """Read the workers first, then the tasks: a worker seen gone has its rescue visible."""
        snapshot = store.snapshot()
        workers = {row["id"]: row["worker_pid"] for row in snapshot["workers"] if row["worker_pid"]}
        running = any(row["id"] == pool_id for row in snapshot["supervisors"])
        tasks: dict[int, dict[str, Any]] = {}
        for task_id in ids:
            known = self.final.get(task_id)
            if known is None or known["status"] not in FINISHED:
                with contextlib.suppress(UnknownTask):
                    self.final[task_id] = store.get_task(task_id)
            tasks[task_id] = self.final[task_id]
        return Observation(time.monotonic() - self.started, tasks, workers, running)

    def exit_code(self) -> int:
        if self.outcome == "interrupted":
            return EXIT_INTERRUPTED
        completed = all(row["status"] == "completed" for row in self.final.values())
        ok = self.outcome == "finished" and completed and self.story.rescues and not self.leftovers
        return EXIT_OK if ok else EXIT_FAILED

    def print_summary(self, quoted_log: list[str]) -> None:
        for line in summary_lines(self, quoted_log):
            print(line, file=self.out)
        self.out.flush()


# -- what happened, told from the tables ----------------------------------------------


@dataclass
class Rescue:
    task_id: int
    task_type: str
    worker_id: int
    pid: int | None
    reason: str
    attempt: int


@dataclass
class Story:
    """Turns successive observations into events: workers started and gone, retries, rescues."""

    desired: int
    started: dict[int, int] = field(default_factory=dict)  # worker id -> pid, in order seen
    gone: dict[int, str] = field(default_factory=dict)  # worker id -> why
    replaced_by: dict[int, int] = field(default_factory=dict)  # dead worker -> its replacement
    rescues: list[Rescue] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    _history_seen: dict[int, int] = field(default_factory=dict)
    _reported_done: set[int] = field(default_factory=set)

    def pids(self) -> dict[int, int]:
        return dict(self.started)

    def initial(self) -> list[int]:
        return list(self.started)[: self.desired]

    def update(self, seen: Observation) -> list[str]:
        """Record what changed since the last observation; return the new event messages."""
        messages: list[str] = []
        for task_id, row in seen.tasks.items():
            messages += self._history_events(task_id, row)
        for worker_id in self.started:
            if worker_id not in seen.workers and worker_id not in self.gone:
                self.gone[worker_id] = "exited"
                messages.append(f"worker {worker_id} (pid {self.started[worker_id]}) exited")
        for worker_id, pid in seen.workers.items():
            if worker_id not in self.started:
                messages.append(self._worker_started(worker_id, pid))
        for task_id, row in seen.tasks.items():
            retried = row["status"] in FINISHED and row["attempts"] > 1
            if retried and task_id not in self._reported_done:
                self._reported_done.add(task_id)
                messages.append(
                    f"task {task_id} {row['task_type']} {row['status']} on attempt "
                    f"{row['attempts']} (worker {row['worker_id']})"
                )
        self.events += [(seen.elapsed, message) for message in messages]
        return messages

    def _worker_started(self, worker_id: int, pid: int) -> str:
        self.started[worker_id] = pid
        if len(self.started) <= self.desired:
            return f"worker {worker_id} (pid {pid}) started"
        orphaned = [dead for dead in self.gone if dead not in self.replaced_by]
        if not orphaned:
            return f"worker {worker_id} (pid {pid}) started"
        self.replaced_by[orphaned[0]] = worker_id
        return f"worker {worker_id} (pid {pid}) started, replacing worker {orphaned[0]}"

    def _history_events(self, task_id: int, row: dict[str, Any]) -> list[str]:
        entries = error_history(row)
        new = entries[self._history_seen.get(task_id, 0) :]
        self._history_seen[task_id] = len(entries)
        messages = []
        for entry in new:
            attempt = int(entry.get("attempt") or 0)
            used = f"attempt {attempt} of {row['max_attempts']} used"
            then = "failed for good" if attempt >= row["max_attempts"] else "back to pending"
            rescue = parse_rescue(entry)
            if rescue is None:
                error = first_line(str(entry.get("error", "")))
                messages.append(
                    f"task {task_id} {row['task_type']} failed: {error} -> {then} ({used})"
                )
                continue
            worker_id, pid, reason = rescue
            self.rescues.append(Rescue(task_id, row["task_type"], worker_id, pid, reason, attempt))
            if worker_id not in self.gone:
                self.gone[worker_id] = reason
                messages.append(
                    f"worker {worker_id} (pid {pid}) died running task {task_id}: {reason}"
                )
            messages.append(
                f"task {task_id} {row['task_type']} rescued by the supervisor -> {then} ({used})"
            )
        return messages


def error_history(row: dict[str, Any]) -> list[dict[str, Any]]:
    raw = row.get("error_history")
    if not raw:
        return []
    value = json.loads(raw) if isinstance(raw, str) else raw
    return [entry for entry in value if isinstance(entry, dict)]


def parse_rescue(entry: dict[str, Any]) -> tuple[int, int | None, str] | None:
    """(worker id, pid, reason) when the entry records a rescue (the worker was gone), else None.

    A rescue's error names the worker ("worker 2 (pid 4242) killed by SIGKILL ...",
    "worker lost: no heartbeat ..."); a handler's error starts with the exception type.
    """
    error = str(entry.get("error", ""))
    if not error.startswith("worker "):
        return None
    match = _RESCUE_ERROR.match(error)
    worker_id = int(entry.get("worker_id") or 0)
    if match is None:
        return worker_id, None, first_line(error)
    return int(match["worker"]), int(match["pid"]), first_line(match["reason"])


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# -- the two views ---------------------------------------------------------------------

STATUS_COLORS = {
    "pending": "36",  # cyan
    "running": "33",  # yellow
    "completed": "32",  # green
    "failed": "31",  # red
    "cancelled": "35",  # magenta
}
BAR_WIDTH = 16


class LiveView:
    """A table redrawn in place (ANSI) on a terminal, with the latest events under it."""

    def __init__(self, out: TextIO, color: bool) -> None:
        self.out = out
        self.color = color
        self.drawn = 0

    def intro(self, count: int) -> None:
        self.out.write("\x1b[?25l")  # hide the cursor while redrawing
        self.out.write(_intro_text(count) + "\n\n")
        self.out.flush()

    def show(self, seen: Observation, _new: list[str], story: Story) -> None:
        width, height = shutil.get_terminal_size()
        lines = self.frame(seen, story, width - 1)[: max(1, height - 1)]
        parts = [f"\x1b[{self.drawn}A\r"] if self.drawn else []
        parts += [line + "\x1b[K\n" for line in lines]
        parts.append("\x1b[J")
        self.out.write("".join(parts))
        self.out.flush()
        self.drawn = len(lines)

    def close(self) -> None:
        self.out.write("\x1b[?25h\n")
        self.out.flush()

    def frame(self, seen: Observation, story: Story, width: int) -> list[str]:
        header = f"{'ID':>3}  {'TASK':<19} {'STATUS':<10} {'TRY':>4}  {'WORKER':<6}  DETAIL"
        lines = [_fit(f"{counts_line(seen.tasks)}   ({seen.elapsed:4.1f} s)", width), header]
        for task_id, row in seen.tasks.items():
            lines.append(self.row(task_id, row, width))
        lines += ["", _fit("workers  " + workers_line(seen, story), width), "events"]
        lines += [
            _fit(f"  {at:5.1f} s  {message}", width) for at, message in story.events[-EVENTS_SHOWN:]
        ]
        return lines

    def row(self, task_id: int, row: dict[str, Any], width: int) -> str:
        status = row["status"]
        worker = f"w{row['worker_id']}" if status in ("running", "completed") else ""
        tries = f"{row['attempts']}/{row['max_attempts']}"
        prefix = f"{task_id:>3}  {row['task_type']:<19} {status:<10} {tries:>4}  {worker:<6}  "
        detail = _fit(task_detail(row), max(0, width - len(prefix)))
        if self.color:
            painted = f"\x1b[{STATUS_COLORS.get(status, '0')}m{status:<10}\x1b[0m"
            prefix = prefix.replace(f"{status:<10}", painted, 1)
        return prefix + detail


class PlainView:
    """Plain lines for a pipe or a file: every event as it happens, a status line each second."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.next_status = 0.0

    def intro(self, count: int) -> None:
        print(_intro_text(count), file=self.out, flush=True)

    def show(self, seen: Observation, new: list[str], story: Story) -> None:
        for message in new:
            print(f"[{seen.elapsed:5.1f} s] {message}", file=self.out)
        if seen.elapsed >= self.next_status:
            self.next_status = seen.elapsed + PLAIN_STATUS_INTERVAL
            running = [
                f"#{task_id} {row['progress_percentage'] or 0:.0f}%"
                for task_id, row in seen.tasks.items()
                if row["status"] == "running"
            ]
            busy = f" | running {', '.join(running)}" if running else ""
            print(f"[{seen.elapsed:5.1f} s] {counts_line(seen.tasks)}{busy}", file=self.out)
        self.out.flush()

    def close(self) -> None:
        print(file=self.out, flush=True)


def _intro_text(count: int) -> str:
    return (
        f"taskherd demo: {count} tasks, a pool of {DEMO_WORKERS} worker processes, "
        "a temporary SQLite file.\n"
        "One task kills its own worker (SIGKILL) on its first try; one fails once and retries."
    )


def counts_line(tasks: dict[int, dict[str, Any]]) -> str:
    counts = {status: 0 for status in ("pending", "running", "completed", "failed", "cancelled")}
    for row in tasks.values():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return " · ".join(f"{status} {count}" for status, count in counts.items())


def workers_line(seen: Observation, story: Story) -> str:
    if not seen.workers:
        return "starting..."
    busy = {
        row["worker_id"]: task_id
        for task_id, row in seen.tasks.items()
        if row["status"] == "running"
    }
    replacing = {new: dead for dead, new in story.replaced_by.items()}
    parts = []
    for worker_id, pid in sorted(seen.workers.items()):
        doing = f"task {busy[worker_id]}" if worker_id in busy else "idle"
        note = f", replaced w{replacing[worker_id]}" if worker_id in replacing else ""
        parts.append(f"w{worker_id} (pid {pid}) {doing}{note}")
    dead = [f"w{worker_id} gone" for worker_id in story.gone if worker_id not in seen.workers]
    return " · ".join(parts + dead)


def task_detail(row: dict[str, Any]) -> str:
    """One line on what a task is doing or did: progress, its wait, its result or error."""
    status = row["status"]
    history = error_history(row)
    if status == "running":
        return f"{progress_bar(row['progress_percentage'], BAR_WIDTH)}  {row['current_step'] or ''}"
    if status == "pending" and history:
        rescue = parse_rescue(history[-1])
        if rescue is not None:
            return f"rescued: worker {rescue[0]} {rescue[2]}"
        return f"will retry: {first_line(str(history[-1].get('error', '')))}"
    if status == "pending":
        return "waiting for a worker"
    if status == "completed":
        after = ""
        if any(parse_rescue(entry) for entry in history):
            after = ", after a rescue"
        elif history:
            after = ", after a retry"
        result = row["result"] or "null"
        return f"done in {row['duration'] or 0:.1f} s{after} -> {result}"
    return first_line(str(row["last_error"] or status))


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _is_terminal(out: TextIO) -> bool:
    return out.isatty() and os.environ.get("TERM") != "dumb"


# -- the summary -----------------------------------------------------------------------


def summary_lines(tour: Tour, quoted_log: list[str]) -> list[str]:
    story, rows = tour.story, tour.final
    total = len(rows)
    finished = tour.outcome == "finished"
    lines = [f"Summary: {tour.outcome} in {tour.elapsed:.1f} s"]
    lines.append(f"  tasks     {counts_line(rows)}   ({total} tasks)")
    if finished and all(row["status"] == "completed" for row in rows.values()):
        lines.append(f"            all {total} tasks completed")
    for task_id, row in rows.items():
        history = error_history(row)
        if history and not any(parse_rescue(entry) for entry in history):
            error = first_line(str(history[0].get("error", "")))
            lines += [
                f"  retried   task {task_id} {row['task_type']}: attempt 1 failed ({error});",
                f"            {_ending(row)}",
            ]
    for rescue in story.rescues:
        row = rows.get(rescue.task_id, {})
        replacement = story.replaced_by.get(rescue.worker_id)
        lines += [
            f"  rescued   task {rescue.task_id} {rescue.task_type}: its worker {rescue.worker_id} "
            f"(pid {rescue.pid}) died on attempt {rescue.attempt},",
            f'            "{rescue.reason}";',
            "            the supervisor saw the exit at once and put the task back to pending;",
            f"            {_ending(row)}",
        ]
        if replacement is not None:
            lines.append(
                f"  replaced  worker {rescue.worker_id} by worker {replacement} "
                f"(pid {story.started[replacement]}), spawned at once to keep the pool at "
                f"{DEMO_WORKERS}"
            )
    extra = len(story.started) - len(story.initial())
    lines.append(
        f"  workers   {len(story.started)} started for a pool of {DEMO_WORKERS} "
        f"({extra} replacement{'s' if extra != 1 else ''}); all stopped"
        + (f", except pids {tour.leftovers} (killed now)" if tour.leftovers else "")
    )
    if quoted_log:
        lines.append("  the pool's own log told the same story (structured events):")
        lines += [f"    {line}" for line in quoted_log]
    return lines


def _ending(row: dict[str, Any]) -> str:
    if row.get("status") == "completed":
        return f"it completed on attempt {row['attempts']}, on worker {row['worker_id']}"
    return f"it is {row.get('status')} after {row.get('attempts')} attempt(s)"


# -- logs, interrupts, leftovers --------------------------------------------------------

QUOTED_EVENTS = ("worker.exited", "task.rescued", "worker.spawned")


@contextlib.contextmanager
def _log_to_file(path: Path) -> Iterator[None]:
    """The pool's log (this process and the workers, which inherit stderr) goes to path."""
    saved_config = structlog.get_config()
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    log_file = path.open("a", encoding="utf-8")
    try:
        configure_logging("json", LOG_LEVEL)
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(log_file))
        yield
    finally:
        structlog.configure(**saved_config)
        log_file.close()
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)


def _quote_log(path: Path, log_format: str) -> list[str]:
    """The log lines about the crash: the worker's exit, the rescue, the replacement's spawn."""
    events = _read_log(path)
    crash = next(
        (
            event
            for event in events
            if event.get("event") == "worker.exited" and event.get("exit_code") == -signal.SIGKILL
        ),
        None,
    )
    if crash is None:
        return []
    start = events.index(crash)
    picked = [crash]
    for event in events[start + 1 :]:
        name = event.get("event")
        if name == "task.rescued" and event.get("worker_id") == crash.get("worker_id"):
            picked.append(event)
        elif name == "worker.spawned":
            picked.append(event)
            break
    if log_format == "json":
        return [json.dumps(event) for event in picked]
    renderer = structlog.dev.ConsoleRenderer(colors=False)
    return [str(renderer(None, str(event.get("level", "info")), dict(event))) for event in picked]


def _read_log(path: Path) -> list[dict[str, Any]]:
    events = []
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
    return events


def _print_log_tail(path: Path, lines: int = 20) -> None:
    with contextlib.suppress(OSError):
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        if tail:
            print("The last lines of the pool's log:", file=sys.stderr)
            for line in tail:
                print(f"  {line}", file=sys.stderr)


def _kill_leftover_workers(started: dict[int, int]) -> list[int]:
    """Worker processes of ours still alive after the pool stopped (a bug): kill, and name them."""
    ours = {child.pid: child for child in psutil.Process().children(recursive=True)}
    leftovers = [pid for pid in started.values() if pid in ours]
    for pid in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            ours[pid].kill()
            ours[pid].wait(5)
    return leftovers


class _Interrupts:
    """SIGINT and SIGTERM end the watch (the handler only records); a second one stops hard."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.on_repeat: Callable[[], None] | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _record(self, _signum: int, _frame: FrameType | None) -> None:
        if self.event.is_set() and self.on_repeat is not None:
            self.on_repeat()  # only sets a flag and wakes the pool's loop
        self.event.set()

    def wait(self, timeout: float) -> bool:
        return self.event.wait(timeout)
