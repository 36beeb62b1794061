"""GRPO: how a rollout becomes group-relative advantages, and a mini-batch of it a loss.

Steps (1)-(2) and (6) are ``preftune.train.online``'s: K completions per prompt (``num_samples``, the
group), each scored by the reward (or several rewards, aggregated, e.g. ``reward_aggregation: weighted``
with ``reward_weights``). GRPO (Shao et al. 2024, "DeepSeekMath", Eq. 3) needs no value network: the
group is the baseline. The rewards are NOT KL-shaped; the KL to the reference is a term of the loss.

(4) advantages, per completion, the same for each of its tokens (``core.rl.group_advantages``)::

        A_i = (r_i - mean_group r) / (std_group r + eps)       scale_rewards: group  (Shao et al. 2024, Sec. 4.1.2)
        A_i = (r_i - mean_group r) / (std_batch r + eps)       scale_rewards: batch  (Liu Z. et al. 2025)
        A_i =  r_i - mean_group r                              scale_rewards: none   (Dr. GRPO, Liu et al. 2025)

    A group whose rewards are all equal has A = 0; with ``loss_type: dapo`` its completions are dropped
    from the training items (DAPO's dynamic sampling, Yu et al. 2025, Eq. 8; counted as ``dropped_groups``),
    and so are truncated ones under ``mask_truncated_completions``, unless fewer than one per micro-batch
    of the rollout (``num_mini_batches x grad_accum``) would remain on a process: then the rollout is
    trained as it is (A = 0 for those groups, weight 0 for masked completions).

(5) update, per response token t of completion i (``update_epochs`` passes, ``num_mini_batches`` steps)::

        ratio_t = pi(y_t) / pi_old(y_t)
        L_t     = -min(ratio_t A_i, clip(ratio_t, 1 - eps, 1 + eps_high) A_i)      (Shao et al. 2024, Eq. 3;
                  + beta * [pi_ref/pi - log(pi_ref/pi) - 1]                        k3 KL, Eq. 4; eps_high: DAPO)

    and by ``loss_type`` (``core.rl.grpo_unit_losses``; ``w_i`` 0 for a masked truncated completion):

        grpo     1/G sum_i w_i 1/|o_i| sum_t L_t               unit: completion  (Shao et al. 2024, Eq. 3)
        dr_grpo  1/G sum_i w_i 1/max_new_tokens sum_t L_t      unit: completion  (Liu et al. 2025, Dr. GRPO)
        dapo     1/sum_i |o_i| sum_i sum_t w_i L_t             unit: token       (Yu et al. 2025, Eq. 8)

    G and the tokens are those of the whole optimizer step (every micro-batch and process: the loop's
    normaliser), so batch x accumulation and the number of processes do not change the update. With
    ``kl_coef: 0`` there is no KL term and no reference model is loaded.

Metrics: per rollout ``reward`` (mean), ``reward_std`` (mean over groups of the group's std),
``frac_reward_zero_std`` (share of groups with all-equal rewards), ``dropped_groups`` (dapo), besides
``objective/*`` and ``completions/*``; per step, means over the loss's units (each completion's token
mean for grpo and dr_grpo, tokens for dapo): ``kl`` (the k3 term; when kl_coef > 0), ``entropy`` (of the
policy's next-token distribution), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``.
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

SCALES = ("group", "batch", "none")         # = preftune.core.rl.GROUP_SCALES (this module loads no torch)
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")    # = preftune.core.rl.LOSS_TYPES


@dataclass
class GRPOConfig(OnlineConfig):
    """`preftune train grpo`: group-relative policy optimisation, K samples per prompt, no value network."""

    command: ClassVar[str] = "grpo"
    aliases: ClassVar[dict[str, str]] = {
        **OnlineConfig.aliases, "epsilon": "clip_range", "epsilon_low": "clip_range", "num_iterations": "update_epochs",
        "reward_funcs": "rewards",
    }
    alias_notes: ClassVar[dict[str, str]] = {
        **OnlineConfig.alias_notes,
        "beta": "the coefficient of GRPO's k3 KL term in the loss (0 = no reference model loaded)",
        "reward_funcs": "each entry a module:function, file.py:function or reward-model directory; weights with "
                        "reward_aggregation: weighted and reward_weights",
    }

    output_dir: str = opt("runs/grpo", "run directory: config.yaml, metrics.jsonl, samples.jsonl, final/")
    num_samples: int = opt(4, "completions per prompt in each rollout: the group (K >= 2) that baselines itself",
                           ge=1)
    kl_coef: float = opt(0.04, "beta of the k3 KL term in the loss (Shao et al. 2024, Eq. 3-4); 0 = no KL term and "
                         "no reference model loaded", ge=0, why="a negative beta would reward moving away from the "
                         "reference")
    kl_estimator: str = opt("k3", "estimator of the logged objective/kl (the loss's KL term is always k3)",
                            choices=("k1", "k3"))
    scale_rewards: str = opt("group", "advantage = (r - group mean) / std of: group; batch = the whole rollout's; "
                             "none = no scaling (Dr. GRPO)", choices=SCALES)
    loss_type: str = opt("grpo", "grpo = token mean per completion, then mean; dr_grpo = token sum / max_new_tokens; "
                         "dapo = mean over all tokens, all-equal groups dropped", choices=LOSS_TYPES)
    clip_range: float = opt(0.2, "epsilon: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]", gt=0, lt=1,
                            why="1 - epsilon is the ratio's lower clip, which must stay above 0")
    epsilon_high: float | None = opt(None, "upper clip of the ratio (DAPO's clip-higher, e.g. 0.28); null = "
                                     "clip_range", gt=0)
    mask_truncated_completions: bool = opt(False, "completions that did not end with EOS within max_new_tokens "
                                           "contribute no loss")

    def validate(self) -> None:
        super().validate()
        require(self, "num_samples", self.num_samples >= 2, "must be >= 2: GRPO's baseline is the other "
                 "completions of the same prompt")
        require(self, "kl_target", self.kl_target is None, "is not used by grpo: its KL is a term of the loss "
                 "with the fixed kl_coef")
        require(self, "whiten_advantages", not self.whiten_advantages, "is not used by grpo: scale_rewards says "
                 "how its advantages are scaled (group, batch or none)")


def loss_unit(c: GRPOConfig) -> str:
    """The loop's unit of the loss: the token (dapo) or the completion (grpo, dr_grpo)."""
    return "token" if c.loss_type == "dapo" else "sequence"


def needs_reference(c: GRPOConfig) -> bool:
    """A reference model only for the KL term: none with kl_coef 0."""
    return c.kl_coef > 0


# (4) advantages: each completion's reward against its group's, the same on each of its tokens
def group_relative_advantages(ro: Rollout, c: GRPOConfig) -> tuple[list[dict[str, Any]], dict[str, float]]:
    import torch

    from preftune.core.rl import group_advantages, zero_std_groups

    k, scores = ro.num_samples, ro.scores.double()
    groups = scores.reshape(-1, k)
    zero_std = zero_std_groups(scores, k)
    batch_std = None
    if c.scale_rewards == "batch":  # the std of the rollout of every process (two passes: mean, then squares)
        sums = torch.tensor([float(scores.sum()), float(scores.numel())], dtype=torch.float64)
        summed, count = ro.total(sums).tolist()
        squares = float(ro.total(((scores - summed / count) ** 2).sum().reshape(1))[0])
        batch_std = (squares / max(count - 1.0, 1.0)) ** 0.5
    advantages = group_advantages(scores, k, scale=c.scale_rewards, batch_std=batch_std)
    weight = ro.ended.double() if c.mask_truncated_completions else torch.ones_like(scores)
    rows, dropped = None, 0
    if c.loss_type == "dapo":  # dynamic sampling: no all-equal group; no masked completion (it has no loss)
        keep = [i for i in range(len(scores)) if not zero_std[i // k] and weight[i] > 0]
        if len(keep) >= c.num_mini_batches * c.grad_accum:  # else: too few for the rollout's micro-batches
            rows, dropped = keep, int(zero_std.sum())
    sums = ro.total(torch.tensor([float(scores.sum()), float(scores.numel()), float(groups.std(-1).sum()),
                                  float(zero_std.sum()), float(groups.shape[0]), float(dropped)], dtype=torch.float64))
    reward, n, std, zero, g, dropped_total = sums.tolist()
    logs = {"reward": reward / n, "reward_std": std / g, "frac_reward_zero_std": zero / g}
    if c.loss_type == "dapo":
        logs["dropped_groups"] = dropped_total
    dtype = ro.logps.dtype
    fields = {"old_logps": ro.logps, "advantage": advantages.to(dtype), "weight": weight.to(dtype)}
    if c.kl_coef > 0:
        fields["ref_logps"] = ro.ref_logps
    return ro.items(rows, **fields), logs


def _unit_sum(x: torch.Tensor, mask: torch.Tensor, c: GRPOConfig) -> torch.Tensor:
    """``x`` [B, R] summed over the batch's units: its tokens (dapo), or each completion's token mean."""
    if loss_unit(c) == "token":
        return (x * mask).sum()
    return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()


# (5) update: the clipped ratio objective per token, plus the k3 KL term, normalised by loss_type
def grpo_loss(logps: torch.Tensor, values: None, batch: dict[str, torch.Tensor],
              c: GRPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from preftune.core.rl import clip_regions, grpo_unit_losses, kl_k3, ppo_policy_loss

    mask = batch["response_mask"].to(logps.dtype)
    advantage = batch["advantage"].to(logps.dtype)[:, None]
    high = c.clip_range if c.epsilon_high is None else c.epsilon_high
    token, ratio = ppo_policy_loss(logps, batch["old_logps"], advantage, clip_range=c.clip_range, clip_range_high=high)
    per_token = {"entropy": batch["entropy"]}
    if c.kl_coef > 0:
        kl = kl_k3(logps, batch["ref_logps"])
        token = token + c.kl_coef * kl  # Shao et al. 2024, Eq. 3: - beta D_KL(pi || pi_ref), the k3 of Eq. 4
        per_token["kl"] = kl.detach()
    low, high_clipped = clip_regions(ratio, advantage, clip_range=c.clip_range, clip_range_high=high)
    per_token.update({"clip_ratio/low_mean": low, "clip_ratio/high_mean": high_clipped,
                      "clip_ratio/region_mean": low + high_clipped})  # disjoint: ratio < 1 - eps or > 1 + eps_high
    losses = grpo_unit_losses(token * batch["weight"].to(logps.dtype)[:, None], mask, loss_type=c.loss_type,
                              max_tokens=c.max_new_tokens)
    return losses, {name: _unit_sum(x, mask, c) for name, x in per_token.items()}


class GRPOMethod(OnlineMethod):
    """Group-relative policy optimisation (see the module docstring)."""

    recipe = OnlineRecipe(unit=loss_unit, value_network=False, advantages=group_relative_advantages, loss=grpo_loss,
                          reference=needs_reference, entropy=True)


SPEC = MethodSpec("grpo", GRPOConfig, GRPOMethod,
                  "Online RL with GRPO: K samples per prompt, group-relative advantages, clipped ratio, KL in "
                  "the loss.")
