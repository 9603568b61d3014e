"""A paused node comes back: it cannot overwrite what another node did meanwhile."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable

from tests.acceptance.pool import Pool
from tests.helpers import wait_until
from workers.store import supervisors

StartPool = Callable[..., Pool]


def test_paused_node_cannot_overwrite_a_rescued_task_and_rejoins(start_pool: StartPool) -> None:
    options = {"--heartbeat-timeout": "3", "--worker-timeout": "60"}
    alpha = start_pool(workers=1, node="alpha", options=options)
    task_id = alpha.queue.enqueue("sleep", {"seconds": 3})
    paused_worker = alpha.running_task(task_id)["worker_id"]
    paused_pid = alpha.active_workers()[paused_worker]
    beta = start_pool(workers=1, node="beta", options=options)
    wait_until(lambda: len(beta.active_workers()) == 1, 10)

    os.kill(alpha.pid, signal.SIGSTOP)  # the whole node freezes: supervisor and worker
    os.kill(paused_pid, signal.SIGSTOP)
    try:
        wait_until(lambda: beta.task(task_id)["status"] == "completed", 15)
    finally:
        os.kill(paused_pid, signal.SIGCONT)  # the worker wakes first, to try its writes
    row = beta.task(task_id)
    assert row["attempts"] == 2 and row["worker_id"] != paused_worker
    winner = json.loads(row["result"])["pid"]

    wait_until(lambda: any(e.get("event") == "task.claim_lost" for e in alpha.events()), 10)
    os.kill(alpha.pid, signal.SIGCONT)
    row = beta.task(task_id)
    assert (row["status"], row["attempts"], json.loads(row["result"])["pid"]) == (
        "completed",
        2,
        winner,
    )

    # alpha rejoins healthy: its disowned worker replaced, its row running again
    wait_until(lambda: any(e.get("event") == "worker.disowned" for e in alpha.events()), 10)
    wait_until(lambda: set(alpha.active_workers()) - {paused_worker}, 10)
    with alpha.store.engine.connect() as conn:
        status = conn.execute(
            supervisors.select()
            .with_only_columns(supervisors.c.status)
            .where(supervisors.c.hostname == "alpha")
        ).scalar_one()
    assert status == "running"
    after = alpha.queue.enqueue("sleep", {"seconds": 0.01})
    wait_until(lambda: alpha.task(after)["status"] == "completed", 10)
