"""The completion journal a worker keeps in a memfd and its supervisor reads after a kill."""

from __future__ import annotations

import os

from workers.store import Claim, Finished, Progress
from workers.worker import CompletionJournal, SharedState, read_journal


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
