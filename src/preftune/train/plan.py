"""The data plan of the training loop: which training items each optimizer step takes.

Data order. Each epoch uses a permutation of the training items seeded by ``seed + epoch``; optimizer
step ``s`` takes positions ``[i*G, (i+1)*G)`` of epoch ``s // steps_per_epoch`` (``i`` = the step within
the epoch, ``G = batch_size * grad_accum * num_processes``). The position in the data is therefore a
pure function of the step, and resuming needs only the step counter, never a replay of a dataloader.
Items that do not fill a last global batch are left out of that epoch (a different few each epoch).
With ``group_by_length`` the epoch's permutation is then regrouped (same seed) so that each global batch
holds items of similar length, longest first, so its micro-batches (contiguous runs) are also of similar
length; the regrouping depends on the global batch only, never on how it is split into micro-batches or
processes, so the loop's accumulation and multi-process invariances and exact resume hold with it too.
An online method that trains several optimizer steps on each global batch of prompts (PPO's epochs over
a rollout) says so with ``updates_per_batch``; an epoch then has that many times more steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from preftune.errors import PreftuneError
from preftune.train.base import TrainConfig
from preftune.train.checkpoint import TrainerState


def plan_steps(num_items: int, config: TrainConfig, num_processes: int, *,
               updates_per_batch: int = 1) -> TrainerState:
    """Global batch, steps per epoch and total steps for ``num_items`` training items
    (``updates_per_batch`` optimizer steps on each global batch; 1 for offline methods)."""
    global_batch = config.batch_size * config.grad_accum * num_processes
    steps_per_epoch = num_items // global_batch * updates_per_batch
    if steps_per_epoch == 0:
        raise PreftuneError(
            f"only {num_items} training examples, but one optimizer step needs {global_batch} "
            f"(batch_size {config.batch_size} x grad_accum {config.grad_accum} x {num_processes} processes)",
            field="batch_size", hint="lower batch_size or grad_accum, or add training data")
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    return TrainerState(num_items=num_items, global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                        total_steps=total, group_by_length=config.group_by_length)


def epoch_order(num_items: int, *, seed: int, epoch: int, lengths: Sequence[int] | None = None,
                group: int = 1) -> list[int]:
    """The seeded permutation of item indices for one epoch (independent of every global RNG).

    With ``lengths`` (one per item: ``group_by_length``), the permutation's first ``num_items // group *
    group`` positions, the ones the epoch uses, are regrouped by ``length_grouped_order`` (seeded by the
    same ``seed + epoch``) so that each block of ``group`` (one optimizer step) holds items of similar
    length, longest first, the blocks in random order but the one holding the longest item first (an
    out-of-memory shows at step 0); the items left out at the end stay the same.
    """
    if lengths is not None and len(lengths) != num_items:
        raise ValueError(f"{len(lengths)} lengths for {num_items} items")
    key = None if lengths is None else tuple(lengths)
    return list(_epoch_order(num_items, seed + epoch, key, group))


@functools.lru_cache(maxsize=2)  # every step of an epoch reads the same order: compute it once
def _epoch_order(num_items: int, seed: int, lengths: tuple[int, ...] | None, group: int) -> tuple[int, ...]:
    from preftune.data.collate import length_grouped_order

    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed)).tolist()
    if lengths is None:
        return tuple(order)
    used = num_items // group * group
    grouped = length_grouped_order([lengths[i] for i in order[:used]], group, seed)
    return tuple([order[j] for j in grouped] + order[used:])


def batch_indices(state: TrainerState, step: int, *, seed: int, lengths: Sequence[int] | None = None) -> list[int]:
    """The item indices of optimizer step ``step`` (0-based) over all processes, in order (``lengths``:
    the items' lengths when steps are grouped by length)."""
    epoch, within = divmod(step, state.steps_per_epoch)
    order = epoch_order(state.num_items, seed=seed, epoch=epoch, lengths=lengths, group=state.global_batch)
    return order[within * state.global_batch:(within + 1) * state.global_batch]


def split_for_process(items: list[Any], *, micro_batches: int, process: int, num_processes: int) -> list[list[Any]]:
    """This process's micro-batches of one step: micro-batch ``k`` of process ``p`` is the (k*W + p)-th
    contiguous chunk of the step's items, so every process gets ``micro_batches`` non-empty chunks."""
    chunks = micro_batches * num_processes
    if len(items) < chunks:
        raise PreftuneError(f"a step has {len(items)} items, fewer than {chunks} micro-batches x processes")
    bounds = [round(j * len(items) / chunks) for j in range(chunks + 1)]
    return [items[bounds[c]:bounds[c + 1]] for c in (k * num_processes + process for k in range(micro_batches))]


def process_share(num_items: int, batch: int, *, config: TrainConfig, process: int, num_processes: int) -> list[int]:
    """Process ``process``'s share of global batch ``batch`` (0-based) of ``num_items`` items in the seeded
    epoch order: what an online method's rollouts (its prompts) and PPO-ptx (its SFT rows) take per step."""
    global_batch = config.batch_size * config.grad_accum * num_processes
    state = TrainerState(num_items=num_items, global_batch=global_batch,
                         steps_per_epoch=max(1, num_items // global_batch))
    per_process = config.batch_size * config.grad_accum
    return batch_indices(state, batch, seed=config.seed)[process * per_process:(process + 1) * per_process]
