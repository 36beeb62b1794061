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
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES", "KTOLossOutput", "LossPart", "LossSpec", "PreferenceLossOutput", "cdpo_loss", "dpo_gradient_weight",
    "dpo_loss", "hinge_loss", "ipo_loss", "kto_loss", "kto_reference_point", "log1mexp", "orpo_loss",
    "preference_loss", "robust_dpo_loss", "simpo_loss", "unlikelihood_loss",
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


# ------------------------------------------------------------------------------------ unpaired: KTO


class KTOLossOutput(NamedTuple):
    losses: Tensor  # (B,) per-example loss
    rewards: Tensor  # (B,) implicit reward beta * log pi(y|x)/pi_ref(y|x), detached


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point ``z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])``, detached.

    z0 is the term ``KL(pi(y'|x) || pi_ref(y'|x))`` of Ethayarajh et al. 2024, Eq. 8, estimated as the
    paper does from MISMATCHED pairs: each prompt ``x_i`` with the completion ``y'_i`` of another example
    (an output unrelated to ``x_i``). The mean log-ratio is clamped at 0, since a KL divergence is never
    negative, and detached: z0 only sets the level the rewards are measured from, and no gradient flows
    through it. Inputs are ``(N,)`` summed log-probs of the N mismatched pairs under the policy and the
    reference; the result is a 0-dim tensor.
    """
    if policy_kl_logps.numel() == 0:
        raise ValueError("kto_reference_point needs at least one mismatched pair")
    log_ratios = policy_kl_logps - ref_kl_logps
    return log_ratios.mean().clamp(min=0).detach()  # z0 of Ethayarajh et al. 2024, Eq. 8 (mismatched pairs)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, z0: Tensor | float, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTOLossOutput:
    """KTO: ``loss = lambda_y - v(x, y)`` (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization", Eq. 8), with ``r = log pi(y|x)/pi_ref(y|x)`` and the value

    ``v = lambda_D sigma(beta (r - z0))`` for a desirable y,  ``v = lambda_U sigma(beta (z0 - r))`` for an
    undesirable one.

    Unpaired: each example is one completion with its label; ``desirable`` is a ``(B,)`` bool mask (True:
    desirable, a thumbs up). ``z0`` is the reference point (:func:`kto_reference_point`), used detached.
    ``lambda_D`` is ``desirable_weight`` and ``lambda_U`` ``undesirable_weight``. Each loss lies in
    ``[0, lambda_y]``; at policy == reference with z0 = 0 it is ``lambda_y / 2``. Rewards returned:
    ``beta * r`` (detached).
    """
    _check_beta(beta)
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not weight >= 0:
            raise ValueError(f"{name} must be >= 0, got {weight}")
    desirable = torch.as_tensor(desirable, device=policy_logps.device).to(torch.bool)
    if desirable.shape != policy_logps.shape:
        raise ValueError(f"desirable must be a bool mask of shape {tuple(policy_logps.shape)}, "
                         f"got {tuple(desirable.shape)}")
    z0 = torch.as_tensor(z0, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    log_ratios = policy_logps - ref_logps
    value = torch.where(desirable, torch.sigmoid(beta * (log_ratios - z0)),  # v / lambda_y, Ethayarajh et al.
                        torch.sigmoid(beta * (z0 - log_ratios)))            # 2024, Eq. 8
    weights = torch.where(desirable, torch.full_like(log_ratios, desirable_weight),
                          torch.full_like(log_ratios, undesirable_weight))
    losses = weights * (1.0 - value)  # lambda_y - v(x, y), Ethayarajh et al. 2024, Eq. 8
    return KTOLossOutput(losses, (beta * log_ratios).detach())


# ------------------------------------------------------------------------------------------- registry


class LossPart(NamedTuple):  # one quantity of a loss on one example: a row of `prefs loss`, a key of its JSON
    key: str  # JSON key
    label: str  # row label
    value: float
    formula: str  # how the value is computed
    shown: bool = True  # False: JSON only


# A parts function gets v: one example as floats (preference_loss's keyword names; lengths None when not given),
# "loss", "reward_chosen", "reward_rejected"; and hp: every hyperparameter. Its rows follow the calculator's generic
# ones (log-ratios and h, or m_w and m_l; r_w, r_l, margin): a row keyed like a generic one replaces it in place, and
# a "loss" row gives the loss its formula (else the summary is shown).
Parts = Callable[[dict[str, Any], dict[str, Any]], list[LossPart]]


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., PreferenceLossOutput]
    needs_reference: bool  # True: the four log-prob form; False: policy log-probs + token counts
    hparams: dict[str, float]  # accepted keyword hyperparameters and their defaults
    summary: str  # one line for docs / CLI help
    takes_lengths: bool = False  # the function accepts chosen_lengths / rejected_lengths
    title: str = ""  # display name, e.g. "SimPO"
    hparam_help: dict[str, str] = field(default_factory=dict)  # one line per hyperparameter (CLI help)
    parts: Parts | None = None  # the loss's own rows for `prefs loss`


def _spec(fn: Callable[..., PreferenceLossOutput], title: str, *, needs_reference: bool, summary: str,
          parts: Parts | None = None, **hparam_help: str) -> LossSpec:
    params = inspect.signature(fn).parameters
    length_names = ("chosen_lengths", "rejected_lengths")
    hparams = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in length_names}
    assert set(hparam_help) <= set(hparams), f"{title}: help for a hyperparameter {fn.__name__} does not take"
    return LossSpec(fn=fn, needs_reference=needs_reference, hparams=hparams, summary=summary, title=title,
                    takes_lengths="chosen_lengths" in params, hparam_help=hparam_help, parts=parts)


def _nls(z: float) -> float:
    return -F.logsigmoid(torch.tensor(z, dtype=torch.float64)).item()  # -log sigma(z)


def _h(v: dict[str, Any], per_token: bool = False) -> float:  # per_token: each log-ratio / its token count
    n_w, n_l = (v["chosen_lengths"], v["rejected_lengths"]) if per_token else (1, 1)
    w, lo = v["policy_chosen_logps"] - v["ref_chosen_logps"], v["policy_rejected_logps"] - v["ref_rejected_logps"]
    return w / n_w - lo / n_l


def _loss(v: dict[str, Any], formula: str) -> LossPart:
    return LossPart("loss", "loss", v["loss"], formula)


def _dpo_parts(v: dict[str, Any], hp: dict[str, Any]) -> list[LossPart]:
    weight = dpo_gradient_weight(*torch.tensor([v["reward_chosen"], v["reward_rejected"]], dtype=torch.float64))
    return [LossPart("gradient_weight", "gradient weight", weight.item(), "sigmoid(r_l - r_w)"),
            _loss(v, "-log sigmoid(r_w - r_l)")]  # Rafailov et al. 2023, Eq. 7 and §4


def _ipo_parts(v: dict[str, Any], hp: dict[str, Any]) -> list[LossPart]:
    per_token = [LossPart("h", "h per token", _h(v, per_token=True), "each log-ratio / its token count"),
                 LossPart("reward_chosen", "r_w", v["reward_chosen"], "beta * log pi/pi_ref (chosen) / |y_w|"),
                 LossPart("reward_rejected", "r_l", v["reward_rejected"], "beta * log pi/pi_ref (rejected) / |y_l|")]
    return [*(per_token if hp["length_normalize"] else []), LossPart("target", "target", 1.0 / (2.0 * hp["beta"]),
            "1 / (2 beta)"), _loss(v, "(h - 1/(2 beta))^2")]  # Azar et al. 2023, Eq. 17


def _flip_parts(v: dict[str, Any], hp: dict[str, Any], *, robust: bool = False) -> list[LossPart]:
    z, e = hp["beta"] * _h(v), hp["label_smoothing"]
    return [LossPart("dpo_term", "DPO term", _nls(z), "-log sigmoid(beta h)"),
            LossPart("flipped_term", "flipped term", _nls(-z), "-log sigmoid(-beta h)"),
            _loss(v, f"({1 - e:g} DPO term - {e:g} flipped) / {1 - 2 * e:g}" if robust  # Chowdhury et al. 2024
                  else f"{1 - e:g} * DPO term + {e:g} * flipped")]  # Mitchell 2023, Eq. 3


def _hinge_parts(v: dict[str, Any], hp: dict[str, Any]) -> list[LossPart]:
    return [LossPart("slack", "1 - beta h", 1.0 - hp["beta"] * _h(v), "1 - margin"),
            _loss(v, "max(0, 1 - beta h)")]  # SLiC-HF calibration hinge, delta = 1/beta


def _orpo_parts(v: dict[str, Any], hp: dict[str, Any]) -> list[LossPart]:
    m = torch.tensor([v["policy_chosen_logps"], v["policy_rejected_logps"]], dtype=torch.float64)
    m = m / torch.tensor([v["chosen_lengths"], v["rejected_lengths"]], dtype=torch.float64)
    odds_w, odds_l = (m - log1mexp(m)).tolist()  # Hong et al. 2024, Eq. 7
    return [LossPart("log_odds_chosen", "log odds(y_w)", odds_w, "m_w - log(1 - exp(m_w))"),
            LossPart("log_odds_rejected", "log odds(y_l)", odds_l, "m_l - log(1 - exp(m_l))"),
            LossPart("log_odds_ratio", "log odds ratio", odds_w - odds_l, "log odds(y_w) - log odds(y_l)"),
            LossPart("nll", "NLL (SFT term)", -m[0].item(), "-m_w"),
            LossPart("odds_ratio_loss", "L_OR", _nls(odds_w - odds_l), "-log sigmoid(log odds ratio)"),
            _loss(v, "NLL + beta * L_OR")]  # Hong et al. 2024, Eq. 6


def _simpo_parts(v: dict[str, Any], hp: dict[str, Any]) -> list[LossPart]:
    margin = v["reward_chosen"] - v["reward_rejected"] - hp["gamma"]
    return [LossPart("margin_minus_gamma", "margin - gamma", margin, "r_w - r_l - gamma"),
            _loss(v, "-log sigmoid(r_w - r_l - gamma)")]  # Meng et al. 2024, Eq. 6


def _unlikelihood_parts(v: dict[str, Any], hp: dict[str, Any]) -> list[LossPart]:
    log_not = log1mexp(torch.tensor(v["policy_rejected_logps"] / v["rejected_lengths"], dtype=torch.float64)).item()
    return [LossPart("nll", "NLL (likelihood term)", -v["policy_chosen_logps"] / v["chosen_lengths"], "-m_w"),
            LossPart("log_one_minus_p_rejected", "log(1 - exp(m_l))", log_not, "log(1 - per-token P(y_l))"),
            LossPart("unlikelihood_term", "unlikelihood term", -hp["alpha"] * log_not, "-alpha log(1 - exp(m_l))"),
            _loss(v, "NLL + unlikelihood term")]  # Welleck et al. 2019


_KL, _EPS = "KL strength beta (> 0).", "eps: probability a label is flipped"
LOSSES: dict[str, LossSpec] = {
    "dpo": _spec(dpo_loss, "DPO", needs_reference=True, parts=_dpo_parts, beta=_KL,
                 summary="-log sigmoid(beta*h) (Rafailov et al. 2023, Eq. 7)"),
    "ipo": _spec(ipo_loss, "IPO", needs_reference=True, parts=_ipo_parts,
                 beta="Regularisation beta (tau in the paper, > 0).",
                 length_normalize="Use per-token log-ratios (TRL's IPO); then the token counts matter.",
                 summary="(h - 1/(2 beta))^2 (Azar et al. 2023, Eq. 17)"),
    "cdpo": _spec(cdpo_loss, "cDPO", needs_reference=True, parts=_flip_parts, beta=_KL,
                  label_smoothing=f"{_EPS}, in [0, 1].", summary="DPO with label smoothing eps (Mitchell 2023, Eq. 3)"),
    "hinge": _spec(hinge_loss, "Hinge", needs_reference=True, parts=_hinge_parts,
                   beta="Scale beta (> 0); the margin on h is 1/beta.",
                   summary="max(0, 1 - beta*h) (SLiC-HF, Zhao et al. 2023)"),
    "robust": _spec(robust_dpo_loss, "Robust DPO", needs_reference=True,
                    parts=lambda v, hp: _flip_parts(v, hp, robust=True), beta=_KL,
                    label_smoothing=f"{_EPS}, in [0, 0.5).",
                    summary="unbiased DPO under label flips eps (Chowdhury et al. 2024)"),
    "orpo": _spec(orpo_loss, "ORPO", needs_reference=False, parts=_orpo_parts,
                  beta="Weight lambda of the odds-ratio term (> 0).",
                  summary="SFT NLL + beta * odds-ratio loss (Hong et al. 2024, Eqs. 6-7)"),
    "simpo": _spec(simpo_loss, "SimPO", needs_reference=False, parts=_simpo_parts,
                   beta="Reward scale beta (> 0).", gamma="Target reward margin gamma.",
                   summary="-log sigmoid(beta*(m_w - m_l) - gamma) (Meng et al. 2024, Eq. 6)"),
    "unlikelihood": _spec(unlikelihood_loss, "Unlikelihood", needs_reference=False, parts=_unlikelihood_parts,
                          alpha="Weight alpha of the unlikelihood term (>= 0).",
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


def dpo_gradient_weight(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """``sigma(r_l - r_w)``: the per-example weight of the DPO gradient (Rafailov et al. 2023, §4).

    ``grad L_DPO = -beta * sigma(r_l - r_w) * [grad log pi(y_w) - grad log pi(y_l)]`` with implicit
    rewards ``r = beta * log pi/pi_ref``: examples the implicit reward model gets wrong weigh most.
    """
    return torch.sigmoid(rejected_rewards - chosen_rewards)
