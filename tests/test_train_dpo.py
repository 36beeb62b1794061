"""DPO family on the tiny in-process Llama: every loss learns a toy preference, log 2 at step 0, one
forward for chosen + rejected, cached reference log-probs equal the online ones, LoRA reference."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from preftune.config import from_mapping, load_config, to_dict, write_config
from preftune.core.forward import batch_logps
from preftune.data.collate import collate_pairs
from preftune.data.formats import PreferencePair
from preftune.data.tokenize import tokenize_preferences
from preftune.train.base import RunContext
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


@pytest.mark.parametrize("fused_lm_head", [False, True])
def test_lora_reference_is_the_adapter_disabled_model(tiny_model_dir, toy_pairs, tmp_path, fused_lm_head):
    """With LoRA (B initialised to 0) the adapted model equals its base at step 0, so the DPO loss is
    log 2 with the reference = the same model, adapter off; the run saves an adapter directory. LoRA on
    q_proj / v_proj leaves lm_head a plain frozen nn.Linear, so fused_lm_head applies."""
    data = _write(tmp_path / "prefs.jsonl", toy_pairs)
    method = DPOMethod()
    final = train(method, _config(tmp_path, tiny_model_dir, data, max_steps=2, precompute_ref_logps=False,
                                  lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                                  fused_lm_head=fused_lm_head))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert method.ref_model is None and method.fused_lm_head is fused_lm_head
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[1]["rewards/margins"] != 0.0
    assert (final / "adapter_config.json").is_file()


def _step(method: DPOMethod, batch: dict) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    """One DPO loss + backward: (loss, metric sums, every trainable parameter's gradient)."""
    method.model.zero_grad()
    out = method.loss(method.model, batch, normaliser=method.units(batch))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in method.model.named_parameters() if p.requires_grad}
    return out.loss.item(), {k: v.item() for k, v in out.metric_sums.items()}, grads


def test_fused_lm_head_gives_the_same_step(tiny_model_dir, toy_pairs, tmp_path):
    """fused_lm_head: true gives the same DPO step as the full logits: loss, every metric and every
    parameter's gradient, to float32 rounding. The reference runs online (a frozen copy, fused too); the
    policy is moved off it first so that the rewards are not 0."""
    data = _write(tmp_path / "prefs.jsonl", toy_pairs)
    messages: list[str] = []
    method = DPOMethod()
    method.setup(RunContext(config=_config(tmp_path, tiny_model_dir, data, precompute_ref_logps=False,
                                           fused_lm_head=True),
                            accelerator=SimpleNamespace(device=torch.device("cpu")), output_dir=tmp_path,
                            log=messages.append))
    assert method.fused_lm_head is True and method.ref_model is not None
    assert not any("cannot be fused" in m for m in messages)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = method.collate(method.train_items)
    fused = _step(method, batch)
    method.fused_lm_head = False
    full = _step(method, batch)
    assert fused[0] == pytest.approx(full[0], rel=1e-6)
    assert fused[1].keys() == full[1].keys()
    assert full[1]["rewards/chosen"] != 0 and full[1]["rewards/margins"] != 0
    for key, value in full[1].items():
        assert fused[1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert fused[2].keys() == full[2].keys() and "lm_head.weight" in full[2]
    for name, grad in full[2].items():
        torch.testing.assert_close(fused[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lm_head_has_its_own_reference_cache(tiny_model_dir, toy_pairs, tmp_path):
    """The fused log-probs round differently, so they are cached under another key: a fused run next to
    an unfused one computes its own reference (then reads it back on the next fused run), and its step 0
    is log 2 exactly as policy and reference go the same way. Its metrics equal the unfused run's."""
    data = _write(tmp_path / "prefs.jsonl", toy_pairs)
    train(DPOMethod(), _config(tmp_path, tiny_model_dir, data, max_steps=1, output_dir=str(tmp_path / "a")))
    fused = DPOMethod()
    train(fused, _config(tmp_path, tiny_model_dir, data, max_steps=1, output_dir=str(tmp_path / "b"),
                         fused_lm_head=True))
    assert fused.ref_hits == {"train": False}
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    again = DPOMethod()
    train(again, _config(tmp_path, tiny_model_dir, data, max_steps=1, output_dir=str(tmp_path / "c"),
                         fused_lm_head=True))
    assert again.ref_hits == {"train": True}
    full, first = (read_metrics(tmp_path / run / "metrics.jsonl")[0] for run in ("a", "b"))
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key


def test_fused_lm_head_key_round_trips(tmp_path):
    """Off by default; on from the command line; written back by write_config and read again."""
    assert DPOConfig.fused_lm_head is False
    config = load_config(DPOConfig, None, ["--model", "m", "--data", "d", "--fused-lm-head"])
    assert config.fused_lm_head is True
    again = load_config(DPOConfig, write_config(config, tmp_path / "config.yaml"))
    assert again.fused_lm_head is True and to_dict(again) == to_dict(config)
