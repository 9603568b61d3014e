"""The project's own unit, run by a real systemd: a Debian container booted with systemd-nspawn.

The test deploys taskherd as the README's deployment guide says (a system user, a venv in
/opt/taskherd installed from wheels, the example environment file, the unit), starts the
service, and checks what an operator would: active with its STATUS line, a SIGKILLed worker
replaced, `taskherd health`, handlers keeping the network and their stacks under the
hardening, and a stop that drains cleanly, extending systemd's stop timeout while it does.

It needs root, systemd-nspawn and debootstrap; without them it skips, except under CI=true
where it fails. The root file system is cached (tests/system/container.py); `.ci/run`
installs the tools and runs it as part of the README's test command.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until
from tests.system.container import (
    Container,
    build_wheels,
    cached_root,
    dependency_wheels,
    require_container_tools,
)

REPO = Path(__file__).resolve().parents[2]
APP = Path(__file__).with_name("app")
SERVICE = "taskherd.service"
AS_TASKHERD = (  # the deployment guide's way to run the CLI as the service does
    "runuser -u taskherd -- sh -c "
    "'set -a; . /etc/taskherd/taskherd.env; exec /opt/taskherd/bin/taskherd \"$@\"' taskherd"
)

# The deployment guide's steps (README, "Deployment guide"), with the wheels this run built.
DEPLOY = """
useradd --system --home-dir /var/lib/taskherd --shell /usr/sbin/nologin taskherd
python3 -m venv /opt/taskherd
/opt/taskherd/bin/pip install -q --no-index --find-links /mnt/wheels --find-links /mnt/deps \
    taskherd herdapp
install -D -m 0640 -g taskherd /mnt/src/systemd/taskherd.env /etc/taskherd/taskherd.env
sed -i -e 's/^TASKHERD_IMPORTS=.*/TASKHERD_IMPORTS=herdapp.tasks/' \
    -e 's/^TASKHERD_WORKERS=.*/TASKHERD_WORKERS=2/' /etc/taskherd/taskherd.env
install -m 0644 /mnt/src/systemd/taskherd.service /etc/systemd/system/taskherd.service
systemctl daemon-reload
"""


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Container]:
    require_container_tools()
    started = time.monotonic()
    root = cached_root()
    wheels = tmp_path / "wheels"
    build_wheels([REPO, APP], wheels)
    deps = dependency_wheels(sorted(wheels.glob("*.whl")))
    prepared = time.monotonic()
    binds = {REPO: "/mnt/src", wheels: "/mnt/wheels", deps: "/mnt/deps"}
    with Container(root, binds=binds, log=tmp_path / "nspawn.log") as container:
        booted = time.monotonic()
        print(  # shown with -s, and in .ci/run's output
            f"\nsystem test: root file system and wheels {prepared - started:.1f} s, "
            f"boot {booted - prepared:.1f} s"
        )
        yield container


def show(box: Container, *properties: str) -> dict[str, str]:
    out = box.run("systemctl", "show", SERVICE, *(f"--property={p}" for p in properties)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(box: Container) -> tuple[list[dict[str, Any]], list[str]]:
    """The unit's journal: taskherd's JSON lines, and systemd's own lines about it."""
    out = box.run("journalctl", "-u", SERVICE, "-o", "cat", "--no-pager").stdout
    events, others = [], []
    for line in out.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            others.append(line)
    return events, others


def taskherd(box: Container, *argv: str, check: bool = True) -> Any:
    return box.run("sh", "-c", f"{AS_TASKHERD} {' '.join(argv)}", check=check)


def task_row(box: Container, task_id: int) -> dict[str, Any]:
    return dict(json.loads(taskherd(box, "show", str(task_id), "--json").stdout))


def wait_for_status(box: Container, task_id: int, status: str, timeout: float) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        row = task_row(box, task_id)
        return row if row["status"] == status else None

    return wait_until(reached, timeout, interval=0.2, message=f"task {task_id} never {status}")


def workers(box: Container) -> set[int]:
    main = show(box, "MainPID")["MainPID"]
    children = box.run("cat", f"/proc/{main}/task/{main}/children").stdout
    return {int(pid) for pid in children.split()}


@pytest.mark.timeout(900)
def test_unit_runs_drains_and_survives_a_killed_worker_under_real_systemd(
    box: Container,
) -> None:
    started = time.monotonic()
    box.sh(DEPLOY, timeout=300)
    verify = box.run("systemd-analyze", "verify", "/etc/systemd/system/taskherd.service")
    assert verify.stdout + verify.stderr == "", "verify is not clean with the real ExecStart"

    box.run("systemctl", "enable", "--now", SERVICE)  # Type=notify: returns after READY=1
    box.run("systemd-analyze", "security", "--threshold=15", SERVICE)  # the loaded unit: <= 1.5
    state = show(box, "ActiveState", "SubState", "StatusText", "WatchdogTimestampMonotonic")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert re.fullmatch(r"2/2 workers, \d+ running, \d+ pending", state["StatusText"]), state
    wait_until(
        lambda: int(show(box, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]) > 0,
        15,
        interval=0.2,
        message="systemd never received WATCHDOG=1",
    )
    database = box.run("stat", "-c", "%U %a", "/var/lib/taskherd/taskherd.db").stdout.split()
    assert database == ["taskherd", "600"]

    # handlers keep the network (IPv4, IPv6, Unix) and ctypes callbacks under the hardening
    probe = int(taskherd(box, "enqueue", "probe").stdout)
    result = wait_for_status(box, probe, "completed", 30)["result"]
    assert result["AF_INET"] == result["AF_INET6"] == result["AF_UNIX"] == "ping", result
    assert result["ctypes_callback"] == [1, 2, 3]
    assert result["uid"] != 0

    # a worker SIGKILLed is replaced at once
    before = workers(box)
    assert len(before) == 2
    victim = min(before)
    box.run("sh", "-c", f"kill -KILL {victim}")  # minbase has no /bin/kill: the shell's

    def replaced() -> set[int] | None:
        now = workers(box)
        return now if len(now) == 2 and victim not in now else None

    after = wait_until(
        replaced,
        10,
        interval=0.1,
        message="the killed worker was not replaced",
    )
    assert show(box, "ActiveState")["ActiveState"] == "active"
    wait_until(lambda: show(box, "StatusText")["StatusText"].startswith("2/2 workers"), 10)
    events, _ = journal(box)
    exits = [e for e in events if e.get("event") == "worker.exited"]
    assert any(e["pid"] == victim and e["exit_code"] == -9 for e in exits), exits
    assert set(after) - before

    health = taskherd(box, "health", "--json", check=False)
    assert health.returncode == 0, health.stdout + health.stderr

    box.run("systemctl", "reload", SERVICE)  # ExecReload=: SIGHUP to the supervisor
    wait_until(
        lambda: "supervisor.reloaded" in [e.get("event") for e in journal(box)[0]],
        10,
        interval=0.2,
        message="no supervisor.reloaded after systemctl reload",
    )
    assert show(box, "ActiveState")["ActiveState"] == "active"

    # a wedged supervisor (SIGSTOPped: it cannot even act on the watchdog's SIGABRT) stops
    # pinging the watchdog; systemd kills it and Restart=on-failure brings the pool back
    box.sh(
        "cd /etc/systemd/system && mkdir -p taskherd.service.d\n"
        "printf '[Service]\\nWatchdogSec=2s\\nTimeoutAbortSec=2s\\nRestartSec=1s\\n'"
        " > taskherd.service.d/watchdog.conf\n"
        "systemctl daemon-reload\nsystemctl restart taskherd"
    )
    wedged = show(box, "MainPID")["MainPID"]
    box.run("sh", "-c", f"kill -STOP {wedged}")

    def restarted() -> bool:
        state = show(box, "NRestarts", "SubState", "MainPID")
        return (
            state["NRestarts"] == "1"
            and state["SubState"] == "running"
            and (state["MainPID"] not in ("0", wedged))
        )

    wait_until(restarted, 30, interval=0.2, message="the wedged supervisor was not restarted")
    _, systemd_lines = journal(box)
    assert any("Watchdog timeout" in line for line in systemd_lines), systemd_lines[-10:]
    box.sh("rm /etc/systemd/system/taskherd.service.d/watchdog.conf\nsystemctl daemon-reload")

    # a task past its timeout: the supervisor reads its stack (SIGUSR1 into a memfd), kills it
    hung = int(taskherd(box, "enqueue", "hang", "--timeout", "1", "--max-retries", "0").stdout)
    history = "\n".join(
        e["error"] for e in wait_for_status(box, hung, "failed", 30)["error_history"]
    )
    assert "timed out after 1 s" in history
    assert "stack of every thread at the kill" in history and "herdapp" in history, history

    # stop: the running task finishes, systemd waits past TimeoutStopSec=4s (EXTEND_TIMEOUT)
    box.sh(
        "cd /etc/systemd/system && mkdir -p taskherd.service.d\n"
        "printf '[Service]\\nTimeoutStopSec=4s\\n' > taskherd.service.d/stop.conf\n"
        "systemctl daemon-reload"
    )
    long_task = int(taskherd(box, "enqueue", "sleep", "--payload", "'{\"seconds\": 7}'").stdout)
    wait_for_status(box, long_task, "running", 30)
    stop_began = time.monotonic()
    box.run("systemctl", "stop", SERVICE)
    stop_took = time.monotonic() - stop_began
    state = show(box, "ActiveState", "Result")
    assert state == {"ActiveState": "inactive", "Result": "success"}, state
    assert stop_took > 4, f"the stop took {stop_took:.1f} s: no task was drained"
    assert task_row(box, long_task)["status"] == "completed"

    events, systemd_lines = journal(box)
    names = [e.get("event") for e in events]
    assert "supervisor.stopping" in names and names[-1] == "supervisor.stopped", names[-8:]
    drained = names[len(names) - 1 - names[::-1].index("supervisor.stopping") :]  # the last stop
    assert drained.count("Background worker stopped") == 2, drained
    completed = [e for e in events if e.get("event") == "task.completed"]
    assert any(e.get("task_id") == long_task for e in completed)
    assert "worker.killed" not in drained
    last_stop = max(i for i, line in enumerate(systemd_lines) if line.startswith("Stopping "))
    stop_lines = systemd_lines[last_stop:]
    assert not [line for line in stop_lines if "timed out" in line or "SIGKILL" in line], stop_lines
    assert any("Deactivated successfully" in line for line in stop_lines), stop_lines
    print(
        f"system test: deploy-to-stopped {time.monotonic() - started:.1f} s "
        f"(drain {stop_took:.1f} s)"
    )
