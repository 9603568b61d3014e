"""The unit files as systemd-analyze judges them: exposure score and verify, on the real files.

`systemd-analyze verify` insists that ExecStart's binary exists, and /opt/taskherd is not
installed on a build host. So the files are verified, unchanged, inside a throwaway root
(--root): this host's own system units (for sysinit.target and friends), the two unit
files copied byte for byte, and an executable at /opt/taskherd/bin/taskherd. The booted
container test verifies the installed unit once more, against the real binary.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.container import cannot_run

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNITS = ("taskherd.service", "taskherd@.service")
MAX_EXPOSURE = 1.5
HOST_UNITS = Path("/usr/lib/systemd/system")


def analyze(*argv: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        cannot_run("systemd-analyze not found: apt-get install systemd")
    return subprocess.run(
        ["systemd-analyze", *argv], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("unit", UNITS)
def test_exposure_score_is_at_most_one_and_a_half(unit: str) -> None:
    done = analyze("security", "--offline=true", str(SYSTEMD_DIR / unit))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found[1]) <= MAX_EXPOSURE, done.stdout


def test_handlers_keep_the_network_and_workers_their_signals() -> None:
    done = analyze("security", "--offline=true", str(SYSTEMD_DIR / "taskherd.service"))
    failed = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("✗")}
    assert "PrivateNetwork=" in failed  # the network stays
    assert "RestrictAddressFamilies=~AF_(INET|INET6)" in failed
    text = (SYSTEMD_DIR / "taskherd.service").read_text()
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n" in text
    assert "SystemCallFilter=@system-service\n" in text  # kill, memfd_create, pidfd_open


@pytest.mark.parametrize("unit", ["taskherd.service", "taskherd@pool.service"])
def test_verify_is_clean(unit: str, tmp_path: Path) -> None:
    if not HOST_UNITS.is_dir():
        cannot_run(f"{HOST_UNITS} not found: verify needs the host's system units")
    root = _root_with(tmp_path, *(SYSTEMD_DIR / name for name in UNITS))
    done = analyze("verify", f"--root={root}", unit)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
    # and the check has teeth: without the binary, verify fails
    (root / "opt/taskherd/bin/taskherd").unlink()
    assert analyze("verify", f"--root={root}", unit).returncode != 0


def test_template_differs_from_the_unit_only_by_its_instance() -> None:
    single = (SYSTEMD_DIR / "taskherd.service").read_text().splitlines()
    template = (SYSTEMD_DIR / "taskherd@.service").read_text().splitlines()

    def settings(lines: list[str]) -> list[str]:
        return [line for line in lines if line and not line.startswith("#")]

    extra = [line for line in settings(template) if line not in settings(single)]
    missing = [line for line in settings(single) if line not in settings(template)]
    assert extra == ["Description=taskherd task pool %i", "EnvironmentFile=/etc/taskherd/%i.env"]
    assert missing == ["Description=taskherd task pool"]


def _root_with(base: Path, *units: Path) -> Path:
    """A throwaway root: the host's system units, these units, and their commands' paths."""
    root = base / "root"
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in units:
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    for command in ("opt/taskherd/bin/taskherd", "bin/sh"):  # ExecStart=, ExecReload=
        binary = root / command
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    return root
