"""The arithmetic of online RLHF as pure functions of tensors: KL estimators, KL-shaped rewards, KL
controllers, advantages (GAE, leave-one-out, batch mean, GRPO's group-relative), whitening, PPO's clipped
losses, GRPO's three normalisations, statistics, and several rewards made into one (standardisation,
aggregation, MaxMin's choice of group).

The objective every online method in ``preftune.train`` climbs is the KL-regularised reward
(Ziegler et al. 2019, Eq. 2; Ouyang et al. 2022, Eq. 2 without the ptx term)::

    max_pi  E_{x ~ D, y ~ pi(.|x)} [ r(x, y) ]  -  beta * KL( pi(.|x) || pi_ref(.|x) )

Shapes and conventions:

* Token tensors are ``[B, T]`` over the response tokens of B sequences; ``mask`` is 1 on real response
  tokens and 0 on padding (responses are right-padded, so each row's mask is a prefix of ones).
* ``logps`` are per-token log-probabilities ``log pi(y_t | x, y_<t)`` of the sampled tokens.
* Hyperparameters are keyword-only; functions return per-element values and the caller reduces.

Only torch is imported, so ``import preftune.core.rl`` stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "GROUP_SCALES",
    "LOSS_TYPES",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_rewards",
    "approx_kl",
    "clip_fraction",
    "clip_regions",
    "clipped_value_loss",
    "gae",
    "group_advantages",
    "grpo_unit_losses",
    "kl_k1",
    "kl_k3",
    "kl_penalty",
    "leave_one_out_advantages",
    "masked_mean",
    "maxmin_group",
    "maxmin_objectives",
    "masked_var",
    "mean_baseline_advantages",
    "ppo_policy_loss",
    "sequence_entropy_estimate",
    "shaped_rewards",
    "standardize",
    "token_entropy",
    "whiten",
    "zero_std_groups",
]


# --------------------------------------------------------------------------------------------- masks


def masked_mean(x: Tensor, mask: Tensor | None = None, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all positions when mask is None)."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor | None = None, *, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked positions; ``unbiased`` divides by n - 1 (Bessel)."""
    if mask is None:
        mask = torch.ones_like(x)
    mask = mask.to(x.dtype)
    n = mask.sum()
    centred = (x - masked_mean(x, mask)) * mask
    var = (centred ** 2).sum() / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def global_mean_var(x: Tensor, mask: Tensor | None, reduce: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`masked_mean` and :func:`masked_var` (unbiased) over the masked positions of every process:
    ``reduce`` sums a float64 tensor over the processes (identity with one process)."""
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    sums = reduce(torch.stack([m.sum(), (x * m).sum()]).double()).to(x.device)
    n = sums[0]
    mean = sums[1] / n.clamp(min=1)
    squares = reduce((((x.double() - mean) * m) ** 2).sum().reshape(1)).to(x.device)[0]
    var = squares / n.clamp(min=1) * (n / (n - 1) if n > 1 else 1.0)
    return mean.to(x.dtype), var.to(x.dtype)


def whiten(x: Tensor, mask: Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8,
           reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked positions (0 elsewhere); with
    ``shift_mean=False`` the mean is added back (only the scale changes), as PPO does for rewards
    (Ziegler et al. 2019's code, ``lm_human_preferences``; TRL ``whiten``). ``reduce`` (a float64 sum over
    processes): the mean and variance of the whole rollout, not of this process's share, so W processes
    whiten as one does."""
    mean, var = (masked_mean(x, mask), masked_var(x, mask)) if reduce is None else global_mean_var(x, mask, reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask.to(x.dtype)


# --------------------------------------------------------------------------------------------- KL


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = log pi(y_t) - log pi_ref(y_t): unbiased for KL(pi || pi_ref) under y ~ pi, high variance,
    can be negative per sample (Schulman 2020, "Approximating KL Divergence", k1)."""
    return logps - ref_logps  # Schulman 2020, k1 = -log r with r = pi_ref / pi


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(y_t) / pi(y_t): unbiased, low variance and never negative
    (Schulman 2020, "Approximating KL Divergence", k3)."""
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r  # Schulman 2020, k3 = (r - 1) - log r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k3": kl_k3}


def kl_penalty(logps: Tensor, ref_logps: Tensor, *, estimator: str = "k1") -> Tensor:
    """Per-token KL estimate with the estimator named in :data:`KL_ESTIMATORS` (k1 or k3)."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}") from None
    return fn(logps, ref_logps)


def shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, *, kl_coef: float) -> Tensor:
    """Per-token rewards ``-beta * kl_t`` plus the score ``r(x, y)`` at the last response token.

    ``R_t = -beta * KL_t + [t = last] * r(x, y)`` (Ziegler et al. 2019, Eq. 2, spread over the tokens as
    in their code; Ouyang et al. 2022, Eq. 2). Summed over t it is the
    sequence-level KL-regularised reward ``r(x, y) - beta * sum_t KL_t`` that RLOO and RAFT use.

    Args:
        scores: [B] one score per sequence.
        kl: [B, T] per-token KL estimates (``kl_penalty``).
        mask: [B, T] 1 on response tokens; each row needs at least one.
    """
    mask = mask.to(kl.dtype)
    lengths = mask.sum(-1).long()
    if bool((lengths == 0).any()):
        raise ValueError("every sequence needs at least one response token")
    rewards = -kl_coef * kl * mask  # Ziegler et al. 2019, Eq. 2: the -beta log(pi/pi_ref) term per token
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, lengths - 1] += scores.to(kl.dtype)  # the reward model's score at the last token
    return rewards


@dataclass
class FixedKLController:
    """A constant KL coefficient beta."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


@dataclass
class AdaptiveKLController:
    """The adaptive KL controller of Ziegler et al. 2019 (a proportional controller on log beta)::

        e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + K_beta * e_t)       with  K_beta = n_steps / horizon

    ``KL_t`` is the mean sequence KL of the latest rollout and ``n_steps`` its number of sequences
    (their code and TRL take ``K_beta`` this way, so ``horizon`` is counted in sequences). A KL above
    the target raises beta, one below lowers it; the clip bounds each step's change.
    """

    value: float
    target: float
    horizon: float = 10000.0

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)  # Ziegler et al. 2019: e_t
        self.value *= 1.0 + error * n_steps / self.horizon          # Ziegler et al. 2019: beta_t+1
        return self.value


# --------------------------------------------------------------------------------------------- advantages


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the response tokens, in the
    truncated form of the PPO paper (Schulman et al. 2017, Eqs. 11-12)::

        delta_t = r_t + gamma * V_{t+1} - V_t              (Eq. 12)
        A_t     = sum_l (gamma lam)^l delta_{t+l}          (Eq. 11) = delta_t + gamma lam A_{t+1}

    computed backwards over t. The episode ends after the
    last masked token: ``V`` and ``A`` beyond it count as 0. Returns ``(advantages, returns)``, both
    [B, T] and 0 where ``mask`` is 0; ``returns = A + V`` are the value targets (TD(lambda) returns).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]          # Schulman et al. 2017, Eq. 12
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]  # Schulman et al. 2017, Eq. 11
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def leave_one_out_advantages(rewards: Tensor, num_samples: int) -> Tensor:
    """RLOO: each of the K samples of a prompt is baselined by the mean reward of the other K - 1.

    ``A_i = R_i - 1/(K-1) sum_{j != i} R_j = K/(K-1) * (R_i - mean_j R_j)`` (Kool et al. 2019,
    "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al. 2024, "Back to Basics", RLOO).
    Each sample's baseline is independent of the sample itself, so the gradient stays unbiased.

    Args:
        rewards: [P * K] sequence rewards, the K samples of each prompt contiguous.
    """
    k = num_samples
    if k < 2:
        raise ValueError(f"the leave-one-out baseline needs num_samples >= 2, got {k}")
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {k}")
    grouped = rewards.reshape(-1, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)  # Kool et al. 2019; Ahmadian et al. 2024
    return (grouped - baseline).reshape(rewards.shape)


def mean_baseline_advantages(rewards: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """REINFORCE with the batch-mean baseline: ``A_i = R_i - mean_j R_j`` (Williams 1992, Sec. 4,
    a baseline b that does not depend on the action keeps the gradient unbiased); ``reduce`` (a float64 sum
    over processes): the mean of every process's rewards."""
    if reduce is None:
        return rewards - rewards.mean()  # Williams 1992: (r - b) with b the mean reward of the batch
    count, total = reduce(torch.tensor([rewards.numel(), rewards.double().sum().item()], dtype=torch.float64)).tolist()
    return rewards - torch.tensor(total / max(count, 1.0), dtype=rewards.dtype)


GROUP_SCALES = ("group", "batch", "none")


def group_advantages(rewards: Tensor, num_samples: int, *, scale: str = "group",
                     batch_std: Tensor | float | None = None, eps: float = 1e-4) -> Tensor:
    """GRPO: each completion's reward against the other completions of its prompt (its group of K)::

        group: A_i = (r_i - mean_g r) / (std_g r + eps)    (Shao et al. 2024, Sec. 4.1.2, outcome supervision)
        batch: A_i = (r_i - mean_g r) / (std_B r + eps)    (group mean, batch std: Liu Z. et al. 2025, Lite PPO)
        none:  A_i =  r_i - mean_g r                       (Dr. GRPO: Liu et al. 2025, Fig. 1, no std scaling)

    (Liu Z. et al. 2025: "Part I: Tricks or Traps? A Deep Dive into RL for LLM Reasoning"; Liu et al.
    2025: "Understanding R1-Zero-Like Training: A Critical Perspective".)
    ``std`` is the sample standard deviation (Bessel's n - 1, as ``torch.std`` and TRL); ``batch_std``
    is the whole batch's (of every process; computed from ``rewards`` when None). A group whose rewards
    are all equal gets exactly 0 (its mean is not subtracted in floating point; it is set).

    Args:
        rewards: [P * K] rewards, the K completions of each prompt contiguous.
    """
    k = num_samples
    if k < 2:
        raise ValueError(f"group advantages need num_samples >= 2, got {k}")
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {k}")
    if scale not in GROUP_SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(GROUP_SCALES)}")
    grouped = rewards.reshape(-1, k)
    equal = grouped.amax(-1, keepdim=True) == grouped.amin(-1, keepdim=True)
    # r_i - mean(r) (Shao et al. 2024, Sec. 4.1.2), all of Dr. GRPO's advantage (Liu et al. 2025, Fig. 1)
    centred = torch.where(equal, torch.zeros_like(grouped), grouped - grouped.mean(-1, keepdim=True))
    if scale == "group":
        centred = centred / (grouped.std(-1, keepdim=True) + eps)  # Shao et al. 2024, Sec. 4.1.2: / std(r)
    elif scale == "batch":
        std = rewards.std() if batch_std is None else torch.as_tensor(batch_std, dtype=rewards.dtype)
        centred = centred / (std + eps)  # Liu Z. et al. 2025: group-level mean, batch-level std
    return centred.reshape(rewards.shape)


def zero_std_groups(rewards: Tensor, num_samples: int) -> Tensor:
    """[P] bool: the groups (the K completions of a prompt) whose rewards are all equal. Their GRPO
    advantages are 0; DAPO's dynamic sampling keeps none of them (Yu et al. 2025, Eq. 8:
    0 < |{o_i correct}| < G)."""
    grouped = rewards.reshape(-1, num_samples)
    return grouped.amax(-1) == grouped.amin(-1)


# --------------------------------------------------------------------------------------------- PPO losses


def ppo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, *,
                    clip_range: float = 0.2, clip_range_high: float | None = None) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, negated to a loss (Schulman et al. 2017, Eq. 7)::

        ratio = pi(a) / pi_old(a) = exp(logp - old_logp)
        loss  = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) = max(-ratio A, -clip(ratio) A)

    ``eps_high`` is ``clip_range_high`` (DAPO's clip-higher, Yu et al. 2025, Sec. 3.1), by default
    ``clip_range``. Per element (token for PPO and GRPO, sequence for RLOO); the caller masks and reduces.
    With ``old_logps == logps.detach()`` the ratio is 1 and the gradient is ``-A * grad logp``,
    REINFORCE's. Returns ``(losses, ratio)``; ratio is detached.
    """
    high = clip_range if clip_range_high is None else clip_range_high
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    return torch.maximum(unclipped, clipped), ratio.detach()  # Schulman et al. 2017, Eq. 7


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, *,
                       clip_range: float = 0.2) -> tuple[Tensor, Tensor]:
    """The value loss with PPO's clipping of the value change (the OpenAI baselines ``ppo2`` loss;
    studied by Andrychowicz et al. 2021, "What Matters in On-Policy RL", Sec. 3.3)::

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        loss   = 1/2 * max((V - G)^2, (V_clip - G)^2)

    Returns ``(losses, clipped)``: per element, and 1.0 where the clipped term was the larger one.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    losses = 0.5 * torch.maximum(unclipped_loss, clipped_loss)
    return losses, (clipped_loss > unclipped_loss).to(values.dtype).detach()


def approx_kl(logps: Tensor, old_logps: Tensor) -> Tensor:
    """``1/2 (logp - old_logp)^2`` per element: the k2 estimate of KL(pi_old || pi) that PPO
    implementations log as ``policy/approxkl`` (Schulman 2020, "Approximating KL Divergence", k2)."""
    return 0.5 * (logps - old_logps).detach() ** 2


def clip_fraction(ratio: Tensor, *, clip_range: float) -> Tensor:
    """1.0 where ``|ratio - 1| > eps`` (the clip is active), else 0.0; its mean is ``policy/clipfrac``."""
    return ((ratio - 1.0).abs() > clip_range).to(ratio.dtype)


def clip_regions(ratio: Tensor, advantages: Tensor, *, clip_range: float,
                 clip_range_high: float | None = None) -> tuple[Tensor, Tensor]:
    """Where the clipped term of ``ppo_policy_loss`` is the active one (its gradient is 0), as 1.0 / 0.0:
    ``low`` = ratio < 1 - eps with A < 0, ``high`` = ratio > 1 + eps_high with A > 0. Their means are
    ``clip_ratio/low_mean`` and ``clip_ratio/high_mean``; their sum ``clip_ratio/region_mean`` (TRL's names)."""
    high = clip_range if clip_range_high is None else clip_range_high
    low_clipped = (ratio < 1.0 - clip_range) & (advantages < 0)
    high_clipped = (ratio > 1.0 + high) & (advantages > 0)
    return low_clipped.to(ratio.dtype), high_clipped.to(ratio.dtype)


LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def grpo_unit_losses(token_losses: Tensor, mask: Tensor, *, loss_type: str, max_tokens: int | None = None) -> Tensor:
    """GRPO's per-token losses [B, T] -> the losses of its units, which the caller sums and divides by
    their number over the whole step (the training loop's normaliser), by ``loss_type``:

    * ``grpo``: per completion, ``1/|o_i| sum_t L_t`` (Shao et al. 2024, Eq. 3), unit the completion:
      the step's loss is ``1/G sum_i 1/|o_i| sum_t L_t``;
    * ``dr_grpo``: per completion, ``1/max_tokens sum_t L_t``, a constant instead of ``|o_i|`` (Dr. GRPO,
      Liu et al. 2025, Fig. 1; the constant of their code), unit the completion;
    * ``dapo``: per token, ``L_t`` itself, unit the token: the step's loss is
      ``1/sum_i |o_i| sum_i sum_t L_t`` (Yu et al. 2025, Eq. 8, token-level policy gradient loss).

    Returns [B] (grpo, dr_grpo) or [B, T] masked (dapo).
    """
    mask = mask.to(token_losses.dtype)
    masked = token_losses * mask
    if loss_type == "grpo":
        return masked.sum(-1) / mask.sum(-1).clamp(min=1)  # Shao et al. 2024, Eq. 3: 1/|o_i| sum_t
    if loss_type == "dr_grpo":
        if not max_tokens or max_tokens < 1:
            raise ValueError(f"dr_grpo needs max_tokens >= 1, got {max_tokens}")
        return masked.sum(-1) / max_tokens  # Liu et al. 2025 (Dr. GRPO): sum_t L_t / a constant, no 1/|o_i|
    if loss_type == "dapo":
        return masked  # Yu et al. 2025, Eq. 8: 1/(sum_i |o_i|) sum_i sum_t, the loop divides by the tokens
    raise ValueError(f"unknown loss type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


ENTROPY_CHUNK_ELEMENTS = 2**24  # float32 values per chunk of token_entropy (64 MiB)


@torch.no_grad()
def token_entropy(logits: Tensor, *, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """The entropy ``H_t = -sum_v p_v log p_v`` of ``softmax(logits / temperature)`` per row of ``logits``
    [..., V] (no gradient), as ``logsumexp(z) - sum_v p_v z_v``, ``chunk_size`` rows at a time (None: 2**24
    values, 64 MiB of float32): never a float32 copy of the whole [..., V] tensor."""
    flat = logits.reshape(-1, logits.shape[-1])
    chunk_size = chunk_size or max(1, ENTROPY_CHUNK_ELEMENTS // max(1, flat.shape[-1]))
    out = torch.empty(flat.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    for s in range(0, flat.shape[0], chunk_size):
        z = flat[s:s + chunk_size].to(out.dtype) / temperature
        lse = torch.logsumexp(z, dim=-1)
        out[s:s + chunk_size] = lse - (torch.softmax(z, dim=-1) * z).sum(-1)  # H = log Z - E_p[z]
    return out.reshape(logits.shape[:-1])


def sequence_entropy_estimate(logps: Tensor, mask: Tensor) -> Tensor:
    """``-sum_t log pi(y_t)`` per sequence: a one-sample estimate of the sequence entropy H(pi(.|x))
    (its expectation under y ~ pi is the entropy), logged as ``objective/entropy``."""
    return -(logps * mask.to(logps.dtype)).sum(-1)


# --------------------------------------------------------------------------------------------- several rewards
#
# MaxMin-RLHF (Chakraborty et al. 2024, "MaxMin-RLHF: Alignment with Diverse Human Preferences", ICML):
# with U groups of users, each with its reward r_u, the egalitarian objective is
#
#     max_pi  min_u  F_u(pi),    F_u(pi) = E_{x ~ D, y ~ pi(.|x)} [ r_u(x, y) ]  -  beta * KL( pi || pi_ref )
#
# and their Algorithm 1 takes, at each step, the policy-gradient step of the group whose F_u is lowest.

AGGREGATIONS = ("mean", "min", "maxmin", "weighted")


def standardize(scores: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(r_u - mean_u) / std_u`` per reward: ``scores`` [R, B], ``mean`` and ``std`` [R] (each reward's
    statistics on samples of the starting policy, so that no reward wins by its arbitrary scale)."""
    return (scores - mean[:, None].to(scores.dtype)) / std[:, None].to(scores.dtype)


def maxmin_objectives(mean_scores: Tensor, mean_kl: Tensor | float, *, kl_coef: float) -> Tensor:
    """Each group's KL-regularised objective estimated on a rollout batch, [R]::

        F_u = 1/B sum_b r_u(x_b, y_b)  -  beta * 1/B sum_b KL_b           (Chakraborty et al. 2024, Alg. 1)

    from ``mean_scores`` [R] (the batch mean of each reward) and ``mean_kl`` (the batch mean of the
    sequence KL). The KL term is the same for every group (one policy, one reference), so it moves every
    F_u alike and never changes which group is lowest; it is kept so the logged values are the paper's."""
    return mean_scores - kl_coef * torch.as_tensor(mean_kl, dtype=mean_scores.dtype)  # Alg. 1: F_u(pi_t)


def maxmin_group(objectives: Tensor) -> int:
    """The group MaxMin-RLHF optimises this step: ``u_min = argmin_u F_u`` (Chakraborty et al. 2024,
    Alg. 1); a tie goes to the lowest index."""
    values = objectives.tolist()
    return min(range(len(values)), key=lambda u: (values[u], u))  # Alg. 1: u_min = argmin_u F_u(pi_t)


def aggregate_rewards(scores: Tensor, how: str, weights: Tensor | list[float] | None = None, *,
                      objectives: Tensor | None = None) -> Tensor:
    """One reward per sample from R rewards: ``scores`` [R, B] -> [B].

    * ``mean``: ``1/R sum_u r_u`` (utilitarian);
    * ``min``: ``min_u r_u`` per sample (the form in the released MaxMin-RLHF code);
    * ``maxmin``: ``r_{u_min}`` for every sample, ``u_min = maxmin_group(objectives)`` (Chakraborty et al.
      2024, Alg. 1); ``objectives`` [R] default to the batch means of ``scores`` (the same choice: the KL
      term of ``maxmin_objectives`` is shared by every group);
    * ``weighted``: ``sum_u w_u r_u / sum_u w_u`` with ``weights`` [R] (non-negative, positive sum).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [R, B], got shape {tuple(scores.shape)}")
    if how == "mean":
        return scores.mean(0)
    if how == "min":
        return scores.min(0).values
    if how == "maxmin":
        return scores[maxmin_group(scores.mean(-1) if objectives is None else objectives)]
    if how == "weighted":
        if weights is None:
            raise ValueError("weighted aggregation needs weights")
        w = torch.as_tensor(weights, dtype=scores.dtype, device=scores.device)
        if w.shape != scores.shape[:1] or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {scores.shape[0]} numbers >= 0 with a positive sum, got {weights}")
        return (w[:, None] * scores).sum(0) / w.sum()
    raise ValueError(f"unknown aggregation {how!r}; valid: {', '.join(AGGREGATIONS)}")
