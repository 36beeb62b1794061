"""Preference losses as pure functions of ``(B,)`` tensors, plus a registry.

Conventions (as in the reference DPO code and torchtune):

* ``*_logps`` are SUMMED sequence log-probabilities ``log pi(y|x) = sum_t log pi(y_t|x, y_<t)``,
  shape ``(B,)``; ``*_lengths`` are the token counts of the responses, shape ``(B,)``.
* Hyperparameters are keyword-only. Every function returns per-example losses ``(B,)``; the caller
  reduces (the training loop sums and divides by its normaliser).
* ``h`` below is the log-ratio difference of the DPO family,
  ``h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)``, and ``sigma`` is the logistic function.

Nothing heavier than torch is imported here, so ``import preftune.core.losses`` stays light.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "LossSpec",
    "PreferenceLossOutput",
    "bradley_terry_loss",
    "cdpo_loss",
    "dpo_gradient_weight",
    "dpo_loss",
    "first_place_probabilities",
    "hinge_loss",
    "ipo_loss",
    "log1mexp",
    "orpo_loss",
    "pairwise_ranking_loss",
    "plackett_luce_logprob",
    "plackett_luce_loss",
    "preference_loss",
    "robust_dpo_loss",
    "simpo_loss",
    "unlikelihood_loss",
]


class PreferenceLossOutput(NamedTuple):
    losses: Tensor  # (B,) per-example loss
    chosen_rewards: Tensor  # (B,) implicit reward of the chosen response, detached
    rejected_rewards: Tensor  # (B,) implicit reward of the rejected response, detached


# --------------------------------------------------------------------------------------------- helpers


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, computed stably (Maechler 2012, "Accurately computing log(1-exp(-|a|))").

    Uses ``log(-expm1(x))`` for ``x > -log 2`` and ``log1p(-exp(x))`` otherwise. Inputs are clamped to
    ``x <= -eps`` (``eps`` = machine epsilon of the dtype) so that a probability of exactly 1 gives a
    large finite value instead of ``-inf``.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_ratio_difference(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(h, log pi/pi_ref of chosen, log pi/pi_ref of rejected)``."""
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    return chosen_logratios - rejected_logratios, chosen_logratios, rejected_logratios


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_smoothing(label_smoothing: float, *, upper: float, closed: bool) -> None:
    ok = 0.0 <= label_smoothing <= upper if closed else 0.0 <= label_smoothing < upper
    if not ok:
        bracket = "]" if closed else ")"
        raise ValueError(f"label_smoothing must be in [0, {upper}{bracket}, got {label_smoothing}")


def _mean_logps(logps: Tensor, lengths: Tensor, name: str) -> Tensor:
    """Mean per-token log-prob ``log pi(y)/|y|`` (the log of the geometric-mean token probability)."""
    lengths = torch.as_tensor(lengths, dtype=logps.dtype, device=logps.device)
    if bool((lengths <= 0).any()):
        raise ValueError(f"{name} must be positive token counts, got {lengths.tolist()}")
    return logps / lengths


# ----------------------------------------------------------------------------- reference-based losses


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1) -> PreferenceLossOutput:
    """DPO: ``loss = -log sigma(beta * h)`` (Rafailov et al. 2023, Eq. 7).

    Implicit rewards ``r = beta * log pi(y)/pi_ref(y)`` (Rafailov et al. 2023, Eq. 5 without the
    partition term, which cancels in the difference).
    """
    _check_beta(beta)
    h, cl, rl = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                      ref_rejected_logps)
    losses = -F.logsigmoid(beta * h)  # Rafailov et al. 2023, Eq. 7
    return PreferenceLossOutput(losses, (beta * cl).detach(), (beta * rl).detach())


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float = 0.1, length_normalize: bool = False,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None
             ) -> PreferenceLossOutput:
    """IPO: ``loss = (h - 1/(2 beta))^2`` (Azar et al. 2023, Eq. 17, with their tau written as beta).

    The minimum is at ``h = 1/(2 beta)``: IPO regresses the log-ratio difference to a finite target
    instead of pushing it to infinity. With ``length_normalize=True`` each log-ratio is divided by the
    response's token count first (the variant TRL uses for IPO); the lengths are then required.
    Rewards are ``beta * log pi/pi_ref`` as for DPO (per token when length-normalised).
    """
    _check_beta(beta)
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    if length_normalize:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo with length_normalize=True needs chosen_lengths and rejected_lengths")
        pc, rc = (_mean_logps(x, chosen_lengths, "chosen_lengths") for x in (pc, rc))
        pr, rr = (_mean_logps(x, rejected_lengths, "rejected_lengths") for x in (pr, rr))
    h, cl, rl = _log_ratio_difference(pc, pr, rc, rr)
    losses = (h - 1.0 / (2.0 * beta)) ** 2  # Azar et al. 2023, Eq. 17
    return PreferenceLossOutput(losses, (beta * cl).detach(), (beta * rl).detach())


def cdpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.1
              ) -> PreferenceLossOutput:
    """Conservative DPO: ``loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``.

    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO", Eq. 3: the DPO loss
    with labels smoothed to ``1 - eps`` (each label flipped with probability ``eps``).
    ``label_smoothing=0`` is exactly DPO.
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing, upper=1.0, closed=True)
    h, cl, rl = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                      ref_rejected_logps)
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)  # Mitchell 2023, Eq. 3
              - label_smoothing * F.logsigmoid(-beta * h))
    return PreferenceLossOutput(losses, (beta * cl).detach(), (beta * rl).detach())


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, *, beta: float = 0.1) -> PreferenceLossOutput:
    """Hinge: ``loss = max(0, 1 - beta * h)``.

    The rank-calibration hinge loss of SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback"), ``max(0, delta - log pi(y_w) + log pi(y_l))``, with margin
    ``delta = 1/beta``, applied to the reference-adjusted log-ratio difference ``h`` and scaled by
    ``beta`` (the form used by the DPO-family implementations, e.g. TRL's ``loss_type="hinge"``).
    """
    _check_beta(beta)
    h, cl, rl = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                      ref_rejected_logps)
    losses = torch.relu(1.0 - beta * h)  # SLiC-HF calibration hinge, delta = 1/beta
    return PreferenceLossOutput(losses, (beta * cl).detach(), (beta * rl).detach())


def robust_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                    ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.1
                    ) -> PreferenceLossOutput:
    """Robust DPO: ``loss = [(1 - eps) l(beta h) - eps l(-beta h)] / (1 - 2 eps)``, ``l(z) = -log sigma(z)``.

    Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback" (the rDPO loss): when each label is flipped with known probability ``eps < 1/2``, this loss
    is an unbiased estimate of the DPO loss on clean labels. ``label_smoothing`` is ``eps``. Unlike
    cDPO it can be negative on a single example (it is unbiased, not a smoothed likelihood).
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing, upper=0.5, closed=False)
    h, cl, rl = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                      ref_rejected_logps)
    eps = label_smoothing
    losses = ((1.0 - eps) * -F.logsigmoid(beta * h)  # Chowdhury et al. 2024, rDPO loss
              - eps * -F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    return PreferenceLossOutput(losses, (beta * cl).detach(), (beta * rl).detach())


# ------------------------------------------------------------------------------ reference-free losses


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
              rejected_lengths: Tensor, *, beta: float = 0.1) -> PreferenceLossOutput:
    """ORPO: ``loss = -m_w + beta * L_OR``, ``L_OR = -log sigma(log odds(y_w) - log odds(y_l))``.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eqs. 6-7
    (``beta`` is their lambda). ``m = log pi(y)/|y|`` is the mean token log-prob, so ``P = exp(m)`` is
    the geometric-mean token probability and ``-m_w`` is the usual token-averaged SFT loss on the
    chosen response. ``log odds(y) = log(P/(1-P)) = m - log(1 - exp(m))``, with ``log(1 - exp(m))``
    computed by :func:`log1mexp`.

    Rewards reported: ``beta * m`` of each response (what TRL's ORPOTrainer logs as
    ``rewards/chosen`` and ``rewards/rejected``).
    """
    _check_beta(beta)
    m_w = _mean_logps(policy_chosen_logps, chosen_lengths, "chosen_lengths")
    m_l = _mean_logps(policy_rejected_logps, rejected_lengths, "rejected_lengths")
    log_odds = (m_w - log1mexp(m_w)) - (m_l - log1mexp(m_l))  # log of the odds ratio, Hong et al. Eq. 7
    odds_ratio_loss = -F.logsigmoid(log_odds)  # L_OR, Hong et al. 2024, Eq. 7
    losses = -m_w + beta * odds_ratio_loss  # L_SFT + lambda * L_OR, Hong et al. 2024, Eq. 6
    return PreferenceLossOutput(losses, (beta * m_w).detach(), (beta * m_l).detach())


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
               rejected_lengths: Tensor, *, beta: float = 2.0, gamma: float = 0.5) -> PreferenceLossOutput:
    """SimPO: ``loss = -log sigma(beta m_w - beta m_l - gamma)`` (Meng et al. 2024, Eq. 6).

    ``m = log pi(y)/|y|`` is the length-normalised log-prob, ``beta * m`` is SimPO's implicit reward
    (these are the rewards returned) and ``gamma`` the target reward margin.
    No reference model.
    """
    _check_beta(beta)
    r_w = beta * _mean_logps(policy_chosen_logps, chosen_lengths, "chosen_lengths")
    r_l = beta * _mean_logps(policy_rejected_logps, rejected_lengths, "rejected_lengths")
    losses = -F.logsigmoid(r_w - r_l - gamma)  # Meng et al. 2024, Eq. 6
    return PreferenceLossOutput(losses, r_w.detach(), r_l.detach())


def unlikelihood_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
                      rejected_lengths: Tensor, *, alpha: float = 1.0) -> PreferenceLossOutput:
    """Unlikelihood: ``loss = -m_w - alpha * log(1 - exp(m_l))`` with ``m = log pi(y)/|y|``.

    Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training" (the unlikelihood term
    ``-log(1 - p)``), applied at the sequence level as in the Unlikelihood baseline of the DPO paper
    (Rafailov et al. 2023, experiments). The term uses the per-token geometric-mean probability ``exp(m_l)``, not the whole
    sequence probability: ``pi(y_l)`` is ~0 for any realistic sequence, so ``-log(1 - pi(y_l))`` would
    be ~0 with ~0 gradient and the rejected response would never be pushed down.
    ``log(1 - exp(m))`` is computed stably by :func:`log1mexp`, clamped away from ``m = 0``.

    Rewards reported: the mean token log-probs ``m_w`` and ``m_l`` (there is no implicit reward).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    m_w = _mean_logps(policy_chosen_logps, chosen_lengths, "chosen_lengths")
    m_l = _mean_logps(policy_rejected_logps, rejected_lengths, "rejected_lengths")
    losses = -m_w - alpha * log1mexp(m_l)  # likelihood of y_w + Welleck et al. 2019 unlikelihood of y_l
    return PreferenceLossOutput(losses, m_w.detach(), m_l.detach())


# ------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., PreferenceLossOutput]
    needs_reference: bool  # True: the four log-prob form; False: policy log-probs + token counts
    hparams: dict[str, float]  # accepted keyword hyperparameters and their defaults
    summary: str  # one line for docs / CLI help
    takes_lengths: bool = False  # the function accepts chosen_lengths / rejected_lengths


def _spec(fn: Callable[..., PreferenceLossOutput], *, needs_reference: bool, summary: str) -> LossSpec:
    params = inspect.signature(fn).parameters
    length_names = ("chosen_lengths", "rejected_lengths")
    hparams = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in length_names}
    return LossSpec(fn=fn, needs_reference=needs_reference, hparams=hparams, summary=summary,
                    takes_lengths="chosen_lengths" in params)


LOSSES: dict[str, LossSpec] = {
    "dpo": _spec(dpo_loss, needs_reference=True, summary="-log sigmoid(beta*h) (Rafailov et al. 2023, Eq. 7)"),
    "ipo": _spec(ipo_loss, needs_reference=True, summary="(h - 1/(2 beta))^2 (Azar et al. 2023, Eq. 17)"),
    "cdpo": _spec(cdpo_loss, needs_reference=True,
                  summary="DPO with label smoothing eps (Mitchell 2023, Eq. 3)"),
    "hinge": _spec(hinge_loss, needs_reference=True, summary="max(0, 1 - beta*h) (SLiC-HF, Zhao et al. 2023)"),
    "robust": _spec(robust_dpo_loss, needs_reference=True,
                    summary="unbiased DPO under label flips eps (Chowdhury et al. 2024)"),
    "orpo": _spec(orpo_loss, needs_reference=False,
                  summary="SFT NLL + beta * odds-ratio loss (Hong et al. 2024, Eqs. 6-7)"),
    "simpo": _spec(simpo_loss, needs_reference=False,
                   summary="-log sigmoid(beta*(m_w - m_l) - gamma) (Meng et al. 2024, Eq. 6)"),
    "unlikelihood": _spec(unlikelihood_loss, needs_reference=False,
                          summary="-m_w - alpha*log(1 - exp(m_l)) (Welleck et al. 2019)"),
}


def preference_loss(name: str, *, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
                    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                    **hparams: float) -> PreferenceLossOutput:
    """Compute the loss registered as ``name`` in :data:`LOSSES`.

    Reference-based losses get the four log-prob tensors; reference-free ones the policy log-probs and
    the token counts (lengths are also passed to reference-based losses that accept them, e.g. ipo
    with ``length_normalize=True``). Raises ``ValueError`` for an unknown loss (naming the closest
    valid name), an unknown hyperparameter, or missing reference log-probs / lengths.
    """
    spec = LOSSES.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(LOSSES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown loss '{name}'.{hint} Valid losses: {', '.join(LOSSES)}")
    unknown = sorted(set(hparams) - set(spec.hparams))
    if unknown:
        raise ValueError(f"loss '{name}' has no hyperparameter {', '.join(map(repr, unknown))}; "
                         f"it accepts: {', '.join(spec.hparams) or 'none'}")
    lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    if spec.needs_reference:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss '{name}' needs reference log-probs: pass ref_chosen_logps and "
                             "ref_rejected_logps (computed with the frozen reference model)")
        extra = {k: v for k, v in lengths.items() if v is not None} if spec.takes_lengths else {}
        return spec.fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       **extra, **hparams)
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(f"loss '{name}' needs chosen_lengths and rejected_lengths (token counts of each "
                         "response) to form mean per-token log-probs")
    return spec.fn(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, **hparams)


# ------------------------------------------------------------------------------- reward-model losses


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


def dpo_gradient_weight(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """``sigma(r_l - r_w)``: the per-example weight of the DPO gradient (Rafailov et al. 2023, §4).

    ``grad L_DPO = -beta * sigma(r_l - r_w) * [grad log pi(y_w) - grad log pi(y_l)]`` with implicit
    rewards ``r = beta * log pi/pi_ref``: examples the implicit reward model gets wrong weigh most.
    """
    return torch.sigmoid(rejected_rewards - chosen_rewards)
