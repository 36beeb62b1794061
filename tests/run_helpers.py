"""Helpers shared by the tests that train: a Ctrl-C at a chosen step (exact-resume tests)."""

from __future__ import annotations

import os
import signal
from typing import Any


def interrupt_at(method: Any, at: int) -> Any:
    """``method`` with a real SIGINT (Ctrl-C) sent to this process while it prepares step ``at`` (0-based):
    the loop finishes that step, saves a checkpoint and stops, as it does for a user's Ctrl-C."""
    prepare = method.before_step

    def before_step(model: Any, step: int) -> Any:
        if step == at:
            os.kill(os.getpid(), signal.SIGINT)
        return prepare(model, step)

    method.before_step = before_step
    return method
