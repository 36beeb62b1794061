"""Tests for preftune.core.losses: hand-derived values for every loss, plus the properties from DESIGN.md.

Notation: h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l); softplus(z) = log(1 + e^z), so
-log sigma(z) = softplus(-z) and softplus(z) - softplus(-z) = z.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune.core import losses as L
from preftune.core import reward_losses as R

COURSE = json.loads((Path(__file__).parent / "data" / "course_exercise.json").read_text())["expected"]
REF_BASED = [n for n, s in L.LOSSES.items() if s.needs_reference]
REF_FREE = [n for n, s in L.LOSSES.items() if not s.needs_reference]


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))


# Shared reference-based inputs: policy (-1, -3), reference (-2, -2) ->
# chosen log-ratio +1, rejected log-ratio -1, h = 2.
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)
# Shared reference-free inputs: chosen 2 tokens with mean log-prob log(1/2) (summed log 1/4),
# rejected 3 tokens with mean log-prob log(1/3) (summed 3 log 1/3).
FC, FR, NC, NR = t(2 * math.log(0.5)), t(3 * math.log(1 / 3)), t(2.0), t(3.0)


# ------------------------------------------------------------------------------ course reference values


def test_course_dpo_values():
    """Course: pi(y_w)=0.2, pi(y_l)=0.3, pi_ref(y_w)=0.2, pi_ref(y_l)=0.4, beta=2.

    r_w = 2 log(0.2/0.2) = 0; r_l = 2 log(0.3/0.4) = -0.575364;
    loss = -log sigma(0.575364) = log(1 + 0.75^2) = log 1.5625 = 0.446287.
    With pi_ref(y_l)=0.2: r_l = 2 log 1.5, loss = log(1 + 1.5^2) = log 3.25 = 1.178655.
    """
    e = COURSE["dpo_loss"]
    i = e["inputs"]
    out = L.dpo_loss(*(t(math.log(i[k])) for k in ("policy_chosen", "policy_rejected", "ref_chosen",
                                                     "ref_rejected")), beta=i["beta"])
    assert out.losses.item() == pytest.approx(e["loss"], abs=5e-7)
    assert out.losses.item() == pytest.approx(math.log(1.5625), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(e["implicit_reward_chosen"], abs=5e-7)
    assert out.rejected_rewards.item() == pytest.approx(e["implicit_reward_rejected"], abs=5e-7)
    m = COURSE["dpo_loss_modified"]["inputs"]
    out2 = L.dpo_loss(t(math.log(m["policy_chosen"])), t(math.log(m["policy_rejected"])),
                      t(math.log(m["ref_chosen"])), t(math.log(m["ref_rejected"])), beta=m["beta"])
    assert out2.losses.item() == pytest.approx(COURSE["dpo_loss_modified"]["loss"], abs=5e-7)
    assert out2.losses.item() == pytest.approx(math.log(3.25), abs=1e-12)


def test_course_reward_loss():
    """Course: r_w = 0.5, r_l = 0.8 -> -log sigma(-0.3) = log(1 + e^0.3) = 0.854355."""
    e = COURSE["reward_loss"]
    loss = R.bradley_terry_loss(t(e["inputs"]["r_chosen"]), t(e["inputs"]["r_rejected"]))
    assert loss.item() == pytest.approx(e["loss"], abs=5e-7)
    assert loss.item() == pytest.approx(softplus(0.3), abs=1e-12)


# ----------------------------------------------------------------------------- hand-derived, every loss


def test_dpo_hand_value():
    """h = 2, beta = 0.5: loss = -log sigma(1) = softplus(-1) = 0.313262; rewards = 0.5 * (+1, -1)."""
    out = L.dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert out.losses.item() == pytest.approx(softplus(-1.0), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.3132617, abs=1e-7)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_ipo_hand_values():
    """h = 2. beta = 0.1: target 1/(2*0.1) = 5, loss (2 - 5)^2 = 9. beta = 0.25: target 2, loss 0.

    Length-normalised: chosen policy -4, ref -6 over 2 tokens -> +1 per token; rejected policy -6,
    ref -3 over 3 tokens -> -1 per token; h = 2, beta = 0.5 -> target 1, loss 1. Unnormalised the
    same numbers give h = 2 - (-3) = 5 and loss (5 - 1)^2 = 16.
    """
    assert L.ipo_loss(PC, PR, RC, RR, beta=0.1).losses.item() == pytest.approx(9.0)
    assert L.ipo_loss(PC, PR, RC, RR, beta=0.25).losses.item() == pytest.approx(0.0, abs=1e-12)
    args = (t(-4.0), t(-6.0), t(-6.0), t(-3.0))
    norm = L.ipo_loss(*args, beta=0.5, length_normalize=True, chosen_lengths=t(2.0), rejected_lengths=t(3.0))
    assert norm.losses.item() == pytest.approx(1.0)
    assert norm.chosen_rewards.item() == pytest.approx(0.5)
    assert L.ipo_loss(*args, beta=0.5).losses.item() == pytest.approx(16.0)
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.ipo_loss(*args, beta=0.5, length_normalize=True)


def test_cdpo_hand_value():
    """h = 2, beta = 0.5, eps = 0.1: 0.9 softplus(-1) + 0.1 softplus(1) = softplus(-1) + 0.1 * 1
    (since softplus(1) - softplus(-1) = 1) = 0.413262."""
    out = L.cdpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(softplus(-1.0) + 0.1, abs=1e-12)
    assert out.losses.item() == pytest.approx(0.4132617, abs=1e-7)


def test_hinge_hand_values():
    """h = 2: beta = 0.25 -> max(0, 1 - 0.5) = 0.5; beta = 1 -> max(0, 1 - 2) = 0; beta = 0.5 -> 0."""
    assert L.hinge_loss(PC, PR, RC, RR, beta=0.25).losses.item() == pytest.approx(0.5)
    assert L.hinge_loss(PC, PR, RC, RR, beta=1.0).losses.item() == 0.0
    assert L.hinge_loss(PC, PR, RC, RR, beta=0.5).losses.item() == pytest.approx(0.0, abs=1e-12)


def test_robust_hand_value():
    """h = 2, beta = 0.5, eps = 0.1, a = softplus(-1): [0.9 a - 0.1 (a + 1)] / 0.8 = a - 0.125 = 0.188262."""
    out = L.robust_dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(softplus(-1.0) - 0.125, abs=1e-12)
    assert out.losses.item() == pytest.approx(0.1882617, abs=1e-7)


def test_orpo_hand_value():
    """Mean token probs P_w = 1/2 (odds 1, log odds 0), P_l = 1/3 (odds 1/2, log odds -log 2).

    log odds ratio = log 2; L_OR = -log sigma(log 2) = -log(2/3) = log 1.5; NLL = -log(1/2) = log 2.
    beta = 0.1: loss = log 2 + 0.1 log 1.5 = 0.733694; rewards = 0.1 log(1/2), 0.1 log(1/3).
    """
    out = L.orpo_loss(FC, FR, NC, NR, beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(2) + 0.1 * math.log(1.5), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.7336937, abs=1e-7)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * math.log(0.5))
    assert out.rejected_rewards.item() == pytest.approx(0.1 * math.log(1 / 3))


def test_simpo_hand_value():
    """beta = 2, gamma = 0.5: z = 2 log(1/2) - 2 log(1/3) - 0.5 = 2 log 1.5 - 0.5;
    loss = log(1 + e^-z) = log(1 + (4/9) e^0.5) = log 1.732765 = 0.549718."""
    out = L.simpo_loss(FC, FR, NC, NR, beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(math.log(1 + 4 / 9 * math.exp(0.5)), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.549718, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(2 * math.log(0.5))


def test_unlikelihood_hand_value():
    """-log(1/2) - alpha log(1 - 1/3) = log 2 + alpha log 1.5; alpha = 1 gives log 3, alpha = 0 log 2."""
    assert L.unlikelihood_loss(FC, FR, NC, NR, alpha=1.0).losses.item() == pytest.approx(math.log(3.0))
    assert L.unlikelihood_loss(FC, FR, NC, NR, alpha=0.0).losses.item() == pytest.approx(math.log(2.0))


def test_unlikelihood_pushes_rejected_down():
    """d loss / d m_l = alpha e^m / (1 - e^m) > 0 so gradient descent lowers the rejected log-prob;
    with m_l = log(1/3) per token over 3 tokens: d/d logp_l = (1/3) * (1/3)/(2/3) = 1/6."""
    fr = FR.clone().requires_grad_()
    L.unlikelihood_loss(FC, fr, NC, NR, alpha=1.0).losses.sum().backward()
    assert fr.grad.item() == pytest.approx(1 / 6)


def test_bradley_terry_margin():
    """r_w = 1, r_l = 0, margin 1: -log sigma(0) = log 2; margin 0 -> softplus(-1). Tensor margins work."""
    assert R.bradley_terry_loss(t(1.0), t(0.0), margin=1.0).item() == pytest.approx(math.log(2))
    assert R.bradley_terry_loss(t(1.0), t(0.0), margin=0.0).item() == pytest.approx(softplus(-1.0))
    per = R.bradley_terry_loss(t(1.0, 1.0), t(0.0, 0.0), margin=t(1.0, 0.0))
    assert per.tolist() == pytest.approx([math.log(2), softplus(-1.0)])


def test_dpo_gradient_weight_matches_autograd():
    """d L_DPO / d log pi(y_w) = -beta sigma(r_l - r_w) (Rafailov et al. §4). With h = 2, beta = 0.5:
    r_w - r_l = 1 so the weight is sigma(-1) = 0.268941 and the gradient -0.5 * 0.268941."""
    pc = PC.clone().requires_grad_()
    out = L.dpo_loss(pc, PR, RC, RR, beta=0.5)
    out.losses.sum().backward()
    w = L.dpo_gradient_weight(out.chosen_rewards, out.rejected_rewards)
    assert w.item() == pytest.approx(1 / (1 + math.e), abs=1e-12)
    assert pc.grad.item() == pytest.approx(-0.5 * w.item(), abs=1e-12)


# ------------------------------------------------------------------------------------------- properties


def test_dpo_is_log2_when_policy_equals_reference():
    """h = 0 for every example, so the loss is -log sigma(0) = log 2 whatever beta."""
    g = torch.Generator().manual_seed(0)
    pc, pr = -10 * torch.rand(5, generator=g, dtype=torch.float64), -10 * torch.rand(5, generator=g,
                                                                                    dtype=torch.float64)
    for beta in (0.01, 0.1, 3.0):
        out = L.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta)
        assert torch.allclose(out.losses, torch.full_like(pc, math.log(2)))
        assert torch.equal(out.chosen_rewards, torch.zeros_like(pc))


@pytest.mark.parametrize("name", REF_BASED)
def test_swapping_chosen_and_rejected_swaps_rewards(name):
    """Swapping roles swaps the two implicit rewards, so the margin r_w - r_l flips sign."""
    a = L.preference_loss(name, policy_chosen_logps=PC, policy_rejected_logps=PR, ref_chosen_logps=RC,
                          ref_rejected_logps=RR)
    b = L.preference_loss(name, policy_chosen_logps=PR, policy_rejected_logps=PC, ref_chosen_logps=RR,
                          ref_rejected_logps=RC)
    assert torch.equal(a.chosen_rewards, b.rejected_rewards)
    assert torch.equal(a.rejected_rewards, b.chosen_rewards)
    margin_a, margin_b = a.chosen_rewards - a.rejected_rewards, b.chosen_rewards - b.rejected_rewards
    assert margin_a.item() == pytest.approx(0.2) and margin_b.item() == pytest.approx(-0.2)


def test_swapped_dpo_loss_differs_by_beta_h():
    """-log sigma(-z) = -log sigma(z) + z, so swapping adds beta*h = 0.5 * 2 = 1 to the DPO loss."""
    a = L.dpo_loss(PC, PR, RC, RR, beta=0.5).losses
    b = L.dpo_loss(PR, PC, RR, RC, beta=0.5).losses
    assert (b - a).item() == pytest.approx(1.0, abs=1e-12)


def test_label_smoothing_zero_is_dpo():
    g = torch.Generator().manual_seed(1)
    args = [-5 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4)]
    dpo = L.dpo_loss(*args, beta=0.3)
    for fn in (L.cdpo_loss, L.robust_dpo_loss):
        out = fn(*args, beta=0.3, label_smoothing=0.0)
        assert torch.equal(out.losses, dpo.losses)
        assert torch.equal(out.chosen_rewards, dpo.chosen_rewards)


def test_ipo_minimum_at_half_inverse_beta():
    """loss(h) = (h - 1/(2 beta))^2: on a grid of h the argmin is 1/(2*0.2) = 2.5 and the gradient there is 0."""
    beta = 0.2
    hs = torch.linspace(-5, 10, 301, dtype=torch.float64)  # step 0.05, contains 2.5
    zeros = torch.zeros_like(hs)
    out = L.ipo_loss(hs, zeros, zeros, zeros, beta=beta)
    assert hs[out.losses.argmin()].item() == pytest.approx(2.5)
    h = torch.tensor([2.5], dtype=torch.float64, requires_grad=True)
    L.ipo_loss(h, t(0.0), t(0.0), t(0.0), beta=beta).losses.sum().backward()
    assert h.grad.item() == 0.0


@pytest.mark.parametrize("name", list(L.LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_at_extreme_inputs(name, dtype):
    """Summed log-probs from 0 (probability 1) to -1e4 per sequence and 1-token to 4096-token responses."""
    pc = torch.tensor([0.0, -1e-30, -1e4, -50.0, -1e4], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1e4, 0.0, 0.0, -1e-30, -1e4], dtype=dtype, requires_grad=True)
    rc = torch.tensor([-1e4, 0.0, -1e-3, -3.0, 0.0], dtype=dtype)
    rr = torch.tensor([0.0, -1e4, -2.0, -1e4, -1e4], dtype=dtype)
    n = torch.tensor([1.0, 4096.0, 1.0, 7.0, 1.0], dtype=dtype)
    out = L.preference_loss(name, policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                            ref_rejected_logps=rr, chosen_lengths=n, rejected_lengths=n.flip(0))
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert torch.isfinite(out.chosen_rewards).all() and not out.chosen_rewards.requires_grad


def test_log1mexp_accurate_on_both_branches():
    """log(1 - e^x) for x = -1e-10 (~log 1e-10), -0.1, -1, -50 (~ -e^-50) against math in double."""
    xs = [-1e-10, -0.1, -1.0, -50.0]
    got = L.log1mexp(torch.tensor(xs, dtype=torch.float64))
    want = [math.log(-math.expm1(x)) for x in xs]
    assert got.tolist() == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------------- registry dispatch


def test_registry_matches_direct_calls():
    for name, spec in L.LOSSES.items():
        if spec.needs_reference:
            direct = spec.fn(PC, PR, RC, RR)
        else:
            direct = spec.fn(FC, FR, NC, NR)
        via = L.preference_loss(name, policy_chosen_logps=PC if spec.needs_reference else FC,
                                policy_rejected_logps=PR if spec.needs_reference else FR,
                                ref_chosen_logps=RC, ref_rejected_logps=RR, chosen_lengths=NC,
                                rejected_lengths=NR)
        assert torch.equal(direct.losses, via.losses), name
        assert spec.summary and isinstance(spec.hparams, dict)
    assert set(L.LOSSES) == {"dpo", "ipo", "cdpo", "hinge", "robust", "orpo", "simpo", "unlikelihood"}
    assert L.LOSSES["simpo"].hparams == {"beta": 2.0, "gamma": 0.5}
    assert L.LOSSES["cdpo"].hparams == {"beta": 0.1, "label_smoothing": 0.1}


def test_registry_passes_hparams():
    via = L.preference_loss("cdpo", policy_chosen_logps=PC, policy_rejected_logps=PR, ref_chosen_logps=RC,
                            ref_rejected_logps=RR, beta=0.5, label_smoothing=0.1)
    assert via.losses.item() == pytest.approx(softplus(-1.0) + 0.1)


def test_registry_does_not_length_normalise_ipo_unless_asked():
    """Lengths given to a reference-based loss change nothing unless the loss is told to use them."""
    kw = dict(policy_chosen_logps=PC, policy_rejected_logps=PR, ref_chosen_logps=RC, ref_rejected_logps=RR,
              chosen_lengths=t(2.0), rejected_lengths=t(4.0), beta=0.1)
    assert L.preference_loss("ipo", **kw).losses.item() == pytest.approx(9.0)
    # per-token: +1/2 - (-1/4) = 0.75 -> (0.75 - 5)^2 = 18.0625
    assert L.preference_loss("ipo", **kw, length_normalize=True).losses.item() == pytest.approx(18.0625)


def test_registry_errors():
    kw = dict(policy_chosen_logps=PC, policy_rejected_logps=PR)
    with pytest.raises(ValueError, match=r"unknown loss 'dpoo'.*Did you mean 'dpo'"):
        L.preference_loss("dpoo", **kw, ref_chosen_logps=RC, ref_rejected_logps=RR)
    with pytest.raises(ValueError, match=r"unknown loss 'zzz'\. Valid losses: dpo, ipo"):
        L.preference_loss("zzz", **kw)
    with pytest.raises(ValueError, match=r"'simpo' has no hyperparameter 'label_smoothing'.*beta, gamma"):
        L.preference_loss("simpo", **kw, chosen_lengths=NC, rejected_lengths=NR, label_smoothing=0.1)
    with pytest.raises(ValueError, match="'dpo' needs reference log-probs"):
        L.preference_loss("dpo", **kw, ref_chosen_logps=RC)
    with pytest.raises(ValueError, match="'orpo' needs chosen_lengths and rejected_lengths"):
        L.preference_loss("orpo", **kw, chosen_lengths=NC)


def test_hyperparameter_and_length_validation():
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        L.robust_dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1.0\]"):
        L.cdpo_loss(PC, PR, RC, RR, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="chosen_lengths must be positive"):
        L.simpo_loss(FC, FR, t(0.0), NR)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        L.unlikelihood_loss(FC, FR, NC, NR, alpha=-1.0)


# ----------------------------------------------------------------------------------- ranking losses


def test_pairwise_ranking_k2_equals_bradley_terry():
    g = torch.Generator().manual_seed(2)
    r = torch.randn(7, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(R.pairwise_ranking_loss(r), R.bradley_terry_loss(r[:, 0], r[:, 1]))


def test_pairwise_ranking_hand_value_and_masks():
    """Rewards (2, 1, 0) best-first: pairs give softplus(-1), softplus(-2), softplus(-1); mean =
    (2 softplus(-1) + softplus(-2)) / 3 = 0.251151. A second prompt with only 2 valid responses
    (padding holds nan) gives softplus(-1) for (1, 0); a hole in the middle is skipped."""
    nan = float("nan")
    r = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, nan], [1.0, nan, 0.0]], dtype=torch.float64,
                     requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, True]])
    loss = R.pairwise_ranking_loss(r, mask=mask)
    want = (2 * softplus(-1.0) + softplus(-2.0)) / 3
    assert want == pytest.approx(0.251151, abs=1e-6)
    assert loss.tolist() == pytest.approx([want, softplus(-1.0), softplus(-1.0)], abs=1e-12)
    loss.sum().backward()
    assert torch.isfinite(r.grad).all() and r.grad[1, 2] == 0 and r.grad[2, 1] == 0


def test_ranking_losses_need_two_valid():
    with pytest.raises(ValueError, match="row 1 has 1 valid responses"):
        R.pairwise_ranking_loss(t(1.0, 2.0, 3.0, 4.0).view(2, 2), mask=torch.tensor([[1, 1], [1, 0]]))
    with pytest.raises(ValueError, match=r"shape \(B, K\)"):
        R.pairwise_ranking_loss(t(1.0, 2.0))


def test_plackett_luce_k2_equals_bradley_terry():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(6, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(R.plackett_luce_loss(r), R.bradley_terry_loss(r[:, 0], r[:, 1]))


def test_plackett_luce_hand_value_and_mask():
    """Rewards (log 3, log 2, log 1): P = 3/6 * 2/3 * 1 = 1/3, so the loss is log 3. Padding anywhere
    (nan or inf values) gives the same result as the compressed row."""
    r3 = t(math.log(3), math.log(2), 0.0)
    assert R.plackett_luce_loss(r3.view(1, 3)).item() == pytest.approx(math.log(3), abs=1e-12)
    assert R.plackett_luce_logprob(r3).item() == pytest.approx(-math.log(3), abs=1e-12)
    padded = torch.tensor([[math.log(3), float("inf"), math.log(2), 0.0, float("nan")]], dtype=torch.float64,
                          requires_grad=True)
    mask = torch.tensor([[True, False, True, True, False]])
    loss = R.plackett_luce_loss(padded, mask=mask)
    assert loss.item() == pytest.approx(math.log(3), abs=1e-12)
    loss.sum().backward()
    assert torch.isfinite(padded.grad).all() and padded.grad[0, 1] == 0 and padded.grad[0, 4] == 0


def test_first_place_probabilities():
    """exp(r) normalised: (log 3, log 2, 0) -> (1/2, 1/3, 1/6); masking the middle -> (3/4, 0, 1/4)."""
    r = t(math.log(3), math.log(2), 0.0)
    assert R.first_place_probabilities(r).tolist() == pytest.approx([1 / 2, 1 / 3, 1 / 6])
    masked = R.first_place_probabilities(r, mask=torch.tensor([True, False, True]))
    assert masked.tolist() == pytest.approx([3 / 4, 0.0, 1 / 4])


def test_import_is_light():
    """`import preftune.core.losses` must not pull in transformers, matplotlib, typer or the CLI."""
    code = ("import sys, preftune.core.losses; heavy = [m for m in ('transformers', 'matplotlib', 'typer', "
            "'preftune.cli', 'accelerate') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
