"""DPO family on the tiny in-process Llama: every loss learns a toy preference, log 2 at step 0, one
forward for chosen + rejected, cached reference log-probs equal the online ones, LoRA reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from preftune.config import from_mapping
from preftune.core.logprobs import batch_logps
from preftune.data.collate import collate_pairs
from preftune.data.formats import PreferencePair
from preftune.data.tokenize import tokenize_preferences
from preftune.train.dpo import DPOConfig, DPOMethod
from preftune.train.loop import read_metrics, train

PROMPTS = ["Shall I compare thee ", "To be, or not to be ", "The quick brown fox ", "What is the answer? "]
A, B = "yes yes the answer is yes", "no the sea is blue"


@pytest.fixture(scope="module")
def toy_pairs(tiny_model_dir: Path) -> list[PreferencePair]:
    """Pairs whose chosen response is, for each prompt, the one the initial model finds LESS likely per
    token, so every loss starts with rewards/accuracies 0 (reference-based: rewards are exactly 0 when
    policy == reference; reference-free: built to be wrong) and has to learn the preference."""
    from preftune.models import load_policy, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_policy(str(tiny_model_dir), dtype="float32")
    pairs = []
    for prompt in PROMPTS:
        items, _ = tokenize_preferences(tok, [PreferencePair(prompt, A, B)], max_length=64)
        with torch.no_grad():
            logps, counts = batch_logps(model, collate_pairs(items, pad_token_id=tok.pad_token_id))
        mean_a, mean_b = (logps / counts).tolist()
        pairs.append(PreferencePair(prompt, A, B) if mean_a < mean_b else PreferencePair(prompt, B, A))
    return pairs


def _write(path: Path, pairs: list[PreferencePair]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    return path


def _config(tmp_path: Path, model: Path, data: Path, **keys) -> DPOConfig:
    base = {"model": str(model), "data": str(data), "output_dir": str(tmp_path / "run"), "batch_size": 4,
            "max_steps": 8, "learning_rate": 1e-3, "lr_scheduler": "constant", "log_every": 1,
            "report_to": "none", "dtype": "float32", "ref_cache_dir": str(tmp_path / "cache"), "seed": 0}
    return from_mapping(DPOConfig, {**base, **keys})


@pytest.mark.parametrize("loss", ["dpo", "ipo", "cdpo", "hinge", "robust", "orpo", "simpo", "unlikelihood"])
def test_each_loss_lowers_its_loss_and_raises_accuracy(loss, tiny_model_dir, toy_pairs, tmp_path):
    """8 full-batch AdamW steps (lr 1e-3) on 4 pairs. Step 1's metrics are measured before any update,
    step 8's after 7: the loss must fall and rewards/accuracies rise from 0 to 1 (every pair right)."""
    data = _write(tmp_path / "prefs.jsonl", toy_pairs)
    train(DPOMethod(), _config(tmp_path, tiny_model_dir, data, loss=loss))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = records[0], records[-1]
    assert first["rewards/accuracies"] == 0.0
    assert last["rewards/accuracies"] == 1.0
    assert last["loss"] < first["loss"]
    assert last["rewards/margins"] > first["rewards/margins"]


def test_dpo_loss_is_log2_at_step0_and_cache_is_reused_and_invalidated(tiny_model_dir, toy_pairs, tmp_path):
    """Policy == reference at step 0, so h = 0 and -log sigma(0) = log 2 = 0.693147...; the implicit
    rewards beta*(logp - logp_ref) are 0. A second run with the same data reads the reference cache
    (same values); changing one rejected text changes the key, so the reference is recomputed."""
    data = _write(tmp_path / "prefs.jsonl", toy_pairs)
    config = _config(tmp_path, tiny_model_dir, data, max_steps=1)
    first = DPOMethod()
    train(first, config)
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert record["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first.ref_hits == {"train": False}
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    again = DPOMethod()
    train(again, _config(tmp_path, tiny_model_dir, data, max_steps=1, output_dir=str(tmp_path / "run2")))
    assert again.ref_hits == {"train": True}
    cached = [(i.ref_chosen_logps, i.ref_rejected_logps) for i in again.train_items]
    assert cached == [(i.ref_chosen_logps, i.ref_rejected_logps) for i in first.train_items]

    changed = [*toy_pairs[:-1], PreferencePair(toy_pairs[-1].prompt, toy_pairs[-1].chosen, "no no no")]
    data2 = _write(tmp_path / "prefs2.jsonl", changed)
    third = DPOMethod()
    train(third, _config(tmp_path, tiny_model_dir, data2, max_steps=1, output_dir=str(tmp_path / "run3")))
    assert third.ref_hits == {"train": False}
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_cached_reference_gives_the_same_training_as_online_reference(tiny_model_dir, toy_pairs, tmp_path):
    """precompute_ref_logps true (cached log-probs) and false (a reference forward every step) must give
    the same loss curve: the reference terms are the same numbers either way."""
    data = _write(tmp_path / "prefs.jsonl", toy_pairs)
    train(DPOMethod(), _config(tmp_path, tiny_model_dir, data, max_steps=3, output_dir=str(tmp_path / "a")))
    train(DPOMethod(), _config(tmp_path, tiny_model_dir, data, max_steps=3, output_dir=str(tmp_path / "b"),
                               precompute_ref_logps=False))
    cached = read_metrics(tmp_path / "a" / "metrics.jsonl")
    online = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in cached] == [1, 2, 3]
    for c, o in zip(cached, online, strict=True):
        assert c["loss"] == pytest.approx(o["loss"], abs=1e-5)
        assert c["rewards/margins"] == pytest.approx(o["rewards/margins"], abs=1e-5)


def test_concatenated_forward_equals_separate_forwards(tiny_model_dir, toy_pairs):
    """One [2B, T] forward (chosen rows, then rejected rows, padded to the longest of all) gives the
    same summed log-probs and token counts as separate forwards of the chosen and rejected batches."""
    from preftune.data.collate import pad_sequences
    from preftune.models import load_policy, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_policy(str(tiny_model_dir), dtype="float32").eval()
    items, _ = tokenize_preferences(tok, toy_pairs, max_length=64)
    with torch.no_grad():
        joint, joint_counts = batch_logps(model, collate_pairs(items, pad_token_id=tok.pad_token_id))
        parts = []
        for side in ("chosen", "rejected"):
            ids, mask = pad_sequences([getattr(i, f"{side}_input_ids") for i in items], pad_value=tok.pad_token_id)
            labels, _ = pad_sequences([getattr(i, f"{side}_labels") for i in items], pad_value=-100)
            parts.append(batch_logps(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}))
    torch.testing.assert_close(joint, torch.cat([parts[0][0], parts[1][0]]), atol=1e-5, rtol=0)
    assert joint_counts.tolist() == torch.cat([parts[0][1], parts[1][1]]).tolist()
    # the count of row 0 is the chosen response's tokens + its EOS
    assert joint_counts[0] == len(tok(toy_pairs[0].chosen, add_special_tokens=False)["input_ids"]) + 1


def test_lora_reference_is_the_adapter_disabled_model(tiny_model_dir, toy_pairs, tmp_path):
    """With LoRA (B initialised to 0) the adapted model equals its base at step 0, so the DPO loss is
    log 2 with the reference = the same model, adapter off; the run saves an adapter directory."""
    data = _write(tmp_path / "prefs.jsonl", toy_pairs)
    method = DPOMethod()
    final = train(method, _config(tmp_path, tiny_model_dir, data, max_steps=2, precompute_ref_logps=False,
                                  lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert method.ref_model is None
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[1]["rewards/margins"] != 0.0
    assert (final / "adapter_config.json").is_file()
