"""Signals for the supervisor's loop: the handler only records; the loop acts."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Any

HANDLED = (
    signal.SIGTERM,  # drain, then stop
    signal.SIGINT,  # the same; a second one stops at once
    signal.SIGQUIT,  # stop at once
    signal.SIGHUP,  # reload the configuration and replace the workers one by one
    signal.SIGTTIN,  # one worker more
    signal.SIGTTOU,  # one worker fewer
)


class SignalInbox:
    """Records signals and wakes the loop through a pipe (signal.set_wakeup_fd)."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._received: collections.deque[int] = collections.deque()
        self._previous: dict[int, Any] = {}
        self._previous_wakeup = -1
        self.installed = False

    def fileno(self) -> int:
        return self._read_fd

    def install(self) -> None:
        """Take over the handled signals; only the main thread may."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in HANDLED:
            self._previous[signum] = signal.signal(signum, self._record)
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self.installed = True

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self._received.append(signum)

    def wake(self) -> None:
        """Wake the loop from another thread (Supervisor.stop)."""
        with contextlib.suppress(BlockingIOError):  # a full pipe wakes the loop anyway
            os.write(self._write_fd, b"\0")

    def drain(self) -> list[int]:
        """The signals received since the last drain, oldest first."""
        try:
            while os.read(self._read_fd, 512):
                pass
        except BlockingIOError:
            pass
        signals: list[int] = []
        while self._received:
            signals.append(self._received.popleft())
        return signals

    def close(self) -> None:
        if self.installed:
            signal.set_wakeup_fd(self._previous_wakeup)
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self.installed = False
        os.close(self._read_fd)
        os.close(self._write_fd)
