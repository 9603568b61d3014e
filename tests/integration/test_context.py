"""TaskContext on real engines: throttled progress, the cancel flag, the execution log."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from datetime import datetime

import pytest

from workers.context import Cancelled, TaskContext
from workers.store import Claim, LostClaim, NewTask, Progress, Store


@pytest.fixture
def claim(store: Store) -> Claim:
    supervisor = store.register_supervisor("node-a", os.getpid(), 0.0, 1, "test")
    worker = store.register_worker(supervisor, "node-a", [])
    store.enqueue([NewTask("job")])
    [claimed] = store.claim_tasks(worker, [])
    return claimed


@pytest.fixture
def writes(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[Progress]:
    """Every progress write the context makes (they still reach the database)."""
    seen: list[Progress] = []
    real = store.record_progress

    def recording(claim: Claim, progress: Progress) -> bool:
        seen.append(progress)
        return real(claim, progress)

    monkeypatch.setattr(store, "record_progress", recording)
    return seen


def make_context(store: Store, claim: Claim, interval: float) -> TaskContext:
    return TaskContext(store, claim, threading.Event(), progress_interval=interval)


def stored_progress(store: Store, claim: Claim) -> float | None:
    value: float | None = store.get_task(claim.id)["progress_percentage"]
    return value


def test_progress_writes_once_per_interval_and_keeps_the_last_report(
    store: Store, claim: Claim, writes: list[Progress]
) -> None:
    ctx = make_context(store, claim, interval=3600.0)
    for n in range(50):
        ctx.progress(n * 2, step=f"step {n}", total_steps=50, message="busy")

    assert [p.percentage for p in writes] == [0.0], "only the first report fits in the interval"
    assert stored_progress(store, claim) == 0.0
    last = ctx.take_unwritten_progress()
    assert last == Progress(98.0, "step 49", 50, "busy")
    assert ctx.take_unwritten_progress() is None

    store.complete_task(claim, "null", 0.1, progress=last)
    row = store.get_task(claim.id)
    assert (row["progress_percentage"], row["current_step"]) == (98.0, "step 49")


def test_progress_with_a_short_interval_writes_about_once_per_interval(
    store: Store, claim: Claim, writes: list[Progress]
) -> None:
    interval = 0.05
    ctx = make_context(store, claim, interval=interval)
    calls = 0
    started = time.monotonic()
    while time.monotonic() - started < 0.4:
        ctx.progress(calls % 101)
        calls += 1
        time.sleep(0.001)  # pacing the reports, not waiting for anything
    elapsed = time.monotonic() - started

    assert calls > 50
    assert 2 <= len(writes) <= elapsed / interval + 1, (len(writes), elapsed)
    assert stored_progress(store, claim) == writes[-1].percentage
    unwritten = ctx.take_unwritten_progress()
    if unwritten is not None:  # the last report either was written or is handed over
        assert unwritten.percentage == (calls - 1) % 101


def test_progress_without_interval_writes_every_report(
    store: Store, claim: Claim, writes: list[Progress]
) -> None:
    ctx = make_context(store, claim, interval=0.0)
    for n in (10, 20, 30):
        ctx.progress(n)
    assert [p.percentage for p in writes] == [10.0, 20.0, 30.0]
    assert ctx.take_unwritten_progress() is None
    assert stored_progress(store, claim) == 30.0


def test_out_of_range_progress_is_a_value_error(
    store: Store, claim: Claim, writes: list[Progress]
) -> None:
    ctx = make_context(store, claim, interval=0.0)
    for percentage in (-0.1, -50, 100.01, 1000, math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            ctx.progress(percentage)
    assert writes == []
    assert ctx.take_unwritten_progress() is None
    assert stored_progress(store, claim) is None


def test_progress_bounds_are_accepted(store: Store, claim: Claim) -> None:
    ctx = make_context(store, claim, interval=0.0)
    for percentage in (0, 100, 33.3):
        ctx.progress(percentage)
        assert stored_progress(store, claim) == float(percentage)


def test_progress_write_brings_back_a_cancel_request(store: Store, claim: Claim) -> None:
    ctx = make_context(store, claim, interval=0.0)
    ctx.progress(10)
    assert ctx.cancel_requested is False
    ctx.raise_if_cancelled()
    store.cancel_task(claim.id)
    ctx.progress(20)
    assert ctx.cancel_requested is True
    with pytest.raises(Cancelled):
        ctx.raise_if_cancelled()


def test_log_appends_timestamped_entries_in_order(store: Store, claim: Claim) -> None:
    ctx = make_context(store, claim, interval=1.0)
    ctx.log("info", "scaled", width=640, height=480)
    ctx.log("warning", "slow source")
    ctx.log("error", "retrying", attempt=2, reasons=["timeout", "reset"])

    entries = json.loads(store.get_task(claim.id)["execution_log"])
    assert [set(e) for e in entries] == [{"timestamp", "level", "message", "data"}] * 3
    assert [(e["level"], e["message"], e["data"]) for e in entries] == [
        ("info", "scaled", {"width": 640, "height": 480}),
        ("warning", "slow source", {}),
        ("error", "retrying", {"attempt": 2, "reasons": ["timeout", "reset"]}),
    ]
    stamps = [datetime.fromisoformat(e["timestamp"]) for e in entries]
    assert all(stamp.tzinfo is not None for stamp in stamps)
    assert stamps == sorted(stamps)


def test_log_with_unknown_level_is_a_value_error(store: Store, claim: Claim) -> None:
    ctx = make_context(store, claim, interval=1.0)
    with pytest.raises(ValueError):
        ctx.log("verbose", "nope")
    assert json.loads(store.get_task(claim.id)["execution_log"]) == []


def test_context_of_a_lost_claim_changes_nothing(store: Store, claim: Claim) -> None:
    ctx = make_context(store, claim, interval=0.0)
    store.retire_worker(claim.worker_id, exit_code=None, exit_reason="hung")
    before = store.get_task(claim.id)
    with pytest.raises(LostClaim):
        ctx.progress(50)
    with pytest.raises(LostClaim):
        ctx.log("info", "late")
    assert store.get_task(claim.id) == before
