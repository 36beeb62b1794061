"""The learning-rate schedule: linear warmup from 0 to the peak, then cosine or linear decay to 0, or constant.

The multiplier of the peak learning rate at step ``s`` (``W`` warmup steps, ``S`` steps in all)::

    s < W:      s / max(1, W)
    constant:   1
    linear:     max(0, (S - s) / max(1, S - W))
    cosine:     max(0, (1 + cos(pi * p)) / 2)   with p = (s - W) / max(1, S - W)

These are the expressions of transformers' ``get_scheduler`` ("constant_with_warmup", "linear", "cosine" with
half a cycle), written in the same order so every value is the same float, and the scheduler is the same
``torch.optim.lr_scheduler.LambdaLR`` (its ``state_dict`` is what checkpoints hold, so checkpoints written
with either resume with the other). Written here so that training does not import ``transformers.optimization``,
which imports the Trainer's utilities and peft (about 0.4 s of every start-up).
"""

from __future__ import annotations

import functools
import math
from typing import Any


def lr_multiplier(step: int, *, kind: str, warmup: int, total: int) -> float:
    """The factor of the peak learning rate at ``step`` (see the module docstring)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def lr_schedule(optimizer: Any, config: Any, total_steps: int) -> Any:
    """The scheduler of ``config.lr_scheduler`` (cosine, linear, constant) over ``total_steps``, with
    ``warmup_steps`` (or ``ceil(warmup_ratio * total_steps)``) of linear warmup."""
    from torch.optim.lr_scheduler import LambdaLR

    if config.lr_scheduler not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown lr_scheduler {config.lr_scheduler!r}")
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    return LambdaLR(optimizer, functools.partial(lr_multiplier, kind=config.lr_scheduler, warmup=warmup,
                                                 total=total_steps))
