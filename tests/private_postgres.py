"""A private PostgreSQL server that a test may stop and start at will.

The shared server that TASKHERD_TEST_POSTGRES_URL names is never touched: this one lives
in a temporary directory, listens on a free port of 127.0.0.1 (and a Unix socket in its
own directory), trusts local connections and skips fsync (not synchronous commits). Run as
root, the server runs as the `postgres` user (initdb refuses root); run as anyone else, as
that user.

`PrivatePostgres(addresses=[...], clients=[...])` also listens on further local addresses
(e.g. the host's end of a veth pair) and trusts clients from the given networks.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa

SUPERUSER = "postgres"
START_TIMEOUT = 30  # seconds pg_ctl waits for the server to accept connections


class Unavailable(Exception):
    """This machine cannot run a private PostgreSQL server (the reason is the message)."""


def _bindir() -> Path:
    """The directory holding initdb and pg_ctl (the newest installed major version)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parts[-3]),
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise Unavailable("no initdb found (install the PostgreSQL server binaries)")


def _run_as() -> tuple[list[str], int | None, int | None]:
    """The command prefix, uid and gid that run the server: `postgres` when we are root."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        account = pwd.getpwnam(SUPERUSER)
    except KeyError as error:
        raise Unavailable("running as root and there is no `postgres` user") from error
    runuser = shutil.which("runuser")
    if runuser is None:
        raise Unavailable("running as root and there is no runuser to drop to `postgres`")
    return [runuser, "-u", SUPERUSER, "--"], account.pw_uid, account.pw_gid


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivatePostgres:
    """initdb + pg_ctl on a temporary directory; `stop()` and `start()` make an outage."""

    def __init__(self, *, addresses: Sequence[str] = (), clients: Sequence[str] = ()) -> None:
        self.addresses = ("127.0.0.1", *addresses)  # where the server listens
        self.bindir = _bindir()
        self._prefix, uid, gid = _run_as()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="taskherd-pg-"))
        self.data = self.dir / "data"
        self.logfile = self.dir / "server.log"
        if uid is not None and gid is not None:
            os.chown(self.dir, uid, gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "--no-instructions",
            "-E",
            "UTF8",
        )
        with (self.data / "pg_hba.conf").open("a") as hba:
            for network in clients:
                hba.write(f"host all all {network} trust\n")
        self.admin_url = sa.make_url(
            f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/postgres"
        )

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._prefix, str(self.bindir / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}")

    def start(self) -> None:
        """Start the server and return once it accepts connections."""
        options = " ".join(
            (
                f"-p {self.port}",
                f"-c listen_addresses={','.join(self.addresses)}",
                f"-c unix_socket_directories={self.dir}",
                # fsync off is safe here: a stop (even `immediate`) is no machine crash, and
                # the OS keeps what was written. synchronous_commit stays on: an immediate
                # stop would lose commits that were acknowledged but not yet written.
                "-c fsync=off",
                "-c full_page_writes=off",
                "-c max_connections=100",
            )
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-o",
            options,
            "-w",
            "-t",
            str(START_TIMEOUT),
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` ends every session, `immediate` is a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"taskherd_outage_{uuid.uuid4().hex[:10]}"
        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def destroy(self) -> None:
        """Stop the server if it runs (crash stop: nothing here is worth keeping), remove it."""
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
