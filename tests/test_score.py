"""`preftune score` through typer's runner: preference data with accuracy, generations, normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny causal LM saved as an (untrained) reward model with its tokenizer."""
    from preftune.models import load_reward_model, load_tokenizer

    out = tmp_path_factory.mktemp("rm") / "rm"
    tok = load_tokenizer(str(tiny_model_dir))
    load_reward_model(str(tiny_model_dir), dtype="float32", tokenizer=tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_preference_pairs_prints_accuracy(reward_dir, tmp_path):
    """2 pairs -> 4 lines (chosen, rejected per pair), scores equal to score_texts, and the printed
    accuracy is the share of pairs whose chosen line scores higher, recomputed here from the file."""
    from preftune.models import load_reward_model, load_tokenizer, score_texts

    pairs = [{"prompt": "To be, ", "chosen": "or not to be", "rejected": "the sea"},
             {"prompt": "Q: two plus two? ", "chosen": "four", "rejected": "blue sky"}]
    data = _jsonl(tmp_path / "prefs.jsonl", pairs)
    result = CliRunner().invoke(app, ["score", "--model", str(reward_dir), "--data", str(data),
                                      "--output", str(tmp_path / "out.jsonl"), "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    lines = _read(tmp_path / "out.jsonl")
    assert [(line["item"], line["role"]) for line in lines] == [(0, "chosen"), (0, "rejected"), (1, "chosen"),
                                                                  (1, "rejected")]
    tok = load_tokenizer(str(reward_dir))
    model = load_reward_model(str(reward_dir), tokenizer=tok)
    expected = score_texts(model, tok, [line["prompt"] for line in lines], [line["response"] for line in lines])
    assert [line["score"] for line in lines] == pytest.approx(expected, abs=1e-5)
    correct = sum(lines[2 * i]["score"] > lines[2 * i + 1]["score"] for i in range(2))
    assert f"accuracy {correct / 2:.4f} ({correct} of 2 pairs ranked right)" in result.output


def test_score_generations_and_normalize_on_itself_gives_mean_zero(reward_dir, tmp_path):
    """Generations keep their fields and gain 'score'. Normalising on the same file subtracts its own
    mean, so the written scores average to 0 and score = raw_score - mean(raw_score)."""
    gens = _jsonl(tmp_path / "gens.jsonl", [
        {"prompt_id": 1, "prompt": "Shall I compare thee ", "completion_id": "A", "completion": "to a summer's day"},
        {"prompt_id": 1, "prompt": "Shall I compare thee ", "completion_id": "B", "completion": "no"},
        {"prompt_id": 2, "prompt": "The quick brown fox ", "completion_id": "A", "completion": "jumps"}])
    out = tmp_path / "scored.jsonl"
    result = CliRunner().invoke(app, ["score", "--model", str(reward_dir), "--data", str(gens), "--output", str(out),
                                      "--normalize-on", str(gens)])
    assert result.exit_code == 0, result.output
    lines = _read(out)
    assert [line["completion_id"] for line in lines] == ["A", "B", "A"]
    raw = [line["raw_score"] for line in lines]
    mean = sum(raw) / 3
    assert [line["score"] for line in lines] == pytest.approx([r - mean for r in raw], abs=1e-6)
    assert sum(line["score"] for line in lines) == pytest.approx(0.0, abs=1e-5)


def test_score_reports_a_missing_field_clearly(reward_dir, tmp_path):
    gens = _jsonl(tmp_path / "gens.jsonl", [{"prompt": "a", "completion": "b"}, {"completion": "c"}])
    result = CliRunner().invoke(app, ["score", "--model", str(reward_dir), "--data", str(gens),
                                      "--output", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 1
    assert "gens.jsonl:2" in result.output and "prompt" in result.output


def test_score_refuses_a_language_model_without_reward_head(tiny_model_dir, reward_dir, tmp_path):
    """Issue 11: `preftune score --model` with a causal LM scored with a freshly random head and printed
    an accuracy. Its config names LlamaForCausalLM only: a one-line error naming the directory, before
    any weights load; the reward model saved from the same backbone (with its head) scores."""
    data = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": "To be, ", "chosen": "or not to be", "rejected": "the sea"}])
    bad = CliRunner().invoke(app, ["score", "--model", str(tiny_model_dir), "--data", str(data),
                                   "--output", str(tmp_path / "o.jsonl")])
    assert bad.exit_code == 1 and not (tmp_path / "o.jsonl").exists()
    flat = " ".join(bad.output.split())
    assert f"{tiny_model_dir} field 'model': a language model (LlamaForCausalLM) without a trained reward head" in flat
    assert "hint: train one with `preftune train reward" in flat and "Traceback" not in bad.output
    good = CliRunner().invoke(app, ["score", "--model", str(reward_dir), "--data", str(data),
                                    "--output", str(tmp_path / "o.jsonl")])
    assert good.exit_code == 0, good.output
