"""Handlers in real worker processes: outcomes, retries, progress and logs as rows show them."""

from __future__ import annotations

import json
from collections.abc import Callable

import sqlalchemy as sa

from tests.acceptance.pool import Pool
from tests.helpers import wait_until
from workers.store import FINISHED, task_workers

StartPool = Callable[..., Pool]


def test_every_kind_of_outcome_is_recorded(start_pool: StartPool) -> None:
    pool = start_pool(workers=2)
    unknown = pool.queue.enqueue("no_such_task", {"a": 1}, max_retries=5)
    flaky = pool.queue.enqueue("flaky", max_retries=2)
    echo = pool.queue.enqueue("echo_async", {"x": [1, 2]})
    report = pool.queue.enqueue("report")
    picky = pool.queue.enqueue("picky", max_retries=5)
    ids = [unknown, flaky, echo, report, picky]
    wait_until(lambda: all(pool.task(i)["status"] in FINISHED for i in ids), 20)

    row = pool.task(unknown)
    assert (row["status"], row["attempts"]) == ("failed", 1)  # at once, retries unused
    assert "no handler registered for task type 'no_such_task'" in row["last_error"]

    row = pool.task(flaky)
    assert (row["status"], row["attempts"], json.loads(row["result"])) == (
        "completed",
        2,
        "recovered",
    )
    history = json.loads(row["error_history"])
    assert len(history) == 1
    assert history[0]["attempt"] == 1 and "first attempt fails" in history[0]["error"]
    assert set(history[0]) == {"at", "attempt", "worker_id", "error"}

    assert json.loads(pool.task(echo)["result"]) == {"echo": {"x": [1, 2]}}

    row = pool.task(report)
    assert row["status"] == "completed"
    assert row["progress_percentage"] == 100  # the last report is always written
    assert (row["current_step"], row["total_steps"]) == ("step 10", 10)
    log = json.loads(row["execution_log"])
    assert [(e["level"], e["message"]) for e in log] == [("info", "starting"), ("warning", "done")]
    assert log[0]["data"] == {"steps": 10} and "timestamp" in log[0]

    row = pool.task(picky)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert "invalid payload: size must be a positive integer" in row["last_error"]

    def counted() -> bool:
        with pool.store.engine.connect() as conn:
            processed, failed = conn.execute(
                sa.select(
                    sa.func.sum(task_workers.c.processed_tasks_count),
                    sa.func.sum(task_workers.c.failed_tasks_count),
                )
            ).one()
        return (processed, failed) == (6, 3)  # six attempts, three of them failed

    wait_until(counted, 5, message="worker counters not recorded with the heartbeats")
