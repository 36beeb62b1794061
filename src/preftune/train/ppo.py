"""PPO: how a rollout becomes advantages, and a mini-batch of it a loss.

Steps (1)-(3) and (6) are ``preftune.train.online``'s (generate K completions with the current policy,
score them, KL-shape the rewards per token). PPO's own are its recipe: a value network, and

(4) advantages. Each response token is an action; the per-token rewards are
    ``R_t = -beta * KL_t (+ r(x, y) at the last token)``. A value network ``V`` (its own backbone and a
    scalar head, started from ``value_model``, the reward model or the policy's start) gives ``V(s_t)``
    at the rollout; GAE turns rewards and values into advantages ``A_t`` and returns ``G_t = A_t + V_t``
    (Schulman et al. 2016; Schulman et al. 2017, Eqs. 11-12); ``whiten_advantages`` normalises ``A``.
(5) update, ``update_epochs`` passes over the rollout in ``num_mini_batches`` optimizer steps each::

        ratio_t = pi(y_t) / pi_old(y_t)
        L_t     = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps))      (Schulman et al. 2017, Eq. 7)
                  + vf_coef * 1/2 max((V_t - G_t)^2, (V_clip,t - G_t)^2)     (value clipping, ppo2)
        loss    = sum over the step's response tokens of L_t / their number  (+ ptx_coef * SFT NLL)

The unit is the response token. Policy and value network are one ``nn.Module``
(``preftune.models.value.PolicyWithValue``), so the loop's one optimizer, clipping and checkpoints cover
both; the final model is the policy alone.

Metrics (token means): ``policy/clipfrac``, ``policy/approxkl``, ``val/ratio``, ``val/vpred``,
``val/clipfrac``, ``loss/policy``, ``loss/value``; per rollout: ``objective/*``, ``completions/*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from preftune.config import opt
from preftune.train.base import MethodSpec, OnlineConfig
from preftune.train.online import OnlineMethod, OnlineRecipe

if TYPE_CHECKING:
    import torch

    from preftune.train.rollout import Rollout


@dataclass
class PPOConfig(OnlineConfig):
    """`preftune train ppo`: PPO with a value network and GAE on KL-shaped per-token rewards."""

    command: ClassVar[str] = "ppo"

    output_dir: str = opt("runs/ppo", "run directory: config.yaml, metrics.jsonl, samples.jsonl, final/")
    update_epochs: int = opt(4, "passes over each rollout (PPO's K epochs)", ge=1)
    whiten_advantages: bool = opt(True, "normalise the rollout's advantages to mean 0, variance 1")
    value_model: str | None = opt(None, "start of the value network: null = the reward model when `reward` "
                                  "is one, else the policy's starting model (a new scalar head)")
    clip_range: float = opt(0.2, "PPO ratio clip epsilon (Schulman et al. 2017, Eq. 7)", gt=0)
    value_clip_range: float = opt(0.2, "clip of the value change around the rollout's values", gt=0)
    vf_coef: float = opt(0.1, "weight of the value loss next to the policy loss", gt=0,
                         why="with 0 the value network is never trained and GAE runs on a random critic")
    gamma: float = opt(1.0, "discount of the per-token rewards", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda (Schulman et al. 2016): 0 = one-step TD, 1 = Monte Carlo", ge=0, le=1)
    whiten_rewards: bool = opt(False, "scale the per-token rewards to unit variance before GAE")

    model_keys: ClassVar[tuple[str, ...]] = (*OnlineConfig.model_keys, "value_model")


# (4) advantages: GAE on the KL-shaped per-token rewards
def gae_advantages(ro: Rollout, c: PPOConfig) -> tuple[list[dict[str, Any]], dict[str, float]]:
    from preftune.core.rl import gae, whiten

    # whitening statistics over the whole rollout (every process's share), so W processes train as one
    rewards = whiten(ro.rewards, ro.mask, shift_mean=False, reduce=ro.reduce) if c.whiten_rewards else ro.rewards
    advantages, returns = gae(rewards, ro.values, ro.mask, gamma=c.gamma, lam=c.lam)
    if c.whiten_advantages:
        advantages = whiten(advantages, ro.mask, reduce=ro.reduce)
    return ro.items(old_logps=ro.logps, old_values=ro.values, advantages=advantages, returns=returns), {}


# (5) update: the clipped surrogate and the clipped value loss, per response token
def ppo_loss(logps: torch.Tensor, values: torch.Tensor, batch: dict[str, torch.Tensor],
             c: PPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from preftune.core.rl import approx_kl, clip_fraction, clipped_value_loss, ppo_policy_loss

    mask = batch["response_mask"]
    pg, ratio = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], clip_range=c.clip_range)
    vf, vclipped = clipped_value_loss(values, batch["old_values"], batch["returns"], clip_range=c.value_clip_range)
    metrics = {"policy/clipfrac": (clip_fraction(ratio, clip_range=c.clip_range) * mask).sum(),
               "policy/approxkl": (approx_kl(logps, batch["old_logps"]) * mask).sum(),
               "val/ratio": (ratio * mask).sum(), "val/vpred": (values.detach() * mask).sum(),
               "val/clipfrac": (vclipped * mask).sum(), "loss/policy": (pg.detach() * mask).sum(),
               "loss/value": (vf.detach() * mask).sum()}
    return (pg + c.vf_coef * vf) * mask, metrics


class PPOMethod(OnlineMethod):
    """PPO with a value network and GAE (see the module docstring)."""

    recipe = OnlineRecipe(unit="token", value_network=True, advantages=gae_advantages, loss=ppo_loss)


SPEC = MethodSpec("ppo", PPOConfig, PPOMethod,
                  "Online RLHF with PPO: sample, score (reward model or function), KL-shape, GAE, clipped updates.")
