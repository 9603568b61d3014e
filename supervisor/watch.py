"""`taskherd status --watch`: the pool, redrawn every few seconds until Ctrl-C.

On a terminal the screen is cleared and redrawn in place; otherwise (a pipe, a file, a log
collector) each frame is printed after the last as plain text, with no escape codes.
RSS and CPU come from psutil for the worker processes on this machine; workers on other
hosts show their last recorded RSS and no CPU.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import psutil

from supervisor.process import is_same_process
from supervisor.text import age, progress_bar, table_lines
from workers.store import FINISHED, Store, mask_url

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
RECENT_FAILURES = 5
ERROR_WIDTH = 70


@dataclass
class Frame:
    """Everything one screen shows, read in one go."""

    snapshot: dict[str, Any]
    running: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    cpu: dict[int, float] = field(default_factory=dict)  # worker id -> CPU % (this host)
    rss: dict[int, float] = field(default_factory=dict)  # worker id -> RSS MiB (this host)


class ProcessMeter:
    """CPU percentages need two looks at a process: keep the psutil handles between frames."""

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}

    def measure(self, workers: list[dict[str, Any]]) -> tuple[dict[int, float], dict[int, float]]:
        cpu: dict[int, float] = {}
        rss: dict[int, float] = {}
        seen = set()
        for worker in workers:
            worker_id, pid = worker["id"], worker["worker_pid"]
            if not pid or not is_same_process(pid, worker["pid_start_time"]):
                continue  # on another host, or gone
            seen.add(worker_id)
            try:
                process = self._processes.get(worker_id) or psutil.Process(pid)
                self._processes[worker_id] = process
                cpu[worker_id] = process.cpu_percent(interval=None)
                rss[worker_id] = process.memory_info().rss / 2**20
            except psutil.Error:
                continue
        for gone in set(self._processes) - seen:
            del self._processes[gone]
        return cpu, rss


def read_frame(store: Store, meter: ProcessMeter) -> Frame:
    snapshot = store.snapshot()
    running, failed = store.activity(RECENT_FAILURES)
    cpu, rss = meter.measure(snapshot["workers"])
    return Frame(snapshot, running, failed, cpu, rss)


def render(frame: Frame, database: str) -> list[str]:
    """The lines of one frame."""
    snapshot = frame.snapshot
    now: datetime = snapshot["now"]
    lines = [f"taskherd  {database}  {now:%Y-%m-%d %H:%M:%S} UTC  on {socket.gethostname()}", ""]
    sups = snapshot["supervisors"]
    if sups:
        lines += table_lines(
            ["SUPERVISOR", "NODE", "PID", "STATUS", "WORKERS", "HEARTBEAT", "VERSION"],
            [
                [s["id"], s["hostname"], s["pid"], s["status"], s["desired_workers"],
                 age(s["last_heartbeat"], now), s["version"]]
                for s in sups
            ],
        )  # fmt: skip
        for sup in sups:
            if sup["crash_streak"] >= 2:
                reason = (sup["crash_reason"] or "unknown").splitlines()[0]
                lines.append(f"CRASH LOOP on {sup['hostname']}: {sup['crash_streak']} - {reason}")
    else:
        lines.append("no supervisor is running")
    lines.append("")
    tasks = {row["id"]: row for row in frame.running}
    workers = snapshot["workers"]
    if workers:
        rows = []
        for w in workers:
            task = tasks.get(w["current_task_id"]) if w["current_task_id"] else None
            rss = frame.rss.get(w["id"], w["rss_mb"])
            cpu = frame.cpu.get(w["id"])
            rows.append(
                [w["id"], w["hostname"], w["worker_pid"], age(w["last_heartbeat"], now),
                 None if rss is None else f"{rss:.0f}M", None if cpu is None else f"{cpu:.0f}%",
                 w["processed_tasks_count"], w["failed_tasks_count"], _doing(task)]
            )  # fmt: skip
        lines += table_lines(
            ["WORKER", "NODE", "PID", "HEARTBEAT", "RSS", "CPU", "DONE", "FAILED", "TASK"], rows
        )
    else:
        lines.append("no active workers")
    lines.append("")
    queues = snapshot["queues"]
    totals = snapshot["totals"]
    if queues:
        lines += table_lines(
            ["QUEUE", "PENDING", "RUNNING"],
            [[name, depth["pending"], depth["running"]] for name, depth in sorted(queues.items())],
        )
    else:
        lines.append("no pending or running tasks")
    lines.append("finished: " + ", ".join(f"{totals.get(s, 0)} {s}" for s in FINISHED))
    lines.append("")
    if frame.failed:
        lines.append("recent failures:")
        for row in frame.failed:
            error = (row["last_error"] or "").strip().splitlines()
            first = error[0] if error else ""
            first = first if len(first) <= ERROR_WIDTH else first[: ERROR_WIDTH - 3] + "..."
            lines.append(
                f"  {row['id']}  {row['task_type']}  {age(row['completed_at'], now)}  {first}"
            )
    else:
        lines.append("no recent failures")
    return lines


def _doing(task: dict[str, Any] | None) -> str:
    if task is None:
        return "idle"
    step = task["current_step"] or task["progress_message"] or ""
    return (
        f"{task['id']} {task['task_type']} {progress_bar(task['progress_percentage'], 10)} {step}"
    )


def watch(store: Store, interval: float, out: TextIO = sys.stdout) -> None:
    """Redraw until SIGINT or SIGTERM (a clean stop, exit code 0)."""
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda _signum, _frame: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    terminal = out.isatty()
    meter = ProcessMeter()
    database = mask_url(store.url)
    try:
        if terminal:
            out.write(HIDE_CURSOR)
        while not stop.is_set():
            lines = render(read_frame(store, meter), database)
            if terminal:
                out.write(CLEAR + "\n".join(lines) + "\n\n(Ctrl-C to quit)")
            else:
                out.write("\n".join(lines) + "\n\n")
            out.flush()
            stop.wait(interval)
    finally:
        if terminal:
            out.write(SHOW_CURSOR + "\n")
            out.flush()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
