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

Micro-batches. A step's items are split over processes and forwards by ``split_for_process``:
``grad_accum`` micro-batches of ``batch_size`` per process; or, with ``max_tokens_per_batch``, by
``token_budget_split``: each process's ``batch_size x grad_accum`` items, longest first, in as many
micro-batches as keep each forward within the token budget. Either way the step's items, and so the
update (the loop divides by the step's units over all micro-batches), are the same.
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


# ------------------------------------------------------------------------------------------------ micro-batches


def micro_batches(items: list[Any], config: TrainConfig, *, process: int, num_processes: int,
                  planned: bool = True) -> list[list[Any]]:
    """This process's micro-batches of one step's ``items``: ``grad_accum`` chunks (``split_for_process``),
    or, with ``max_tokens_per_batch``, as many as the token budget needs (``token_budget_split``).
    ``planned``: the items are the plan's global batch (False: this process's items from an online
    method's ``before_step``, which the budget does not apply to)."""
    budget = config.max_tokens_per_batch
    if budget is None:
        return split_for_process(items, micro_batches=config.grad_accum, process=process,
                                 num_processes=num_processes)
    if not planned:
        raise PreftuneError("max_tokens_per_batch is for the offline methods (sft, reward, dpo, kto): this "
                            "method's steps train on items it makes itself (before_step)",
                            field="max_tokens_per_batch", hint="set max_tokens_per_batch: null")
    from preftune.data.collate import row_lengths

    rows = [row_lengths(item) for item in items]
    return [[items[i] for i in batch] for batch in token_budget_split(rows, budget=budget, process=process,
                                                                      num_processes=num_processes)]


def padded_tokens(rows: Sequence[Sequence[int]]) -> int:
    """The positions a padded forward over these items computes: rows x longest row (``rows``: the
    ``row_lengths`` of each item, so a pair counts its chosen and its rejected row)."""
    flat = [n for item in rows for n in item]
    return len(flat) * max(flat, default=0)


def token_budget_split(rows: Sequence[Sequence[int]], *, budget: int, process: int,
                       num_processes: int) -> list[list[int]]:
    """Process ``process``'s micro-batches of one step, as indices into the step's items (``rows``: their
    ``row_lengths``), each of at most ``budget`` padded tokens (``padded_tokens``).

    Process ``p`` takes items ``p, p + W, p + 2W, ...`` of the step (the same count on every process,
    ``batch_size x grad_accum``), ordered longest first (stable), and fills micro-batches with consecutive
    items while the padded cost stays within the budget; an item over the budget alone is a micro-batch of
    its own. Then every process is brought to the same number of micro-batches, the largest any process
    needs, by halving its costliest micro-batch of several items until it has as many: each process runs
    the same number of forwards (FSDP and DeepSpeed gather parameters in every forward, so the processes'
    forwards must pair up) and no micro-batch exceeds the budget. A pure function of the step's items, so
    every process computes every process's count without communicating, and resume is exact. Which items
    share a forward never changes the update: the loop's normaliser is the step's units over all of them.
    """
    return _budget_split(rows, budget, num_processes)[process]


def _budget_split(rows: Sequence[Sequence[int]], budget: int, world: int) -> list[list[list[int]]]:
    """``token_budget_split`` for every process at once."""
    size = [(len(r), max(r, default=0)) for r in rows]  # an item's rows and its longest row

    def cost(batch: list[int]) -> int:
        return sum(size[i][0] for i in batch) * max(size[i][1] for i in batch)

    shares = [_pack(sorted(range(p, len(rows), world), key=lambda i: -size[i][1]), size, budget)
              for p in range(world)]
    count = max(len(share) for share in shares)
    for batches in shares:
        while len(batches) < count:  # there is a micro-batch of 2+ items: every process has as many items
            j = max((j for j, b in enumerate(batches) if len(b) > 1), key=lambda j: (cost(batches[j]), -j))
            half = (len(batches[j]) + 1) // 2
            batches[j:j + 1] = [batches[j][:half], batches[j][half:]]
    return shares


def _pack(order: list[int], size: Sequence[tuple[int, int]], budget: int) -> list[list[int]]:
    """Consecutive items of ``order`` (``size``: each item's rows and longest row) into micro-batches of at
    most ``budget`` padded tokens (an item over the budget alone forms one)."""
    batches: list[list[int]] = []
    current: list[int] = []
    count = longest = 0
    for i in order:
        rows, width = size[i]
        more, wider = count + rows, max(longest, width)
        if current and more * wider > budget:
            batches.append(current)
            current, more, wider = [], rows, width
        current.append(i)
        count, longest = more, wider
    return batches + [current] if current else batches


def describe_budget(items: Sequence[Any], state: TrainerState, config: TrainConfig, *,
                    lengths: Sequence[int] | None) -> list[str]:
    """Log lines for ``max_tokens_per_batch`` (none when it is off): the forwards per step and the share of
    real tokens among the padded positions over the first epoch's steps, against ``grad_accum``
    micro-batches of ``batch_size``; and, once, how many items are over the budget alone."""
    from preftune.data.collate import real_token_share, row_lengths

    budget, per_process = config.max_tokens_per_batch, config.batch_size * config.grad_accum
    if budget is None:
        return []
    world = state.global_batch // per_process
    rows = [row_lengths(item) for item in items]
    order = epoch_order(state.num_items, seed=config.seed, epoch=0, lengths=lengths, group=state.global_batch)
    forwards, real, padded = [], 0, 0
    for start in range(0, state.steps_per_epoch * state.global_batch, state.global_batch):
        step = [rows[i] for i in order[start:start + state.global_batch]]
        shares = _budget_split(step, budget, world)
        padded += sum(padded_tokens([step[i] for i in b]) for batches in shares for b in batches)
        real += sum(sum(r) for r in step)
        forwards.append(len(shares[0]))
    used = [rows[i] for i in order[:len(forwards) * state.global_batch]]
    lines = [f"max_tokens_per_batch {budget}: {sum(forwards) / len(forwards):.2f} forwards per step and process "
             f"on average over the first epoch ({min(forwards)} to {max(forwards)}; grad_accum {config.grad_accum} "
             f"without the budget); real tokens are {real / max(padded, 1):.1%} of the padded positions "
             f"({real_token_share(used, config.batch_size):.1%} in micro-batches of batch_size {config.batch_size})"]
    over = [padded_tokens([r]) for r in rows if padded_tokens([r]) > budget]
    if over:
        lines.append(f"max_tokens_per_batch {budget}: {len(over)} of {len(rows)} training items are over the "
                     f"budget alone (the largest {max(over)} padded tokens); each is a micro-batch of its own")
    return lines
