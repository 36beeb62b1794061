"""GRPO (`preftune train grpo`): the math on hand-made numbers, then runs on the tiny in-process Llama.

The math (``preftune.core.rl``): group-relative advantages with each ``scale_rewards``, an all-equal group
at exactly 0, the three loss normalisations (grpo, dr_grpo, dapo) with the KL term and masking, DAPO's
clip-higher and the clip-ratio regions, the chunked entropy, and the rollout -> items step (DAPO drops
all-equal groups). The runs: with one pass and kl_coef 0 the gradient is REINFORCE's with the
group-normalised advantages (float64), the letters reward rises, batch 8 x accumulation 1 equals batch 1
x accumulation 8, a run stopped in the middle of a rollout resumes exactly, kl_coef 0 loads no reference,
and several weighted rewards give the scores the advantages are computed from.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.train import resolve_config
from preftune.train.grpo import GRPOMethod, group_relative_advantages, grpo_loss
from preftune.train.loop import read_metrics, train
from run_helpers import interrupt_at

PROMPTS = ["Shall I compare thee to a summer's day?", "To be, or not to be, that is the question:",
           "The quick brown fox jumps over the lazy dog.", "Please write a short poem about the sea.",
           "Question: what colour is the sky? Answer:", "Rough winds do shake the darling buds of May,",
           "What is the answer?", "Here is a poem about the sea and the sky."]
HELDOUT = ["Thou art more lovely and more temperate:", "Whether 'tis nobler in the mind to suffer",
           "Question: what is two plus two? Answer:", "The slings and arrows of outrageous fortune,"]
EPS = 1e-4  # the advantage's std epsilon


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def letters(prompt: str, completion: str) -> float:
    return sum(c.isascii() and c.isalpha() for c in completion) / max(len(completion), 1)


def spaces(prompt: str, completion: str) -> float:  # on another scale on purpose
    return 10.0 * sum(c == " " for c in completion) / max(len(completion), 1)


def space_count(prompt: str, completion: str) -> float:  # few values: groups whose rewards all tie are common
    return float(completion.count(" "))


def _keys(model: Path, out: Path, **keys):
    return {"model": str(model), "output_dir": str(out), "batch_size": 4, "max_new_tokens": 8, "max_length": 64,
            "learning_rate": 3e-2, "lr_scheduler": "constant", "log_every": 1, "report_to": "none",
            "dtype": "float32", "sample_every": 0, "seed": 0, **keys}


def _config(**keys):
    """A GRPO config that names no real model (for the math on hand-made batches)."""
    return resolve_config("grpo", {"model": "m", "reward": "r.py:f", **keys})


# ------------------------------------------------------------------------------------------------ the math


def test_group_advantages_by_hand():
    """K = 4, two groups: a = [0, 0, 0, 4] (mean 1, deviations [-1, -1, -1, 3], sample variance
    (1 + 1 + 1 + 9) / 3 = 4, std 2) and b = [2, 2, 2, 2] (all equal).
    group: a -> [-1, -1, -1, 3] / (2 + eps); b -> 0 exactly.
    batch: the 8 rewards have mean 1.5, squared deviations 3 x 2.25 + 6.25 + 4 x 0.25 = 14, sample variance
    14 / 7 = 2, so a -> [-1, -1, -1, 3] / (sqrt 2 + eps); b -> 0.
    none (Dr. GRPO): a -> [-1, -1, -1, 3]; b -> 0."""
    from preftune.core.rl import group_advantages, zero_std_groups

    r = torch.tensor([0.0, 0.0, 0.0, 4.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    dev = torch.tensor([-1.0, -1.0, -1.0, 3.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(r, 4), dev / (2 + EPS), rtol=0, atol=1e-15)
    torch.testing.assert_close(group_advantages(r, 4, scale="batch"), dev / (math.sqrt(2) + EPS), rtol=0, atol=1e-15)
    torch.testing.assert_close(group_advantages(r, 4, scale="batch", batch_std=3.0), dev / (3 + EPS), rtol=0, atol=0)
    torch.testing.assert_close(group_advantages(r, 4, scale="none"), dev, rtol=0, atol=0)
    assert zero_std_groups(r, 4).tolist() == [False, True]
    # 0.1 four times: its float mean need not be 0.1 exactly, the advantages are 0 all the same
    tenths = torch.full((4,), 0.1)
    assert group_advantages(tenths, 4).tolist() == [0.0] * 4
    assert group_advantages(tenths, 4, scale="none").tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="num_samples >= 2"):
        group_advantages(r, 1)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(r, 3)


def _hand_batch(**fields):
    """Two completions of 3 and 1 tokens, advantages A = [1, -2], ratio 1 (logps == old_logps)."""
    logps = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64) * math.log(0.5)  # 0 on padding
    batch = {"response_mask": torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64),
             "advantage": torch.tensor([1.0, -2.0], dtype=torch.float64), "old_logps": logps.clone(),
             "weight": torch.ones(2, dtype=torch.float64), "entropy": torch.zeros(2, 3, dtype=torch.float64), **fields}
    return logps, batch


@pytest.mark.parametrize(("keys", "units", "expected"), [
    ({"loss_type": "grpo"}, 2, 0.5),          # (mean(-1, -1, -1) + mean(2)) / 2 = (-1 + 2) / 2
    ({"loss_type": "dr_grpo"}, 2, -0.125),   # (-3/4 + 2/4) / 2 with max_new_tokens 4
    ({"loss_type": "dapo"}, 4, -0.25),       # (-1 - 1 - 1 + 2) / 4 tokens
    ({"loss_type": "grpo", "mask_truncated_completions": True}, 2, -0.5),  # the 2nd is masked: (-1 + 0) / 2
])
def test_loss_normalisations_on_a_hand_made_batch(keys, units, expected):
    """Ratio 1 and no KL: the token losses are -A_i, [-1, -1, -1] and [2]; each loss_type's step loss is
    the sum of its units' losses over the step's units (2 completions or 4 tokens)."""
    c = _config(max_new_tokens=4, kl_coef=0.0, **keys)
    weight = torch.tensor([1.0, 0.0], dtype=torch.float64) if c.mask_truncated_completions else None
    logps, batch = _hand_batch(**({"weight": weight} if weight is not None else {}))
    losses, metrics = grpo_loss(logps, None, batch, c)
    assert float(losses.sum()) / units == pytest.approx(expected, abs=1e-15)
    assert "kl" not in metrics and float(metrics["clip_ratio/region_mean"]) == 0.0


def test_the_k3_kl_term_is_in_the_loss():
    """beta 0.5, pi = 0.5 and pi_ref = 0.25 on every token: r = pi_ref / pi = 0.5, k3 = (r - 1) - log r =
    -0.5 + log 2 = 0.193147; grpo's loss = ((-1 + 0.5 k3) + (2 + 0.5 k3)) / 2 = 0.5 + 0.5 k3, and the kl
    metric's sum over the 2 completions is 2 k3."""
    c = _config(max_new_tokens=4, kl_coef=0.5)
    logps, batch = _hand_batch()
    batch["ref_logps"] = (logps + math.log(0.5)) * batch["response_mask"]
    losses, metrics = grpo_loss(logps, None, batch, c)
    k3 = -0.5 + math.log(2)
    assert float(losses.sum()) / 2 == pytest.approx(0.5 + 0.5 * k3, abs=1e-15)
    assert float(metrics["kl"]) == pytest.approx(2 * k3, abs=1e-15)


def test_clip_higher_and_the_clip_regions():
    """eps 0.2: ratio 1.25 with A = 1 is clipped at 1.2 (loss -1.2, a high clip) unless eps_high 0.28
    (loss -1.25, unclipped); ratio 0.7 with A = -1 is clipped at 0.8 (loss 0.8, a low clip); ratio 0.7
    with A = +1 is not clipped (the min keeps 0.7 A: loss -0.7)."""
    from preftune.core.rl import clip_regions, ppo_policy_loss

    logps = torch.log(torch.tensor([1.25, 0.7, 0.7], dtype=torch.float64))
    old, adv = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    symmetric, ratio = ppo_policy_loss(logps, old, adv, clip_range=0.2)
    higher, _ = ppo_policy_loss(logps, old, adv, clip_range=0.2, clip_range_high=0.28)
    torch.testing.assert_close(symmetric, torch.tensor([-1.2, 0.8, -0.7], dtype=torch.float64))
    torch.testing.assert_close(higher, torch.tensor([-1.25, 0.8, -0.7], dtype=torch.float64))
    low, high = clip_regions(ratio, adv, clip_range=0.2)
    assert low.tolist() == [0.0, 1.0, 0.0] and high.tolist() == [1.0, 0.0, 0.0]
    assert clip_regions(ratio, adv, clip_range=0.2, clip_range_high=0.28)[1].tolist() == [0.0, 0.0, 0.0]


def test_chunked_entropy():
    """Uniform logits over V = 384: H = log 384 = 5.95064; random logits at temperature 0.7: the same as
    the full softmax, whatever the chunk size; response_entropy takes the columns that predict the
    response (query width 2: columns 1 and 2 for a 2-token response) and is 0 on padding."""
    from preftune.core.rl import token_entropy
    from preftune.train.rollout import response_entropy

    assert token_entropy(torch.zeros(3, 384)).tolist() == pytest.approx([math.log(384)] * 3, abs=1e-6)
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = torch.softmax(logits / 0.7, -1)
    full = -(p * torch.log(p)).sum(-1)
    torch.testing.assert_close(token_entropy(logits, temperature=0.7, chunk_size=3), full, rtol=0, atol=1e-12)
    batch = {"query_width": torch.tensor(2), "response_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0]])}
    expected = full[:, 1:3] * torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(response_entropy(logits, batch, temperature=0.7), expected, rtol=0, atol=1e-12)


def _rollout(scores, ended, k=2):
    from preftune.train.rollout import Rollout

    n = len(scores)
    mask = torch.ones(n, 2)
    return Rollout(list(range(n)), [torch.tensor([1])] * n, [torch.tensor([5, 6])] * n, ["ab"] * n, mask,
                   -torch.ones(n, 2), None, None, torch.tensor(scores), torch.zeros(n, 2), torch.zeros(n, 2),
                   torch.tensor(ended), k)


def test_rollout_items_and_dapos_dropped_groups():
    """K = 2, scores [1, 1 | 0, 2]: group 0 is all equal (A = 0), group 1 has mean 1 and std sqrt 2, so
    A = [-1, 1] / (sqrt 2 + eps). reward 1.0; reward_std = (0 + sqrt 2) / 2; frac_reward_zero_std 0.5.
    grpo keeps all 4 completions; dapo drops group 0 (dropped_groups 1), except when fewer than
    num_mini_batches x grad_accum = 4 would remain: then all 4 stay. mask_truncated_completions with the
    3rd completion truncated: weight 0 under grpo; dropped too under dapo (1 item left)."""
    ro = _rollout([1.0, 1.0, 0.0, 2.0], [True, True, False, True])
    a = 1 / (math.sqrt(2) + EPS)
    items, logs = group_relative_advantages(ro, _config(num_samples=2, kl_coef=0.0))
    assert [float(i["advantage"]) for i in items] == pytest.approx([0.0, 0.0, -a, a], abs=1e-7)
    assert logs == pytest.approx({"reward": 1.0, "reward_std": math.sqrt(2) / 2, "frac_reward_zero_std": 0.5})
    assert all(float(i["weight"]) == 1.0 and "ref_logps" not in i for i in items)
    items, logs = group_relative_advantages(ro, _config(num_samples=2, kl_coef=0.0, loss_type="dapo"))
    assert [float(i["advantage"]) for i in items] == pytest.approx([-a, a], abs=1e-7)
    assert logs["dropped_groups"] == 1.0
    items, logs = group_relative_advantages(ro, _config(num_samples=2, kl_coef=0.0, loss_type="dapo", grad_accum=4))
    assert len(items) == 4 and logs["dropped_groups"] == 0.0
    items, _ = group_relative_advantages(ro, _config(num_samples=2, kl_coef=0.0, mask_truncated_completions=True))
    assert [float(i["weight"]) for i in items] == [1.0, 1.0, 0.0, 1.0]
    items, _ = group_relative_advantages(ro, _config(num_samples=2, kl_coef=0.0, loss_type="dapo",
                                                     mask_truncated_completions=True))
    assert [float(i["advantage"]) for i in items] == pytest.approx([a], abs=1e-7)


def test_the_lists_of_choices_match_the_math():
    from preftune.core import rl
    from preftune.train import grpo

    assert grpo.SCALES == rl.GROUP_SCALES and grpo.LOSS_TYPES == rl.LOSS_TYPES


@pytest.mark.parametrize(("keys", "field", "message"), [
    ({"num_samples": 1}, "num_samples", "must be >= 2"),
    ({"kl_target": 1.0}, "kl_target", "is not used by grpo"),
    ({"whiten_advantages": True}, "whiten_advantages", "scale_rewards says"),
    ({"clip_range": 1.0}, "clip_range", "must be in"),
    ({"loss_type": "bnpo"}, "loss_type", "is not one of grpo, dr_grpo, dapo"),
    ({"epsilon": 0.3}, "epsilon", "did you mean clip_range"),
])
def test_config_errors_name_the_key(keys, field, message):
    with pytest.raises(PreftuneError, match=message) as info:
        _config(**keys)
    assert info.value.field == field


# ------------------------------------------------------------------------------------------------ runs


def _by_hand(config, **method):
    """setup + before_step(0) + collate outside the loop, on one accelerator; returns method, batch."""
    from accelerate import Accelerator

    from preftune.train.base import RunContext
    from preftune.train.loop import _release

    accelerator = Accelerator(cpu=True)
    m = GRPOMethod(prompts=PROMPTS, reward_fn=method.get("reward_fn", letters))
    m.setup(RunContext(config=config, accelerator=accelerator, output_dir=Path(config.output_dir),
                       log=lambda message: None))
    batch = m.collate(m.before_step(m.model, 0))
    _release(accelerator)
    return m, batch


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_gradient_is_reinforce_with_the_group_normalised_advantages(loss_type, float64_model_dir, tmp_path):
    """One pass, kl_coef 0, a rollout just sampled by this policy: ratio 1 (no clip active), so the gradient
    of GRPO's loss is REINFORCE's, -sum_i A_i sum_t w_it grad log pi(y_it) / N, with A_i = (r_i - mean_g) /
    (std_g + eps) of the letters reward over each prompt's K = 4 and, by loss_type, w_it = 1/|o_i| and
    N = completions (grpo), w_it = 1/max_new_tokens and N = completions (dr_grpo), w_it = 1 and N = tokens
    (dapo). float64, 1e-10. No reference model is loaded (kl_coef 0)."""
    from preftune.core.forward import forward_logits
    from preftune.core.rl import group_advantages
    from preftune.train.rollout import policy_response_logps, response_logps

    config = resolve_config("grpo", _keys(float64_model_dir, tmp_path, num_samples=4, dtype="auto", kl_coef=0.0,
                                          temperature=0.7, loss_type=loss_type, max_steps=1))
    method, batch = _by_hand(config)
    assert method.reference is None and not method.with_reference
    items = method.buffer["items"]
    if loss_type == "grpo":  # every completion is an item: their advantages, from the rewards by hand
        texts = method.tokenizer.batch_decode([i["response"] for i in items], skip_special_tokens=True)
        expected = group_advantages(torch.tensor([letters("", t) for t in texts], dtype=torch.float64), 4)
        torch.testing.assert_close(torch.stack([i["advantage"] for i in items]), expected, rtol=0, atol=1e-6)
    n = float(method.units(batch))
    method.loss(method.model, batch, normaliser=n).loss.backward()
    grpo = _grads(method.model)
    mask = batch["response_mask"]
    logps = response_logps(forward_logits(method.model, batch), batch, temperature=0.7)
    torch.testing.assert_close(logps * mask, batch["old_logps"] * mask, rtol=0, atol=1e-12)  # ratio == 1
    logps = policy_response_logps(method.model, batch, temperature=0.7)  # the loss's path (packed rows by default)
    per_token = {"grpo": 1 / mask.sum(-1, keepdim=True), "dr_grpo": 1 / config.max_new_tokens, "dapo": 1.0}[loss_type]
    (-(batch["advantage"][:, None] * per_token * logps * mask).sum() / n).backward()
    reinforce = _grads(method.model)
    assert grpo.keys() == reinforce.keys() and len(grpo) > 0
    assert max(float(g.abs().max()) for g in reinforce.values()) > 1e-4  # a real, non-zero gradient
    for name in grpo:
        torch.testing.assert_close(grpo[name], reinforce[name], rtol=1e-10, atol=1e-12, msg=name)


def _measure(model_dir: Path, reference_dir: Path) -> dict[str, float]:
    """Mean letters reward and KL of 8 samples on each held-out prompt (32 completions, fixed seeds)."""
    from preftune.models import load_policy, load_tokenizer
    from preftune.models.rewards import load_scorer
    from preftune.train.rollout import evaluate_policy

    tokenizer = load_tokenizer(str(reference_dir))
    policy, reference = load_policy(str(model_dir), tokenizer=tokenizer), load_policy(str(reference_dir))
    return evaluate_policy(policy, reference, tokenizer, HELDOUT, load_scorer(letters), num_samples=8,
                           max_new_tokens=8, seed=123)


@pytest.mark.parametrize("keys", [
    {"loss_type": "grpo"},
    {"loss_type": "dapo", "kl_coef": 0.0, "epsilon_high": 0.28, "scale_rewards": "none"},
])
def test_the_reward_rises_on_held_out_prompts(keys, tiny_model_dir, tmp_path):
    """The letters reward (the share of ASCII letters; 1.0 at best, about 0.55 for the random tiny model):
    32 fixed-seed completions on 4 held-out prompts before and after 12 steps must gain more than 5
    standard errors of the difference; the metrics carry the ecosystem's names and are finite."""
    final = train(GRPOMethod(prompts=PROMPTS, reward_fn=letters),
                  resolve_config("grpo", _keys(tiny_model_dir, tmp_path, max_steps=12, **keys)))
    before, after = _measure(tiny_model_dir, tiny_model_dir), _measure(final, tiny_model_dir)
    assert after["reward"] - before["reward"] > 5 * math.hypot(before["reward_se"], after["reward_se"]), (before, after)
    records = read_metrics(tmp_path / "metrics.jsonl")
    names = ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "clip_ratio/low_mean",
             "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "objective/scores", "objective/rlhf_reward"]
    names += ["kl", "objective/kl"] if keys.get("kl_coef", 0.04) > 0 else ["dropped_groups"]
    for name in names:
        assert all(math.isfinite(r[name]) for r in records), name
    assert records[-1]["reward"] > records[0]["reward"]
    assert 0 < records[0]["entropy"] <= math.log(384)  # nats, at most the uniform distribution's


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_batch8_accum1_equals_batch1_accum8(loss_type, float64_model_dir, tmp_path):
    """One step on the same 8 prompts x K = 2 (the same rollout: sampling is seeded per row), as one
    micro-batch of 8 prompts or 8 micro-batches of 1: the loop's normaliser is the step's completions
    (grpo, dr_grpo) or tokens (dapo), so the loss, the gradient norm and the weights agree (float64). Packed
    rows without prompt sharing: a shared prompt sums its continuations' gradients before Llama's RMSNorm
    rounds them to float32, so sharing holds to float32 precision, not float64 (tests/test_packing.py)."""
    from safetensors.torch import load_file

    runs = {}
    for name, (batch, accum) in {"b8a1": (8, 1), "b1a8": (1, 8)}.items():
        out = tmp_path / name
        train(GRPOMethod(prompts=PROMPTS, reward_fn=letters),
              resolve_config("grpo", _keys(float64_model_dir, out, batch_size=batch, grad_accum=accum, num_samples=2,
                                           dtype="auto", loss_type=loss_type, max_steps=1, learning_rate=1e-3,
                                           share_prompt=False)))
        runs[name] = (read_metrics(out / "metrics.jsonl")[0], load_file(out / "final" / "model.safetensors"))
    (r8, w8), (r1, w1) = runs["b8a1"], runs["b1a8"]
    assert r8["loss"] == pytest.approx(r1["loss"], rel=1e-10, abs=1e-14)
    assert r8["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-10) and r8["grad_norm"] > 0
    assert r8["kl"] == pytest.approx(r1["kl"], abs=1e-12) and r8["entropy"] == pytest.approx(r1["entropy"], rel=1e-10)
    for key in w8:
        torch.testing.assert_close(w8[key], w1[key], rtol=0, atol=1e-10, msg=key)




def test_resume_in_the_middle_of_a_rollout_is_exact(tiny_model_dir, tmp_path):
    """6 steps straight == Ctrl-C during step 3, checkpoint, resume. A rollout serves 2 steps (2 passes), so
    step 4 trains on the rollout made at step 3, restored from the checkpoint: identical metrics,
    samples.jsonl and final weights. dapo with clip-higher on the count of spaces: rollouts drop their
    all-equal groups and second passes clip."""
    from safetensors.torch import load_file

    keys = _keys(tiny_model_dir, tmp_path / "straight", num_samples=2, update_epochs=2, max_steps=6, kl_coef=0.1,
                 loss_type="dapo", epsilon_high=0.28, sample_every=2, save_every=100)
    train(GRPOMethod(prompts=PROMPTS, reward_fn=space_count), resolve_config("grpo", keys))
    resumed = {**keys, "output_dir": str(tmp_path / "resumed")}
    with pytest.raises(KeyboardInterrupt):
        train(interrupt_at(GRPOMethod(prompts=PROMPTS, reward_fn=space_count), 2), resolve_config("grpo", resumed))
    assert (tmp_path / "resumed" / "checkpoints" / "step-3" / "method_state_0.pt").is_file()
    train(GRPOMethod(prompts=PROMPTS, reward_fn=space_count), resolve_config("grpo", resumed))

    def curve(run):
        return [{k: v for k, v in r.items() if k != "tokens_per_second"}
                for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    assert [r["step"] for r in curve("resumed")] == [1, 2, 3, 4, 5, 6]
    assert curve("resumed") == curve("straight")
    assert all(r["dropped_groups"] > 0 for r in curve("straight"))
    assert all(r["clip_ratio/region_mean"] > 0 for r in curve("straight")[1::2])  # each second pass
    assert (tmp_path / "resumed" / "samples.jsonl").read_text() == (tmp_path / "straight" / "samples.jsonl").read_text()
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def constant(prompt: str, completion: str) -> float:
    return 1.0


@pytest.mark.parametrize(("reward", "keys"), [(constant, {"loss_type": "dapo"}),
                                              (letters, {"loss_type": "grpo", "mask_truncated_completions": True}),
                                              (letters, {"loss_type": "dapo", "mask_truncated_completions": True})])
def test_steps_with_nothing_to_learn_from_still_run(reward, keys, tiny_model_dir, tmp_path):
    """A constant reward: every group is all-equal, so dapo would drop every completion; it keeps the rollout
    instead (dropped_groups 0) and the loss is exactly 0 (A = 0, no KL term). The random model's 8-token
    completions never end with EOS: with mask_truncated_completions every one is masked (dapo would drop
    them all and keeps them instead), so the letters reward's non-zero advantages give a loss of 0 too."""
    train(GRPOMethod(prompts=PROMPTS, reward_fn=reward),
          resolve_config("grpo", _keys(tiny_model_dir, tmp_path, kl_coef=0.0, max_steps=2, **keys)))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in records] == [0.0, 0.0] and records[0]["completions/eos_rate"] == 0.0
    assert all(r.get("dropped_groups", 0.0) == 0.0 for r in records)
    assert all((r["frac_reward_zero_std"] == 1.0) == (reward is constant) for r in records)


def test_kl_coef_0_loads_no_reference(tiny_model_dir, tmp_path, monkeypatch):
    """kl_coef 0: build_reference is never called (it raises here), no reference forward pass runs, and no
    KL is logged (neither the loss's kl nor objective/kl) or written to samples.jsonl. kl_coef 0.1: the
    reference is loaded and each item carries its log-probs."""
    import preftune.models.load as load

    build = load.build_reference

    def refuse(*args, **kwargs):
        raise AssertionError("no reference model may be loaded with kl_coef 0")

    monkeypatch.setattr(load, "build_reference", refuse)
    train(GRPOMethod(prompts=PROMPTS, reward_fn=letters),
          resolve_config("grpo", _keys(tiny_model_dir, tmp_path / "nokl", kl_coef=0.0, max_steps=2, sample_every=1)))
    records = read_metrics(tmp_path / "nokl" / "metrics.jsonl")
    assert len(records) == 2 and not {"kl", "objective/kl"} & set(records[-1]) and "entropy" in records[-1]
    sample = json.loads((tmp_path / "nokl" / "samples.jsonl").read_text().splitlines()[0])
    assert "kl" not in sample and sample["rlhf_reward"] == sample["score"]
    monkeypatch.setattr(load, "build_reference", build)
    method, batch = _by_hand(resolve_config("grpo", _keys(tiny_model_dir, tmp_path / "kl", kl_coef=0.1, max_steps=1)))
    assert method.reference is not None and "ref_logps" in batch


def test_several_weighted_rewards(tiny_model_dir, tmp_path):
    """rewards alpha (letters) and space (10 x the share of spaces), reward_aggregation weighted with weights
    [3, 1]: each is standardised on the starting policy's samples and the score GRPO's advantages are
    computed from is (3 z_alpha + z_space) / 4 (samples.jsonl against reward_stats.json); the rollout
    logs each reward's raw mean and ``reward`` is the mean of those scores."""
    keys = _keys(tiny_model_dir, tmp_path, reward_aggregation="weighted", reward_weights=[3.0, 1.0],
                 reward_standardize_prompts=4, num_samples=2, max_steps=2, sample_every=1, sample_rows=8)
    train(GRPOMethod(prompts=PROMPTS, reward_fn={"alpha": letters, "space": spaces}), resolve_config("grpo", keys))
    stats = json.loads((tmp_path / "reward_stats.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16
    for s in samples:
        z = [(s["reward_scores"][n] - m) / sd for n, m, sd in zip(("alpha", "space"), stats["mean"], stats["std"],
                                                                     strict=True)]
        assert s["score"] == pytest.approx((3 * z[0] + z[1]) / 4, abs=1e-5)
    first = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert {"objective/scores/alpha", "objective/scores/space"} <= set(first)
    assert first["reward"] == pytest.approx(sum(s["score"] for s in samples[:8]) / 8, abs=1e-5)


@pytest.mark.slow
def test_two_cpu_processes_equal_one_process(float64_model_dir, tmp_path):
    """2 steps (2 passes over one rollout) on 8 prompts x K = 2, one process with batch_size 8 or two gloo
    processes with 4 each (`accelerate launch`, the user's path). Each process makes its own prompts'
    groups; scale_rewards batch takes the std over both processes' rewards, dapo's normaliser their
    tokens, the logged rollout statistics their sums: so the metrics and the final weights agree (float64;
    1e-10, as in test_distributed.py)."""
    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    (tmp_path / "rewards.py").write_text("def space_count(prompt, completion):\n"
                                         "    return float(completion.count(' '))\n", encoding="utf-8")
    config = tmp_path / "grpo.yaml"
    config.write_text(f"model: {float64_model_dir}\ndata: {tmp_path / 'prompts.txt'}\nreward: "
                      f"{tmp_path / 'rewards.py'}:space_count\nreport_to: none\nlearning_rate: 1.0e-3\n"
                      "lr_scheduler: constant\nmax_steps: 2\nupdate_epochs: 2\nlog_every: 1\nseed: 0\nnum_samples: 2\n"
                      "max_new_tokens: 8\nmax_length: 64\nkl_coef: 0.1\nloss_type: dapo\nscale_rewards: batch\n"
                      "epsilon_high: 0.28\nsample_every: 0\n", encoding="utf-8")
    from preftune.train import run

    run("grpo", config, batch_size=8, output_dir=str(tmp_path / "one"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(repo / "examples" / "accelerate" / "multi_cpu.yaml"), "--num_processes", "2", "--main_process_port",
           str(port), "--num_cpu_threads_per_process", "1", "-m", "preftune", "train", "grpo", str(config),
           "--batch_size", "4", "--output_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "batch_size 4 x grad_accum 1 x 2 processes" in proc.stdout + proc.stderr
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "reward", "reward_std", "frac_reward_zero_std", "dropped_groups", "kl",
                    "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "objective/kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-12), (a["step"], key)
    assert one[0]["dropped_groups"] > 0 and one[1]["clip_ratio/region_mean"] > 0
    w1 = load_file(tmp_path / "one" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-10, msg=key)
