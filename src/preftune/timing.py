"""Where the time before the first optimizer step goes: a clock of consecutive named phases.

The training loop logs, just before its first step::

    ready to train after 9.4 s (imports 5.2 s, accelerate 0.1 s, model 0.6 s, data 0.3 s, reference 2.9 s,
    prepare 0.3 s)

Phases follow one another: ``mark(name)`` ends the phase that is running and starts ``name`` (a name seen
before adds to its total), so the phases sum to the whole. ``preftune train`` starts the clock when its
command begins, counting from the start of the process when the process runs that one command (the
interpreter, preftune's CLI and the libraries it imports are the ``imports`` phase); ``preftune.train.run``
from Python starts it when the training loop begins. The loaders mark their phases as they begin (``model``: tokenizer and weights, ``data``: reading and
tokenising, ``reference``: building the reference model and, until the set-up ends, its log-prob pass or the
cache read), and the loop marks ``accelerate`` and ``prepare`` (optimizer, run directory, resume) and reads
the line. With no clock running, ``mark`` does nothing, so a loader called outside training (generate,
score) pays one global lookup.
"""

from __future__ import annotations

import os
import time


def process_age() -> float | None:
    """Seconds since this process started (Linux: ``/proc/self/stat``), or None where that is unknown."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()  # the command name may hold spaces: fields after it
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return age if 0 <= age < 86_400 else None


class Clock:
    """Consecutive phases: seconds per phase name, in the order they first ran."""

    def __init__(self, phase: str, *, origin: float | None = None) -> None:
        now = time.perf_counter()
        self.origin = now if origin is None else origin
        self.current, self.since = phase, self.origin
        self.totals: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[self.current] = self.totals.get(self.current, 0.0) + now - self.since
        self.current, self.since = phase, now

    def read(self) -> tuple[float, dict[str, float]]:
        """(seconds since the origin, seconds per phase) with the running phase counted up to now."""
        self.mark(self.current)
        return self.since - self.origin, dict(self.totals)


_clock: Clock | None = None


def start(phase: str = "imports", *, since_process_start: bool = False) -> None:
    """Start the clock in ``phase`` unless it is running; ``since_process_start``: count from the start of
    the process (when it is known), so the time before this call counts as ``phase``."""
    global _clock
    if _clock is None:
        age = process_age() if since_process_start else None
        _clock = Clock(phase, origin=None if age is None else time.perf_counter() - age)


def mark(phase: str) -> None:
    """From now on the time goes to ``phase`` (nothing when no clock runs)."""
    if _clock is not None:
        _clock.mark(phase)


def stop() -> tuple[float, dict[str, float]] | None:
    """Stop the clock; return (seconds since its origin, seconds per phase), or None when none ran."""
    global _clock
    clock, _clock = _clock, None
    return None if clock is None else clock.read()


def ready_line(total: float, phases: dict[str, float]) -> str:
    """``ready to train after 9.4 s (imports 5.2 s, ..., prepare 0.3 s)``."""
    parts = ", ".join(f"{name} {_seconds(seconds)} s" for name, seconds in phases.items())
    return f"ready to train after {_seconds(total)} s ({parts})"


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"
