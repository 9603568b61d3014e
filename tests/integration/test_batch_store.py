"""The worker's round trip (Store.finish_and_claim) and the supervisor's release of the
tasks a gone worker never started, on both engines: every write fenced on its claim."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from workers.store import Finished, NewTask, Progress, Store, tasks


def _row(store: Store, task_id: int) -> dict[str, object]:
    return store.get_task(task_id)


def test_one_round_trip_completes_releases_and_claims_in_order(store: Store) -> None:
    ids = store.enqueue([NewTask("t", priority=p) for p in (0, 5, 0, 5, 0)])
    claims, lost = store.finish_and_claim(1, (), limit=3)
    assert ([c.id for c in claims], lost) == ([ids[1], ids[3], ids[0]], [])  # priority, then id

    done = [Finished(claims[0], '"a"', 0.001), Finished(claims[1], '"b"', 0.002, Progress(50.0))]
    more, lost = store.finish_and_claim(1, (), done, release=[claims[2]], limit=2)
    assert lost == []
    assert [c.id for c in more] == [ids[0], ids[2]]  # the released task is first again
    assert [c.attempts for c in more] == [1, 1]  # its released attempt was given back
    first, second = _row(store, ids[1]), _row(store, ids[3])
    assert (first["status"], first["result"], second["progress_percentage"]) == (
        "completed",
        '"a"',
        50.0,
    )


def test_a_batch_of_completions_writes_each_tasks_own_outcome_exactly(store: Store) -> None:
    """One statement completes the batch (the rows travel as arrays or as JSON): each value
    arrives as it was, whatever its JSON type, and progress only where there is some."""
    results = ['"a \\"quoted\\" ünïcode"', "null", "1.5", '{"k": [1, "2"]}', "[]", "true"]
    ids = store.enqueue([NewTask("t") for _ in results])
    claims, _lost = store.finish_and_claim(2, (), limit=len(results))
    progress = Progress(12.5, "3", 7, "step «three»")
    done = [
        Finished(claim, result, 0.25 * index, progress if index % 2 else None)
        for index, (claim, result) in enumerate(zip(claims, results, strict=True))
    ]
    _claims, lost = store.finish_and_claim(2, (), done, limit=0)
    assert lost == []
    for index, (task_id, result) in enumerate(zip(ids, results, strict=True)):
        row = _row(store, task_id)
        written = (row["status"], row["result"], row["duration"], row["completed_at"] is not None)
        assert written == ("completed", result, 0.25 * index, True)
        shown = (
            row["progress_percentage"],
            row["current_step"],
            row["total_steps"],
            row["progress_message"],
        )
        assert shown == ((12.5, "3", 7, "step «three»") if index % 2 else (None,) * 4)


def test_a_lost_claim_is_reported_and_not_written_the_others_are(store: Store) -> None:
    ids = store.enqueue([NewTask("t") for _ in range(3)])
    claims, _lost = store.finish_and_claim(7, (), limit=3)
    with store.engine.begin() as conn:  # another attempt took the second task meanwhile
        conn.execute(sa.update(tasks).where(tasks.c.id == ids[1]).values(attempts=5))
    done = [Finished(claim, "null", 0.0) for claim in claims[:2]]
    _claims, lost = store.finish_and_claim(7, (), done, release=[claims[2]], limit=0)
    assert lost == [ids[1]]
    assert [_row(store, i)["status"] for i in ids] == ["completed", "running", "pending"]
    assert _row(store, ids[1])["result"] is None
    assert _row(store, ids[2])["attempts"] == 0


def test_release_unstarted_gives_back_only_the_gone_workers_running_tasks(store: Store) -> None:
    ids = store.enqueue([NewTask("t") for _ in range(3)])
    mine, _lost = store.finish_and_claim(3, (), limit=2)
    theirs, _lost = store.finish_and_claim(4, (), limit=1)
    released = store.release_unstarted(3, [mine[1].id, theirs[0].id])
    assert released == [mine[1].id]  # the other worker's task is not ours to give back
    assert [(_row(store, i)["status"], _row(store, i)["attempts"]) for i in ids] == [
        ("running", 1),
        ("pending", 0),
        ("running", 1),
    ]


def _refuse_claims_of(store: Store, task_type: str) -> None:
    """A trigger that fails any claim (pending -> running) of task_type's tasks."""
    with store.engine.begin() as conn:
        if store.is_sqlite:
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE UPDATE OF status ON tasks "
                f"WHEN NEW.status = 'running' AND NEW.task_type = '{task_type}' "
                "BEGIN SELECT RAISE(ABORT, 'claim refused'); END"
            )
            return
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.status = 'running' AND NEW.task_type = '{task_type}' THEN "
            "RAISE EXCEPTION 'claim refused'; END IF; RETURN NEW; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION refuse()"
        )


def test_a_round_trip_after_a_lone_claim_is_still_one_transaction(store: Store) -> None:
    """A claim with nothing to complete runs alone (in autocommit on PostgreSQL); the next
    round trip, which completes and then claims, is whole again: its claim failing undoes
    its completions, and the worker's connection is replaced, then works."""
    first = store.enqueue([NewTask("t")])[0]
    claims, _lost = store.finish_and_claim(5, (), limit=1)  # a lone claim
    assert [claim.id for claim in claims] == [first]
    _refuse_claims_of(store, "refused")
    refused = store.enqueue([NewTask("refused")])[0]
    with pytest.raises(sa.exc.DBAPIError, match="claim refused"):
        store.finish_and_claim(5, (), [Finished(claims[0], "1", 0.0)], limit=1)
    assert (_row(store, first)["status"], _row(store, refused)["status"]) == (
        "running",
        "pending",
    )  # the completion went with the failed claim

    store.enqueue([NewTask("t", priority=1)])  # claimed before the refused one
    more, lost = store.finish_and_claim(5, (), [Finished(claims[0], "1", 0.0)], limit=1)
    assert (lost, _row(store, first)["status"], len(more)) == ([], "completed", 1)
    assert more[0].task_type == "t"
