"""Padding-free packing and prompt sharing (preftune.core.packing): the plan's layout, and the same
log-probs, scores, gradients and training runs as padded rows, on several architectures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from preftune.config import from_mapping
from preftune.core.forward import model_label_logps
from preftune.core.packing import packing_applies, packing_mask, packing_unsupported, plan_packing, unpacked
from preftune.data.collate import pad_sequences
from preftune.train.loop import read_metrics, train

pytestmark = pytest.mark.usefixtures("one_thread")

V = 96


def _model(arch: str, *, dtype: torch.dtype = torch.float32, attn: str = "sdpa", head: bool = False):
    """A tiny randomly initialised model of ``arch`` (seeded), as a causal LM or, ``head``, a scalar
    sequence classifier."""
    import transformers as tf

    common = {"vocab_size": V, "pad_token_id": 0}
    configs = {
        "llama": lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **common),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                        **common),
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common),
        "gemma2": lambda: tf.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          sliding_window=256, final_logit_softcapping=30.0, **common),
    }
    config = configs[arch]()
    attn = "eager" if arch == "gemma2" else attn  # transformers runs Gemma-2 with eager attention only
    if head:
        config.num_labels = 1
    cls = tf.AutoModelForSequenceClassification if head else tf.AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls.from_config(config, attn_implementation=attn)
    return model.to(dtype).eval()  # no dropout (GPT-2 has 0.1): the two paths must see the same network


def _pairs(n: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """2n rows: n prompt + chosen, then the n prompt + rejected; labels -100 on the prompt. Prompts,
    chosen and rejected of different lengths; one chosen starts like its rejected (a longer common
    prefix than the prompt)."""
    g = torch.Generator().manual_seed(seed)

    def tokens(lo: int, hi: int) -> list[int]:
        return torch.randint(3, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    ids, labels = [[] for _ in range(2 * n)], [[] for _ in range(2 * n)]
    for b in range(n):
        prompt, chosen, rejected = tokens(3, 12), tokens(1, 6), tokens(2, 15)
        if b == 1:
            rejected = chosen[:1] + rejected
        for row, answer in ((b, chosen), (n + b, rejected)):
            ids[row], labels[row] = prompt + answer, [-100] * len(prompt) + answer
    return ids, labels


def _batch(ids, labels, side: str = "right") -> dict[str, torch.Tensor]:
    input_ids, mask = pad_sequences(ids, pad_value=0, padding_side=side)
    padded_labels, _ = pad_sequences(labels, pad_value=-100, padding_side=side)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": padded_labels}


def test_plan_of_two_pairs_shares_each_prompt_and_restarts_positions():
    ids = [[5, 6, 7, 8], [5, 6, 9], [10, 11, 12], [10, 13, 14, 15, 16]]  # rows 0/1 and 2/3 share 2 and 1 tokens
    labels = [[-100, -100, 7, 8], [-100, -100, 9], [-100, 11, 12], [-100, 13, 14, 15, 16]]
    batch = _batch(ids, labels)
    plan = plan_packing(batch["input_ids"], batch["attention_mask"], batch["labels"], groups=[(0, 1), (2, 3)])
    flat = batch["input_ids"].reshape(-1)
    tokens = [[int(flat[i]) if i >= 0 else None for i in row] for row in plan["pack_index"].tolist()]
    # unit of 2/3 (1 + 2 + 4 = 7 slots) is the longest: its own row first; 0/1 (2 + 2 + 1 = 5) then
    assert tokens == [[10, 11, 12, 13, 14, 15, 16], [5, 6, 7, 8, 9, None, None]]
    assert plan["pack_position_ids"].tolist() == [[0, 1, 2, 1, 2, 3, 4], [0, 1, 2, 3, 2, 0, 0]]
    segment, parent = plan["pack_segment"].tolist(), plan["pack_parent"].tolist()
    assert segment == [[0, 1, 1, 2, 2, 2, 2], [3, 3, 4, 4, 5, -1, -1]]
    assert parent == [[-1, 0, 0, 0, 0, 0, 0], [-1, -1, 3, 3, 3, -1, -1]]
    # a query per scored token (2 + 1 + 2 + 4 = 9); the shared prompt's last slot predicts both answers
    assert len(plan["pack_query_slot"]) == 9
    slot_to_targets: dict[int, list[int]] = {}
    for slot, target in zip(plan["pack_query_slot"].tolist(), plan["pack_query_target"].tolist(), strict=True):
        slot_to_targets.setdefault(slot, []).append(target)
    assert sorted(slot_to_targets[7 + 1]) == [7, 9]  # row 1, slot 1 holds token 6: predicts 7 (row 0) and 9 (row 1)
    assert slot_to_targets[0] == [11, 13]  # token 10 predicts 11 (row 2) and 13 (row 3)
    mask = packing_mask(plan["pack_segment"], plan["pack_parent"])[:, 0]
    # row 0: slot 3 (token 13, the rejected answer) sees the prompt (slot 0) and itself, never the chosen (1, 2)
    assert mask[0, 3].tolist() == [True, False, False, True, False, False, False]
    assert mask[1, 6].tolist() == [False] * 6 + [True]  # a tail slot sees itself only


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2"])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_logps_and_gradients_equal_padded(arch, share, side):
    """float32: the packed forward gives the padded forward's per-token log-probs (in the padded layout)
    and the same gradient of a weighted sum of them, to float32 rounding."""
    model = _model(arch)
    ids, labels = _pairs(4)
    batch = _batch(ids, labels, side)
    groups = [(b, 4 + b) for b in range(4)] if share else ()
    packed = {**batch, **plan_packing(batch["input_ids"], batch["attention_mask"], batch["labels"], groups=groups)}
    assert packed["pack_index"].numel() <= batch["input_ids"].numel()  # never more positions than padded
    weights = torch.randn(batch["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    results = []
    for b in (batch, packed):
        model.zero_grad(set_to_none=True)
        logps, hits = model_label_logps(model, b, hits=True)
        (logps * weights).sum().backward()
        results.append((logps.detach(), hits, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded_logps, padded_hits, padded_grads), (packed_logps, packed_hits, packed_grads) = results
    assert (padded_logps != 0).sum() == sum(sum(1 for t in row[1:] if t != -100) for row in labels)
    torch.testing.assert_close(packed_logps, padded_logps, rtol=1e-5, atol=2e-5)
    assert torch.equal(packed_hits, padded_hits)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=2e-5, msg=name)


def test_fused_lm_head_on_packed_rows_equals_padded():
    model = _model("llama")
    ids, labels = _pairs(3, seed=2)
    batch = _batch(ids, labels)
    packed = {**batch, **plan_packing(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      groups=[(b, 3 + b) for b in range(3)])}
    padded, _ = model_label_logps(model, batch)
    fused, _ = model_label_logps(model, packed, fused=True)
    torch.testing.assert_close(fused, padded, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_reward_scores_of_rankings_equal_padded(arch):
    """A reward model's score at each response's last token; a ranking's 3 responses share the prompt."""
    from preftune.core.forward import packed_scores
    from preftune.models.load import score_head, sequence_scores

    model = _model(arch, head=True)
    ids, _ = _pairs(3, seed=3)
    ids = ids + [ids[0][:-1] + [7, 8, 9]]  # a third response to prompt 0
    batch = _batch(ids, [[0] * len(r) for r in ids])
    plan = plan_packing(batch["input_ids"], batch["attention_mask"], groups=[(0, 3, 6), (1, 4), (2, 5)],
                        last_token_queries=True)
    expected = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    got = packed_scores(model, {**batch, **plan}, score_head(model))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packing_is_refused_for_models_it_cannot_reproduce():
    model = _model("llama")
    assert packing_unsupported(model) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in packing_unsupported(model)
    mistral = _model("gemma2")
    mistral.config.sliding_window = 16
    assert "sliding-window" in packing_unsupported(mistral, longest_row=64)
    assert packing_unsupported(mistral, longest_row=16) is None

    class Config:
        packing, max_length = True, 32

    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    said: list[str] = []
    assert packing_applies(Config(), adapted, said.append) == ""
    assert "packing: off" in said[0] and "lm_head" in said[0]
    assert packing_applies(Config(), _model("llama"), said.append, share_prompt=True) == "shared"


# ------------------------------------------------------------------------------------------------ training runs


def _write_pairs(path: Path, n: int = 8) -> Path:
    lines = []
    for i in range(n):
        prompt = "To be or not to be, " * (1 + i % 3) + f"line {i}: "
        lines.append(json.dumps({"prompt": prompt, "chosen": "yes" * (1 + i % 2),
                                 "rejected": "no, the sea is blue and " * (1 + i % 4)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _dpo(tmp_path: Path, model: Path, data: Path, name: str, **keys):
    from preftune.train.dpo import DPOConfig, DPOMethod

    base = {"model": str(model), "data": str(data), "output_dir": str(tmp_path / name), "batch_size": 4,
            "max_steps": 3, "learning_rate": 1e-3, "lr_scheduler": "constant", "log_every": 1,
            "report_to": "none", "dtype": "float32", "ref_cache_dir": str(tmp_path / f"cache-{name}"), "seed": 0,
            "max_length": 40, "max_prompt_length": 24}
    train(DPOMethod(), from_mapping(DPOConfig, {**base, **keys}))
    return read_metrics(tmp_path / name / "metrics.jsonl")


@pytest.mark.parametrize("precompute", [True, False])
def test_dpo_runs_packed_shared_and_padded_agree(precompute, tiny_model_dir, tmp_path):
    """3 DPO steps (prompts truncated from the left at max_prompt_length 24, responses at max_length 40):
    padded rows, packed rows and packed rows with shared prompts give the same losses and metrics to
    float32 rounding, with the reference cached or run every step; step 1 is log 2 (policy == reference)."""
    data = _write_pairs(tmp_path / "pairs.jsonl")
    runs = {name: _dpo(tmp_path, tiny_model_dir, data, name, packing=packing, share_prompt=share,
                       precompute_ref_logps=precompute)
            for name, packing, share in (("padded", False, False), ("rows", True, False), ("shared", True, True))}
    assert runs["shared"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rows", "shared"):
        for got, expected in zip(runs[name], runs["padded"], strict=True):
            for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
                assert got[key] == pytest.approx(expected[key], rel=2e-4, abs=2e-5), (name, key)


def test_sft_packed_equals_padded(tiny_model_dir, tmp_path):
    from preftune.train.sft import SFTConfig, SFTMethod

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}? " * (1 + i % 3), "completion": " answer" * (1 + i)})
                            + "\n" for i in range(8)))
    runs = {}
    for packing in (False, True):
        out = tmp_path / f"sft-{packing}"
        train(SFTMethod(), from_mapping(SFTConfig, {
            "model": str(tiny_model_dir), "data": str(data), "output_dir": str(out), "batch_size": 4, "max_steps": 2,
            "learning_rate": 1e-3, "log_every": 1, "report_to": "none", "dtype": "float32", "packing": packing}))
        runs[packing] = read_metrics(out / "metrics.jsonl")
    for got, expected in zip(runs[True], runs[False], strict=True):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert got["mean_token_accuracy"] == expected["mean_token_accuracy"]
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)


def test_packing_off_leaves_the_batch_padded(tiny_model_dir):
    """``unpacked`` drops exactly the plan, so the padded path is what it always was."""
    ids, labels = _pairs(2)
    batch = _batch(ids, labels)
    packed = {**batch, **plan_packing(batch["input_ids"], batch["attention_mask"], batch["labels"])}
    assert unpacked(packed).keys() == batch.keys()


@pytest.mark.parametrize("method", ["rloo", "ppo"])
def test_online_runs_packed_shared_and_padded_agree(method, tiny_model_dir, tmp_path):
    """Two steps of RLOO (K = 4 completions per prompt, shared on packed rows) and PPO (with a value network
    read on the packed rows): rollout log-probs, values and the training pass on packed rows give the
    padded run's metrics to float32 rounding (the sampled completions are the same: sampling is padded)."""
    from preftune.train import resolve_config
    from preftune.train.ppo import PPOMethod
    from preftune.train.rloo import RLOOMethod

    cls = {"rloo": RLOOMethod, "ppo": PPOMethod}[method]
    prompts = ["Shall I compare thee", "To be or not", "The quick brown fox", "Now is the winter"]

    def reward(prompt: str, completion: str) -> float:
        return float(sum(c in "aeiou" for c in completion))

    runs = {}
    for name, packing, share in (("padded", False, False), ("shared", True, True)):
        out = tmp_path / name
        keys = {"model": str(tiny_model_dir), "output_dir": str(out), "batch_size": 4, "max_new_tokens": 8,
                "max_length": 64, "learning_rate": 3e-3, "lr_scheduler": "constant", "log_every": 1,
                "report_to": "none", "dtype": "float32", "kl_coef": 0.05, "sample_every": 0, "seed": 0,
                "max_steps": 2, "num_samples": 4 if method == "rloo" else 2, "packing": packing,
                "share_prompt": share}
        train(cls(prompts=prompts, reward_fn=reward), resolve_config(method, keys))
        runs[name] = read_metrics(out / "metrics.jsonl")
    for got, expected in zip(runs["shared"], runs["padded"], strict=True):
        for key in ("loss", "grad_norm", "objective/kl", "objective/scores"):
            if key in expected:
                assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
