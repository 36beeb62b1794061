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
    length_controlled_interval,
    length_controlled_win_rate,
    markdown_table,
    summary_lines,
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
    """The fit's arithmetic on tiny inputs (the data-size rule switched off with min_events=0).
    All ties: every target is 1/2, the gradient vanishes at b = 0, so LC = sigmoid(0) = 1/2 exactly.
    Mirror-image data (a win at +d for every loss at -d and vice versa) also gives b0 = 0."""
    lc = length_controlled_win_rate(["T"] * 6, [3, -1, 4, 1, -5, 9], min_events=0)
    assert lc["win_rate"] == pytest.approx(0.5, abs=1e-9) and lc["intercept"] == pytest.approx(0.0, abs=1e-9)
    mirror = length_controlled_win_rate(["W", "L", "W", "L", "L", "W"], [5, -5, -2, 2, 1, -1], min_events=0)
    assert mirror["win_rate"] == pytest.approx(0.5, abs=1e-9)
    same = length_controlled_win_rate(["W", "W", "L"], [0, 0, 0])  # equal lengths: intercept only, no rule
    assert same["slope"] == 0.0 and same["win_rate"] == pytest.approx(2 / 3, abs=1e-3) and same["reason"] is None


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


def _pairs(diffs: list[int], verdicts: str, per_prompt: int = 3) -> tuple[list[dict], list[dict]]:
    """Baseline and candidate records whose k-th pair has length difference diffs[k] (candidate minus
    baseline) and whose scripted verdict is verdicts[k]; per_prompt pairs per prompt."""
    base, cand = [], []
    for k, (d, v) in enumerate(zip(diffs, verdicts, strict=True)):
        i, c = k // per_prompt + 1, "ABCDEFGH"[k % per_prompt]
        base.append({"prompt_id": i, "prompt": f"p{i}", "completion_id": c, "completion": f"{v}{k}:" + "x" * 60})
        cand.append({"prompt_id": i, "prompt": f"p{i}", "completion_id": c, "completion": f"{v}{k}:" + "y" * (60 + d)})
    return base, cand


def scripted(prompt: str, completion: str) -> float:
    """Judge from the verdict written at the start of the text: the candidate (y...) gets 1 for W, 0 for
    L, 0.5 for T; the baseline (x...) always 0.5."""
    return 0.5 if "x" in completion else {"W": 1.0, "L": 0.0, "T": 0.5}[completion[0]]


def test_length_controlled_refuses_the_issues_15_pairs():
    """Issue 11: 15 pairs (5 prompts x 3), W 3 / L 12, the 3 wins being the 3 longest candidates
    (+25, +30, +40 characters). Raw: 3/15 = 0.2. The logistic fit has no finite maximum (the wins are
    separated from the losses by length: slope -> inf, and the boundary at +20 characters pushes b0 ->
    -inf), so the old code reported sigmoid(b0) = 0.000002 with the interval [0.000000, 0.000133]:
    every resample is separated too. Now: "not enough data", with the reason, and no interval."""
    diffs = [-12, 3, 8, -5, 15, 1, 25, -3, 6, 11, 0, 30, -8, 4, 40]
    verdicts = "".join("W" if d >= 20 else "L" for d in diffs)
    res = compare_generations(*_pairs(diffs, verdicts), FunctionJudge(scripted), n_bootstrap=500, seed=0)
    assert (res.wins, res.ties, res.losses) == (3, 0, 12) and res.win_rate == pytest.approx(0.2)
    lc = res.length_controlled
    assert lc["win_rate"] is None and lc["ci"] is None and lc["intercept"] is None
    assert "separated by length: every win at a length difference of +25 or more, every loss at +15 or less" in lc["reason"]
    line = summary_lines(res)[2]
    assert line.startswith("length-controlled win rate: not enough data (the verdicts are separated by length")
    assert json.loads(json.dumps(res.to_dict()))["length_controlled"]["win_rate"] is None


@pytest.mark.parametrize(("diffs", "verdicts", "reason"), [
    ([5, -3, 8, 1, 12, -7] * 5, "W" * 30, "the candidate won every judged pair"),
    ([5, -3, 8, 1, 12, -7] * 5, "L" * 30, "the baseline won every judged pair"),
    ([5, -3, 8, 1, 12, -7], "T" * 6, "too few decisive outcomes (0 wins, 0 losses, 6 ties)"),
    ([7] * 30, "WLWWLT" * 5, "every pair has the same length difference (+7 characters)"),
    (list(range(1, 16)) + list(range(-15, 0)), "W" * 15 + "L" * 15,
     "separated by length: every win at a length difference of +1 or more, every loss at -1 or less"),
    (list(range(-15, 0)) + [0] + list(range(1, 16)), "W" * 15 + "T" + "L" * 15,  # quasi-separation at 0
     "separated by length: every win at a length difference of -1 or less, every loss at +1 or more"),
    ([5, -3, 8, 1, 12, -7, 2, -2, 4, 9], "WLWLWLLWLW", "too few decisive outcomes (5 wins, 5 losses, 0 ties)"),
])
def test_length_controlled_says_not_enough_data(diffs, verdicts, reason):
    """Each input admits no finite fit, or too few outcomes for one (the rarer outcome, a tie counting
    half, must reach 10: Peduzzi et al. 1996): win rate None and the reason, whatever the bootstrap."""
    lc = length_controlled_win_rate(list(verdicts), diffs)
    assert lc["win_rate"] is None and lc["slope"] is None and reason in lc["reason"]
    res = compare_generations(*_pairs(diffs, verdicts), FunctionJudge(scripted), n_bootstrap=100, seed=0)
    assert res.length_controlled["win_rate"] is None and reason in res.length_controlled["reason"]


def test_length_controlled_equal_lengths_is_the_raw_win_rate():
    """All pairs of equal length: nothing to control, the intercept-only fit gives logit^-1(logit(raw))
    = the raw win rate (0.6 here, W 9 / T 0 / L 6 over 15), even with few pairs."""
    res = compare_generations(*_pairs([0] * 15, "WWLWLWWLWLWWLWL"), FunctionJudge(scripted), n_bootstrap=200)
    assert res.win_rate == pytest.approx(0.6)
    assert res.length_controlled["win_rate"] == pytest.approx(0.6, abs=1e-3) and res.length_controlled["slope"] == 0


def test_length_controlled_nearly_separated_has_no_confident_interval():
    """40 pairs (10 prompts x 4): 20 wins at +5..+50 characters, 20 losses at -5..-50 except one loss at
    +10. The fit is finite (one loss overlaps the wins) but rests on that one pair: a resample misses its
    prompt with probability 0.9^10 = 0.35 and is then separated. More than 2.5% degenerate resamples
    -> "not enough data", and the JSON keeps the count."""
    diffs = [5 * k for k in range(1, 11)] * 2 + [-5 * k for k in range(1, 11)] * 2
    diffs[-1] = 10
    verdicts = "W" * 20 + "L" * 20
    assert length_controlled_win_rate(list(verdicts), diffs)["win_rate"] is not None  # the point fit exists
    res = compare_generations(*_pairs(diffs, verdicts, per_prompt=4), FunctionJudge(scripted), n_bootstrap=400)
    lc = res.length_controlled
    assert lc["win_rate"] is None and lc["ci"] is None and "nearly separated" in lc["reason"]
    assert 0.25 * 400 < lc["degenerate_resamples"] < 0.45 * 400


def test_length_controlled_recovers_a_known_intercept_on_large_data():
    """4,000 verdicts drawn from the model itself, P(W) = sigmoid(1 + 1.5 d / s), d ~ N(20, 40^2):
    the length-controlled win rate should be sigmoid(1) = 0.731 (raw: about 0.77). The standard error of
    b0 is about 0.04, i.e. 0.008 on the probability scale; we allow 0.03, and the interval (1,000 prompts
    x 4, no degenerate resample) must cover the truth."""
    rng = np.random.default_rng(0)
    d = rng.normal(20, 40, 4000).round()
    wins = rng.random(4000) < 1 / (1 + np.exp(-(1.0 + 1.5 * d / d.std())))
    verdicts = ["W" if w else "L" for w in wins]
    lc = length_controlled_win_rate(verdicts, d)
    truth = 1 / (1 + math.exp(-1.0))
    assert lc["reason"] is None and lc["win_rate"] == pytest.approx(truth, abs=0.03)
    assert lc["slope"] == pytest.approx(1.5, abs=0.3)
    boot = length_controlled_interval(verdicts, d, [k // 4 for k in range(4000)], scale=lc["scale"],
                                      n_bootstrap=200, seed=0)
    assert boot["degenerate"] == 0 and boot["ci"][0] <= truth <= boot["ci"][1]


def test_fit_logistic_fails_loudly_instead_of_diverging():
    """Without the ridge, separated data make the Hessian singular: an error, not a huge number."""
    with pytest.raises(FloatingPointError):
        fit_logistic([-2, -1, 1, 2], [0, 0, 1, 1], ridge=0.0)


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
    assert any(n.startswith("1 pair was not judged") for n in res.notes)
    assert summary_lines(res)[0].endswith("W 1 / T 0 / L 0 over 1 pair")  # not "1 pairs"
    assert any(n.startswith("3 completions could not be paired and are left out") for n in res.notes)
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
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| 1 | prompt 1 | W | T | 1 | 1 | 0 |" in markdown
    assert ("length-controlled win rate: not enough data (the verdicts are separated by length: every win at a "
            "length difference of +1 or more, every loss at -4 or less (characters)") in markdown  # longer wins, always
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


# ----------------------------------------------------------------------------- several judges (one per group)


def first_half(prompt: str, completion: str) -> float:
    """Prefers a candidate completion ('b...') on prompts 1-3 and the baseline's on prompts 4-6."""
    return float(completion.startswith("b") == (int(prompt.split()[1]) <= 3))


def second_half(prompt: str, completion: str) -> float:
    """The opposite: prefers the candidate on prompts 4-6."""
    return float(completion.startswith("b") == (int(prompt.split()[1]) > 3))


HALVES_BASE = recs([(i, c, "a") for i in range(1, 7) for c in "AB"], "sft")
HALVES_CAND = recs([(i, c, "b") for i in range(1, 7) for c in "AB"], "grpo")


def test_several_judges_each_count_and_the_worst_by_hand():
    """Judges longer (by_length) and shorter (minus the length) on BASE/CAND: longer W2 T1 L1 -> 0.625 (as
    in the first test); shorter sees the mirror image, W1 T1 L2 -> 0.375, the worst. Each judge's result is
    what judging with it alone gives, under its own name."""
    judges = {"longer": FunctionJudge(by_length), "shorter": FunctionJudge(lambda p, c: -len(c))}
    res = compare_generations(BASE, CAND, judges, n_bootstrap=200, seed=0)
    assert list(res.by_judge) == ["longer", "shorter"]
    assert [(r.judge, r.wins, r.ties, r.losses) for r in res.pairs] == [("longer", 2, 1, 1), ("shorter", 1, 1, 2)]
    alone = compare_generations(BASE, CAND, FunctionJudge(by_length), n_bootstrap=200, seed=0)
    assert (res.by_judge["longer"].win_rate, res.by_judge["longer"].win_rate_ci) == (alone.win_rate, alone.win_rate_ci)
    worst = res.worst_judge_win_rate
    assert worst["name"] == "shorter" and worst["win_rate"] == pytest.approx(0.375)
    d = res.to_dict()
    assert d["worst_judge"] == worst and set(d["by_judge"]) == {"longer", "shorter"}
    assert d["by_judge"]["shorter"]["wins"] == 1 and (d["baseline"], d["candidate"]) == ("sft", "dpo")


def test_worst_judge_interval_is_that_of_the_minimum_over_shared_resamples():
    """Two groups that want opposite halves of 6 prompts: each judge's win rate is 0.5, but in a resample
    that draws k of the first 3 prompts' copies the two are k/6 and 1 - k/6, so the minimum is at most
    0.5 in every resample: the worst judge's interval ends at 0.5, while each judge alone reaches above.
    With one judge the worst interval is that judge's own (the very same resamples)."""
    judges = {"first": FunctionJudge(first_half), "second": FunctionJudge(second_half)}
    res = compare_generations(HALVES_BASE, HALVES_CAND, judges, n_bootstrap=500, seed=3)
    assert [r.win_rate for r in res.pairs] == [0.5, 0.5]
    worst = res.worst_judge_win_rate
    assert worst["name"] == "first" and worst["win_rate"] == 0.5       # a tie names the first judge given
    assert worst["ci"][1] <= 0.5 < min(r.win_rate_ci[1] for r in res.pairs)
    assert worst["ci"][0] <= min(r.win_rate_ci[0] for r in res.pairs)
    one = compare_generations(HALVES_BASE, HALVES_CAND, {"first": FunctionJudge(first_half)}, n_bootstrap=500, seed=3)
    assert one.worst_judge_win_rate["ci"] == one.by_judge["first"].win_rate_ci
    with pytest.raises(PreftuneError, match="two files at a time"):
        compare_models([HALVES_BASE, HALVES_CAND, HALVES_CAND], judges)
    with pytest.raises(PreftuneError, match="mapping of non-empty names"):
        compare_generations(HALVES_BASE, HALVES_CAND, {})


def test_several_judges_report_side_by_side(tmp_path):
    """comparison.md and .html hold one table with a row per judge and the worst row; a W/T/L plot per judge."""
    judges = {"first": FunctionJudge(first_half), "second": FunctionJudge(second_half)}
    res = compare_generations(HALVES_BASE, HALVES_CAND, judges, n_bootstrap=100, seed=0)
    paths = write_report(res, tmp_path / "cmp")
    assert {p.name for p in paths} == {"comparison.json", "comparison.md", "comparison.html", "lengths.png",
                                       "wtl_grpo_vs_sft_first.png", "wtl_grpo_vs_sft_second.png"}
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| judge | W | T | L | n | win rate | 95% CI | length-controlled |" in markdown
    assert "| first | 6 | 0 | 6 | 12 | 0.500 |" in markdown and "| second | 6 | 0 | 6 | 12 | 0.500 |" in markdown
    assert "| **worst: first** |  |  |  |  | **0.500** |" in markdown
    assert "## grpo vs sft, judge second" in markdown
    page = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "<td><strong>worst: first</strong></td>" in page
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert data["worst_judge"]["name"] == "first" and data["by_judge"]["second"]["losses"] == 6


def runner_invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def test_cli_compare_several_judges(tmp_path):
    """--judge NAME=SPEC repeated: a table per judge and the judges side by side; comparison.json carries
    by_judge and worst_judge. A plain single --judge keeps the one-judge JSON. Errors: a name twice,
    several judges with three files."""
    base, cand = _write(tmp_path / "sft.jsonl", HALVES_BASE), _write(tmp_path / "grpo.jsonl", HALVES_CAND)
    (tmp_path / "rules.py").write_text(
        "def first(prompt, completion):\n    return float(completion.startswith('b') == (int(prompt.split()[1]) <= 3))\n"
        "def second(prompt, completion):\n    return float(completion.startswith('b') == (int(prompt.split()[1]) > 3))\n")
    rules = tmp_path / "rules.py"
    verse, stage = ["--judge", f"verse=function:{rules}:first"], ["--judge", f"stage=function:{rules}:second"]
    options = ["--n-bootstrap", "100", "--output", str(tmp_path / "o")]
    result = runner_invoke(["compare", str(base), str(cand), *verse, *stage, *options])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "grpo vs sft, judge by judge" in out and "worst judge verse: win rate 0.500" in out
    data = json.loads((tmp_path / "o" / "comparison.json").read_text())
    assert list(data["by_judge"]) == ["verse", "stage"] and data["worst_judge"]["name"] == "verse"
    assert data["judges"]["stage"] == f"function:{rules}:second"
    plain = runner_invoke(["compare", str(base), str(cand), "--judge", f"function:{rules}:first",
                           "--output", str(tmp_path / "p"), "--json", "--n-bootstrap", "50"])
    assert plain.exit_code == 0 and "by_judge" not in json.loads(plain.output)
    assert json.loads(plain.output)["wins"] == 6
    twice = runner_invoke(["compare", str(base), str(cand), *verse, "--judge", f"verse=function:{rules}:second",
                           *options])
    assert twice.exit_code == 1 and "the judge name 'verse' is given twice" in twice.output
    three = runner_invoke(["compare", str(base), str(cand), str(cand), *verse, *stage, *options])
    assert three.exit_code == 1 and "two files at a time" in three.output
