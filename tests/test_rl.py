"""preftune.core.rl by hand: KL estimators, shaped rewards, the KL controllers, GAE, the leave-one-out and mean
baselines, whitening, PPO's clipped policy and value losses, and the light import."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from preftune.core import rl


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_kl_estimators_by_hand() -> None:
    """log pi = log 0.5, log pi_ref = log 0.25: k1 = log 2 = 0.693147; r = pi_ref/pi = 1/2, so
    k3 = (r - 1) - log r = -0.5 + log 2 = 0.193147. k3 >= 0 always; k1 is negative when pi < pi_ref."""
    logp, ref = t(math.log(0.5)), t(math.log(0.25))
    assert rl.kl_k1(logp, ref).item() == pytest.approx(math.log(2), abs=1e-12)
    assert rl.kl_k3(logp, ref).item() == pytest.approx(-0.5 + math.log(2), abs=1e-12)
    assert rl.kl_k1(ref, logp).item() == pytest.approx(-math.log(2), abs=1e-12)
    assert rl.kl_k3(ref, logp).item() == pytest.approx(1.0 - math.log(2), abs=1e-12)  # r = 2: 1 - log 2
    assert rl.kl_penalty(logp, logp, estimator="k3").item() == 0.0
    with pytest.raises(ValueError, match="unknown KL estimator 'k2'"):
        rl.kl_penalty(logp, ref, estimator="k2")


def test_both_estimators_are_unbiased_for_the_kl() -> None:
    """Sampling y ~ p and averaging k1 or k3 gives KL(p || q) = sum p log p/q (here 0.0851...)."""
    p, q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    for name in ("k1", "k3"):
        values = rl.kl_penalty(p.log(), q.log(), estimator=name)
        assert float((p * values).sum()) == pytest.approx(exact, abs=1e-12), name  # expectation under p


def test_shaped_rewards_put_the_score_on_the_last_token() -> None:
    """Two responses of 3 and 2 tokens, beta 0.5: R_t = -0.5 KL_t, plus the score at the last real token."""
    kl = t([0.2, 0.4, 0.6], [1.0, -1.0, 9.0])
    mask = t([1, 1, 1], [1, 1, 0])
    rewards = rl.shaped_rewards(t(1.0, 2.0), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, t([-0.1, -0.2, -0.3 + 1.0], [-0.5, 0.5 + 2.0, 0.0]))
    assert rewards.sum(-1).tolist() == pytest.approx([1.0 - 0.5 * 1.2, 2.0 - 0.5 * 0.0])
    with pytest.raises(ValueError, match="at least one response token"):
        rl.shaped_rewards(t(1.0), t([0.0]), t([0]), kl_coef=0.1)


def test_adaptive_controller_step_by_hand() -> None:
    """target 6, KL 9: e = clip(9/6 - 1, -0.2, 0.2) = 0.2, beta = 0.1 * (1 + 0.2 * 100/1000) = 0.102;
    then KL 5.4: e = -0.1, beta = 0.102 * (1 - 0.1 * 0.1) = 0.10098."""
    controller = rl.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert controller.update(9.0, n_steps=100) == pytest.approx(0.102, abs=1e-15)
    assert controller.update(5.4, n_steps=100) == pytest.approx(0.10098, abs=1e-15)
    fixed = rl.FixedKLController(0.3)
    assert fixed.update(100.0, n_steps=100) == 0.3


def test_adaptive_controller_holds_the_kl_near_its_target() -> None:
    """A policy whose KL answers beta as KL = 2 / beta (with 10% multiplicative noise): from beta 0.01
    (KL 200, far above a target of 4) the controller settles where KL ~ target; over the last 200 of
    2000 rollouts the mean KL is within 5% of the target. A fixed beta stays at KL 200."""
    generator = torch.Generator().manual_seed(0)
    controller = rl.AdaptiveKLController(0.01, target=4.0, horizon=500)
    kls = []
    for _ in range(2000):
        kl = 2.0 / controller.value * float(1 + 0.1 * torch.randn((), generator=generator))
        kls.append(kl)
        controller.update(kl, n_steps=64)
    tail = sum(kls[-200:]) / 200
    assert abs(tail - 4.0) / 4.0 < 0.05
    assert controller.value == pytest.approx(0.5, rel=0.1)
    assert kls[0] > 150


def test_gae_by_hand() -> None:
    """gamma 0.9, lambda 0.5, one response of 3 tokens with rewards (1, 0, 2), values (0.5, 1, 1.5):
    delta_2 = 2 + 0 - 1.5 = 0.5 (the episode ends), delta_1 = 0 + 0.9*1.5 - 1 = 0.35,
    delta_0 = 1 + 0.9*1 - 0.5 = 1.4; A_2 = 0.5, A_1 = 0.35 + 0.45*0.5 = 0.575,
    A_0 = 1.4 + 0.45*0.575 = 1.65875; returns = A + V = (2.15875, 1.575, 2.0).
    A second row of 2 tokens padded to 3: its third value and reward are ignored."""
    rewards = t([1.0, 0.0, 2.0], [1.0, 3.0, 7.0])
    values = t([0.5, 1.0, 1.5], [0.5, 1.0, 9.0])
    mask = t([1, 1, 1], [1, 1, 0])
    advantages, returns = rl.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 2: delta_1 = 3 - 1 = 2, delta_0 = 1 + 0.9*1 - 0.5 = 1.4, A_0 = 1.4 + 0.45*2 = 2.3
    torch.testing.assert_close(advantages, t([1.65875, 0.575, 0.5], [2.3, 2.0, 0.0]))
    torch.testing.assert_close(returns, t([2.15875, 1.575, 2.0], [2.8, 3.0, 0.0]))


def test_gae_with_lambda_1_and_gamma_1_is_return_minus_value() -> None:
    """lambda = gamma = 1: A_t = sum_{t' >= t} r_t' - V_t (Monte Carlo return minus the baseline)."""
    rewards, values, mask = t([1.0, 2.0, 3.0]), t([0.3, -0.2, 0.7]), t([1, 1, 1])
    advantages, _ = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, t([6.0 - 0.3, 5.0 + 0.2, 3.0 - 0.7]))


def test_leave_one_out_by_hand() -> None:
    """K = 3 rewards (1, 2, 6) of one prompt: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5, so
    A = (-3, -1.5, 4.5) = 3/2 * (R - mean 3). A second prompt (0, 0, 3): A = (-1.5, -1.5, 3)."""
    advantages = rl.leave_one_out_advantages(t(1.0, 2.0, 6.0, 0.0, 0.0, 3.0), 3)
    torch.testing.assert_close(advantages, t(-3.0, -1.5, 4.5, -1.5, -1.5, 3.0))
    with pytest.raises(ValueError, match="num_samples >= 2"):
        rl.leave_one_out_advantages(t(1.0), 1)
    with pytest.raises(ValueError, match="groups of 2"):
        rl.leave_one_out_advantages(t(1.0, 2.0, 3.0), 2)


def test_mean_baseline_and_whitening() -> None:
    """Batch mean of (1, 2, 6) is 3: A = (-2, -1, 3). Whitening (x - mean)/std with the unbiased std
    sqrt(((−2)^2 + 1 + 9)/2) = sqrt(7): (-2, -1, 3)/sqrt(7); masked positions are left out and set to 0."""
    torch.testing.assert_close(rl.mean_baseline_advantages(t(1.0, 2.0, 6.0)), t(-2.0, -1.0, 3.0))
    white = rl.whiten(t(1.0, 2.0, 6.0, 100.0), t(1, 1, 1, 0), eps=0.0)
    torch.testing.assert_close(white, t(-2.0, -1.0, 3.0, 0.0) / math.sqrt(7))
    kept = rl.whiten(t(1.0, 2.0, 6.0), shift_mean=False, eps=0.0)
    torch.testing.assert_close(kept, t(-2.0, -1.0, 3.0) / math.sqrt(7) + 3.0)


def test_ppo_policy_loss_clips_by_the_sign_of_the_advantage() -> None:
    """eps 0.2. A = +1, ratio 1.5: min(1.5, 1.2) = 1.2 -> loss -1.2 (no gain beyond 1 + eps);
    A = -1, ratio 0.5: min(-0.5, -0.8) = -0.8 -> loss 0.8; A = +1, ratio 0.5: min(0.5, 0.8) = 0.5 ->
    loss -0.5 (the pessimistic unclipped term); ratio 1: -A."""
    logp = t(math.log(1.5), math.log(0.5), math.log(0.5), 0.0)
    advantages = t(1.0, -1.0, 1.0, 2.0)
    losses, ratio = rl.ppo_policy_loss(logp, torch.zeros(4, dtype=torch.float64), advantages, clip_range=0.2)
    torch.testing.assert_close(losses, t(-1.2, 0.8, -0.5, -2.0))
    torch.testing.assert_close(ratio, t(1.5, 0.5, 0.5, 1.0))
    torch.testing.assert_close(rl.clip_fraction(ratio, clip_range=0.2), t(1.0, 1.0, 1.0, 0.0))
    torch.testing.assert_close(rl.approx_kl(logp, torch.zeros(4, dtype=torch.float64)),
                               0.5 * t(math.log(1.5), math.log(0.5), math.log(0.5), 0.0) ** 2)


def test_clipped_value_loss_by_hand() -> None:
    """eps 0.2, old value 1, return 2. V = 1.5: clipped 1.2, losses (0.25, 0.64)/2 -> 0.32 (clipped
    is larger). V = 0.5: clipped 0.8, (2.25, 1.44)/2 -> 1.125 (unclipped is larger). V = 1.1: in range."""
    values, old, returns = t(1.5, 0.5, 1.1), t(1.0, 1.0, 1.0), t(2.0, 2.0, 2.0)
    losses, clipped = rl.clipped_value_loss(values, old, returns, clip_range=0.2)
    torch.testing.assert_close(losses, t(0.32, 1.125, 0.405))
    torch.testing.assert_close(clipped, t(1.0, 0.0, 0.0))


def test_importing_rl_stays_light() -> None:
    code = "import sys, preftune.core.rl; print('transformers' in sys.modules, 'accelerate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
