"""`preftune demo --quick`: the whole pipeline end to end (tiny settings), its files, resume and errors.

One quick run is shared by the module (it takes well under a minute on a 2-core CPU); the tests read
its output directory and run the demo again where they need to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "out", root / "cache"
    result = runner.invoke(app, ["demo", "--quick", "--output", str(out), "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    return out, cache, result.output


def test_quick_demo_writes_the_report_and_summary(quick_run):
    out, _, output = quick_run
    for name in ("report.md", "report.html", "summary.json", "plots/win_rates.png", "plots/training.png",
                 "plots/lengths.png", "plots/wtl.png", "preferences/train.jsonl", "preferences/pairs.jsonl",
                 "eval/sft.jsonl", "eval/dpo.jsonl", "eval/orpo.jsonl", "eval/ppo.jsonl", "eval/rloo.jsonl",
                 "dpo/final/config.json", "ppo/final/config.json", "rloo/samples.jsonl"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for method in ("dpo", "orpo", "ppo", "rloo"):
        for judge in ("ground_truth", "reward_model"):
            r = summary["methods"][method][judge]
            n = r["wins"] + r["ties"] + r["losses"]
            assert n == summary["eval_prompts"] * summary["completions_per_prompt"]
            assert r["win_rate"] == pytest.approx((r["wins"] + r["ties"] / 2) / n)
            lo, hi = r["win_rate_ci"]
            assert 0 <= lo <= r["win_rate"] <= hi <= 1
    rm = summary["reward_model"]
    assert rm["heldout_pairs"] > 0 and 0 <= rm["accuracy_vs_ground_truth"] <= 1
    assert set(summary["seconds"]) >= {"corpus", "base", "sft", "preferences", "reward", "dpo", "orpo", "ppo", "rloo",
                                       "evaluate"}
    assert "win rate" in output and "report.html" in output


def test_report_shows_the_course_table_and_embeds_its_plots(quick_run):
    out, _, _ = quick_run
    md = (out / "report.md").read_text()
    assert "O, what a noble mind is here o'erthrown!" in md        # the course's first prefix
    assert "![Win rates" in md and "plots/win_rates.png" in md
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == md.count("![")  # self-contained
    assert "<table>" in html


def test_generations_pair_the_models_on_the_same_prompts_and_ids(quick_run):
    out, _, _ = quick_run
    keys = {}
    for name in ("sft", "dpo", "orpo", "ppo", "rloo"):
        rows = [json.loads(line) for line in (out / "eval" / f"{name}.jsonl").read_text().splitlines()]
        keys[name] = [(r["prompt_id"], r["completion_id"], r["prompt"]) for r in rows]
    assert keys["sft"] == keys["dpo"] == keys["orpo"] == keys["ppo"] == keys["rloo"]
    assert {k[1] for k in keys["sft"]} == {"A", "B", "C"}


def test_preference_data_trains_and_has_annotators(quick_run):
    out, _, _ = quick_run
    rows = [json.loads(line) for line in (out / "preferences" / "train.jsonl").read_text().splitlines()]
    assert rows and all(r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"] for r in rows)
    assert len({r["annotator"] for r in rows}) > 1
    stats = json.loads((out / "stages" / "preferences.json").read_text())["train"]
    assert stats["labels"] == len(rows)


def test_a_second_run_skips_every_finished_stage(quick_run):
    out, cache, _ = quick_run
    before = json.loads((out / "summary.json").read_text())
    result = runner.invoke(app, ["demo", "--quick", "--output", str(out), "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert result.output.count("done in an earlier run") == len(before["seconds"]) + 1  # + the report stage
    assert json.loads((out / "summary.json").read_text()) == before


def test_an_interrupted_run_resumes_from_the_last_finished_stage(quick_run, tmp_path, monkeypatch):
    """Stop the run inside the reward stage; the next run skips corpus..preferences and finishes."""
    from preftune.experiments.demo.settings import QUICK

    out, cache, _ = quick_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for stage in ("reward", *QUICK.methods, "evaluate", "report"):
        (copy / "stages" / f"{stage}.json").unlink()
    from preftune.experiments.demo import pipeline

    original = pipeline.Demo.stage_reward

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Demo, "stage_reward", interrupted)
    result = runner.invoke(app, ["demo", "--quick", "--output", str(copy), "--cache-dir", str(cache)])
    assert result.exit_code != 0
    assert not (copy / "stages" / "reward.json").exists()
    monkeypatch.setattr(pipeline.Demo, "stage_reward", original)
    result = runner.invoke(app, ["demo", "--quick", "--output", str(copy), "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert result.output.count("done in an earlier run") == 4   # corpus, base, sft, preferences
    assert (copy / "stages" / "report.json").is_file()


def test_a_new_run_directory_reuses_the_cached_base_model(quick_run, tmp_path):
    out, cache, _ = quick_run
    other = tmp_path / "other"
    result = runner.invoke(app, ["demo", "--quick", "--until", "base", "--output", str(other), "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert "reusing" in result.output and "stopped after stage base" in result.output
    marker = json.loads((other / "stages" / "base.json").read_text())
    assert marker["cached"] is True
    assert marker["model"] == json.loads((out / "stages" / "base.json").read_text())["model"]
    assert not (other / "stages" / "sft.json").exists()


def test_a_directory_with_other_settings_is_refused(quick_run):
    out, cache, _ = quick_run
    result = runner.invoke(app, ["demo", "--output", str(out), "--cache-dir", str(cache)])  # default settings
    assert result.exit_code == 1
    assert "holds a demo run with other settings" in result.output and "--fresh" in result.output


def test_every_method_stage_is_built_from_the_table(quick_run, monkeypatch):
    """Each row of METHODS trains its `train` command with keys its config accepts, its own from the settings."""
    import dataclasses

    import preftune.train
    from preftune.experiments.demo.pipeline import METHODS, Demo
    from preftune.experiments.demo.settings import QUICK

    out, cache, _ = quick_run
    calls = []
    monkeypatch.setattr(preftune.train, "run", lambda command, keys: calls.append((command, keys)) or Path("x"))
    names = {f.name for f in dataclasses.fields(QUICK)}
    for method, recipe in METHODS.items():
        assert set(recipe.settings.values()) <= names, method
        changed = dataclasses.replace(QUICK, methods=(method,), **{
            name: getattr(QUICK, name) * 2 for name in recipe.settings.values()})
        demo = Demo(out, changed, cache_dir=cache)
        assert [name for name, _ in demo.stages if name == method] == [method]
        demo.train_method(method)
        command, keys = calls.pop()
        assert command == recipe.command and keys["output_dir"] == str(out / method)
        for key, name in recipe.settings.items():
            assert keys[key] == getattr(changed, name)
        assert preftune.train.resolve_config(command, keys).seed == QUICK.seed  # valid keys for the command


def test_an_unknown_method_is_refused_before_any_training(tmp_path):
    import dataclasses

    from preftune.errors import PreftuneError
    from preftune.experiments.demo.pipeline import Demo
    from preftune.experiments.demo.settings import QUICK

    with pytest.raises(PreftuneError, match="no recipe for method 'sppo'") as info:
        Demo(tmp_path / "out", dataclasses.replace(QUICK, methods=("dpo", "sppo")))
    assert "dpo, orpo, ppo, rloo" in str(info.value.hint)
    assert not (tmp_path / "out").exists()


def test_every_setting_is_in_the_fingerprint_and_the_base_ones_in_the_cache_key():
    import dataclasses

    from preftune.experiments.demo.settings import QUICK

    for name, value, shapes_base in (("max_length", 256, False), ("ppo_update_epochs", 4, False),
                                     ("eval_seed_offset", 7, False), ("preview_samples", 1, False),
                                     ("base_head_dim", 16, True), ("base_weight_decay", 0.0, True),
                                     ("log_every", 1, True), ("group_by_length", False, True)):
        changed = dataclasses.replace(QUICK, **{name: value})
        assert changed.fingerprint != QUICK.fingerprint, name
        assert (changed.base_recipe() != QUICK.base_recipe()) is shapes_base, name
