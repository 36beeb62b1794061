"""The DPO reference model: an explicit `ref_model`, and no reference at all for reference-free losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preftune.config import from_mapping
from preftune.core.forward import batch_logps
from preftune.core.losses import dpo_loss
from preftune.data.collate import collate_pairs
from preftune.data.formats import PreferencePair
from preftune.data.tokenize import tokenize_preferences
from preftune.train.dpo import DPOConfig, DPOMethod
from preftune.train.loop import read_metrics, train

PAIRS = [PreferencePair("Shall I compare thee ", "to a summer's day", "no"),
         PreferencePair("To be, or not to be ", "that is the question", "maybe"),
         PreferencePair("The quick brown fox ", "jumps over the lazy dog", "sleeps"),
         PreferencePair("What is the answer? ", "forty-two", "the sea is blue")]


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in PAIRS))
    return path


def _config(tmp_path: Path, model: Path, **keys) -> DPOConfig:
    base = {"model": str(model), "data": str(_data(tmp_path)), "output_dir": str(tmp_path / "run"),
            "batch_size": 4, "max_steps": 1, "learning_rate": 1e-3, "lr_scheduler": "constant", "log_every": 1,
            "report_to": "none", "dtype": "float32", "ref_cache_dir": str(tmp_path / "cache"), "seed": 0,
            "beta": 0.5}
    return from_mapping(DPOConfig, {**base, **keys})


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with other random weights (seed 1): a reference that differs from the policy."""
    from preftune.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-seed1") / "tiny", seed=1)


@pytest.mark.parametrize("precompute", [True, False])
def test_explicit_ref_model_is_the_reference(tiny_model_dir, other_model_dir, tmp_path, precompute):
    """With ref_model = another model, step 1 (before any update) logs the DPO loss of the policy against
    THAT model: mean_i -log sigma(beta * h_i), h_i from the summed log-probs of both models, computed
    here directly. Against its own copy the loss would be log 2 (h = 0); here it is not."""
    from preftune.models import load_policy, load_tokenizer

    train(DPOMethod(), _config(tmp_path, tiny_model_dir, ref_model=str(other_model_dir),
                               precompute_ref_logps=precompute))
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]

    tok = load_tokenizer(str(tiny_model_dir))
    items, _ = tokenize_preferences(tok, PAIRS, max_length=1024)
    batch = collate_pairs(items, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        policy, _ = batch_logps(load_policy(str(tiny_model_dir), dtype="float32").eval(), batch)
        ref, _ = batch_logps(load_policy(str(other_model_dir), dtype="float32").eval(), batch)
    n = len(PAIRS)
    want = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=0.5)
    assert abs(want.losses.mean().item() - 0.6931471805599453) > 1e-3   # the reference matters here
    assert first["loss"] == pytest.approx(want.losses.mean().item(), abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(want.chosen_rewards.mean().item(), abs=1e-5)
    assert first["rewards/rejected"] == pytest.approx(want.rejected_rewards.mean().item(), abs=1e-5)


def test_reference_free_loss_loads_and_caches_no_reference(tiny_model_dir, other_model_dir, tmp_path):
    """simpo needs no pi_ref: no reference model is built (even when ref_model is given), nothing is
    written to the reference cache, and step 1's loss is SimPO's on the policy alone."""
    method = DPOMethod()
    train(method, _config(tmp_path, tiny_model_dir, loss="simpo", ref_model=str(other_model_dir)))
    assert method.ref_model is None and method.ref_hits == {}
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["loss"] > 0 and first["rewards/chosen"] < 0    # beta * mean token log-prob is negative
