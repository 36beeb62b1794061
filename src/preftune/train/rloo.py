"""RLOO and REINFORCE: how a rollout becomes advantages, and a mini-batch of it a loss.

Steps (1)-(3) and (6) are ``preftune.train.online``'s. The whole completion is one action
(Ahmadian et al. 2024): its reward is the sequence-level KL-regularised reward
``R_i = r(x, y_i) - beta * sum_t KL_t`` (``rl.shaped_rewards`` summed over the tokens).

(4) advantages over the K samples of each prompt, by ``baseline``:
    * ``leave_one_out`` (RLOO): ``A_i = R_i - mean_{j != i} R_j`` (Kool et al. 2019; Ahmadian et al. 2024);
    * ``mean`` (REINFORCE with a baseline): ``A_i = R_i - mean of the rollout`` (Williams 1992);
    * ``none``: ``A_i = R_i``.
(5) update: the policy gradient ``-A_i * log pi(y_i | x)``, written as PPO's clipped surrogate on the
    sequence ratio ``pi(y_i|x) / pi_old(y_i|x)`` (Schulman et al. 2017, Eq. 7). With one pass and one
    mini-batch (the defaults) the ratio is 1 and the gradient is exactly REINFORCE's; more passes reuse
    the rollout with the ratio's clip as the trust region (as TRL does).

The unit is the completion: the loss is the sum over the step's completions divided by their number.
Metrics (completion means): ``policy/clipfrac``, ``policy/approxkl``, ``val/ratio``, ``loss/policy``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from preftune.config_online import RLOOConfig
from preftune.train.base import StepOutput
from preftune.train.online import OnlineMethod, Rollout


class RLOOMethod(OnlineMethod):
    """REINFORCE with the leave-one-out (or batch-mean) baseline (see the module docstring)."""

    unit = "sequence"

    # (4) advantages: sequence rewards minus the baseline of the other samples of the prompt
    def advantages(self, ro: Rollout) -> tuple[list[dict[str, Any]], dict[str, float]]:
        from preftune.core.rl import leave_one_out_advantages, mean_baseline_advantages, whiten

        c: RLOOConfig = self.config
        rewards = ro.rewards.sum(-1)  # r(x, y) - beta * sum_t KL_t
        if c.baseline == "leave_one_out":
            advantages = leave_one_out_advantages(rewards, ro.num_samples)
        elif c.baseline == "mean":
            advantages = mean_baseline_advantages(rewards)
        else:
            advantages = rewards
        if c.whiten_advantages:
            advantages = whiten(advantages)
        return ro.items(old_logp=(ro.logps * ro.mask).sum(-1), advantage=advantages), {}

    # (5) update: -A * ratio of the whole completion (clipped), summed over completions
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, normaliser: float) -> StepOutput:
        from preftune.core.rl import approx_kl, clip_fraction, ppo_policy_loss
        from preftune.train.rollout import policy_logits, response_logps

        c: RLOOConfig = self.config
        logp = response_logps(policy_logits(model, batch), batch, temperature=c.temperature).sum(-1)
        losses, ratio = ppo_policy_loss(logp, batch["old_logp"], batch["advantage"], clip_range=c.clip_range)
        ptx, ptx_metrics = self.ptx_loss(model, batch, normaliser=normaliser)
        metrics = {"policy/clipfrac": clip_fraction(ratio, clip_range=c.clip_range).sum(),
                   "policy/approxkl": approx_kl(logp, batch["old_logp"]).sum(), "val/ratio": ratio.sum(),
                   "loss/policy": losses.detach().sum(), **ptx_metrics}
        return StepOutput(loss=losses.sum() / normaliser + ptx, metric_sums=metrics, logs=dict(self.buffer["logs"]))


def train_rloo(config: RLOOConfig | dict[str, Any] | str | Path, *, prompts: list[Any] | None = None,
               reward_fn: Any = None, **overrides: Any) -> Path:
    """Run ``preftune train rloo`` from Python; returns ``OUTPUT_DIR/final``. ``prompts`` and
    ``reward_fn(prompt, completion) -> float`` replace the ``data`` and ``reward`` keys."""
    from preftune.train.loop import resolve_config, train

    return train(RLOOMethod(prompts=prompts, reward_fn=reward_fn), resolve_config("rloo", config, **overrides))
