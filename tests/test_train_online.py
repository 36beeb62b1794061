"""PPO, RLOO and RAFT on the tiny in-process Llama: each raises a toy reward with a known optimum, PPO
(and RLOO) with one pass and the rollout policy equal to the current one take REINFORCE's gradient, the
adaptive KL controller is wired to the logged KL, a run stopped in the middle of a rollout resumes
exactly, and the configs and the CLI fail with clear messages.

The toy task: the reward is the share of ASCII letters in the completion (1.0 at best). The random tiny
model writes about half letters; 8-token completions, 8 prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.train import resolve_config
from preftune.train.loop import read_metrics, train
from preftune.train.ppo import PPOMethod
from preftune.train.raft import RAFTMethod
from preftune.train.rloo import RLOOMethod
from run_helpers import interrupt_at

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Shall I compare thee to a summer's day?", "To be, or not to be, that is the question:",
           "The quick brown fox jumps over the lazy dog.", "Please write a short poem about the sea.",
           "Question: what colour is the sky? Answer:", "Rough winds do shake the darling buds of May,",
           "What is the answer?", "Here is a poem about the sea and the sky."]
HELDOUT = ["Thou art more lovely and more temperate:", "Whether 'tis nobler in the mind to suffer",
           "Question: what is two plus two? Answer:", "The slings and arrows of outrageous fortune,"]
METHODS = {"ppo": PPOMethod, "rloo": RLOOMethod, "raft": RAFTMethod}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def letters(prompt: str, completion: str) -> float:
    return sum(c.isascii() and c.isalpha() for c in completion) / max(len(completion), 1)


def _keys(model: Path, out: Path, **keys):
    return {"model": str(model), "output_dir": str(out), "batch_size": 4, "max_new_tokens": 8, "max_length": 64,
            "learning_rate": 3e-2, "lr_scheduler": "constant", "log_every": 1, "report_to": "none",
            "dtype": "float32", "kl_coef": 0.0, "sample_every": 0, "seed": 0, **keys}


def _measure(model_dir: Path, reference_dir: Path) -> dict[str, float]:
    """Mean toy reward and KL of 8 samples on each held-out prompt (32 completions, fixed seeds)."""
    from preftune.models import load_policy, load_tokenizer
    from preftune.models.rewards import load_scorer
    from preftune.train.rollout import evaluate_policy

    tokenizer = load_tokenizer(str(reference_dir))
    policy, reference = load_policy(str(model_dir), tokenizer=tokenizer), load_policy(str(reference_dir))
    return evaluate_policy(policy, reference, tokenizer, HELDOUT, load_scorer(letters), num_samples=8,
                           max_new_tokens=8, seed=123)


@pytest.mark.parametrize(("method", "keys"), [
    ("ppo", {"num_samples": 2, "batch_size": 8, "update_epochs": 2, "max_steps": 12}),
    ("rloo", {"num_samples": 4, "max_steps": 12}),
    ("raft", {"num_samples": 4, "max_steps": 12}),
])
def test_each_method_raises_the_reward_on_held_out_prompts(method, keys, tiny_model_dir, tmp_path):
    """Before and after training, 32 fixed-seed completions on 4 held-out prompts: the mean reward must
    rise by more than 5 standard errors of the difference (random drift of the weights moves it either
    way by about one), and the trained policy has moved away from the reference (KL > 0)."""
    final = train(METHODS[method](prompts=PROMPTS, reward_fn=letters),
                  resolve_config(method, _keys(tiny_model_dir, tmp_path / method, **keys)))
    before, after = _measure(tiny_model_dir, tiny_model_dir), _measure(final, tiny_model_dir)
    margin = 5 * math.hypot(before["reward_se"], after["reward_se"])
    assert after["reward"] - before["reward"] > margin, (before, after)
    assert before["kl"] == 0.0 and after["kl"] > 0.1
    records = read_metrics(tmp_path / method / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, keys["max_steps"] + 1))
    for name in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores",
                 "completions/mean_length", "completions/eos_rate"):
        assert all(math.isfinite(r[name]) for r in records), name
    assert records[0]["objective/kl"] == 0.0  # the first rollout comes from pi_ref itself


def test_ppo_metrics_and_saved_policy(tiny_model_dir, tmp_path):
    """PPO logs the ecosystem's names, writes samples.jsonl every N steps, and saves only the policy
    (final/ loads with AutoModelForCausalLM; no value head in it)."""
    from transformers import AutoModelForCausalLM

    keys = _keys(tiny_model_dir, tmp_path / "ppo", num_samples=2, update_epochs=2, max_steps=4, sample_every=2,
                 sample_rows=3)
    final = train(PPOMethod(prompts=PROMPTS, reward_fn=letters), resolve_config("ppo", keys))
    records = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    for name in ("policy/clipfrac", "policy/approxkl", "val/ratio", "val/vpred", "val/clipfrac", "loss/policy",
                 "loss/value", "objective/kl_coef"):
        assert name in records[-1], name
    assert records[0]["val/ratio"] == pytest.approx(1.0, abs=1e-5)  # first pass: pi == pi_old
    assert records[0]["policy/clipfrac"] == 0.0
    samples = [json.loads(line) for line in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0] * 3 + [2] * 3  # rollouts start at steps 0 and 2
    assert {"prompt", "completion", "score", "kl", "rlhf_reward", "length", "eos"} <= set(samples[0])
    model = AutoModelForCausalLM.from_pretrained(final)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("score" in name for name, _ in model.named_parameters())


def _by_hand(method_cls, config):
    """setup + before_step(0) + collate outside the loop, on one accelerator; returns method, batch."""
    from accelerate import Accelerator

    from preftune.train.base import RunContext
    from preftune.train.loop import _release

    accelerator = Accelerator(cpu=True)
    method = method_cls(prompts=PROMPTS, reward_fn=letters)
    method.setup(RunContext(config=config, accelerator=accelerator, output_dir=Path(config.output_dir),
                            log=lambda message: None))
    batch = method.collate(method.before_step(method.model, 0))
    _release(accelerator)
    return method, batch


def _policy_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_ppo_first_pass_is_reinforce(float64_model_dir, tmp_path):
    """One pass, one mini-batch, no clipping (clip_range 1e9), a rollout just sampled by this very policy:
    ratio = pi / pi_old = 1, so the gradient of PPO's surrogate sum_t -A_t ratio_t / N equals that of
    REINFORCE, -sum_t A_t log pi(y_t) / N, with the same per-token advantages A_t (float64, 1e-10).
    The value loss touches only the value network, so the policy's gradient is unaffected by it."""
    from preftune.core.forward import forward_logits
    from preftune.train.rollout import policy_response_logps, response_logps

    config = resolve_config("ppo", _keys(float64_model_dir, tmp_path, num_samples=2, update_epochs=1,
                                         dtype="auto", clip_range=1e9, temperature=0.7, max_steps=1))
    method, batch = _by_hand(PPOMethod, config)
    model, mask, n = method.model, batch["response_mask"], float(method.units(batch))
    method.loss(model, batch, normaliser=n).loss.backward()
    ppo = _policy_grads(model.policy)
    _policy_grads(model.value)
    logps = response_logps(forward_logits(model.policy, batch), batch, temperature=0.7)
    torch.testing.assert_close(logps * mask, batch["old_logps"] * mask, rtol=0, atol=1e-12)  # ratio == 1
    logps = policy_response_logps(model.policy, batch, temperature=0.7)  # the loss's path (packed rows)
    (-(batch["advantages"] * logps * mask).sum() / n).backward()
    reinforce = _policy_grads(model.policy)
    assert ppo.keys() == reinforce.keys() and len(ppo) > 0
    assert max(float(g.abs().max()) for g in reinforce.values()) > 1e-4  # a real, non-zero gradient
    for name in ppo:
        torch.testing.assert_close(ppo[name], reinforce[name], rtol=1e-10, atol=1e-12, msg=name)


def test_rloo_gradient_is_reinforce_with_the_leave_one_out_baseline(float64_model_dir, tmp_path):
    """RLOO's loss with one pass has the gradient -sum_i A_i grad log pi(y_i|x) / B with
    A_i = R_i - mean_{j != i} R_j over each prompt's K = 4 samples and R_i = score - beta * KL_i."""
    from preftune.core.rl import leave_one_out_advantages
    from preftune.train.rollout import policy_response_logps

    config = resolve_config("rloo", _keys(float64_model_dir, tmp_path, num_samples=4, dtype="auto",
                                          kl_coef=0.1, max_steps=1))
    method, batch = _by_hand(RLOOMethod, config)
    items = method.buffer["items"]
    assert len(items) == 16 and batch["advantage"].shape == (16,)  # 4 prompts x K = 4, one mini-batch
    method.loss(method.model, batch, normaliser=16.0).loss.backward()
    rloo = _policy_grads(method.model)
    texts = method.tokenizer.batch_decode([i["response"] for i in items], skip_special_tokens=True)
    # the first rollout is sampled from pi_ref itself: KL 0, so R_i is the score
    expected = leave_one_out_advantages(torch.tensor([letters("", t) for t in texts], dtype=torch.float64), 4)
    torch.testing.assert_close(torch.stack([i["advantage"] for i in items]).double(), expected, rtol=0, atol=1e-6)
    logp = policy_response_logps(method.model, batch).sum(-1)  # the loss's path (packed rows by default)
    (-(batch["advantage"] * logp).sum() / 16).backward()
    reinforce = _policy_grads(method.model)
    assert len(rloo) > 0 and max(float(g.abs().max()) for g in reinforce.values()) > 1e-4
    for name in rloo:
        torch.testing.assert_close(rloo[name], reinforce[name], rtol=1e-10, atol=1e-12, msg=name)


def test_adaptive_kl_coefficient_follows_the_controller(tiny_model_dir, tmp_path):
    """kl_target 2, horizon 64, beta 0.5: after each rollout of n = 16 completions beta becomes
    beta * (1 + clip(KL/2 - 1, -0.2, 0.2) * 16/64), with KL the rollout's logged objective/kl. The
    first rollout is sampled from pi_ref (KL 0), so beta first falls by 5%; as training pulls the policy
    away, KL passes the target and beta rises again."""
    keys = _keys(tiny_model_dir, tmp_path, num_samples=4, kl_coef=0.5, kl_target=2.0, kl_horizon=64.0,
                 max_steps=8)
    train(RLOOMethod(prompts=PROMPTS, reward_fn=letters), resolve_config("rloo", keys))
    records = read_metrics(tmp_path / "metrics.jsonl")
    betas, kls = [r["objective/kl_coef"] for r in records], [r["objective/kl"] for r in records]
    assert betas[0] == 0.5 and betas[1] == pytest.approx(0.5 * 0.95)
    for k in range(len(records) - 1):
        error = min(max(kls[k] / 2.0 - 1.0, -0.2), 0.2)
        assert betas[k + 1] == pytest.approx(betas[k] * (1 + error * 16 / 64), rel=1e-9)
    assert max(kls) > 2.0 and betas[-1] > min(betas)




def test_resume_in_the_middle_of_a_rollout_is_exact(tiny_model_dir, tmp_path):
    """6 steps straight == Ctrl-C during step 3, checkpoint, then resume. A rollout serves 2 steps (2
    passes of 1 mini-batch), so step 3 is the first step of the second rollout and step 4 still trains
    on it. The checkpoint holds that rollout and beta, so the resumed run trains on the same rollout:
    identical metrics, samples.jsonl and final weights (a rollout regenerated after step 3's update
    would differ)."""
    from safetensors.torch import load_file

    keys = _keys(tiny_model_dir, tmp_path / "straight", num_samples=2, update_epochs=2, max_steps=6,
                 kl_coef=0.1, kl_target=1.0, kl_horizon=100.0, sample_every=2, save_every=100)
    train(PPOMethod(prompts=PROMPTS, reward_fn=letters), resolve_config("ppo", keys))
    resumed = {**keys, "output_dir": str(tmp_path / "resumed")}
    with pytest.raises(KeyboardInterrupt):
        train(interrupt_at(PPOMethod(prompts=PROMPTS, reward_fn=letters), 2), resolve_config("ppo", resumed))
    assert (tmp_path / "resumed" / "checkpoints" / "step-3" / "method_state_0.pt").is_file()
    train(PPOMethod(prompts=PROMPTS, reward_fn=letters), resolve_config("ppo", resumed))

    def curve(run):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_second",)}
                for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    assert [r["step"] for r in curve("resumed")] == [1, 2, 3, 4, 5, 6]
    assert curve("resumed") == curve("straight")
    assert (tmp_path / "resumed" / "samples.jsonl").read_text() == (tmp_path / "straight" / "samples.jsonl").read_text()
    a, b = load_file(tmp_path / "straight" / "final" / "model.safetensors"), load_file(
        tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ptx_mixes_in_the_sft_loss(tiny_model_dir, tmp_path):
    """PPO-ptx on RAFT: with ptx_coef > 0 the step loss is the RL loss plus ptx_coef x the SFT token
    mean, logged as loss/ptx (a language-model NLL of the random model: about log V = log 384 ~ 5.95)."""
    keys = _keys(tiny_model_dir, tmp_path, num_samples=2, max_steps=2, ptx_data=str(REPO / "examples/data/sft.jsonl"),
                 ptx_coef=0.5, learning_rate=1e-6)
    train(RAFTMethod(prompts=PROMPTS, reward_fn=letters), resolve_config("raft", keys))
    first = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert 4.0 < first["loss/ptx"] < 8.0


@pytest.mark.parametrize(("command", "keys", "field", "message"), [
    ("ppo", {"kl_coeff": 0.1}, "kl_coeff", "did you mean kl_coef"),
    ("ppo", {"target_kl": 6.0}, "target_kl", "did you mean kl_target"),
    ("rloo", {"num_samples": 1}, "num_samples", "must be >= 2 for the leave-one-out baseline"),
    ("ppo", {"temperature": 0.0}, "temperature", "must be > 0"),
    ("ppo", {"eval_fraction": 0.1}, "eval_fraction", "not used by online methods"),
    ("rloo", {"group_by_length": True}, "group_by_length", "is for offline methods"),
    ("ppo", {"kl_estimator": "k2"}, "kl_estimator", "is not one of k1, k3"),
    ("ppo", {"max_new_tokens": 64, "max_length": 64}, "max_new_tokens", "must be >= 1 and < max_length"),
    ("raft", {"keep": "top_fraction", "top_fraction": 0.01}, "top_fraction", "fewer than one per micro-batch"),
    ("ppo", {"ptx_coef": 0.5}, "ptx_coef", "needs ptx_data"),
])
def test_config_errors_name_the_key(command, keys, field, message):
    with pytest.raises(PreftuneError, match=message) as info:
        resolve_config(command, {"model": "m", **keys})
    assert info.value.field == field


def test_missing_reward_or_bad_function_is_a_clear_error(tiny_model_dir, tmp_path):
    keys = _keys(tiny_model_dir, tmp_path, num_samples=2, max_steps=1)
    with pytest.raises(PreftuneError, match="is required") as info:
        train(RLOOMethod(prompts=PROMPTS), resolve_config("rloo", keys))
    assert info.value.field == "reward"
    with pytest.raises(PreftuneError, match="has no function 'nope'") as info:
        train(RLOOMethod(prompts=PROMPTS), resolve_config("rloo", {**keys, "reward": "examples/rewards.py:nope"}))
    assert info.value.field == "reward"
    with pytest.raises(PreftuneError, match="prompts file") as info:
        train(RLOOMethod(reward_fn=letters), resolve_config("rloo", keys))
    assert info.value.field == "data"


def test_cli_train_rloo_and_keys(tiny_model_dir, tmp_path, monkeypatch):
    """`preftune train rloo CONFIG.yaml --key value` with a prompts file and a file.py:function reward."""
    from typer.testing import CliRunner

    from preftune.cli import app

    monkeypatch.chdir(REPO)
    config = tmp_path / "rloo.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: examples/data/prompts.txt\nreward: examples/rewards.py:letters\n"
                      f"output_dir: {tmp_path / 'run'}\nnum_samples: 2\nbatch_size: 4\nmax_new_tokens: 4\n"
                      "max_length: 64\nreport_to: none\n")
    result = CliRunner().invoke(app, ["train", "rloo", str(config), "--max_steps", "2", "--baseline", "mean"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert "baseline: mean" in (tmp_path / "run" / "config.yaml").read_text()
    result = CliRunner().invoke(app, ["train", "rloo", str(config), "--kl_coeff", "0.1"])
    assert result.exit_code == 1 and "did you mean --kl_coef" in result.output
    result = CliRunner().invoke(app, ["train", "keys", "ppo"])
    assert result.exit_code == 0 and "kl_estimator" in result.output and "value_clip_range" in result.output


@pytest.mark.parametrize("method", ["ppo", "rloo", "raft"])
def test_reward_without_a_score_head_is_refused_before_anything_loads(method, tiny_model_dir, tmp_path):
    """Issue 11: `reward: DIR` naming a causal LM would score with a random head. The online configs'
    preflight reads the directory's config.json and refuses it, naming the key, before the policy loads."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "To be"}\n', encoding="utf-8")
    config = resolve_config(method, _keys(tiny_model_dir, tmp_path / method, data=str(prompts),
                                          reward=str(tiny_model_dir)))
    with pytest.raises(PreftuneError, match="without a trained reward head") as info:
        config.preflight()
    assert info.value.field == "reward"
