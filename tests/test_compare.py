"""preftune.compare and `preftune compare`: W/T/L tables, win rates, intervals, length control, ranking."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.compare import (
    bootstrap_interval,
    cluster_weights,
    compare_generations,
    compare_models,
    fit_logistic,
    length_controlled_win_rate,
    markdown_table,
    write_report,
)
from preftune.errors import PreftuneError
from preftune.judges import FunctionJudge, Judge, Judgements


def recs(rows: list[tuple[int, str, str]], model: str, prompt: str = "prompt {i}") -> list[dict]:
    return [{"prompt_id": i, "prompt": prompt.format(i=i), "completion_id": c, "completion": text, "model": model}
            for i, c, text in rows]


def by_length(prompt: str, completion: str) -> float:
    return len(completion)


BASE = recs([(1, "A", "aa"), (1, "B", "aaa"), (2, "A", "aaaaa"), (2, "B", "a")], "sft")
CAND = recs([(1, "A", "aaaa"), (1, "B", "bbb"), (2, "A", "b"), (2, "B", "bb")], "dpo")


def test_function_judge_counts_and_win_rate_by_hand():
    """Judge = longer wins. 1-A: 4 vs 2 chars -> W; 1-B: 3 vs 3 -> T; 2-A: 1 vs 5 -> L; 2-B: 2 vs 1 -> W.
    W=2, T=1, L=1; win rate = (2 + 1/2) / 4 = 0.625. Per prompt: 1 -> W1 T1 L0, 2 -> W1 T0 L1."""
    res = compare_generations(BASE, CAND, FunctionJudge(by_length), n_bootstrap=200, seed=0)
    assert (res.baseline, res.candidate) == ("sft", "dpo")
    assert [(r["prompt_id"], r["completion_id"], r["verdict"]) for r in res.rows] == [
        (1, "A", "W"), (1, "B", "T"), (2, "A", "L"), (2, "B", "W")]
    assert (res.wins, res.ties, res.losses, res.n) == (2, 1, 1, 4)
    assert res.win_rate == pytest.approx(0.625)
    assert [(p["wins"], p["ties"], p["losses"]) for p in res.per_prompt()] == [(1, 1, 0), (1, 0, 1)]
    lo, hi = res.win_rate_ci
    assert lo <= res.win_rate <= hi
    assert markdown_table(res) == (
        "| # | prompt | A | B | W | T | L |\n|---|---|---|---|---|---|---|\n"
        "| 1 | prompt 1 | W | T | 1 | 1 | 0 |\n| 2 | prompt 2 | L | W | 1 | 0 | 1 |\n"
        "|  | **total** |  |  | 2 | 1 | 1 |")
    d = res.to_dict()
    assert d["win_rate"] == res.win_rate and d["n"] == 4 and "candidate" in d["verdict_meaning"]


def test_cluster_bootstrap_resamples_prompts():
    """Items of one cluster always get the same weight, and each draw picks as many clusters as there
    are: clusters (p1, p2, p2) -> weights (c1, c2, c2) with c1 + c2 = 2."""
    w = cluster_weights([1, 2, 2], n_bootstrap=50, seed=0)
    assert w.shape == (50, 3)
    assert np.all(w[:, 1] == w[:, 2]) and np.all(w[:, 0] + w[:, 1] == 2)
    assert bootstrap_interval([1.0, 0.0, 0.5], ["p"] * 3, n_bootstrap=20) == (0.5, 0.5)  # one prompt: degenerate


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_prompts():
    """Verdicts W W L / T W L / L L W / W T T / W L W repeated over 5 prompts, then 40 prompts
    (the same pattern 8 times): the point estimate is the same (0.5667) and the interval of the larger
    sample should be about sqrt(8) = 2.8 times narrower; we ask for at least 2 times."""
    pattern = ["WWL", "TWL", "LLW", "WTT", "WLW"]

    def interval(copies: int) -> tuple[float, float, float]:
        values, clusters = [], []
        for k in range(copies):
            for j, verdicts in enumerate(pattern):
                values += [{"W": 1.0, "T": 0.5, "L": 0.0}[v] for v in verdicts]
                clusters += [f"{k}-{j}"] * 3
        lo, hi = bootstrap_interval(values, clusters, n_bootstrap=2000, seed=1)
        return float(np.mean(values)), lo, hi

    est_small, lo_s, hi_s = interval(1)
    est_big, lo_b, hi_b = interval(8)
    assert est_small == pytest.approx(8.5 / 15) == est_big
    assert lo_s <= est_small <= hi_s and lo_b <= est_big <= hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 2


def test_clustered_interval_is_wide_when_prompts_decide_everything():
    """10 prompts x 10 completions where each prompt is all W (5 prompts) or all L (5): only 10
    independent units, so the interval is about 0.5 +- 1.96 sqrt(0.25 / 10) = 0.5 +- 0.31, not the
    0.5 +- 0.10 that 100 independent verdicts would give. We check a width above 0.4."""
    values = [1.0 if p < 5 else 0.0 for p in range(10) for _ in range(10)]
    clusters = [p for p in range(10) for _ in range(10)]
    lo, hi = bootstrap_interval(values, clusters, n_bootstrap=2000, seed=0)
    assert hi - lo > 0.4


def test_logistic_fit_recovers_known_coefficients():
    """20,000 draws of y ~ Bernoulli(sigmoid(0.5 - x)), x ~ N(0, 1): the MLE's standard errors are
    about 0.017 (intercept) and 0.02 (slope); we allow 0.06."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=20_000)
    y = (rng.random(20_000) < 1 / (1 + np.exp(-(0.5 - x)))).astype(float)
    b0, b1 = fit_logistic(x, y)
    assert b0 == pytest.approx(0.5, abs=0.06) and b1 == pytest.approx(-1.0, abs=0.06)


def test_length_controlled_ties_and_symmetry():
    """All ties: every target is 1/2, the gradient vanishes at b = 0, so LC = sigmoid(0) = 1/2 exactly.
    Mirror-image data (a win at +d for every loss at -d and vice versa) also gives b0 = 0."""
    lc = length_controlled_win_rate(["T"] * 6, [3, -1, 4, 1, -5, 9])
    assert lc["win_rate"] == pytest.approx(0.5, abs=1e-9) and lc["intercept"] == pytest.approx(0.0, abs=1e-9)
    mirror = length_controlled_win_rate(["W", "L", "W", "L", "L", "W"], [5, -5, -2, 2, 1, -1])
    assert mirror["win_rate"] == pytest.approx(0.5, abs=1e-9)
    same = length_controlled_win_rate(["W", "W", "L"], [0, 0, 0])  # no length variation: intercept only
    assert same["slope"] == 0.0 and same["win_rate"] == pytest.approx(2 / 3, abs=1e-3)


def _gumbel(text: str) -> float:
    u = (int(hashlib.sha256(text.encode()).hexdigest()[:13], 16) + 0.5) / 16**13
    return -math.log(-math.log(u))


def length_only_judge(prompt: str, completion: str) -> float:
    """Score = length / 10 + a standard Gumbel draw fixed by the text. The difference of two
    independent standard Gumbels is standard logistic, so P(x beats y) = sigmoid((len x - len y) / 10):
    a judge that cares about length only."""
    return len(completion) / 10 + _gumbel(completion)


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    """The candidate's completions are longer by N(30, 20) characters and the judge prefers length only.
    Raw win rate = E[sigmoid(d / 10)] with d / 10 ~ N(3, 2^2): about 0.87 (> 0.8). The true model is
    sigmoid(0 + d / 10): intercept 0, so the length-controlled win rate should be 1/2. Simulating this
    design 200 times with 1,000 pairs gave a standard deviation of 0.035 for the LC win rate; with
    2,000 pairs (400 prompts x 5) it is about 0.025, so |LC - 0.5| < 0.1 is a 4-sigma check."""
    rng = np.random.default_rng(0)
    base_rows, cand_rows = [], []
    for i in range(1, 401):
        for c in "ABCDE":
            n_base = int(rng.integers(20, 120))
            n_cand = max(1, n_base + int(round(rng.normal(30, 20))))
            base_rows.append((i, c, f"{i}{c}b:" + "x" * n_base))
            cand_rows.append((i, c, f"{i}{c}c:" + "y" * n_cand))
    res = compare_generations(recs(base_rows, "short"), recs(cand_rows, "long"), FunctionJudge(length_only_judge),
                              n_bootstrap=50, seed=0)
    assert res.win_rate > 0.8
    lc = res.length_controlled
    assert abs(lc["win_rate"] - 0.5) < 0.1
    assert lc["slope"] > 1.0  # the judge's length preference shows up in the slope instead
    assert lc["ci"][0] <= lc["win_rate"] <= lc["ci"][1]


def test_mismatches_and_missing_judgements_are_reported_not_counted():
    """The candidate lacks 2-B, adds 3-A and has another prompt text for 1-B: only 1-A and 2-A pair up.
    The judge cannot decide 2-A (e.g. no human label): counts cover 1-A alone."""
    base = recs([(1, "A", "x"), (1, "B", "x"), (2, "A", "x"), (2, "B", "x")], "sft")
    cand = recs([(1, "A", "yy"), (2, "A", "yy"), (3, "A", "yy")], "dpo")
    cand.append({"prompt_id": 1, "prompt": "another prompt", "completion_id": "B", "completion": "y"})

    class PartlyBlind(Judge):
        def judge_pairs(self, prompts, pairs):
            return Judgements(choices=[1] * len(pairs), missing=[k for k, p in enumerate(prompts) if p == "prompt 2"])

    res = compare_generations(base, cand, PartlyBlind(), n_bootstrap=0)
    assert res.unmatched == {"only_in_baseline": ["2-B"], "only_in_candidate": ["3-A"], "prompt_mismatch": ["1-B"]}
    assert [(m["prompt_id"], m["completion_id"]) for m in res.missing] == [(2, "A")]
    assert (res.wins, res.ties, res.losses) == (1, 0, 0) and res.win_rate_ci is None
    assert any("1 pairs were not judged" in n for n in res.notes)
    with pytest.raises(PreftuneError, match="no completion of dpo matches"):
        compare_generations(base, recs([(9, "A", "z")], "dpo"), PartlyBlind())


def test_three_models_ranked_by_bradley_terry():
    """Judge = longer wins; short (1 char) < mid (2) < long (3) on every one of 4 prompts x 2 completions.
    Every pair of models is judged (3 pairs x 8), so long wins 16, mid wins 8 and loses 8, short loses 16."""
    rows = [(i, c) for i in range(1, 5) for c in "AB"]
    models = [recs([(i, c, "s") for i, c in rows], "short"), recs([(i, c, "mm") for i, c in rows], "mid"),
              recs([(i, c, "lll") for i, c in rows], "long")]
    multi = compare_models(models, FunctionJudge(by_length), n_bootstrap=100, seed=0)
    assert [(p.baseline, p.candidate, p.wins) for p in multi.pairs] == [
        ("short", "mid", 8), ("short", "long", 8), ("mid", "long", 8)]
    fit = multi.ranking
    assert fit.names == ["long", "mid", "short"]
    assert (fit.wins, fit.losses) == ([16, 8, 0], [0, 8, 16])
    assert fit.strengths[0] > fit.strengths[1] > fit.strengths[2]
    assert all(lo <= s <= hi for s, lo, hi in zip(fit.strengths, fit.ci_low, fit.ci_high, strict=True))
    assert multi.to_dict()["ranking"]["players"][0]["name"] == "long"


def test_write_report_files(tmp_path):
    res = compare_generations(BASE, CAND, FunctionJudge(by_length), n_bootstrap=100)
    paths = write_report(res, tmp_path / "cmp")
    assert {p.name for p in paths} == {"comparison.json", "comparison.md", "comparison.html", "wtl_dpo_vs_sft.png",
                                       "lengths.png"}
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert data["win_rate"] == res.win_rate and data["wins"] == 2
    assert "| 1 | prompt 1 | W | T | 1 | 1 | 0 |" in (tmp_path / "cmp" / "comparison.md").read_text()
    page = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "<td>prompt 1</td><td>W</td><td>T</td>" in page and "data:image/png;base64," in page
    assert all(p.stat().st_size > 0 for p in paths)


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_generate_then_compare_offline(tiny_model_dir, tmp_path):
    """Two generation runs of the tiny model (4 vs 16 new tokens), compared by a length judge through
    the CLI: every verdict follows len(candidate) vs len(baseline), and the counts add up."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("O, what a noble mind\nLook in thy glass\n")
    runner = CliRunner()
    for name, tokens, seed in (("short", "4", "1"), ("long", "16", "2")):
        result = runner.invoke(app, ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                                     "--num", "3", "--output", str(tmp_path / f"{name}.jsonl"),
                                     "--max-new-tokens", tokens, "--seed", seed])
        assert result.exit_code == 0, result.output
    (tmp_path / "rules.py").write_text("def length(prompt, completion):\n    return len(completion)\n")
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(tmp_path / "short.jsonl"), str(tmp_path / "long.jsonl"),
                                 "--judge", f"function:{tmp_path / 'rules.py'}:length", "--output", str(out),
                                 "--n-bootstrap", "200"])
    assert result.exit_code == 0, result.output
    assert "long vs short" in result.output and "win rate" in result.output
    data = json.loads((out / "comparison.json").read_text())
    assert data["wins"] + data["ties"] + data["losses"] == 6
    for row in data["rows"]:
        diff = len(row["candidate"]) - len(row["baseline"])
        assert row["verdict"] == ("W" if diff > 0 else "L" if diff < 0 else "T")
    assert (out / "comparison.md").exists() and (out / "lengths.png").exists()


def test_cli_compare_three_files_and_errors(tmp_path):
    rows = [(i, c) for i in (1, 2) for c in "AB"]
    files = [_write(tmp_path / f"{n}.jsonl", recs([(i, c, t) for i, c in rows], n))
             for n, t in (("sft", "a"), ("dpo", "aaa"), ("ppo", "aa"))]
    (tmp_path / "rules.py").write_text("def length(prompt, completion):\n    return len(completion)\n")
    judge = f"function:{tmp_path / 'rules.py'}:length"
    runner = CliRunner()
    result = runner.invoke(app, ["compare", *map(str, files), "--judge", judge, "--output", str(tmp_path / "o"),
                                 "--n-bootstrap", "50", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [p["name"] for p in data["ranking"]["players"]] == ["dpo", "ppo", "sft"]
    assert (tmp_path / "o" / "ranking.png").exists()
    one = runner.invoke(app, ["compare", str(files[0]), "--judge", judge, "--output", str(tmp_path / "o")])
    assert one.exit_code == 1 and "at least two" in one.output
    bad = _write(tmp_path / "bad.jsonl", [{"prompt_id": 1, "prompt": "p", "completion": "x"}])
    result = runner.invoke(app, ["compare", str(files[0]), str(bad), "--judge", judge, "--output", str(tmp_path)])
    assert result.exit_code == 1 and "bad.jsonl:1 field 'completion_id'" in result.output
