"""`preftune demo --scenario groups`: the two ground truths and the panel by hand, and the --quick run end to
end (tiny settings: its numbers say nothing about the methods, only that every stage, file and key is there).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.experiments.demo.groups_reward import (
    annotate_pairs,
    concise_reward,
    expansive_reward,
    make_panel,
    reward_agreement,
    verse_words,
)
from preftune.experiments.demo.reward import shakespeare_reward

runner = CliRunner()
PREFIX = "O, what a noble mind is here o'erthrown!"
METHODS = ("pooled_rloo", "maxmin_rloo", "pooled_dpo", "grdpo")
GROUPS = ("concise", "expansive")


# ------------------------------------------------------------------------------------- the ground truths


def test_the_majority_is_the_default_ground_truth_and_the_minority_counts_words_of_verse():
    """A speaker's name and a stage direction are not verse; the speech after them is. 'Who's there?' (2) +
    'Nay, answer me. Stand and unfold yourself.' (7) = 9 words: the minority gives 0.9; the majority takes
    1 for the speaker, 1 for the stage direction, 0 for the last line being verse ending in '.' (finished)."""
    completion = "\nWho's there?\n[Enter Francisco.]\nFRANCISCO.\nNay, answer me. Stand and unfold yourself."
    assert verse_words(completion) == 9
    assert expansive_reward(PREFIX, completion) == pytest.approx(0.9)
    assert concise_reward(PREFIX, completion) == shakespeare_reward(PREFIX, completion)
    # capped at 40 words: 60 words of verse score 4.0, as 40 do
    long = "\n" + "\n".join(["The king is come and all the court is here"] * 6)   # 10 words a line
    assert verse_words(long) == 60 and expansive_reward(PREFIX, long) == pytest.approx(4.0)


def test_both_groups_can_be_satisfied_at_once():
    """Three lines of verse, 25 words, finished, no other voice. Syllables 10, 12 and 11 (metre 1.0, 0.6, 0.8:
    mean 0.8); the majority gives 1 + 0.5 * 0.8 - 0.1 (one word over 24) = 1.3 of its best 1.5, the minority
    2.5. The majority prefers it to a ramble across speakers, the minority to the short finished line a
    pooled reward favours (3 words: 0.3 for the minority, 1 - 0.25 * 5 = -0.25 for the majority)."""
    both = "\nThe glass of fashion and the mould of form,\nThe observed of all observers, quite, quite down!\n" \
           "And I of ladies most deject and wretched."
    ramble = "\nAnd so, my lord,\nHAMLET.\nI will not go\nOPHELIA.\nGood my lord, how does your honour for this many a day"
    short = "\nAnd so farewell."
    assert verse_words(both) == 25 and expansive_reward(PREFIX, both) == pytest.approx(2.5)
    assert concise_reward(PREFIX, both) == pytest.approx(1.3)
    assert concise_reward(PREFIX, short) == pytest.approx(-0.25)
    assert concise_reward(PREFIX, both) > concise_reward(PREFIX, ramble)
    assert expansive_reward(PREFIX, both) > expansive_reward(PREFIX, short) == pytest.approx(0.3)
    assert concise_reward(PREFIX, short) > concise_reward(PREFIX, ramble)      # the pooled direction


def test_reward_agreement_measures_the_conflict_by_hand():
    """Three one-line completions of 4, 12 and 30 one-syllable words, none finished. Concise: -0.25 * 4 = -1.0;
    metre 1 - 2/5 = 0.6 gives 0.5 * 0.6 = 0.3; -0.1 * 6 = -0.6. Expansive: 0.4, 1.2, 3.0. Pairs (0,1) and
    (0,2): both prefer the second; (1,2): concise prefers 1, expansive 2: opposite, 1 of 3."""
    texts = ["\n" + " ".join(["word"] * n) for n in (4, 12, 30)]
    res = reward_agreement([PREFIX] * 3, texts, [(0, 1), (0, 2), (1, 2)])
    assert res["mean"]["concise"] == pytest.approx((-1.0 + 0.3 - 0.6) / 3)
    assert res["opposite_order"] == pytest.approx(1 / 3)
    a, b = [-1.0, 0.3, -0.6], [0.4, 1.2, 3.0]
    ma, mb = sum(a) / 3, sum(b) / 3
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    den = (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    assert res["correlation"] == pytest.approx(cov / den)


def test_the_panel_has_its_group_sizes_and_ids_that_do_not_tell_the_group():
    panel = make_panel((16, 4), (0.4, 0.6, 0.8, 1.0), seed=7)
    assert [a.name for a in panel] == [f"a{k:02d}" for k in range(1, 21)]
    assert sum(a.group == "concise" for a in panel) == 16 and sum(a.group == "expansive" for a in panel) == 4
    minority = [int(a.name[1:]) for a in panel if a.group == "expansive"]
    assert minority != [17, 18, 19, 20]                   # shuffled: not the last four
    assert make_panel((16, 4), (0.4, 0.6, 0.8, 1.0), seed=7) == panel
    assert {a.temperature for a in panel} == {0.4, 0.6, 0.8, 1.0}


def test_annotators_follow_their_own_group_and_label_in_proportion_to_its_size():
    """Pairs where the groups disagree: a finished line of 10 words (concise 1.5, expansive 1.0) against 27 words
    of verse, unfinished (concise 0.5 * metre 1.0 - 0.1 * 3 = 0.2, expansive 2.7). With
    near-zero noise the concise annotators pick the short one, the expansive the long one, always; labels
    come 80/20 (one annotator drawn per pair, uniformly over 20)."""
    panel = make_panel((16, 4), (0.01,), seed=0)
    short, long = "\nAnd so the day is done, and we must part.", "\n" + "\n".join(["the long night comes on with many words here"] * 3) + ","
    pairs = [(PREFIX, short, long) if k % 2 else (PREFIX, long, short) for k in range(2000)]
    rows = annotate_pairs(pairs, panel, second_opinion=0.0, seed=3)
    assert len(rows) == 2000
    for r in rows:
        prefers_short = (r["choice"] == 0) == (r["first"] == short)
        assert prefers_short == (r["group"] == "concise")
        assert r["true_choice"]["concise"] == int(r["second"] == short)
        assert r["true_choice"]["expansive"] == int(r["second"] == long)
    share = sum(r["group"] == "expansive" for r in rows) / len(rows)
    assert 0.17 < share < 0.23
    assert annotate_pairs(pairs[:50], panel, second_opinion=0.2, seed=3) == annotate_pairs(
        pairs[:50], panel, second_opinion=0.2, seed=3)


def test_noisy_annotators_follow_bradley_terry():
    """P(first) = sigmoid((r_g(first) - r_g(second)) / T): 10 more words of verse are +1.0 for the minority;
    at T = 1 an expansive annotator prefers them with probability sigmoid(1) = 0.731."""
    from preftune.experiments.demo.groups_reward import GroupAnnotator

    a = GroupAnnotator("x", "expansive", 1.0)
    longer, shorter = "\n" + " ".join(["word"] * 20), "\n" + " ".join(["word"] * 10)
    assert a.p_first(PREFIX, longer, shorter) == pytest.approx(0.7310586, abs=1e-6)
    rng = random.Random(0)
    picks = [rng.random() < a.p_first(PREFIX, longer, shorter) for _ in range(4000)]
    assert sum(picks) / len(picks) == pytest.approx(0.731, abs=0.03)


# ------------------------------------------------------------------------------------- settings and CLI


def test_the_scenario_shares_the_default_base_and_sft_recipes_and_has_its_own_fingerprint():
    import dataclasses

    from preftune.experiments.demo.settings import DEFAULT, GROUPS, GROUPS_QUICK, QUICK

    assert GROUPS.base_recipe() == DEFAULT.base_recipe() and GROUPS.sft_recipe() == DEFAULT.sft_recipe()
    assert GROUPS_QUICK.base_recipe() == QUICK.base_recipe() and GROUPS_QUICK.sft_recipe() == QUICK.sft_recipe()
    assert GROUPS.fingerprint != DEFAULT.fingerprint
    for name, value in (("grdpo_step_size", 0.1), ("group_annotators", (8, 2)), ("em_restarts", 2)):
        assert dataclasses.replace(GROUPS, **{name: value}).fingerprint != GROUPS.fingerprint, name
    assert dataclasses.replace(GROUPS, sft_steps=81).sft_recipe() != GROUPS.sft_recipe()
    assert dataclasses.replace(GROUPS, rl_steps=1).sft_recipe() == GROUPS.sft_recipe()


def test_an_unknown_scenario_is_refused_and_help_lists_the_scenarios(tmp_path):
    result = runner.invoke(app, ["demo", "--scenario", "tribes", "--output", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "unknown demo scenario 'tribes'" in result.output and "default, groups" in result.output
    assert not (tmp_path / "o").exists()
    help_text = " ".join(runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "--scenario" in help_text and "groups:" in help_text and "maxmin_rloo" in help_text


def test_every_method_stage_is_built_from_the_table(tmp_path, monkeypatch):
    """Each row of METHODS trains its command with keys the config accepts; MaxMin RLOO gets the mixture's
    reward models, pooled RLOO the pooled one; group-robust DPO sets group_robust and its eta."""
    import preftune.train
    from preftune.experiments.demo.groups import METHODS as TABLE
    from preftune.experiments.demo.groups import GroupsDemo
    from preftune.experiments.demo.settings import GROUPS_QUICK

    out = tmp_path / "out"
    (out / "stages").mkdir(parents=True)
    markers = {"sft": {"model": "sft/final"}, "reward": {"model": "reward/final"},
               "mixture": {"models": ["m/final/mixture-0", "m/final/mixture-1"]}}
    for name, info in markers.items():
        (out / "stages" / f"{name}.json").write_text(json.dumps(info))
    calls = []
    monkeypatch.setattr(preftune.train, "run", lambda command, keys: calls.append((command, keys)) or Path("x"))
    demo = GroupsDemo(out, GROUPS_QUICK, cache_dir=tmp_path / "cache")
    assert [n for n, _ in demo.stages][4:-2] == ["mixture", "reward", *METHODS]
    for method in METHODS:
        demo.train_method(method)
        command, keys = calls.pop()
        assert command == TABLE[method].recipe.command
        preftune.train.resolve_config(command, keys)          # valid keys for the command
        if method == "maxmin_rloo":
            assert keys["rewards"] == markers["mixture"]["models"] and keys["reward_aggregation"] == "maxmin"
            assert "reward" not in keys
        if method == "pooled_rloo":
            assert keys["reward"] == "reward/final" and "rewards" not in keys
        if method == "grdpo":
            assert keys["group_robust"] is True and keys["group_step_size"] == GROUPS_QUICK.grdpo_step_size
        if method == "pooled_dpo":
            assert "group_robust" not in keys and keys["loss"] == "dpo"


# ------------------------------------------------------------------------------------- the quick run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("groups")
    out, cache = root / "out", root / "cache"
    result = runner.invoke(app, ["demo", "--scenario", "groups", "--quick", "--output", str(out),
                                 "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    return out, cache, result.output


@pytest.mark.slow
def test_quick_run_writes_every_summary_key_file_and_the_report(quick_run):
    out, _, output = quick_run
    for name in ("report.md", "report.html", "summary.json", "plots/win_rates_by_group.png", "plots/training.png",
                 "eval/e2_ratings.csv", "preferences/train.jsonl", "mixture/assignments.jsonl",
                 "mixture/final/mixture-0/config.json", "mixture/final/mixture-1/config.json", "reward/final/config.json",
                 *(f"{m}/final/config.json" for m in METHODS), *(f"eval/{m}.jsonl" for m in ("sft", *METHODS)),
                 *(f"eval/{m}_vs_sft/comparison.json" for m in METHODS)):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert 0.5 <= summary["em"]["purity"] <= 1 and -1 <= summary["em"]["ari"] <= 1
    n = summary["eval_prompts"] * summary["completions_per_prompt"]
    for method in METHODS:
        m = summary["methods"][method]
        for group in GROUPS:
            r = m["win_rate_by_group"][group]
            assert r["wins"] + r["ties"] + r["losses"] == n
            assert r["win_rate"] == pytest.approx((r["wins"] + r["ties"] / 2) / n)
            lo, hi = r["ci"]
            assert 0 <= lo <= r["win_rate"] <= hi <= 1
        worst = m["worst_group_win_rate"]
        assert worst["group"] in GROUPS
        assert worst["win_rate"] == min(m["win_rate_by_group"][g]["win_rate"] for g in GROUPS)
        assert worst["win_rate"] == m["win_rate_by_group"][worst["group"]]["win_rate"]
        assert len(worst["ci"]) == 2 and worst["ci"][0] <= worst["ci"][1]
    assert set(summary["reward_model"]["accuracy_vs_truth"]) == set(GROUPS)
    assert -1 <= summary["conflict"]["correlation"] <= 1
    assert set(summary["profiles"]) == {"sft", *METHODS}
    md = (out / "report.md").read_text()
    first_table = md.split("## Who wins, by group", 1)[1].split("\n\n", 2)[1]
    assert "worst-group win rate" in first_table and all(t in first_table for t in ("MaxMin RLOO", "group-robust DPO"))
    assert "pooled reward model orders" in md
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == md.count("![")
    assert "worst group" in output and "purity" in output


@pytest.mark.slow
def test_quick_run_labels_carry_annotator_and_group(quick_run):
    out, _, _ = quick_run
    rows = [json.loads(line) for line in (out / "preferences" / "train.jsonl").read_text().splitlines()]
    assert {r["group"] for r in rows} == set(GROUPS)
    assignments = [json.loads(line) for line in (out / "mixture" / "assignments.jsonl").read_text().splitlines()]
    assert {a["annotator"] for a in assignments} == {r["annotator"] for r in rows}
    assert {a["mixture"] for a in assignments} <= {0, 1}


@pytest.mark.slow
def test_a_second_run_reuses_the_cached_sft_model_and_skips_finished_stages(quick_run, tmp_path):
    out, cache, _ = quick_run
    result = runner.invoke(app, ["demo", "--scenario", "groups", "--quick", "--output", str(out),
                                 "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert result.output.count("done in an earlier run") == 12
    other = tmp_path / "other"
    result = runner.invoke(app, ["demo", "--scenario", "groups", "--quick", "--until", "sft", "--output", str(other),
                                 "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    marker = json.loads((other / "stages" / "sft.json").read_text())
    assert marker["cached"] is True
    assert marker["model"] == json.loads((out / "stages" / "sft.json").read_text())["model"]
    # and the default scenario refuses the groups run's directory (other settings)
    result = runner.invoke(app, ["demo", "--quick", "--output", str(out), "--cache-dir", str(cache)])
    assert result.exit_code == 1 and "other settings" in result.output
