"""Measure a node's loss -> its tasks running on another node, next to the heartbeat timeout.

    python -m tests.acceptance.measure_node_loss [--mode kill|partition] [--runs N]
        [--heartbeat-timeout S] [--heartbeat-interval S]

Two supervisors (nodes alpha and beta, 2 workers each) share a private PostgreSQL server
(never the shared one). Each run uses a fresh database: alpha runs two long tasks, beta is
up and idle, then alpha is lost, either by SIGKILL of its whole process group (`kill`, the
default: supervisor and workers die at once) or by cutting its network namespace off the
host (`partition`: root and `ip netns` needed; its processes live on, unheard). The figure
is the time from the loss until both tasks run on beta's workers, read from the table.

Also printed, by the database clock: how long alpha's workers had been silent when beta
declared them lost (at least the heartbeat timeout, by construction), and how long beta's
workers then took to claim the rescued tasks. The loss lands at a random moment of alpha's
heartbeat cycle, so the figure is expected between timeout - interval and timeout + interval
plus the claim.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from tests.acceptance.pool import Pool
from tests.helpers import wait_until
from tests.netns import Network, Node
from tests.private_postgres import PrivatePostgres
from workers.store import Store, task_workers, tasks

WORKERS = 2
LONG = 600  # seconds the lost node's tasks would run: they never end on their own


@dataclass(frozen=True)
class Figures:
    moved: float  # seconds from the loss to both tasks running on beta (the host's clock)
    silent: float  # seconds alpha's workers had been silent when declared lost (database clock)
    claimed: float  # seconds from that declaration to beta's last claim (database clock)


class Setup:
    """The private server and, in partition mode, the namespaces; start(name) runs a pool."""

    def __init__(self, mode: str, options: dict[str, str], workdir: Path) -> None:
        self.mode = mode
        self.options = options
        self.workdir = workdir
        self.network: Network | None = None
        self.nodes: dict[str, Node] = {}
        self.server: PrivatePostgres | None = None

    def open(self) -> None:
        clients: list[str] = []
        if self.mode == "partition":
            self.network = Network()
            self.nodes = {name: self.network.add(name) for name in ("alpha", "beta")}
            clients = [str(self.network.subnet)]
        addresses = [node.host_address for node in self.nodes.values()]
        self.server = PrivatePostgres(addresses=addresses, clients=clients)
        self.server.start()

    def database(self) -> str:
        assert self.server is not None
        url = self.server.create_database()
        store = Store(url)
        store.init_schema()
        store.dispose()
        return url

    def start(self, url: str, name: str) -> Pool:
        node = self.nodes.get(name)
        if node is not None:
            url = sa.make_url(url).set(host=node.host_address).render_as_string(False)
        return Pool(
            url,
            self.workdir,
            workers=WORKERS,
            node=name,
            options=self.options,
            prefix=node.prefix if node is not None else (),
        )

    def lose(self, pool: Pool) -> None:
        if self.network is None:
            os.killpg(pool.pid, signal.SIGKILL)
        else:
            self.network.cut(self.nodes["alpha"])

    def restore(self) -> None:
        if self.network is not None:
            self.network.heal(self.nodes["alpha"])

    def close(self) -> None:
        if self.server is not None:
            self.server.destroy()
        if self.network is not None:
            self.network.close()


@contextmanager
def setup(mode: str, options: dict[str, str]) -> Iterator[Setup]:
    with tempfile.TemporaryDirectory() as workdir:
        made = Setup(mode, options, Path(workdir))
        try:
            made.open()
            yield made
        finally:
            made.close()


def booted(pool: Pool) -> bool:
    started = [e for e in pool.events() if e.get("event") == "Background worker started"]
    return len(started) >= WORKERS


def measure_once(made: Setup) -> Figures:
    url = made.database()
    pools: list[Pool] = []
    try:
        alpha = made.start(url, "alpha")
        pools.append(alpha)
        wait_until(lambda: booted(alpha), 60, message="alpha never booted")
        held = [alpha.queue.enqueue("sleep", {"seconds": LONG}) for _ in range(WORKERS)]
        lost_workers = [alpha.running_task(task_id, 30)["worker_id"] for task_id in held]
        beta = made.start(url, "beta")
        pools.append(beta)
        wait_until(lambda: booted(beta), 60, message="beta never booted")

        made.lose(alpha)
        lost_at = time.monotonic()

        def moved() -> bool:
            busy = beta.active_workers()
            return all(beta.task(task_id)["worker_id"] in busy for task_id in held)

        wait_until(moved, 120, interval=0.005, message="the tasks never moved")
        seconds = time.monotonic() - lost_at
        with beta.store.engine.connect() as conn:
            workers = conn.execute(
                sa.select(task_workers.c.last_heartbeat, task_workers.c.stopped_at).where(
                    task_workers.c.id.in_(lost_workers)
                )
            ).all()
            claims = conn.execute(sa.select(tasks.c.started_at).where(tasks.c.id.in_(held)))
            last_claim = max(row.started_at for row in claims)
        declared = max(row.stopped_at for row in workers)
        silent = min((row.stopped_at - row.last_heartbeat).total_seconds() for row in workers)
        return Figures(seconds, silent, (last_claim - declared).total_seconds())
    finally:
        made.restore()
        for pool in pools:
            pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="measure_node_loss", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("kill", "partition"), default="kill")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--heartbeat-interval", type=float, default=0.5)
    args = parser.parse_args()
    options = {
        "--heartbeat-interval": f"{args.heartbeat_interval:g}",
        "--heartbeat-timeout": f"{args.heartbeat_timeout:g}",
    }
    settings = (
        f"heartbeat timeout {args.heartbeat_timeout:g} s, interval {args.heartbeat_interval:g} s"
    )
    figures = []
    with setup(args.mode, options) as made:
        for run in range(args.runs):
            figure = measure_once(made)
            figures.append(figure)
            print(
                f"run {run + 1} ({args.mode}, {settings}): tasks running on beta "
                f"{figure.moved:.2f} s after the loss; alpha's workers silent "
                f"{figure.silent:.2f} s when declared lost; claimed {figure.claimed * 1000:.0f} "
                "ms later",
                flush=True,
            )
    moved = [figure.moved for figure in figures]
    print(
        f"{args.mode}: loss -> tasks running on the other node: median "
        f"{statistics.median(moved):.2f} s (min {min(moved):.2f}, max {max(moved):.2f}) over "
        f"{len(moved)} runs, with {settings}"
    )


if __name__ == "__main__":
    main()
