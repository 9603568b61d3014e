"""The task store against real engines: claim, fencing, failure, rescue, operators.

Every test runs on a fresh SQLite file and on a fresh PostgreSQL database (the
`store` fixture). Time is aged with SQL UPDATEs, never waited for.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select, update

from workers.store import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    Claim,
    LostClaim,
    NewTask,
    Progress,
    Rescued,
    Store,
    UnknownTask,
    WorkerStats,
    WrongState,
    supervisors,
    task_workers,
    tasks,
)

SLACK = timedelta(seconds=2)  # clock reads around a statement, not inside it
NODE = "node-a"


# -- helpers -------------------------------------------------------------------------


def add(store: Store, n: int = 1, **fields: Any) -> list[int]:
    fields.setdefault("task_type", "job")
    return store.enqueue([NewTask(**fields) for _ in range(n)])


def add_one(store: Store, **fields: Any) -> int:
    return add(store, 1, **fields)[0]


def set_task(store: Store, task_id: int, **values: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(**values))


def set_worker(store: Store, worker_id: int, **values: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(task_workers).where(task_workers.c.id == worker_id).values(**values))


def set_supervisor(store: Store, supervisor_id: int, **values: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(supervisors).where(supervisors.c.id == supervisor_id).values(**values))


def worker_row(store: Store, worker_id: int) -> dict[str, Any]:
    with store.engine.connect() as conn:
        row = conn.execute(select(task_workers).where(task_workers.c.id == worker_id)).mappings()
        return dict(row.one())


def supervisor_row(store: Store, supervisor_id: int) -> dict[str, Any]:
    with store.engine.connect() as conn:
        row = conn.execute(select(supervisors).where(supervisors.c.id == supervisor_id)).mappings()
        return dict(row.one())


def count(store: Store, *where: Any) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(tasks).where(*where)).scalar_one())


def history(store: Store, task_id: int) -> list[dict[str, Any]]:
    value: list[dict[str, Any]] = json.loads(store.get_task(task_id)["error_history"])
    return value


def claim_one(store: Store, worker_id: int, queues: tuple[str, ...] = ()) -> Claim:
    claims = store.claim_tasks(worker_id, list(queues))
    assert len(claims) == 1, claims
    return claims[0]


def assert_between(value: datetime, low: datetime, high: datetime) -> None:
    assert low - SLACK <= value <= high + SLACK, (value, low, high)


@pytest.fixture
def supervisor_id(store: Store) -> int:
    return store.register_supervisor(NODE, os.getpid(), 0.0, 2, "test")


@pytest.fixture
def new_worker(store: Store, supervisor_id: int) -> Callable[..., int]:
    def make(queues: tuple[str, ...] = ()) -> int:
        return store.register_worker(supervisor_id, NODE, list(queues))

    return make


# -- claim ---------------------------------------------------------------------------


def add_in_claim_order(store: Store) -> tuple[list[int], int]:
    """Tasks whose claim order (priority DESC, run_at, id) is neither their id order nor
    their run_at order, in that order; and a higher-priority task not due yet."""
    now = store.now()
    ago = lambda seconds: now - timedelta(seconds=seconds)  # noqa: E731
    plain_old = add_one(store, priority=0)
    urgent_newer = add_one(store, priority=5)
    urgent_older = add_one(store, priority=5)
    plain_old_twin = add_one(store, priority=0)
    lowest = add_one(store, priority=-1)
    future = add_one(store, priority=10, delay=3600)
    set_task(store, plain_old, run_at=ago(300))
    set_task(store, urgent_newer, run_at=ago(100))
    set_task(store, urgent_older, run_at=ago(200))
    set_task(store, plain_old_twin, run_at=ago(300))
    set_task(store, lowest, run_at=ago(1000))
    return [urgent_older, urgent_newer, plain_old, plain_old_twin, lowest], future


def test_claim_takes_highest_priority_then_oldest_run_at_then_lowest_id(
    store: Store, new_worker: Callable[..., int]
) -> None:
    expected, future = add_in_claim_order(store)
    worker = new_worker()
    order = [claim_one(store, worker).id for _ in range(5)]

    assert order == expected
    assert store.claim_tasks(worker, []) == [], "a task whose run_at is in the future was claimed"
    assert store.get_task(future)["status"] == PENDING


def test_a_batch_claim_hands_out_its_tasks_in_claim_order(
    store: Store, new_worker: Callable[..., int]
) -> None:
    expected, future = add_in_claim_order(store)
    claims = store.claim_tasks(new_worker(), [], limit=10)
    assert [claim.id for claim in claims] == expected
    assert store.get_task(future)["status"] == PENDING


def test_claim_with_a_limit_returns_tasks_in_claim_order(
    store: Store, new_worker: Callable[..., int]
) -> None:
    low, high, mid = (
        add_one(store, priority=1),
        add_one(store, priority=9),
        add_one(store, priority=5),
    )
    claims = store.claim_tasks(new_worker(), [], limit=10)
    assert [c.id for c in claims] == [high, mid, low]


def test_task_becomes_claimable_when_its_run_at_passes(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store, delay=3600)
    worker = new_worker()
    assert store.claim_tasks(worker, []) == []
    set_task(store, task_id, run_at=store.now() - timedelta(seconds=1))
    assert claim_one(store, worker).id == task_id


def test_worker_claims_only_from_its_queues(store: Store, new_worker: Callable[..., int]) -> None:
    in_a = add(store, 3, queue="a")
    in_b = add(store, 2, queue="b")
    in_c = add(store, 2, queue="c")

    picky = store.claim_tasks(new_worker(("a", "c")), ["a", "c"], limit=100)
    assert sorted(c.id for c in picky) == sorted(in_a + in_c)
    assert {c.queue for c in picky} == {"a", "c"}
    assert count(store, tasks.c.queue == "b", tasks.c.status == PENDING) == 2

    assert store.claim_tasks(new_worker(("nothing-here",)), ["nothing-here"], limit=100) == []
    rest = store.claim_tasks(new_worker(), [], limit=100)
    assert sorted(c.id for c in rest) == in_b


def test_empty_queue_list_claims_from_every_queue(
    store: Store, new_worker: Callable[..., int]
) -> None:
    ids = add(store, 1, queue="a") + add(store, 1, queue="b") + add(store, 1, queue="default")
    claims = store.claim_tasks(new_worker(), [], limit=100)
    assert sorted(c.id for c in claims) == ids


def test_claim_marks_task_running_and_counts_the_attempt(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store, payload='{"n": 1}', queue="q", priority=3, max_attempts=7, timeout=9.5)
    worker = new_worker()
    before = store.now()
    claim = claim_one(store, worker)
    after = store.now()

    assert claim == Claim(
        id=task_id,
        task_type="job",
        payload='{"n": 1}',
        queue="q",
        priority=3,
        attempts=1,
        max_attempts=7,
        timeout=9.5,
        worker_id=worker,
    )
    row = store.get_task(task_id)
    assert row["status"] == RUNNING
    assert row["attempts"] == 1
    assert row["worker_id"] == worker
    assert row["started_at"] is not None
    assert_between(row["started_at"], before, after)


def test_reclaim_counts_another_attempt_and_clears_old_progress(
    store: Store, new_worker: Callable[..., int]
) -> None:
    add_one(store)
    first = new_worker()
    claim = claim_one(store, first)
    store.record_progress(claim, Progress(40.0, "half", 5, "going"))
    store.retire_worker(first, exit_code=-9, exit_reason="killed by SIGKILL")

    again = claim_one(store, new_worker())
    assert again.attempts == 2
    row = store.get_task(again.id)
    assert (row["progress_percentage"], row["current_step"], row["total_steps"]) == (
        None,
        None,
        None,
    )
    assert row["progress_message"] is None


def test_claim_respects_limit(store: Store, new_worker: Callable[..., int]) -> None:
    add(store, 40)
    running = 0
    for limit in (1, 3, 7):
        claims = store.claim_tasks(new_worker(), [], limit=limit)
        running += limit
        assert len(claims) == limit
        assert len({c.id for c in claims}) == limit
        assert count(store, tasks.c.status == RUNNING) == running
        assert count(store, tasks.c.status == PENDING) == 40 - running


def test_concurrent_claimers_never_share_a_task(
    store: Store, database_url: str, new_worker: Callable[..., int]
) -> None:
    total = 200
    ids = add(store, total)
    other = Store(database_url)
    claimers = [
        (store, new_worker()),
        (store, new_worker()),
        (other, new_worker()),
        (other, new_worker()),
    ]
    got: dict[int, list[int]] = {worker: [] for _, worker in claimers}
    errors: list[BaseException] = []
    # In rounds, every claimer claiming at once: a claimer alone (the others not yet
    # scheduled) could otherwise take every task before the rest begin.
    round_done = threading.Barrier(len(claimers))
    counted = threading.Barrier(len(claimers))

    def run(claimer: Store, worker: int) -> None:
        try:
            while True:
                claims = claimer.claim_tasks(worker, [], limit=3)
                got[worker].extend(c.id for c in claims)
                round_done.wait(timeout=10)
                # SKIP LOCKED may hand back nothing while others hold the rest: stop only when
                # nothing is left pending (every claimer sees the same count).
                left = count(claimer, tasks.c.status == PENDING)
                counted.wait(timeout=10)
                if left == 0:
                    return
        except BaseException as error:  # reported to the test thread below
            errors.append(error)

    threads = [threading.Thread(target=run, args=c) for c in claimers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    other.dispose()

    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    claimed = [task_id for per_worker in got.values() for task_id in per_worker]
    assert sorted(claimed) == ids, "a task was claimed twice or not at all"
    assert all(got.values()), "a claimer got nothing: no concurrency happened"
    with store.engine.connect() as conn:
        owners = {
            row.id: row.worker_id for row in conn.execute(select(tasks.c.id, tasks.c.worker_id))
        }
        attempts = set(conn.execute(select(tasks.c.attempts)).scalars())
    assert attempts == {1}
    for worker, claimed_ids in got.items():
        assert all(owners[task_id] == worker for task_id in claimed_ids)


# -- fencing -------------------------------------------------------------------------


FENCED_WRITES: dict[str, Callable[[Store, Claim], Any]] = {
    "complete_task": lambda s, c: s.complete_task(c, '{"done": true}', 1.0, Progress(100.0)),
    "fail_task": lambda s, c: s.fail_task(c, "late failure", retry_delay=0.0),
    "fail_task_permanent": lambda s, c: s.fail_task(c, "late", retry_delay=0.0, permanent=True),
    "record_progress": lambda s, c: s.record_progress(c, Progress(99.0, "late", 2, "late")),
    "append_log": lambda s, c: s.append_log(c, {"level": "info", "message": "late"}),
}


def test_rescued_worker_cannot_write_to_a_task_reclaimed_elsewhere(
    store: Store, new_worker: Callable[..., int]
) -> None:
    for name, write in FENCED_WRITES.items():
        task_id = add_one(store)
        hung = new_worker()
        stale = claim_one(store, hung)
        store.retire_worker(hung, exit_code=None, exit_reason="hung: killed by the supervisor")
        current = claim_one(store, new_worker())
        assert current.id == stale.id == task_id
        store.record_progress(current, Progress(10.0, "fresh", 3, "fresh"))
        store.append_log(current, {"level": "info", "message": "fresh"})
        before = store.get_task(task_id)

        with pytest.raises(LostClaim):
            write(store, stale)

        assert store.get_task(task_id) == before, name
        # The current holder's writes still land.
        store.complete_task(current, '{"ok": true}', 0.5)
        assert store.get_task(task_id)["status"] == COMPLETED, name


def test_rescued_worker_cannot_write_to_its_task_while_it_waits_pending(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store)
    hung = new_worker()
    stale = claim_one(store, hung)
    store.retire_worker(hung, exit_code=-9, exit_reason="killed by SIGKILL")
    before = store.get_task(task_id)
    assert before["status"] == PENDING
    for name, write in FENCED_WRITES.items():
        with pytest.raises(LostClaim):
            write(store, stale)
        assert store.get_task(task_id) == before, name


# -- failure -------------------------------------------------------------------------


def test_failure_with_attempts_left_goes_back_to_pending_after_the_retry_delay(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store, max_attempts=3)
    worker = new_worker()
    claim = claim_one(store, worker)
    before = store.now()
    status = store.fail_task(claim, "boom: connection reset", retry_delay=30.0, duration=0.25)
    after = store.now()

    assert status == PENDING
    row = store.get_task(task_id)
    assert row["status"] == PENDING
    assert row["last_error"] == "boom: connection reset"
    assert row["completed_at"] is None
    assert row["duration"] == 0.25
    assert_between(row["run_at"], before + timedelta(seconds=30), after + timedelta(seconds=30))
    [entry] = history(store, task_id)
    assert set(entry) == {"at", "attempt", "worker_id", "error"}
    assert entry["attempt"] == 1
    assert entry["worker_id"] == worker
    assert entry["error"] == "boom: connection reset"
    assert_between(datetime.fromisoformat(entry["at"]), before, after)
    assert store.claim_tasks(new_worker(), []) == [], "claimed before its retry delay"


def test_failures_accumulate_in_error_history_in_order(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store, max_attempts=3)
    workers = [new_worker(), new_worker()]
    for number, worker in enumerate(workers, start=1):
        claim = claim_one(store, worker)
        assert store.fail_task(claim, f"error {number}", retry_delay=60.0) == PENDING
        set_task(store, task_id, run_at=store.now() - timedelta(seconds=1))
    entries = history(store, task_id)
    assert [(e["attempt"], e["worker_id"], e["error"]) for e in entries] == [
        (1, workers[0], "error 1"),
        (2, workers[1], "error 2"),
    ]
    assert store.get_task(task_id)["last_error"] == "error 2"


def test_failure_on_the_last_attempt_fails_the_task(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store, max_attempts=2)
    first = claim_one(store, new_worker())
    assert store.fail_task(first, "once", retry_delay=0.0) == PENDING
    last = claim_one(store, new_worker())
    assert last.attempts == 2
    before = store.now()
    assert store.fail_task(last, "twice", retry_delay=0.0, duration=1.5) == FAILED
    after = store.now()

    row = store.get_task(task_id)
    assert row["status"] == FAILED
    assert row["attempts"] == 2
    assert row["last_error"] == "twice"
    assert row["duration"] == 1.5
    assert_between(row["completed_at"], before, after)
    assert [e["error"] for e in history(store, task_id)] == ["once", "twice"]
    assert store.claim_tasks(new_worker(), []) == []


def test_permanent_failure_fails_at_once_with_attempts_left(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store, max_attempts=5)
    claim = claim_one(store, new_worker())
    status = store.fail_task(
        claim, "no handler for task type 'job'", retry_delay=10.0, permanent=True
    )
    assert status == FAILED
    row = store.get_task(task_id)
    assert (row["status"], row["attempts"]) == (FAILED, 1)
    assert row["completed_at"] is not None
    assert row["last_error"] == "no handler for task type 'job'"
    assert len(history(store, task_id)) == 1


def test_failure_of_a_task_with_cancel_requested_ends_cancelled(
    store: Store, new_worker: Callable[..., int]
) -> None:
    for permanent in (False, True):
        task_id = add_one(store, max_attempts=4)
        claim = claim_one(store, new_worker())
        assert store.cancel_task(task_id) == "cancel_requested"
        status = store.fail_task(claim, "Cancelled", retry_delay=30.0, permanent=permanent)
        assert status == CANCELLED, permanent
        row = store.get_task(task_id)
        assert row["status"] == CANCELLED
        assert row["completed_at"] is not None
        assert store.claim_tasks(new_worker(), []) == []


def test_handler_that_cancels_itself_ends_cancelled_with_attempts_left(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store, max_attempts=4)
    claim = claim_one(store, new_worker())
    status = store.fail_task(claim, "cancelled: by the handler", retry_delay=30.0, cancelled=True)
    assert status == CANCELLED
    row = store.get_task(task_id)
    assert (row["status"], row["attempts"]) == (CANCELLED, 1)  # no retry
    assert row["completed_at"] is not None
    assert store.claim_tasks(new_worker(), []) == []


def test_very_long_error_is_truncated(store: Store, new_worker: Callable[..., int]) -> None:
    task_id = add_one(store)
    claim = claim_one(store, new_worker())
    store.fail_task(claim, "x" * 100_000, retry_delay=1.0)
    row = store.get_task(task_id)
    assert len(row["last_error"]) <= 8_000
    assert row["last_error"].endswith("...")
    assert len(history(store, task_id)[0]["error"]) <= 8_000


# -- completion, progress, log -------------------------------------------------------


def test_complete_task_stores_result_duration_and_final_progress(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store)
    claim = claim_one(store, new_worker())
    before = store.now()
    store.complete_task(claim, '{"path": "a.png"}', 2.5, Progress(100.0, "done", 4, "all done"))
    after = store.now()

    row = store.get_task(task_id)
    assert row["status"] == COMPLETED
    assert json.loads(row["result"]) == {"path": "a.png"}
    assert row["duration"] == 2.5
    assert_between(row["completed_at"], before, after)
    assert row["progress_percentage"] == 100.0
    assert (row["current_step"], row["total_steps"], row["progress_message"]) == (
        "done",
        4,
        "all done",
    )
    with pytest.raises(LostClaim):
        store.complete_task(claim, '{"path": "b.png"}', 3.0)
    assert json.loads(store.get_task(task_id)["result"]) == {"path": "a.png"}


def test_record_progress_writes_fields_and_returns_the_cancel_flag(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store)
    claim = claim_one(store, new_worker())

    assert store.record_progress(claim, Progress(25.0, "download", 4, "1 of 4")) is False
    row = store.get_task(task_id)
    assert row["progress_percentage"] == 25.0
    assert (row["current_step"], row["total_steps"], row["progress_message"]) == (
        "download",
        4,
        "1 of 4",
    )

    store.cancel_task(task_id)
    assert store.record_progress(claim, Progress(50.0, "resize", 4, "2 of 4")) is True
    row = store.get_task(task_id)
    assert row["progress_percentage"] == 50.0
    assert row["status"] == RUNNING


def test_append_log_keeps_entries_in_order(store: Store, new_worker: Callable[..., int]) -> None:
    task_id = add_one(store)
    claim = claim_one(store, new_worker())
    entries = [
        {
            "timestamp": "2024-01-01T00:00:00.000+00:00",
            "level": "info",
            "message": f"m{i}",
            "data": {"i": i},
        }
        for i in range(5)
    ]
    entries.append(
        {"timestamp": "t", "level": "error", "message": "quote ' and \" and \\", "data": {}}
    )
    for entry in entries:
        store.append_log(claim, entry)
    assert json.loads(store.get_task(task_id)["execution_log"]) == entries


# -- rescue --------------------------------------------------------------------------


def test_retire_worker_rescues_its_task_and_counts_the_attempt(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store, max_attempts=3)
    other_task = add_one(store)
    dead, busy = new_worker(), new_worker()
    claim_one(store, dead)
    kept = claim_one(store, busy)
    assert kept.id == other_task

    rescued = store.retire_worker(
        dead, exit_code=-9, exit_reason="killed by SIGKILL", stats=WorkerStats(task_id, 7, 2)
    )

    assert rescued == [Rescued(task_id, PENDING, 1, dead)]
    row = store.get_task(task_id)
    assert (row["status"], row["attempts"], row["completed_at"]) == (PENDING, 1, None)
    assert row["run_at"] <= store.now(), "a rescued task waits for no backoff"
    assert "killed by SIGKILL" in row["last_error"]
    [entry] = history(store, task_id)
    assert (entry["attempt"], entry["worker_id"]) == (1, dead)
    assert "killed by SIGKILL" in entry["error"]

    gone = worker_row(store, dead)
    assert gone["is_active"] is False
    assert (gone["exit_code"], gone["exit_reason"]) == (-9, "killed by SIGKILL")
    assert gone["stopped_at"] is not None
    assert gone["current_task_id"] is None
    assert (gone["processed_tasks_count"], gone["failed_tasks_count"]) == (7, 2)

    assert store.get_task(other_task)["status"] == RUNNING, "another worker's task was rescued"
    assert worker_row(store, busy)["is_active"] is True
    assert claim_one(store, new_worker()).attempts == 2


def test_retire_worker_fails_a_task_whose_attempts_are_used_up(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store, max_attempts=1)
    dead = new_worker()
    claim_one(store, dead)
    rescued = store.retire_worker(
        dead, exit_code=-11, exit_reason="killed by SIGSEGV", error="worker died: SIGSEGV"
    )
    assert rescued == [Rescued(task_id, FAILED, 1, dead)]
    row = store.get_task(task_id)
    assert row["status"] == FAILED
    assert row["completed_at"] is not None
    assert row["last_error"] == "worker died: SIGSEGV"
    assert history(store, task_id)[-1]["error"] == "worker died: SIGSEGV"


def test_retire_worker_with_release_gives_the_attempt_back(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store, max_attempts=1)
    stopped = new_worker()
    claim_one(store, stopped)
    rescued = store.retire_worker(
        stopped, exit_code=-9, exit_reason="stopped at shutdown", release=True
    )
    assert [(r.id, r.status, r.attempts) for r in rescued] == [(task_id, PENDING, 0)]
    row = store.get_task(task_id)
    assert (row["status"], row["attempts"], row["completed_at"]) == (PENDING, 0, None)
    again = claim_one(store, new_worker())
    assert again.attempts == 1


def test_retire_worker_ends_a_cancel_requested_task_cancelled(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store, max_attempts=5)
    dead = new_worker()
    claim_one(store, dead)
    store.cancel_task(task_id)
    [rescued] = store.retire_worker(dead, exit_code=-9, exit_reason="killed: cancel timeout")
    assert rescued.status == CANCELLED
    assert store.get_task(task_id)["status"] == CANCELLED


def test_retire_idle_worker_rescues_nothing(store: Store, new_worker: Callable[..., int]) -> None:
    task_id = add_one(store)
    idle = new_worker()
    assert store.retire_worker(idle, exit_code=0, exit_reason="exited cleanly") == []
    assert store.get_task(task_id)["status"] == PENDING
    assert worker_row(store, idle)["exit_code"] == 0


def test_rescue_stale_tasks_rescues_silent_workers_only(
    store: Store, supervisor_id: int, new_worker: Callable[..., int]
) -> None:
    silent, fresh = new_worker(), new_worker()
    silent_tasks = add(store, 2, max_attempts=3)
    fresh_task = add_one(store)
    for claim in store.claim_tasks(silent, [], limit=2):
        assert claim.id in silent_tasks
    assert claim_one(store, fresh).id == fresh_task
    set_worker(store, silent, last_heartbeat=store.now() - timedelta(hours=1))

    rescued, lost = store.rescue_stale_tasks(heartbeat_timeout=30.0)

    assert lost == [silent]
    assert sorted(r.id for r in rescued) == silent_tasks
    assert {(r.status, r.attempts, r.worker_id) for r in rescued} == {(PENDING, 1, silent)}
    for task_id in silent_tasks:
        row = store.get_task(task_id)
        assert row["status"] == PENDING
        assert "no heartbeat" in row["last_error"]
    lost_row = worker_row(store, silent)
    assert lost_row["is_active"] is False
    assert lost_row["stopped_at"] is not None
    assert "heartbeat" in lost_row["exit_reason"]

    fresh_row = store.get_task(fresh_task)
    assert (fresh_row["status"], fresh_row["worker_id"]) == (RUNNING, fresh)
    assert worker_row(store, fresh)["is_active"] is True
    assert supervisor_row(store, supervisor_id)["status"] == "running"

    assert store.rescue_stale_tasks(heartbeat_timeout=30.0) == ([], [])


def test_rescue_stale_tasks_declares_a_silent_supervisor_dead(
    store: Store, supervisor_id: int
) -> None:
    gone = store.register_supervisor("node-b", 12345, 0.0, 1, "test")
    set_supervisor(store, gone, last_heartbeat=store.now() - timedelta(hours=1))
    store.rescue_stale_tasks(heartbeat_timeout=30.0)
    assert supervisor_row(store, gone)["status"] == "dead"
    assert supervisor_row(store, gone)["stopped_at"] is not None
    assert supervisor_row(store, supervisor_id)["status"] == "running"


def test_rescue_stale_tasks_leaves_a_heartbeat_within_the_timeout(
    store: Store, new_worker: Callable[..., int]
) -> None:
    worker = new_worker()
    task_id = add_one(store)
    claim_one(store, worker)
    set_worker(store, worker, last_heartbeat=store.now() - timedelta(seconds=10))
    assert store.rescue_stale_tasks(heartbeat_timeout=30.0) == ([], [])
    assert store.get_task(task_id)["status"] == RUNNING


# -- operators -----------------------------------------------------------------------


def test_cancel_pending_task_cancels_it_at_once(store: Store) -> None:
    task_id = add_one(store)
    assert store.cancel_task(task_id) == CANCELLED
    row = store.get_task(task_id)
    assert row["status"] == CANCELLED
    assert row["completed_at"] is not None


def test_cancel_running_task_requests_cancellation(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store)
    claim_one(store, new_worker())
    assert store.cancel_task(task_id) == "cancel_requested"
    row = store.get_task(task_id)
    assert (row["status"], row["cancel_requested"]) == (RUNNING, True)


def test_cancel_finished_task_is_wrong_state(store: Store, new_worker: Callable[..., int]) -> None:
    for final in (COMPLETED, FAILED, CANCELLED):
        task_id = add_one(store, max_attempts=1)
        if final == CANCELLED:
            store.cancel_task(task_id)
        else:
            claim = claim_one(store, new_worker())
            if final == COMPLETED:
                store.complete_task(claim, "null", 0.1)
            else:
                store.fail_task(claim, "boom", retry_delay=0.0)
        before = store.get_task(task_id)
        assert before["status"] == final
        with pytest.raises(WrongState):
            store.cancel_task(task_id)
        assert store.get_task(task_id) == before


def test_cancel_unknown_task(store: Store) -> None:
    with pytest.raises(UnknownTask):
        store.cancel_task(987654)


def test_retry_failed_task_makes_it_runnable_now_with_one_more_attempt(
    store: Store, new_worker: Callable[..., int]
) -> None:
    task_id = add_one(store, max_attempts=1)
    claim = claim_one(store, new_worker())
    assert store.fail_task(claim, "boom", retry_delay=3600.0) == FAILED

    store.retry_task(task_id)

    row = store.get_task(task_id)
    assert row["status"] == PENDING
    assert row["completed_at"] is None
    assert row["max_attempts"] == 2
    assert row["run_at"] <= store.now()
    again = claim_one(store, new_worker())
    assert (again.id, again.attempts, again.max_attempts) == (task_id, 2, 2)
    # The retried attempt is the last one: failing it fails the task again.
    assert store.fail_task(again, "boom again", retry_delay=0.0) == FAILED


def test_retry_keeps_a_larger_max_attempts(store: Store, new_worker: Callable[..., int]) -> None:
    task_id = add_one(store, max_attempts=5)
    claim = claim_one(store, new_worker())
    store.fail_task(claim, "bad payload", retry_delay=0.0, permanent=True)
    store.retry_task(task_id)
    assert store.get_task(task_id)["max_attempts"] == 5


def test_retry_cancelled_task(store: Store, new_worker: Callable[..., int]) -> None:
    task_id = add_one(store)
    store.cancel_task(task_id)
    store.retry_task(task_id)
    row = store.get_task(task_id)
    assert (row["status"], row["cancel_requested"]) == (PENDING, False)
    assert claim_one(store, new_worker()).id == task_id


def test_retry_of_an_unfinished_or_completed_task_is_wrong_state(
    store: Store, new_worker: Callable[..., int]
) -> None:
    for state in (RUNNING, COMPLETED, PENDING):  # claims take the oldest pending task
        task_id = add_one(store)
        if state != PENDING:
            claim = claim_one(store, new_worker())
            if state == COMPLETED:
                store.complete_task(claim, "1", 0.1)
        before = store.get_task(task_id)
        assert before["status"] == state
        with pytest.raises(WrongState):
            store.retry_task(task_id)
        assert store.get_task(task_id) == before


def test_retry_unknown_task(store: Store) -> None:
    with pytest.raises(UnknownTask):
        store.retry_task(987654)


def test_purge_deletes_only_finished_tasks_older_than_the_cutoff(
    store: Store, new_worker: Callable[..., int]
) -> None:
    long_ago = store.now() - timedelta(days=3)
    old_completed, new_completed, old_failed, old_cancelled, pending, running = add(
        store, 6, max_attempts=1
    )
    for task_id in (old_completed, new_completed):
        set_task(store, task_id, status=COMPLETED, completed_at=store.now())
    set_task(store, old_failed, status=FAILED, completed_at=store.now())
    set_task(store, old_cancelled, status=CANCELLED, completed_at=store.now())
    for task_id in (old_completed, old_failed, old_cancelled):
        set_task(store, task_id, completed_at=long_ago, created_at=long_ago, run_at=long_ago)
    set_task(store, pending, created_at=long_ago, run_at=long_ago)
    worker = new_worker()
    set_task(store, running, status=RUNNING, worker_id=worker, started_at=long_ago, run_at=long_ago)

    removed = store.purge(86_400.0, (COMPLETED,))
    assert removed["tasks"] == 1
    with pytest.raises(UnknownTask):
        store.get_task(old_completed)

    removed = store.purge(86_400.0, (COMPLETED, FAILED, CANCELLED))
    assert removed["tasks"] == 2
    with store.engine.connect() as conn:
        left = set(conn.execute(select(tasks.c.id)).scalars())
    assert left == {new_completed, pending, running}


def test_purge_deletes_old_stopped_process_rows_only(
    store: Store, supervisor_id: int, new_worker: Callable[..., int]
) -> None:
    long_ago = store.now() - timedelta(days=3)
    stopped_long_ago, stopped_now, active_but_silent = new_worker(), new_worker(), new_worker()
    store.retire_worker(stopped_long_ago, exit_code=0, exit_reason="exited cleanly")
    store.retire_worker(stopped_now, exit_code=0, exit_reason="exited cleanly")
    set_worker(store, stopped_long_ago, stopped_at=long_ago)
    set_worker(store, active_but_silent, last_heartbeat=long_ago, started_at=long_ago)

    removed = store.purge(86_400.0, (COMPLETED,))

    assert removed == {"tasks": 0, "workers": 1, "supervisors": 0}
    with store.engine.connect() as conn:
        left = set(conn.execute(select(task_workers.c.id)).scalars())
    assert left == {stopped_now, active_but_silent}
    assert supervisor_row(store, supervisor_id)["status"] == "running"


def test_snapshot_reports_queue_depths_and_totals(
    store: Store, supervisor_id: int, new_worker: Callable[..., int]
) -> None:
    add(store, 3, queue="media")
    add(store, 1, queue="mail")
    add(store, 2, queue="done", max_attempts=1)
    worker = new_worker()
    claim_one(store, worker, ("media",))
    finished = store.claim_tasks(worker, ["done"], limit=2)
    store.complete_task(finished[0], "1", 0.1)
    store.fail_task(finished[1], "x", retry_delay=0.0)
    store.cancel_task(add_one(store, queue="done"))
    retired = new_worker()
    store.retire_worker(retired, exit_code=0, exit_reason="exited cleanly")

    snapshot = store.snapshot()

    assert snapshot["queues"] == {
        "media": {PENDING: 2, RUNNING: 1},
        "mail": {PENDING: 1, RUNNING: 0},
    }
    assert snapshot["totals"] == {COMPLETED: 1, FAILED: 1, CANCELLED: 1}
    assert [s["id"] for s in snapshot["supervisors"]] == [supervisor_id]
    assert [w["id"] for w in snapshot["workers"]] == [worker]
    assert isinstance(snapshot["now"], datetime)
    assert snapshot["now"].tzinfo is not None


def test_snapshot_of_an_empty_database(store: Store) -> None:
    snapshot = store.snapshot()
    assert (snapshot["queues"], snapshot["totals"]) == ({}, {})
    assert (snapshot["supervisors"], snapshot["workers"]) == ([], [])


# -- heartbeats ----------------------------------------------------------------------


@pytest.fixture
def statements(store: Store) -> Iterator[list[str]]:
    """Every SQL statement the store sends while the test runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))

    sa.event.listen(store.engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(store.engine, "before_cursor_execute", record)


@pytest.mark.parametrize("busy", [True, False], ids=["some-busy", "all-idle"])
def test_record_heartbeats_stamps_supervisor_and_all_workers_in_one_statement(
    store: Store,
    supervisor_id: int,
    new_worker: Callable[..., int],
    statements: list[str],
    busy: bool,
) -> None:
    long_ago = store.now() - timedelta(hours=1)
    first, second, not_reported = new_worker(), new_worker(), new_worker()
    for worker in (first, second, not_reported):
        set_worker(store, worker, last_heartbeat=long_ago)
    set_supervisor(store, supervisor_id, last_heartbeat=long_ago)
    task_id = add_one(store)
    if busy:
        claim_one(store, first)
    stats = {
        first: WorkerStats(task_id if busy else None, 12, 3),
        second: WorkerStats(None, 4, 0),
    }
    statements.clear()
    before = store.now()

    store.record_heartbeats(supervisor_id, stats)

    after = store.now()
    updates = [s for s in statements if s.upper().startswith("UPDATE")]
    assert len([s for s in updates if s.upper().startswith("UPDATE TASK_WORKERS")]) == 1, updates
    assert len([s for s in updates if s.upper().startswith("UPDATE SUPERVISORS")]) == 1, updates
    assert_between(supervisor_row(store, supervisor_id)["last_heartbeat"], before, after)
    for worker, expected in stats.items():
        row = worker_row(store, worker)
        assert_between(row["last_heartbeat"], before, after)
        assert row["current_task_id"] == expected.current_task_id
        assert (row["processed_tasks_count"], row["failed_tasks_count"]) == (
            expected.processed,
            expected.failed,
        )
    untouched = worker_row(store, not_reported)
    assert untouched["last_heartbeat"] == long_ago
    assert (untouched["processed_tasks_count"], untouched["current_task_id"]) == (0, None)


def test_record_heartbeats_with_no_workers_stamps_the_supervisor(
    store: Store, supervisor_id: int
) -> None:
    set_supervisor(store, supervisor_id, last_heartbeat=store.now() - timedelta(hours=1))
    before = store.now()
    store.record_heartbeats(supervisor_id, {})
    assert_between(supervisor_row(store, supervisor_id)["last_heartbeat"], before, store.now())


def test_record_heartbeats_reports_workers_declared_lost_elsewhere(
    store: Store, supervisor_id: int
) -> None:
    kept = store.register_worker(supervisor_id, "node-a", [])
    lost = store.register_worker(supervisor_id, "node-a", [])
    store.retire_worker(lost, exit_code=None, exit_reason="heartbeat lost")
    store.set_supervisor_status(supervisor_id, "dead")
    idle = WorkerStats(None, 0, 0)

    assert store.record_heartbeats(supervisor_id, {kept: idle, lost: idle}) == {lost}
    assert supervisor_row(store, supervisor_id)["status"] == "running"
    assert supervisor_row(store, supervisor_id)["stopped_at"] is None
