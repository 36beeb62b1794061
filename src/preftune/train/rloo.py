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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from preftune.config import opt, require
from preftune.train.base import MethodSpec, OnlineConfig
from preftune.train.online import OnlineMethod, OnlineRecipe

if TYPE_CHECKING:
    import torch

    from preftune.train.rollout import Rollout


@dataclass
class RLOOConfig(OnlineConfig):
    """`preftune train rloo`: REINFORCE with the leave-one-out baseline over K samples per prompt."""

    command: ClassVar[str] = "rloo"

    output_dir: str = opt("runs/rloo", "run directory: config.yaml, metrics.jsonl, samples.jsonl, final/")
    num_samples: int = opt(4, "completions sampled per prompt in each rollout (K)", ge=1)
    baseline: str = opt("leave_one_out", "leave_one_out = mean of the other K - 1 samples (RLOO); mean = the "
                        "rollout's mean (plain REINFORCE); none", choices=("leave_one_out", "mean", "none"))
    clip_range: float = opt(0.2, "sequence ratio clip when a rollout is used for more than one step", gt=0)

    def validate(self) -> None:
        super().validate()
        require(self, "num_samples", not (self.baseline == "leave_one_out" and self.num_samples < 2),
                 "must be >= 2 for the leave-one-out baseline (or set baseline: mean)")


# (4) advantages: sequence rewards minus the baseline of the other samples of the prompt
def baseline_advantages(ro: Rollout, c: RLOOConfig) -> tuple[list[dict[str, Any]], dict[str, float]]:
    from preftune.core.rl import leave_one_out_advantages, mean_baseline_advantages, whiten

    rewards = ro.rewards.sum(-1)  # r(x, y) - beta * sum_t KL_t
    if c.baseline == "leave_one_out":
        advantages = leave_one_out_advantages(rewards, ro.num_samples)
    elif c.baseline == "mean":  # the mean and the whitening over every process's share, as one process
        advantages = mean_baseline_advantages(rewards, ro.reduce)
    else:
        advantages = rewards
    if c.whiten_advantages:
        advantages = whiten(advantages, reduce=ro.reduce)
    return ro.items(old_logp=(ro.logps * ro.mask).sum(-1), advantage=advantages), {}


# (5) update: -A * ratio of the whole completion (clipped), per completion
def sequence_loss(logps: torch.Tensor, values: None, batch: dict[str, torch.Tensor],
                  c: RLOOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from preftune.core.rl import approx_kl, clip_fraction, ppo_policy_loss

    logp = logps.sum(-1)
    losses, ratio = ppo_policy_loss(logp, batch["old_logp"], batch["advantage"], clip_range=c.clip_range)
    metrics = {"policy/clipfrac": clip_fraction(ratio, clip_range=c.clip_range).sum(),
               "policy/approxkl": approx_kl(logp, batch["old_logp"]).sum(), "val/ratio": ratio.sum(),
               "loss/policy": losses.detach().sum()}
    return losses, metrics


class RLOOMethod(OnlineMethod):
    """REINFORCE with the leave-one-out (or batch-mean) baseline (see the module docstring)."""

    recipe = OnlineRecipe(unit="sequence", value_network=False, advantages=baseline_advantages, loss=sequence_loss)


SPEC = MethodSpec("rloo", RLOOConfig, RLOOMethod,
                  "Online RLHF with REINFORCE: K samples per prompt, the leave-one-out (or batch-mean) baseline.")
