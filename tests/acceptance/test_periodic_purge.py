"""`run --purge-after`: the pool deletes old finished tasks itself, every few minutes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, update

from tests.acceptance.pool import Pool
from tests.helpers import wait_until
from workers.store import COMPLETED, NewTask, Store, tasks

StartPool = Callable[..., Pool]


def test_pool_purges_finished_tasks_older_than_purge_after(
    start_pool: StartPool, database_url: str
) -> None:
    store = Store(database_url)
    try:
        old, recent = store.enqueue([NewTask("job"), NewTask("job")])
        [pending] = store.enqueue([NewTask("job", delay=3600)])  # never claimed in this test
        now = store.now()
        with store.engine.begin() as conn:
            for task_id, age in ((old, timedelta(days=2)), (recent, timedelta(minutes=5))):
                conn.execute(
                    update(tasks)
                    .where(tasks.c.id == task_id)
                    .values(status=COMPLETED, completed_at=now - age)
                )

        pool = start_pool(database_url, workers=1, extra=["--purge-after", "1h"])

        def purged() -> list[dict[str, object]]:
            return [e for e in pool.events() if e.get("event") == "maintenance.purged"]

        [event] = wait_until(purged, 20, message="the pool never purged")
        assert event["tasks"] == 1 and event["older_than"] == 3600
        with store.engine.connect() as conn:
            left = set(conn.execute(select(tasks.c.id)).scalars())
        assert left == {recent, pending}
    finally:
        store.dispose()
