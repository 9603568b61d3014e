"""Workers recycled after their share of tasks or past a memory limit: nothing lost."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from tests.acceptance.pool import Pool
from tests.helpers import wait_until
from workers.store import task_workers

StartPool = Callable[..., Pool]


def worker_rows(pool: Pool) -> list[dict[str, object]]:
    with pool.store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(task_workers)).mappings()]


def test_worker_recycled_after_its_share_of_tasks(start_pool: StartPool) -> None:
    limit = 5
    pool = start_pool(workers=1, options={"--max-tasks-per-worker": str(limit)})
    ids = pool.queue.enqueue_many("sleep", [{"seconds": 0.01}] * 20)
    wait_until(lambda: all(pool.task(i)["status"] == "completed" for i in ids), 30)

    assert all(pool.task(i)["attempts"] == 1 for i in ids)  # nothing failed or ran twice
    retired = [r for r in worker_rows(pool) if not r["is_active"]]
    assert len(retired) >= 3
    for row in retired:
        assert row["exit_code"] == 5
        assert "recycled" in str(row["exit_reason"])
        assert limit <= int(str(row["processed_tasks_count"])) <= limit + limit // 10 + 1
    wait_until(lambda: len(pool.active_workers()) == 1, 5)
    events = [e["event"] for e in pool.events()]
    assert "supervisor.crash_loop" not in events


def test_worker_recycled_past_its_memory_limit_and_rss_recorded(start_pool: StartPool) -> None:
    pool = start_pool(workers=1, options={"--max-memory-per-worker": "1"})  # every worker is over
    first = pool.queue.enqueue("sleep", {"seconds": 0.01})
    wait_until(lambda: pool.task(first)["status"] == "completed", 15)
    wait_until(lambda: any(r["exit_code"] == 6 for r in worker_rows(pool)), 10)
    second = pool.queue.enqueue("sleep", {"seconds": 0.01})
    wait_until(lambda: pool.task(second)["status"] == "completed", 15)
    assert pool.task(second)["worker_id"] != pool.task(first)["worker_id"]

    def rss_recorded() -> bool:
        return any(r["is_active"] and (r["rss_mb"] or 0) > 5 for r in worker_rows(pool))

    wait_until(rss_recorded, 5, message="no worker RSS recorded with the heartbeats")
