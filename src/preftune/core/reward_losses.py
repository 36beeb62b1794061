"""Losses of reward models as pure functions of ``(B,)`` / ``(B, K)`` reward tensors: the Bradley-Terry pair
loss (with Llama 2's margin), InstructGPT's all-pairs ranking loss, and the Plackett-Luce model of a
ranking. Conventions as in ``preftune.core.losses``: per-example losses out, the caller reduces.

Nothing heavier than torch is imported here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bradley_terry_loss", "first_place_probabilities", "pairwise_ranking_loss", "plackett_luce_logprob",
           "plackett_luce_loss"]


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, *,
                       margin: Tensor | float | None = None) -> Tensor:
    """Reward-model loss ``-log sigma(r_w - r_l - m)``, per example ``(B,)``.

    Bradley-Terry negative log-likelihood: Stiennon et al. 2020 (reward-model loss) and Ouyang et al.
    2022, Eq. 1 (for one pair). The optional ``margin`` m is Llama 2's (Touvron et al. 2023, Eq. 2): a
    larger required gap for pairs annotated as clearly better.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin  # Touvron et al. 2023, Eq. 2
    return -F.logsigmoid(diff)  # Ouyang et al. 2022, Eq. 1


def _rank_mask(rewards: Tensor, mask: Tensor | None, *, need: int) -> Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (B, K), got {tuple(rewards.shape)}")
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    mask = mask.to(device=rewards.device, dtype=torch.bool)
    if mask.shape != rewards.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from rewards shape {tuple(rewards.shape)}")
    counts = mask.sum(dim=1)
    if bool((counts < need).any()):
        bad = int(torch.nonzero(counts < need)[0])
        raise ValueError(f"row {bad} has {int(counts[bad])} valid responses; at least {need} are needed")
    return mask


def pairwise_ranking_loss(rewards: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """InstructGPT ranking loss: mean over the ``C(K, 2)`` pairs ``i < j`` of ``-log sigma(r_i - r_j)``.

    Ouyang et al. 2022, Eq. 1, with the ``1/C(K,2)`` factor and all pairs of one prompt in one batch
    element. ``rewards`` is ``(B, K)`` ordered best-first; ``mask`` ``(B, K)`` marks valid responses
    (K may vary per prompt; masked entries may hold any value, even inf/nan). Returns ``(B,)``.
    """
    mask = _rank_mask(rewards, mask, need=2)
    safe = torch.where(mask, rewards, torch.zeros_like(rewards))
    diff = safe[:, :, None] - safe[:, None, :]  # diff[b, i, j] = r_i - r_j
    k = rewards.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(diagonal=1)
    pairs = upper & mask[:, :, None] & mask[:, None, :]
    nll = torch.where(pairs, -F.logsigmoid(diff), torch.zeros_like(diff))
    return nll.sum(dim=(1, 2)) / pairs.sum(dim=(1, 2)).to(rewards.dtype)  # Ouyang et al. 2022, Eq. 1


def plackett_luce_logprob(rewards_in_rank_order: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """``log P_PL(ranking) = sum_k [r_k - log sum_{j >= k} exp(r_j)]`` over valid positions, ``(B,)``.

    The Plackett-Luce model (Plackett 1975, "The Analysis of Permutations"; Luce 1959, "Individual
    Choice Behavior"): pick the best with softmax probability, remove it, repeat. Used for rankings in
    Rafailov et al. 2023, App. A.3. ``rewards_in_rank_order`` is ``(B, K)`` best-first (a ``(K,)``
    tensor is treated as one row); for K = 2 this is ``log sigma(r_1 - r_2)`` (Bradley-Terry).
    """
    squeeze = rewards_in_rank_order.dim() == 1
    r = rewards_in_rank_order.unsqueeze(0) if squeeze else rewards_in_rank_order
    mask = _rank_mask(r, None if mask is None else (mask.unsqueeze(0) if squeeze else mask), need=1)
    # Masked entries get a finite value far below every valid one: exp(fill - max) underflows to exactly 0,
    # so they drop out of the suffix log-sum-exp without producing inf/nan gradients.
    low = torch.where(mask, r, torch.full_like(r, math.inf)).amin(dim=1, keepdim=True).detach()
    filled = torch.where(mask, r, low - 1.0e4)
    suffix_lse = torch.logcumsumexp(filled.flip(1), dim=1).flip(1)  # log sum_{j>=k} exp(r_j)
    terms = torch.where(mask, filled - suffix_lse, torch.zeros_like(r))
    out = terms.sum(dim=1)
    return out.squeeze(0) if squeeze else out


def plackett_luce_loss(rewards: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Negative Plackett-Luce log-likelihood of the best-first ranking, ``-log P_PL``, shape ``(B,)``."""
    return -plackett_luce_logprob(rewards, mask=mask)


def first_place_probabilities(rewards: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """``P(y_i ranked first) = exp(r_i) / sum_j exp(r_j)`` over valid responses (the first Plackett-Luce
    factor; the Luce choice rule). Shape as ``rewards``; masked entries get probability 0."""
    if mask is None:
        return torch.softmax(rewards, dim=-1)
    mask = mask.to(device=rewards.device, dtype=torch.bool)
    filled = torch.where(mask, rewards, torch.full_like(rewards, -math.inf))
    return torch.softmax(filled, dim=-1)
