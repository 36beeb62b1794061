"""Reward models: hand-computed losses and metrics, a separable toy set learned to high accuracy, rankings
in one forward pass, and a saved model that reloads as a sequence classifier with the same scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from preftune.config import from_mapping
from preftune.data.collate import collate_responses
from preftune.data.tokenize import TokenizedPair, TokenizedRanking
from preftune.train.loop import read_metrics, train
from preftune.train.reward import RewardConfig, RewardMethod, item_rewards, reward_losses, reward_metrics

TRAIN_PROMPTS = ["Shall I compare thee", "To be, or not to be", "The quick brown fox", "What is the answer?",
                 "Please write a poem", "The slings and arrows", "Rough winds do shake", "Question: what colour"]
EVAL_PROMPTS = ["Whether 'tis nobler", "A sea of troubles", "The lazy dog", "Here is a poem"]


def _batch():
    """A pair (rows 0, 1) with margin 0.5 and a 3-way ranking (rows 2, 3, 4)."""
    items = [TokenizedPair([1], [1], [2], [2], margin=0.5),
             TokenizedRanking([[3], [4], [5]], [[3], [4], [5]], scores=[3.0, 2.0, 1.0])]
    return collate_responses(items, pad_token_id=0)


def test_losses_by_hand():
    """Scores per row [1.0, 0.0 | 2.0, 1.0, 0.0].
    pair, no margin:   -log sigma(1 - 0) = log(1 + e^-1) = 0.313262
    pair, margin 0.5:  -log sigma(0.5) = log(1 + e^-0.5) = 0.474077
    ranking (K=3):     mean of -log sigma over diffs 1, 2, 1 = (2*0.313262 + 0.126928) / 3 = 0.251151
    centring c = 0.1: pair + 0.1*(1+0)^2 = 0.413262; ranking + 0.1*((2+1)^2 + (2+0)^2 + (1+0)^2)/3 = +0.466667
    """
    batch = _batch()
    rewards = item_rewards(torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0]), batch)
    assert rewards.tolist() == [[1.0, 0.0, 0.0], [2.0, 1.0, 0.0]]
    plain = reward_losses(rewards, batch, use_margin=False)
    assert plain.tolist() == pytest.approx([0.313262, 0.251151], abs=1e-6)
    assert reward_losses(rewards, batch, use_margin=True)[0].item() == pytest.approx(0.474077, abs=1e-6)
    centred = reward_losses(rewards, batch, use_margin=False, center_coefficient=0.1)
    assert centred.tolist() == pytest.approx([0.413262, 0.251151 + 0.466667], abs=1e-6)


def test_metrics_by_hand():
    """Scores [1.0, 0.0 | 0.0, 1.0, -1.0]: the pair is right (accuracy 1, margin 1); the ranking has
    pairs (0,1): 0-1 = -1 wrong, (0,2): 1 right, (1,2): 2 right -> accuracy 2/3, margin 2/3.
    Sums over the two items: accuracy 5/3, margin 5/3, chosen 1+0 = 1, rejected (worst) 0-1 = -1,
    mean 0.5 + 0 = 0.5."""
    batch = _batch()
    rewards = item_rewards(torch.tensor([1.0, 0.0, 0.0, 1.0, -1.0]), batch)
    m = {k: v.item() for k, v in reward_metrics(rewards, batch["response_mask"]).items()}
    assert m["accuracy"] == pytest.approx(5 / 3) and m["margin"] == pytest.approx(5 / 3)
    assert (m["rewards/chosen"], m["rewards/rejected"], m["rewards/mean"]) == pytest.approx((1.0, -1.0, 0.5))


def _write(path: Path, prompts, *, ranking: bool = False) -> Path:
    rows = []
    for p in prompts:
        if ranking:
            rows.append({"prompt": p + " ", "responses": ["yes the answer is yes", "the sky", "no no no"],
                         "ranking": [0, 1, 2]})
        else:
            rows.append({"prompt": p + " ", "chosen": "yes the answer is yes", "rejected": "no the sea is no"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, model: Path, data: Path, **keys) -> RewardConfig:
    base = {"model": str(model), "data": str(data), "output_dir": str(tmp_path / "run"), "batch_size": 4,
            "max_steps": 8, "learning_rate": 1e-3, "lr_scheduler": "constant", "log_every": 1,
            "report_to": "none", "dtype": "float32", "seed": 0}
    return from_mapping(RewardConfig, {**base, **keys})


def test_reward_model_learns_a_separable_preference_and_reloads(tiny_model_dir, tmp_path):
    """Chosen says 'yes', rejected 'no': after 8 steps the held-out pairs (other prompts) are all ranked
    right. The saved directory loads with AutoModelForSequenceClassification and scores as trained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from preftune.models import score_texts

    method = RewardMethod()
    final = train(method, _config(tmp_path, tiny_model_dir, _write(tmp_path / "train.jsonl", TRAIN_PROMPTS),
                                  eval_data=str(_write(tmp_path / "eval.jsonl", EVAL_PROMPTS))))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evaluation = [r for r in records if "eval/accuracy" in r][-1]
    assert evaluation["eval/accuracy"] == 1.0
    assert evaluation["eval/loss"] < math.log(2)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 8 and steps[-1]["loss"] < steps[0]["loss"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert reloaded.config.num_labels == 1 and reloaded.config.pad_token_id == tok.pad_token_id
    prompts = [p + " " for p in EVAL_PROMPTS]
    after = score_texts(reloaded, tok, prompts, ["yes the answer is yes"] * 4)
    live = score_texts(method.model, method.tokenizer, prompts, ["yes the answer is yes"] * 4)
    assert after == pytest.approx(live, abs=1e-5)
    worse = score_texts(reloaded, tok, prompts, ["no the sea is no"] * 4)
    assert all(a > w for a, w in zip(after, worse, strict=True))


def test_rankings_train_as_one_item_per_prompt(tiny_model_dir, tmp_path):
    """4 rankings of K=3 responses: 4 items (not 12 pairs), each batch scoring 12 responses in one
    forward; at step 1 (untrained head) the loss is the InstructGPT mean over 3 pairs of each ranking."""
    method = RewardMethod()
    train(method, _config(tmp_path, tiny_model_dir, _write(tmp_path / "rank.jsonl", TRAIN_PROMPTS[:4], ranking=True),
                          max_steps=2))
    assert len(method.train_items) == 4 and all(isinstance(i, TokenizedRanking) for i in method.train_items)
    batch = method.collate(method.train_items)
    assert batch["input_ids"].shape[0] == 12 and batch["response_index"].shape == (4, 3)
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    # the same initial model (the loop seeds with `seed` before loading), scored outside the loop
    from accelerate.utils import set_seed

    from preftune.core.reward_losses import pairwise_ranking_loss
    from preftune.models import load_reward_model, sequence_scores

    set_seed(0)
    model = load_reward_model(str(tiny_model_dir), dtype="float32", tokenizer=method.tokenizer)
    with torch.no_grad():
        rewards = item_rewards(sequence_scores(model, batch["input_ids"], batch["attention_mask"]), batch)
    assert first["loss"] == pytest.approx(pairwise_ranking_loss(rewards).mean().item(), abs=1e-5)
