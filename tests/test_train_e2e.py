"""End to end through the CLI: SFT -> reward model -> DPO on the tiny model, each reading the last one's output."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.train.loop import read_metrics

SFT_ROWS = [{"prompt": f"Question: what is {w} plus {w}? Answer:", "completion": f" {a}."}
            for w, a in [("one", "two"), ("two", "four"), ("three", "six"), ("four", "eight")]]
PAIRS = [{"prompt": f"Question: what is {w} plus {w}? Answer:", "chosen": f" {a}.", "rejected": f" {b}."}
         for w, a, b in [("one", "two", "three"), ("two", "four", "five"), ("three", "six", "nine"),
                         ("four", "eight", "seven")]]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _invoke(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_sft_then_reward_then_dpo_through_the_cli(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft_data = _jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    pairs = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    common = "report_to: none\nbatch_size: 2\nlog_every: 1\nmax_steps: 2\n"
    sft_yaml = tmp_path / "sft.yaml"
    sft_yaml.write_text(f"model: {tiny_model_dir}\ndata: {sft_data}\noutput_dir: {tmp_path / 'sft'}\n{common}")
    _invoke("train", "sft", str(sft_yaml), "--learning_rate", "1e-3")
    sft_final = tmp_path / "sft" / "final"
    assert AutoModelForCausalLM.from_pretrained(sft_final).config.model_type == "llama"

    reward_yaml = tmp_path / "reward.yaml"
    reward_yaml.write_text(f"model: {sft_final}\ndata: {pairs}\noutput_dir: {tmp_path / 'reward'}\n{common}")
    _invoke("train", "reward", str(reward_yaml))
    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward" / "final")
    assert reward.config.num_labels == 1

    dpo_yaml = tmp_path / "dpo.yaml"
    dpo_yaml.write_text(textwrap.dedent(f"""\
        model: {sft_final}
        data: {pairs}
        output_dir: {tmp_path / 'dpo'}
        ref_cache_dir: {tmp_path / 'ref-cache'}
        learning_rate: 1e-4
        {common.replace(chr(10), chr(10) + '        ')}"""))
    _invoke("train", "dpo", str(dpo_yaml), "--beta", "0.2", "--lora.r", "4", "--merge_lora", "true")
    dpo_dir = tmp_path / "dpo"
    assert (dpo_dir / "final" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(dpo_dir / "final-merged")
    assert merged.config.num_hidden_layers == 2
    records = read_metrics(dpo_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(records[0])
    # at step 1 the policy equals the reference, so the DPO loss is log 2 (Rafailov et al. 2023, Eq. 7)
    assert records[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-5)
    written = (dpo_dir / "config.yaml").read_text()
    assert "beta: 0.2" in written and "lora: {r: 4}" in written
