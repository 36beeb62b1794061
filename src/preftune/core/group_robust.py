"""Group-robust preference optimisation (GRPO): the math, as pure functions of tensors.

Ramesh et al. 2024, "Group Robust Preference Optimization in Reward-free RLHF" (NeurIPS). With K groups of
labellers, group g holding N_g of the N training pairs and L_g(pi) the mean loss of its pairs (any
reference-based DPO-family loss: GR-DPO with ``dpo``, GR-IPO with ``ipo``), the objective is the worst
group's loss, written as a game against weights alpha on the simplex of groups::

    min_pi  max_{alpha in simplex}  sum_g alpha_g L_g(pi)

Their Algorithm 1 solves it by alternating mirror ascent on alpha and gradient descent on pi. Each
iteration samples one group g with probability N_g / N and one of its pairs, then

    line 6:  alpha'_g = alpha_g * exp(eta * (N / N_g) * loss)     (only the sampled group's weight moves)
    line 7:  alpha    = alpha' / sum_g' alpha'_g'
    line 8:  theta   -= lr * alpha_g * (N / N_g) * grad loss

The factor N / N_g is an importance weight: a pair of group g turns up with probability N_g / N, so
``(N / N_g) * loss`` is an unbiased estimate of L_g. With a batch of B pairs (drawn uniformly from all
N) the same estimate per group is

    hat L_g = (N / N_g) * (1/B) * sum_{i in batch, g_i = g} loss_i            (:func:`group_loss_estimates`)

whose expectation is L_g; a group with no pair in the batch gets hat L_g = 0, so its weight is left as
it was before the renormalisation, as line 6 leaves every group but the sampled one. With ``group_sizes``
= the batch's own counts (N_g = n_g, N = B) hat L_g is simply the mean loss of group g's pairs in the
batch. The released code does the same: ``compute_group_metric`` with ``divide_by_totalcount`` (on by
default) multiplies each group's loss sum by N / N_g (rsshyam/Group-robust-preference-optimization,
src/trainers/grouptrainer.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_loss_estimates", "group_robust_loss", "group_robust_weights", "pair_weights"]


def _scale(groups: Tensor, n_groups: int, group_sizes: Tensor | None) -> Tensor:
    """N / N_g per group (0 for a group of size 0); with ``group_sizes`` None the batch's own counts."""
    sizes = (torch.bincount(groups, minlength=n_groups) if group_sizes is None
             else torch.as_tensor(group_sizes)).to(torch.float64)
    if sizes.shape != (n_groups,):
        raise ValueError(f"group_sizes has shape {tuple(sizes.shape)}, expected ({n_groups},)")
    if bool((sizes < 0).any()):
        raise ValueError(f"group sizes must be >= 0, got {sizes.tolist()}")
    return torch.where(sizes > 0, sizes.sum() / sizes.clamp(min=1), torch.zeros_like(sizes))


def _check(losses: Tensor, groups: Tensor, n_groups: int) -> None:
    if losses.dim() != 1 or groups.shape != losses.shape:
        raise ValueError(f"losses and groups must both be (B,), got {tuple(losses.shape)} and {tuple(groups.shape)}")
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= n_groups):
        raise ValueError(f"group indices must be in [0, {n_groups}), got {groups.tolist()}")


def group_loss_estimates(losses: Tensor, groups: Tensor, n_groups: int, *, group_sizes: Tensor | None = None,
                         normaliser: float | None = None) -> Tensor:
    """``hat L_g = (N / N_g) * sum_{i: g_i = g} losses_i / B`` for g = 0..n_groups-1, float64, shape (K,).

    ``losses`` (B,) per-pair losses, ``groups`` (B,) group indices; ``group_sizes`` (K,) the N_g of the
    training data (None: the batch's own counts, so hat L_g is the batch mean of group g); ``normaliser``
    the B to divide by (default ``len(losses)``; the training loop passes the step's pairs over all
    micro-batches and processes). Ramesh et al. 2024, Algorithm 1 line 6 with a batch of B pairs.
    """
    groups = torch.as_tensor(groups, dtype=torch.long, device=losses.device)
    _check(losses, groups, n_groups)
    batch = float(normaliser) if normaliser is not None else float(len(losses))
    if batch <= 0:
        raise ValueError(f"normaliser must be > 0, got {batch}")
    sums = torch.zeros(n_groups, dtype=torch.float64, device=losses.device)
    sums = sums.index_add(0, groups, losses.detach().to(torch.float64))
    return _scale(groups.cpu(), n_groups, group_sizes).to(losses.device) * sums / batch


def group_robust_weights(alpha: Tensor, group_losses: Tensor, eta: float) -> Tensor:
    """The exponentiated-gradient step on the group weights, float64 (Ramesh et al. 2024, Algorithm 1
    lines 6-7): ``alpha_g * exp(eta * group_losses_g)``, renormalised to sum to 1. A group whose estimate
    is 0 (no pair in the batch) keeps its weight before the renormalisation. Computed in log space
    (``softmax(log alpha + eta * loss)``), so no weight overflows however long the run."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    group_losses = torch.as_tensor(group_losses, dtype=torch.float64, device=alpha.device)
    if alpha.shape != group_losses.shape or alpha.dim() != 1:
        raise ValueError(f"alpha and group_losses must both be (K,), got {tuple(alpha.shape)} and "
                         f"{tuple(group_losses.shape)}")
    if bool((alpha < 0).any()) or not bool(alpha.sum() > 0):
        raise ValueError(f"alpha must be non-negative with a positive sum, got {alpha.tolist()}")
    return torch.softmax(torch.log(alpha) + eta * group_losses, dim=0)  # Ramesh et al. 2024, Alg. 1 lines 6-7


def pair_weights(groups: Tensor, alpha: Tensor, *, group_sizes: Tensor | None = None) -> Tensor:
    """Each pair's weight ``alpha_{g_i} * N / N_{g_i}`` (B,), float64: ``sum_i w_i loss_i / B`` equals
    ``sum_g alpha_g hat L_g``, the loss of Algorithm 1 line 8 written per pair."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    groups = torch.as_tensor(groups, dtype=torch.long)
    return (alpha * _scale(groups.cpu(), alpha.numel(), group_sizes).to(alpha.device))[groups.to(alpha.device)]


def group_robust_loss(losses: Tensor, groups: Tensor, alpha: Tensor, *, group_sizes: Tensor | None = None,
                      normaliser: float | None = None) -> Tensor:
    """``sum_g alpha_g hat L_g = sum_i alpha_{g_i} (N / N_{g_i}) losses_i / B``: the group-robust loss,
    differentiable through ``losses``; ``alpha`` is a constant here (Ramesh et al. 2024, Algorithm 1 line
    8). Same arguments as :func:`group_loss_estimates`. With one group it is ``losses.sum() / B``, bit
    for bit (every weight is 1.0)."""
    groups = torch.as_tensor(groups, dtype=torch.long, device=losses.device)
    _check(losses, groups, int(torch.as_tensor(alpha).numel()))
    batch = float(normaliser) if normaliser is not None else float(len(losses))
    weights = pair_weights(groups, torch.as_tensor(alpha).detach(), group_sizes=group_sizes)
    return (weights.to(device=losses.device, dtype=losses.dtype) * losses).sum() / batch
