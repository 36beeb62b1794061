"""The contract between the one training loop and each method (sft, reward, dpo, ppo, rloo, raft).

The loop (`preftune.train.loop`) owns everything generic: accelerate, optimizer, scheduler, gradient
accumulation, clipping, evaluation, checkpoints with exact resume, metrics.jsonl, trackers, the progress
bar and saving the final model. A method owns only what is its own:

1. ``setup(ctx)``: load the trainable model, the tokenizer, the reference model if any, and the
   train / eval examples (already tokenized, one item per example or pair).
2. ``collate(items)``: a list of items -> a batch of padded tensors (pad to the longest in the batch).
3. ``units(batch)``: how many units the batch's loss is a sum over (examples, pairs or tokens). The loop
   sums units over the micro-batches of one optimizer step and over processes, and passes the total to
   ``loss`` as ``normaliser``, so batch 8 x accumulation 1 gives the same update as batch 1 x
   accumulation 8, and two processes the same as one.
4. ``loss(model, batch, normaliser=...)``: the SUM of per-unit losses divided by ``normaliser``, and a
   dict of metric sums (the loop divides them by the same total when it logs; values that are already
   means, like a learning rate, go in ``logs`` of the return instead).
5. ``before_step(model, step)``: a hook for online methods (generate and score rollouts). Offline methods
   return None and the loop takes the step's items from ``train_items`` in a seeded order. An online
   method may return this process's items for the step (a list, at least ``grad_accum`` long); the loop
   then collates them into ``grad_accum`` micro-batches instead. (Refinement by the loop's author:
   returning a list is new; returning None keeps the original contract.)
6. ``save(model, path)``: write the final model and tokenizer with ``save_pretrained``.

Optional, for online methods (``preftune.train.online``; offline methods define none of them):

* ``updates_per_batch`` (int, default 1): optimizer steps the method takes on each global batch of
  ``train_items`` (PPO's epochs over a rollout); the loop's plan has that many more steps per epoch.
* ``state_dict()`` / ``load_state_dict(state)``: what the method keeps between steps (a rollout buffer,
  an adaptive KL coefficient); saved per process in every checkpoint (``method_state_R.pt``, tensors and
  plain values only) and restored on resume, so a run resumes exactly in the middle of a rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass
class StepOutput:
    loss: torch.Tensor                                        # scalar, already divided by the normaliser
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # summed over units; loop averages
    logs: dict[str, float] = field(default_factory=dict)     # already-final values (not averaged)


@dataclass
class RunContext:
    config: Any                 # the method's resolved config dataclass
    accelerator: Any            # accelerate.Accelerator
    output_dir: Path
    log: Any                    # callable(str) that prints on the main process only


class TrainingMethod(Protocol):
    model: torch.nn.Module
    tokenizer: Any
    train_items: list[Any]
    eval_items: list[Any]

    def setup(self, ctx: RunContext) -> None: ...

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]: ...

    def units(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, normaliser: float) -> StepOutput: ...

    def before_step(self, model: torch.nn.Module, step: int) -> list[Any] | None: ...

    def save(self, model: torch.nn.Module, path: Path) -> None: ...
