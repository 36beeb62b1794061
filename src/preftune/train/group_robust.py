"""Group-robust DPO in the training loop: ``train dpo`` with ``group_robust: true``.

The math is ``preftune.core.group_robust`` (Ramesh et al. 2024, Algorithm 1); this file holds the state
the method keeps between steps and says when it changes:

* the groups are fixed at setup: the sorted ``group`` names of the training pairs and their counts N_g
  (N = all training pairs); a training pair without a group is an error;
* alpha starts uniform, 1/K each. Step t's loss is ``sum_i alpha_{g_i} (N / N_{g_i}) loss_i / U`` (U the
  step's pairs over every micro-batch and process, the loop's normaliser) with alpha fixed during the step;
* after the step's last micro-batch, the per-group loss sums of the step are summed over processes
  (one all-reduce), ``hat L_g = (N / N_g) S_g / U`` and alpha moves by one exponentiated-gradient step.

So alpha changes once per optimizer step, from the whole step's pairs: batch 8 x accumulation 1, batch 1
x accumulation 8 and two processes of 4 give the same alpha and the same update. The paper's Algorithm 1
moves alpha first and then weights the same sample's gradient with the new alpha; here the gradient of
step t is weighted by the alpha of steps 1..t-1, which needs no second forward pass over the step.
alpha, and the per-group sums since the last log line, are the method's state: saved in every
checkpoint (``method_state_R.pt``) and restored on resume, so a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from preftune.errors import PreftuneError


class GroupRobust:
    """The group weights alpha and the per-group running sums of one group-robust DPO run."""

    def __init__(self, names: list[str], sizes: list[int], *, eta: float, pairs_per_step: int,
                 log_every: int) -> None:
        self.names, self.eta = list(names), float(eta)
        self.index = {name: g for g, name in enumerate(self.names)}
        self.sizes = torch.tensor(sizes, dtype=torch.float64)  # N_g of the training data
        self.alpha = torch.full((len(names),), 1.0 / len(names), dtype=torch.float64)
        self.pairs_per_step, self.log_every = pairs_per_step, log_every
        self.since_log = torch.zeros(3, len(names), dtype=torch.float64)  # loss, correct, pairs (global)
        self.steps = 0  # optimizer steps taken
        self._step = torch.zeros(3, len(names), dtype=torch.float64)  # this process, this step so far
        self._pairs = 0  # training pairs of this step so far, on this process

    @classmethod
    def from_items(cls, items: list[Any], config: Any, log: Any) -> GroupRobust:
        """The groups of the training pairs (sorted names) and their sizes; every pair needs a group."""
        missing = [i for i, item in enumerate(items) if getattr(item, "group", None) is None]
        if missing:
            raise PreftuneError(
                f"group_robust needs the group of every training pair; {len(missing)} of {len(items)} have none "
                f"(the first is pair {missing[0] + 1} of {config.data or 'the training data'})",
                field="group_robust", hint="give every row a `group` (or `group_id`) column naming the labeller's "
                "group, or set group_robust: false (docs/diverse.md)")
        counts = Counter(str(item.group) for item in items)
        names = sorted(counts)
        log(f"group-robust DPO: {len(names)} group{'s' if len(names) != 1 else ''} in {len(items)} training pairs "
            f"({', '.join(f'{n}: {counts[n]}' for n in names)}); alpha starts at 1/{len(names)}, step size "
            f"{config.group_step_size}")
        return cls(names, [counts[n] for n in names], eta=config.group_step_size,
                   pairs_per_step=config.batch_size * config.grad_accum, log_every=config.log_every)

    # ------------------------------------------------------------------------------------------ per batch
    def loss(self, losses: torch.Tensor, correct: torch.Tensor, groups: list[str | None], *, normaliser: float,
             accelerator: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Step loss of one training micro-batch: ``sum_i alpha_{g_i} (N/N_{g_i}) losses_i / normaliser``.
        After the step's last micro-batch, alpha moves; the logs (alpha, and each group's mean loss and
        accuracy since the last log line) come back then, and are empty before."""
        from preftune.core.group_robust import group_robust_loss

        index = self.indices(groups)
        loss = group_robust_loss(losses, index.to(losses.device), self.alpha, group_sizes=self.sizes,
                                 normaliser=normaliser)
        for row, values in enumerate((losses.detach(), correct.detach())):
            self._step[row].index_add_(0, index, values.double().cpu())
        self._step[2].index_add_(0, index, torch.ones(len(index), dtype=torch.float64))
        self._pairs += len(index)  # a process's share of a step is batch_size x grad_accum pairs, however
        if self._pairs < self.pairs_per_step:  # many micro-batches hold them (max_tokens_per_batch)
            return loss, {}
        return loss, self._update(accelerator, normaliser)

    def indices(self, groups: list[str | None]) -> torch.Tensor:
        unknown = sorted({str(g) for g in groups if g not in self.index})
        if unknown:
            raise PreftuneError(f"pairs of group(s) {', '.join(map(repr, unknown))} that the training data "
                                f"does not have (groups: {', '.join(self.names)})", field="group_robust")
        return torch.tensor([self.index[g] for g in groups], dtype=torch.long)

    def _update(self, accelerator: Any, units: float) -> dict[str, float]:
        """The step's sums over processes -> hat L_g -> the new alpha; the logs of the step."""
        from preftune.core.group_robust import group_robust_weights

        totals = accelerator.reduce(self._step.to(accelerator.device), reduction="sum").cpu()
        self._step.zero_()
        self._pairs = 0
        scale = self.sizes.sum() / self.sizes  # N / N_g (every N_g >= 1: the groups come from the data)
        estimates = scale * totals[0] / units  # Ramesh et al. 2024, Algorithm 1 line 6 with a batch of U pairs
        self.alpha = group_robust_weights(self.alpha, estimates, self.eta)
        self.steps += 1
        self.since_log += totals
        logs = {f"group/alpha/{name}": self.alpha[g].item() for g, name in enumerate(self.names)}
        for g, name in enumerate(self.names):
            loss_sum, correct, pairs = self.since_log[:, g].tolist()
            if pairs > 0:  # a group with no pair since the last log line has no mean to show
                logs[f"group/loss/{name}"] = loss_sum / pairs
                logs[f"group/accuracy/{name}"] = correct / pairs
        if self.steps % self.log_every == 0:  # the loop writes a line after this step: start the next span
            self.since_log.zero_()
        return logs

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "alpha": self.alpha.clone(), "since_log": self.since_log.clone(),
                "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise PreftuneError(f"the checkpoint's groups {state['names']} are not the data's {self.names}",
                                field="group_robust", hint="resume with the same training data")
        self.alpha = state["alpha"].to(torch.float64).clone()
        self.since_log = state["since_log"].to(torch.float64).clone()
        self.steps = int(state["steps"])
        self._step.zero_()
        self._pairs = 0
