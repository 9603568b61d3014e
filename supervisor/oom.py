"""Tell a worker killed by the kernel's OOM killer from one killed by a person.

Both die of SIGKILL. The kernel logs every OOM kill to its ring buffer ("Killed process
1234 (python) ..." and "oom-kill:...,pid=1234,..."), which root reads from /dev/kmsg. Where
that cannot be read (not root, or systemd's ProtectKernelLogs=), the answer is "unknown"
and the exit reason says both are possible.
"""

from __future__ import annotations

import os
import re

KMSG = "/dev/kmsg"
MAX_RECORDS = 20_000  # the ring buffer holds a few thousand; never read without end
CLOCK_SLACK = 1.0  # seconds: the kernel's log clock and CLOCK_MONOTONIC may differ a little


def killed_by_oom(pid: int, since: float) -> bool | None:
    """Whether the kernel logged an OOM kill of pid at or after `since` (time.monotonic()).

    None when the kernel log cannot be read. The time bound keeps an old kill of a process
    that had the same pid from counting.
    """
    pattern = re.compile(rf"(?:Killed process {pid} |oom-kill:.*[,:]pid={pid},)")
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        for _ in range(MAX_RECORDS):
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:  # read everything there is
                return False
            except BrokenPipeError:  # records overwritten while we read: go on with the next
                continue
            except OSError:
                return None
            if not record:
                return False
            prefix, _, message = record.decode("utf-8", "replace").partition(";")
            if pattern.search(message) and _logged_at(prefix) >= since - CLOCK_SLACK:
                return True
        return False
    finally:
        os.close(fd)


def _logged_at(prefix: str) -> float:
    """The record's time in seconds since boot ("level,seq,usec,flags" before the ';')."""
    fields = prefix.split(",")
    try:
        return int(fields[2]) / 1e6
    except (IndexError, ValueError):
        return float("inf")  # an unreadable time: trust the pid match
