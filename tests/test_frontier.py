"""`preftune experiment frontier` on the tiny model: a small sweep of every method, measured on held-out
prompts; the SFT point has KL exactly 0; a rerun skips finished runs; changed keys are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.errors import PreftuneError
from preftune.experiments.frontier import FrontierConfig, frontier, plan_runs

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _config(model: Path, out: Path, **keys) -> dict:
    return {"model": str(model), "train_prompts": str(REPO / "examples/data/prompts.txt"),
            "heldout_prompts": str(REPO / "examples/data/prompts_heldout.txt"),
            "reward": str(REPO / "examples/rewards.py") + ":letters", "output_dir": str(out),
            "dpo_betas": [0.1], "ppo_kl_coefs": [0.05], "rloo_kl_coefs": [0.05], "max_new_tokens": 8,
            "max_length": 64, "eval_samples": 2, "preference_samples": 3,
            "common": {"max_steps": 2, "learning_rate": 1e-2, "report_to": "none", "dtype": "float32",
                       "batch_size": 4},
            "dpo": {"max_prompt_length": 32}, "rloo": {"num_samples": 2}, "raft": {"num_samples": 2},
            "grpo": {"num_samples": 2}, "online_dpo": {"num_samples": 2}, **keys}


def test_plan_runs_names_and_keys() -> None:
    config = FrontierConfig(model="m", dpo_betas=[0.1, 0.5], ppo_kl_coefs=[0.05], rloo_kl_coefs=[], raft=None,
                            dpo={"beta": 9.0, "learning_rate": 1e-6}, unlikelihood={"alpha": 0.5},
                            online_dpo={"beta": 7.0, "num_samples": 4})
    runs = plan_runs(config)
    assert [r.name for r in runs] == ["dpo-beta0.1", "dpo-beta0.5", "ppo-kl0.05", "grpo-kl0.04",
                                      "online-dpo-beta0.1", "unlikelihood"]
    assert runs[1].keys["beta"] == 0.5 and runs[1].keys["loss"] == "dpo"  # the sweep wins over `dpo`
    assert runs[2].keys["kl_coef"] == 0.05 and runs[2].keys["max_new_tokens"] == 32
    assert runs[3].command == "grpo" and runs[3].keys["kl_coef"] == 0.04
    assert runs[4].command == "online-dpo" and runs[4].keys["beta"] == 0.1 and runs[4].keys["num_samples"] == 4
    unlikelihood = runs[5].keys
    assert unlikelihood["loss"] == "unlikelihood" and "beta" not in unlikelihood and unlikelihood["alpha"] == 0.5


def test_frontier_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    """Every method once (2 steps each), measured on 4 held-out prompts x 2 samples. Checks the files,
    that SFT sits at KL 0 (pi == pi_ref: every log-ratio is exactly 0), that the trained runs moved
    (KL != 0), the preference data, and that a second call trains and measures nothing again."""
    out = tmp_path / "frontier"
    messages: list[str] = []
    result = frontier(_config(tiny_model_dir, out), log=messages.append)
    names = [p["name"] for p in result["points"]]
    assert names == ["sft", "dpo-beta0.1", "ppo-kl0.05", "rloo-kl0.05", "grpo-kl0.04", "online-dpo-beta0.1", "raft",
                     "unlikelihood"]
    sft = result["points"][0]
    assert sft["kl"] == 0.0 and sft["samples"] == 8 and 0.0 <= sft["reward"] <= 1.0
    assert all(p["kl"] != 0.0 for p in result["points"][1:])
    saved = json.loads((out / "frontier.json").read_text())
    assert saved["points"] == result["points"]
    assert (out / "frontier.png").stat().st_size > 10_000
    pairs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    for name in names[1:]:
        assert (out / "runs" / name / "final" / "config.json").is_file(), name

    stamps = {n: (out / "runs" / n / "final" / "model.safetensors").stat().st_mtime_ns for n in names[1:]}
    again: list[str] = []
    second = frontier(_config(tiny_model_dir, out), log=again.append)
    assert second["points"] == result["points"]
    assert stamps == {n: (out / "runs" / n / "final" / "model.safetensors").stat().st_mtime_ns for n in names[1:]}
    assert [m for m in again if "skipped" in m] == [f"[{k}/{len(names) - 1}] {n}: finished before, skipped"
                                                    for k, n in enumerate(names[1:], start=1)]
    assert "[2/7] ppo-kl0.05: trained, " + str(out / "runs" / "ppo-kl0.05" / "final") in messages

    with pytest.raises(PreftuneError, match="finished with other keys") as info:
        frontier(_config(tiny_model_dir, out, common={"max_steps": 3, "report_to": "none", "dtype": "float32",
                                                      "batch_size": 4, "learning_rate": 1e-2}), log=again.append)
    assert "delete" in info.value.hint


def test_frontier_cli_and_errors(tiny_model_dir, tmp_path):
    """The CLI runs a sweep with no DPO and no RAFT runs; a mistyped key names its nearest key."""
    import yaml
    from typer.testing import CliRunner

    from preftune.cli import app

    config = tmp_path / "frontier.yaml"
    keys = _config(tiny_model_dir, tmp_path / "out", dpo_betas=[], ppo_kl_coefs=[], grpo_kl_coefs=[], online_dpo_betas=[],
                   raft=None, unlikelihood=None)
    config.write_text(yaml.safe_dump(keys))
    result = CliRunner().invoke(app, ["experiment", "frontier", str(config), "--rloo_kl_coefs", "[0.0, 0.5]"])
    assert result.exit_code == 0, result.output
    points = json.loads((tmp_path / "out" / "frontier.json").read_text())["points"]
    assert [p["name"] for p in points] == ["sft", "rloo-kl0", "rloo-kl0.5"]
    result = CliRunner().invoke(app, ["experiment", "frontier", str(config), "--dpo_beta", "[0.1]"])
    assert result.exit_code == 1 and "did you mean --dpo_betas" in result.output
    with pytest.raises(PreftuneError, match="must hold numbers > 0") as info:
        frontier({**keys, "dpo_betas": [0.0]})
    assert info.value.field == "dpo_betas"
