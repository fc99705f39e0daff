"""Stop requests: SIGINT/SIGTERM, callbacks and callers only set a flag the loop reads.

The trainer checks the :class:`StopFlag` after every step, writes a checkpoint and
stops with a resumable error; a second signal restores the default handlers and
interrupts at once (atomic writes keep the checkpoints consistent).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any


class StopFlag:
    """Set by signal handlers, tests and callers; read by the loop after each step."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def set(self, reason: str = "stop requested") -> None:
        """Ask the loop to checkpoint and stop after the current step."""
        self.requested = True
        self.reason = reason


@contextlib.contextmanager
def signal_handlers(flag: StopFlag) -> Iterator[None]:
    """SIGINT/SIGTERM set ``flag``; a second signal interrupts at once. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        if flag.requested:
            for sig, old in previous.items():
                signal.signal(sig, old)
            raise KeyboardInterrupt
        flag.set(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
