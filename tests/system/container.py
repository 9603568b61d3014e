"""A Debian bookworm container booted with systemd as PID 1, for the tests in tests/system.

The root file system is built once with debootstrap and cached under
/var/cache/taskherd-tests/ (TASKHERD_TEST_CACHE), keyed by a hash of what goes into it.
Each run boots it with `systemd-nspawn --volatile=overlay`: every write lands in a tmpfs
that vanishes with the container, so the cache stays as debootstrap left it, and the
project comes in fresh (this run's wheels, bound read-only).

    require_container_tools()                 # skip (or fail under CI=true) if impossible
    root = cached_root()                      # debootstrap on the first run
    with Container(root, binds={...}, log=...) as box:
        box.run("systemctl", "is-system-running")

Cleanup never depends on the container's cooperation: closing SIGKILLs the container's
init, which takes every process of its PID namespace with it, then reaps systemd-nspawn.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import psutil
import pytest

from tests.helpers import wait_until

CACHE_DIR = Path(os.environ.get("TASKHERD_TEST_CACHE", "/var/cache/taskherd-tests"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv")
CONTAINER_PYTHON = "3.11"  # bookworm's python3: the wheels are fetched for it
TOOLS = ("systemd-nspawn", "debootstrap", "nsenter")
BOOT_TIMEOUT = 90.0  # seconds until systemd in the container reports running
DEBOOTSTRAP_TIMEOUT = 900.0
SOURCE_NOISE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "*.db*"
)
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cannot_run(reason: str) -> None:
    """Skip with the reason; under CI (CI=true) fail instead: CI must run this test."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"this system test must run in CI, and cannot: {reason}", pytrace=False)
    pytest.skip(reason)


def require_container_tools() -> None:
    """Root and the tools to build and boot a container (.ci/run installs them)."""
    if os.geteuid() != 0:
        cannot_run("needs root (debootstrap and systemd-nspawn)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        cannot_run(f"{', '.join(missing)} not found: apt-get install systemd-container debootstrap")


def debootstrap_command(target: Path) -> list[str]:
    return [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(target),
        MIRROR,
    ]


def cache_key() -> str:
    """Changes whenever what goes into the root file system changes."""
    recipe = " ".join(debootstrap_command(Path("ROOT")))
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def cached_root() -> Path:
    """The cached root file system, built by debootstrap if this recipe has none yet."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    root = CACHE_DIR / f"rootfs-{cache_key()}"
    with _locked(CACHE_DIR / "build.lock"):
        if (root / "usr/bin/python3").exists():
            return root
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        log = CACHE_DIR / "debootstrap.log"
        with log.open("w") as out:
            done = subprocess.run(
                debootstrap_command(partial),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=DEBOOTSTRAP_TIMEOUT,
                check=False,
            )
        if done.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            tail = log.read_text().strip().splitlines()[-3:]
            cannot_run(f"debootstrap failed ({done.returncode}), see {log}: {' | '.join(tail)}")
        partial.rename(root)
        for stale in CACHE_DIR.glob("rootfs-*"):  # older recipes
            if stale != root:
                shutil.rmtree(stale, ignore_errors=True)
    return root


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time (concurrent test runs share the cache)."""
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_wheels(sources: Sequence[Path], out: Path) -> None:
    """Wheels of these source trees (the project, an application), built fresh into `out`.

    Each tree is copied first: an in-tree build would reuse a stale build/ directory and
    leave one behind.
    """
    out.mkdir(parents=True, exist_ok=True)
    copies = []
    for source in sources:
        copy = out.parent / f"source-{source.name}"
        shutil.copytree(source, copy, ignore=SOURCE_NOISE)
        copies.append(str(copy))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _pip([*pip, "wheel", "--no-deps", "--wheel-dir", str(out), *copies])


def dependency_wheels(requirements: Sequence[Path]) -> Path:
    """The wheels these wheels depend on, for the container's Python; cached between runs.

    Offline first (everything already in the cache), else from the package index.
    """
    cache = CACHE_DIR / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "download"]
    base += ["--dest", str(cache), "--only-binary=:all:", "--python-version", CONTAINER_PYTHON]
    wanted = [str(path) for path in requirements]
    with _locked(CACHE_DIR / "wheels.lock"):
        offline = subprocess.run(
            [*base, "--no-index", "--find-links", str(cache), *wanted],
            capture_output=True,
            text=True,
            check=False,
        )
        if offline.returncode != 0:
            _pip([*base, *wanted])
        for path in requirements:  # pip copies the requirements themselves in: keep them out
            (cache / path.name).unlink(missing_ok=True)
    return cache


def _pip(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")


class Container:
    """One booted container; `run` executes a command inside it through nsenter."""

    def __init__(self, root: Path, *, binds: Mapping[Path, str], log: Path) -> None:
        self.root = root
        self.binds = dict(binds)
        self.log_path = log
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def boot(self) -> None:
        """Start systemd-nspawn and wait until systemd inside reports `running`."""
        argv = ["systemd-nspawn", "--register=no", "--keep-unit", "--volatile=overlay"]
        argv += [f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()]
        argv += ["--quiet", "-D", str(self.root), "-b"]
        with self.log_path.open("wb") as log:
            self.nspawn = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.init_pid = wait_until(self._find_init, 30, message=self._boot_failure("no init"))
        wait_until(
            lambda: self.state() in ("running", "degraded"),
            BOOT_TIMEOUT,
            interval=0.2,
            message=self._boot_failure("systemd never reached running"),
        )

    def _find_init(self) -> int | None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            cannot_run(self._boot_failure("systemd-nspawn exited"))
            return None
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.nspawn.pid).children():
                if child.name() == "systemd":
                    return int(child.pid)
        return None

    def _boot_failure(self, what: str) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"{what}; systemd-nspawn said: {' | '.join(text.strip().splitlines()[-5:])}"

    def state(self) -> str:
        done = self.run("systemctl", "is-system-running", check=False, timeout=10)
        return done.stdout.strip()

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (its namespaces, root and a clean environment)."""
        command = ["nsenter", "-t", str(self.init_pid), "-a", "-r", "-w", "--"]
        command += ["env", "-i", f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", *argv]
        done = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"in the container, {' '.join(argv)} exited {done.returncode}:\n"
                f"{done.stdout}\n{done.stderr}"
            )
        return done

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        """Kill the container's init (its whole PID namespace goes), then reap systemd-nspawn."""
        if self.init_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
        if self.nspawn is not None:
            try:
                self.nspawn.wait(15)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(15)
