"""What a worker keeps in memory its supervisor reads after a kill: the completion journal
(a memfd) and the list of claimed tasks not started (shared memory)."""

from __future__ import annotations

import os

from workers.store import Claim, Finished, Progress
from workers.worker import (
    MAX_BATCH,
    CompletionJournal,
    SharedState,
    Worker,
    map_shared_state,
    read_journal,
)


def test_what_the_supervisor_reads_back_is_what_the_worker_wrote() -> None:
    fd = os.memfd_create("journal")
    try:
        shared = SharedState()
        journal = CompletionJournal(fd, shared)
        claims = [Claim(i, "t", '{"big": "payload"}', "q", 5, 2, 9, 1.5, 7) for i in (1, 2, 3)]
        done = [
            Finished(claims[0], '"ünï \\"code\\""', 0.125),
            Finished(claims[1], "null", 0.5, Progress(40.0, "2", 5, "half «way»")),
            Finished(claims[2], "[1, 2]", 0.0, Progress(message="only a message")),
        ]
        for entry in done:
            journal.add(entry)
        journal.remove([2])  # written by the worker itself: no longer the supervisor's

        read = read_journal(fd, int(shared.journal_bytes))

        assert [(f.claim.id, f.claim.worker_id, f.claim.attempts) for f in read] == [
            (1, 7, 2),
            (3, 7, 2),
        ]
        assert [(f.claim.task_type, f.claim.queue) for f in read] == [("t", "q"), ("t", "q")]
        assert [(f.result, f.duration, f.progress) for f in read] == [
            (done[0].result, 0.125, None),
            ("[1, 2]", 0.0, Progress(message="only a message")),
        ]
        assert read_journal(fd, 0) == []
    finally:
        os.close(fd)


def test_the_supervisor_reads_exactly_the_claimed_tasks_not_started() -> None:
    """The list of unstarted tasks in shared memory, through batches of shrinking and
    growing size, some tasks started: what a supervisor would release after a kill."""
    fd = os.memfd_create("shared")
    try:
        _memory, shared = map_shared_state(fd)
        worker = Worker.__new__(Worker)  # only its shared memory and slot map take part
        worker.shared, worker._slots = shared, {}

        def claims(*ids: int) -> list[Claim]:
            return [Claim(i, "t", "{}", "q", 0, 1, 4, None, 7) for i in ids]

        big = claims(*range(1, MAX_BATCH + 1))  # a full batch
        worker._publish_unstarted(big)
        worker._publish_started(big[0])
        worker._publish_started(big[1])
        assert shared.unstarted_tasks() == list(range(3, MAX_BATCH + 1))

        worker._publish_unstarted(claims(500, 501))  # a small one after it: the rest cleared
        worker._publish_started(claims(500)[0])
        assert shared.unstarted_tasks() == [501]
        assert list(shared.unstarted).count(0) == MAX_BATCH - 1

        worker._publish_unstarted([])  # settled: none
        assert not any(shared.unstarted)
    finally:
        os.close(fd)
