"""The pool inside an application's own process: Supervisor.start() / stop()."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from supervisor import Supervisor
from tests.acceptance.pool import SAMPLE_TASKS
from tests.helpers import wait_until
from workers import TaskQueue
from workers.store import Store, task_workers


@pytest.fixture
def importable_tasks(tmp_path: Path) -> Iterator[str]:
    shutil.copy(SAMPLE_TASKS, tmp_path / "embedded_tasks.py")
    sys.path.insert(0, str(tmp_path))
    yield "embedded_tasks"
    sys.path.remove(str(tmp_path))
    sys.modules.pop("embedded_tasks", None)


def test_application_runs_pool_in_its_lifespan(database_url: str, importable_tasks: str) -> None:
    pool = Supervisor(
        database_url,
        workers=2,
        imports=[importable_tasks],
        poll_interval=0.05,
        heartbeat_interval=0.2,
    )
    with capture_logs() as logs:
        pool.start()
        queue = TaskQueue(database_url)
        ids = [queue.enqueue("sleep", {"seconds": 0.05}) for _ in range(4)]
        wait_until(lambda: all(queue.store.get_task(i)["status"] == "completed" for i in ids), 20)
        pool.stop(timeout=5)
    events = [entry["event"] for entry in logs]
    assert events[0] == "supervisor.started"
    assert events[-1] == "supervisor.stopped"
    assert events.count("worker.spawned") == 2
    store = Store(database_url)
    with store.engine.connect() as conn:
        active = conn.execute(
            sa.select(sa.func.count()).select_from(task_workers).where(task_workers.c.is_active)
        ).scalar_one()
    assert active == 0
    assert not pool.workers
    store.dispose()
    queue.store.dispose()
