"""A step hook that sends this process SIGTERM, shared by the stop-and-resume tests.

``from tests.signal_helpers import sigterm_at``: ``AdaptRequest(on_step=sigterm_at(2))``
stops the run at global step 2 as a scheduler's SIGTERM would.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from sourcefree.engine.trainer import StepInfo


def sigterm_at(step: int, phase: str | None = None) -> Callable[[StepInfo], None]:
    """A ``on_step`` hook: SIGTERM to this process at ``step`` (of ``phase``, if given)."""

    def hook(info: StepInfo) -> None:
        if info.global_step == step and (phase is None or info.phase == phase):
            os.kill(os.getpid(), signal.SIGTERM)

    return hook
