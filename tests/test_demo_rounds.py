"""`preftune demo --scenario rounds`: its stages and recipes, and the --quick run end to end (tiny settings:
its numbers say nothing about the methods, only that every stage, file and key is there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app

runner = CliRunner()
METHODS = ("dpo", "online_dpo", "iterative_dpo", "grpo", "rloo", "ppo")


def test_the_scenario_shares_the_default_base_and_sft_recipes_and_has_its_own_fingerprint():
    import dataclasses

    from preftune.experiments.demo.settings import (
        DEFAULT,
        GROUPS,
        QUICK,
        ROUNDS,
        ROUNDS_QUICK,
        scenario_preset,
    )

    assert ROUNDS.base_recipe() == DEFAULT.base_recipe() and ROUNDS.sft_recipe() == DEFAULT.sft_recipe()
    assert ROUNDS_QUICK.base_recipe() == QUICK.base_recipe() and ROUNDS_QUICK.sft_recipe() == QUICK.sft_recipe()
    assert len({ROUNDS.fingerprint, DEFAULT.fingerprint, GROUPS.fingerprint}) == 3
    assert dataclasses.replace(ROUNDS, rounds=4).fingerprint != ROUNDS.fingerprint
    assert scenario_preset("rounds", False) is ROUNDS and scenario_preset("rounds", True) is ROUNDS_QUICK
    assert ROUNDS.methods == METHODS


def test_every_method_stage_is_built_from_the_table(tmp_path, monkeypatch):
    """Each trained method gets keys its command accepts, from the SFT model, against the learned reward
    model (online) or on the annotators' labels (offline DPO); online DPO gets its own beta and no kl_coef."""
    import preftune.train
    from preftune.experiments.demo.rounds import RECIPES, RoundsDemo
    from preftune.experiments.demo.settings import ROUNDS

    out = tmp_path / "out"
    (out / "stages").mkdir(parents=True)
    for name, info in {"sft": {"model": "sft/final"}, "reward": {"model": "reward/final"}}.items():
        (out / "stages" / f"{name}.json").write_text(json.dumps(info))
    calls = []
    monkeypatch.setattr(preftune.train, "run", lambda command, keys: calls.append((command, keys)) or Path("x"))
    demo = RoundsDemo(out, ROUNDS, cache_dir=tmp_path / "cache")
    assert [n for n, _ in demo.stages] == ["corpus", "base", "sft", "preferences", "reward", *METHODS,
                                           "evaluate", "frontier", "report"]
    for method in RECIPES:
        demo.train_method(method)
        command, keys = calls.pop()
        assert command == RECIPES[method].command
        preftune.train.resolve_config(command, keys)  # valid keys for the command
        assert keys["model"] == "sft/final"
        if RECIPES[method].online:
            assert keys["reward"] == "reward/final"
        else:
            assert keys["data"].endswith("preferences/train.jsonl")
    online = demo.method_keys("online_dpo")
    assert "kl_coef" not in online and online["beta"] == ROUNDS.online_dpo_beta
    assert online["max_steps"] == ROUNDS.online_dpo_steps and online["num_samples"] == ROUNDS.online_dpo_num_samples
    assert demo.method_keys("grpo")["kl_coef"] == ROUNDS.grpo_kl_coef


def test_an_unknown_method_is_refused(tmp_path):
    import dataclasses

    from preftune.errors import PreftuneError
    from preftune.experiments.demo.rounds import RoundsDemo
    from preftune.experiments.demo.settings import ROUNDS

    with pytest.raises(PreftuneError, match="no recipe for method 'orpo'"):
        RoundsDemo(tmp_path, dataclasses.replace(ROUNDS, methods=("dpo", "orpo")))


# ------------------------------------------------------------------------------------- the quick run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("rounds")
    out, cache = root / "out", root / "cache"
    result = runner.invoke(app, ["demo", "--scenario", "rounds", "--quick", "--output", str(out),
                                 "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    return out, cache, result.output


@pytest.mark.slow
def test_quick_run_writes_every_summary_key_file_and_the_report(quick_run):
    from preftune.experiments.demo.settings import ROUNDS_QUICK

    out, _, output = quick_run
    for name in ("report.md", "report.html", "summary.json", "plots/win_rates.png", "plots/frontier.png",
                 "iterative_dpo/rounds.json", "iterative_dpo/rounds.png", "online_dpo/pairs.jsonl", "eval/frontier.jsonl",
                 *(f"eval/{m}.jsonl" for m in ("sft", *METHODS))):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    n = summary["eval_prompts"] * summary["completions_per_prompt"]
    for method in METHODS:
        g = summary["methods"][method]["ground_truth"]
        assert g["wins"] + g["ties"] + g["losses"] == n
        assert g["win_rate"] == pytest.approx((g["wins"] + g["ties"] / 2) / n)
        point = summary["methods"][method]["frontier"]
        assert point["samples"] == summary["eval_prompts"] * ROUNDS_QUICK.frontier_samples
    assert summary["sft"]["kl"] == 0.0  # the SFT model against itself: every log-ratio is exactly 0
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS_QUICK.rounds + 1))
    assert summary["methods"]["iterative_dpo"]["frontier"]["name"] == f"iterative_dpo_round{ROUNDS_QUICK.rounds}"
    names = [p["name"] for p in summary["frontier"]]
    assert names[0] == "sft" and all(f"iterative_dpo_round{r}" in names for r in range(1, ROUNDS_QUICK.rounds + 1))
    md = (out / "report.md").read_text()
    assert "## Offline, online and iterative DPO side by side" in md and "frontier" in md
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == md.count("![")
    assert "online DPO" in output and "iterative DPO" in output


@pytest.mark.slow
def test_a_second_run_skips_every_finished_stage(quick_run):
    out, cache, _ = quick_run
    result = runner.invoke(app, ["demo", "--scenario", "rounds", "--quick", "--output", str(out),
                                 "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert result.output.count("done in an earlier run") == 14
