"""preftune.core.prefs: Bradley-Terry tables, MaxMin, Plackett-Luce and Bradley-Terry fits.

Reference values come from tests/data/course_exercise.json (6 decimals); the others are derived by
hand in each test's docstring.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from preftune.core.bt_fit import fit_bradley_terry
from preftune.core.prefs import (
    aggregate,
    bradley_terry_table,
    plackett_luce,
    plackett_luce_top_k,
    sigmoid,
)
from preftune.data.comparisons import read_comparisons
from preftune.data.ratings import read_ratings
from preftune.errors import PreftuneError

ROOT = Path(__file__).resolve().parents[1]
COURSE = json.loads((ROOT / "tests" / "data" / "course_exercise.json").read_text())
EXAMPLES = ROOT / "examples" / "course"


def course_ratings() -> dict[str, dict[str, float]]:
    return {g: dict(zip(COURSE["responses"], row, strict=True)) for g, row in COURSE["ratings"].items()}


# ----------------------------------------------------------------------------- course reference values


@pytest.mark.parametrize("source", ["mapping", "ratings.csv", "ratings.json", "course_exercise.json"])
def test_course_table_matches_reference(source):
    """Every P(y_i > y_j) = sigmoid(r_i - r_j) equals the course file's value (6 decimals, so 1e-6)."""
    if source == "mapping":
        ratings = course_ratings()
    elif source == "course_exercise.json":
        ratings = read_ratings(ROOT / "tests" / "data" / source)
    else:
        ratings = read_ratings(EXAMPLES / source)
    table = bradley_terry_table(ratings)
    expected = COURSE["expected"]
    assert list(table["groups"]) == list(expected["pairwise"])
    for group, pairs in expected["pairwise"].items():
        got = table["groups"][group]["pairwise"]
        assert set(got) == set(pairs)
        for key, value in pairs.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (group, key)
        assert table["groups"][group]["most_preferred"] == expected["most_preferred"][group]
    assert table["groups"]["subpopulation_2"]["most_preferred"] == ["y1", "y3"]


def test_example_files_hold_the_course_ratings():
    """The CSV and JSON examples are the course ratings, read the same way."""
    csv_r, json_r = read_ratings(EXAMPLES / "ratings.csv"), read_ratings(EXAMPLES / "ratings.json")
    assert csv_r.values == json_r.values == course_ratings()
    assert csv_r.responses == ("y1", "y2", "y3")
    assert csv_r.lines["subpopulation_3"] == 4


def test_ordered_pairs_are_complementary():
    """matrix[a][b] = sigmoid(r_a - r_b), so matrix[a][b] + matrix[b][a] = 1; subpopulation_3 has
    r = (3, 1, 0): P(y3 > y1) = sigmoid(-3) = 1 / (1 + e^3) = 0.0474259."""
    table = bradley_terry_table(course_ratings())
    m = table["groups"]["subpopulation_3"]["matrix"]
    assert m["y3"]["y1"] == pytest.approx(1 / (1 + math.e**3), abs=1e-12)
    for a, b in itertools.permutations(["y1", "y2", "y3"], 2):
        assert m[a][b] + m[b][a] == pytest.approx(1.0, abs=1e-12)


def test_ratio_scale_hand_values():
    """Ratio scale P = r_i / (r_i + r_j). strengths.csv: group_a (2, 1, 1) gives 2/3, 2/3, 1/2;
    group_b (1, 3, 4) gives 1/4, 1/5, 3/7; favourites y1 and y3."""
    table = bradley_terry_table(read_ratings(EXAMPLES / "strengths.csv"), scale="ratio")
    a, b = table["groups"]["group_a"], table["groups"]["group_b"]
    assert a["pairwise"] == pytest.approx({"P(y1>y2)": 2 / 3, "P(y1>y3)": 2 / 3, "P(y2>y3)": 1 / 2})
    assert b["pairwise"] == pytest.approx({"P(y1>y2)": 1 / 4, "P(y1>y3)": 1 / 5, "P(y2>y3)": 3 / 7})
    assert a["most_preferred"] == ["y1"] and b["most_preferred"] == ["y3"]


def test_ratio_scale_rejects_non_positive_rating_with_location():
    """The course ratings hold 0 (subpopulation_3, y3, line 4 of the CSV): invalid on the ratio scale."""
    with pytest.raises(PreftuneError) as err:
        bradley_terry_table(read_ratings(EXAMPLES / "ratings.csv"), scale="ratio")
    assert (err.value.path, err.value.line, err.value.field) == (str(EXAMPLES / "ratings.csv"), 4, "y3")
    assert "ratings.csv:4 field 'y3'" in str(err.value) and "> 0" in str(err.value)
    with pytest.raises(PreftuneError, match="unknown scale"):
        bradley_terry_table(course_ratings(), scale="probit")


# ----------------------------------------------------------------------------- MaxMin


def test_course_maxmin_is_y2():
    """min over groups: y1 min(1,2,3,0) = 0, y2 min(1,1,1,2) = 1, y3 min(2,2,0,3) = 0 -> MaxMin y2.
    means: y1 6/4 = 1.5, y2 5/4 = 1.25, y3 7/4 = 1.75 -> utilitarian y3. No group's favourite is y2."""
    res = aggregate(course_ratings())
    assert res["min_rating"] == COURSE["expected"]["maxmin"]["min_rating"]
    assert res["maxmin"] == COURSE["expected"]["maxmin"]["choice"] == ["y2"]
    assert res["mean_rating"] == {"y1": 1.5, "y2": 1.25, "y3": 1.75}
    assert res["utilitarian"] == ["y3"]
    assert res["favourites"] == COURSE["expected"]["most_preferred"]
    assert res["summary"] == ("MaxMin picks y2, whose worst rating over the groups is 1, while the utilitarian "
                              "choice is y3 with the highest mean rating 1.75, although no group ranks the "
                              "MaxMin choice first.")


def test_aggregate_agreement_ties_and_partial_favourites():
    """g1 (a=2, b=1), g2 (a=1, b=0): min a=1 > b=0 and mean a=1.5 > b=0.5, a is both groups' favourite.
    h1 (a=1, b=1, c=0), h2 (a=3, b=1, c=5): min a=1, b=1, c=0 -> MaxMin {a, b} (a tie);
    mean a=2, b=1, c=2.5 -> utilitarian c; favourites h1 {a, b}, h2 {c}, so h2 is not served."""
    agree = aggregate({"g1": {"a": 2, "b": 1}, "g2": {"a": 1, "b": 0}})
    assert agree["maxmin"] == agree["utilitarian"] == ["a"]
    assert "agree on a" in agree["summary"] and "every group" in agree["summary"]
    split = aggregate({"h1": {"a": 1, "b": 1, "c": 0}, "h2": {"a": 3, "b": 1, "c": 5}})
    assert split["maxmin"] == ["a", "b"] and split["utilitarian"] == ["c"]
    assert split["favourites"] == {"h1": ["a", "b"], "h2": ["c"]}
    assert split["summary"].endswith("not the favourite of h2.")
    assert "MaxMin picks a and b" in split["summary"]


# ----------------------------------------------------------------------------- Plackett-Luce


def test_plackett_luce_two_responses_is_sigmoid():
    """Rewards (1, 0): P(first = y1) = e / (e + 1) = sigmoid(1) = 0.7310586 = P(y1 > y2)."""
    res = plackett_luce({"y1": 1.0, "y2": 0.0})
    assert res["ranking"] == ["y1", "y2"]
    assert res["first_place"]["y1"] == pytest.approx(sigmoid(1.0), abs=1e-12)
    assert res["first_place"]["y1"] == pytest.approx(0.7310585786, abs=1e-9)
    assert res["probability"] == pytest.approx(sigmoid(1.0), abs=1e-12)


def test_plackett_luce_three_responses_hand_values():
    """Rewards y1=1, y2=0.5, y3=-1; Z = e + e^0.5 + e^-1 = 2.718282 + 1.648721 + 0.367879 = 4.734882.
    P(first) = (0.574097, 0.348207, 0.077696).
    P(y1 > y3 > y2) = e/Z * e^-1/(e^0.5 + e^-1) = 0.574097 * 0.367879/2.016600 = 0.104730.
    All 6 rankings sum to 1."""
    rewards = {"y1": 1.0, "y2": 0.5, "y3": -1.0}
    res = plackett_luce(rewards, ["y1", "y3", "y2"])
    z = math.e + math.exp(0.5) + math.exp(-1)
    assert res["first_place"] == pytest.approx({"y1": math.e / z, "y2": math.exp(0.5) / z, "y3": math.exp(-1) / z})
    assert res["first_place"]["y1"] == pytest.approx(0.574097, abs=1e-6)
    assert res["probability"] == pytest.approx(0.104730, abs=1e-6)
    assert res["log_probability"] == pytest.approx(math.log(res["probability"]), abs=1e-12)
    total = sum(plackett_luce(rewards, list(p))["probability"] for p in itertools.permutations(rewards))
    assert total == pytest.approx(1.0, abs=1e-12)
    assert plackett_luce(rewards)["ranking"] == ["y1", "y2", "y3"]
    # a partial ranking: the probability that y2 takes the first place
    assert plackett_luce(rewards, ["y2"])["probability"] == pytest.approx(res["first_place"]["y2"])


def test_plackett_luce_top_k():
    """Equal rewards over 3 responses: each is in the top 2 with probability 2/3. In general the top-k
    marginals sum to k, k = 1 is softmax, k = n is 1 for all. For rewards (1, 0.5, -1), P(y3 in top 2)
    = P(y3 first) + sum_{y != y3} P(y first) * P(y3 first among the rest)
    = 0.077696 + 0.574097 * e^-1/(e^0.5 + e^-1) + 0.348207 * e^-1/(e + e^-1) = 0.223933."""
    assert plackett_luce_top_k({"a": 0.0, "b": 0.0, "c": 0.0}, 2) == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 2 / 3})
    rewards = {"y1": 1.0, "y2": 0.5, "y3": -1.0}
    res = plackett_luce(rewards, top_k=2)
    assert res["top_k_probability"]["y3"] == pytest.approx(0.223933, abs=1e-6)
    assert sum(res["top_k_probability"].values()) == pytest.approx(2.0)
    assert plackett_luce_top_k(rewards, 1) == pytest.approx(res["first_place"])
    assert plackett_luce_top_k(rewards, 3) == pytest.approx({"y1": 1.0, "y2": 1.0, "y3": 1.0})
    with pytest.raises(PreftuneError, match="between 1 and 3"):
        plackett_luce_top_k(rewards, 4)


def test_plackett_luce_agrees_with_torch_losses():
    """prefs (math) and preftune.core.losses (torch) implement the same formula independently."""
    losses = pytest.importorskip("preftune.core.reward_losses")
    import torch

    rng = np.random.default_rng(3)
    r = rng.normal(size=5)
    rewards = {f"y{i}": float(v) for i, v in enumerate(r)}
    order = list(rng.permutation(5))
    res = plackett_luce(rewards, [f"y{i}" for i in order])
    ref = losses.plackett_luce_logprob(torch.tensor(r[order], dtype=torch.float64))
    assert res["log_probability"] == pytest.approx(float(ref), abs=1e-12)
    first = losses.first_place_probabilities(torch.tensor(r, dtype=torch.float64))
    assert list(res["first_place"].values()) == pytest.approx(first.tolist(), abs=1e-12)


def test_plackett_luce_errors():
    with pytest.raises(PreftuneError, match="'y9' in the ranking has no reward"):
        plackett_luce({"y1": 1.0, "y2": 0.0}, ["y1", "y9"])
    with pytest.raises(PreftuneError, match="twice"):
        plackett_luce({"y1": 1.0, "y2": 0.0}, ["y1", "y1"])
    with pytest.raises(PreftuneError, match="at least two"):
        plackett_luce({"y1": 1.0})


# ----------------------------------------------------------------------------- Bradley-Terry fit


def sample_bt(strengths: dict[str, float], n: int, *, seed: int) -> list[tuple[str, str, str]]:
    """n comparisons of uniformly drawn pairs; a wins with probability sigmoid(t_a - t_b)."""
    rng = np.random.default_rng(seed)
    names = list(strengths)
    out = []
    for _ in range(n):
        i, j = rng.choice(len(names), size=2, replace=False)
        a, b = names[i], names[j]
        out.append((a, b, a if rng.random() < sigmoid(strengths[a] - strengths[b]) else b))
    return out


def test_fit_recovers_known_strengths():
    """True log-strengths (1, 0, -1) (mean 0), 3000 comparisons: each player plays ~2000 games with
    p(1-p) ~ 0.2, so the Fisher information is ~400 per player and the standard error ~ 1/sqrt(400)
    = 0.05 (the bootstrap agrees: intervals about +-0.07). A tolerance of 0.15 is 3 standard errors.
    The 95% intervals contain the truth, and the ranking is strongest first."""
    truth = {"A": 1.0, "B": 0.0, "C": -1.0}
    fit = fit_bradley_terry(sample_bt(truth, 3000, seed=0), n_bootstrap=300, seed=1)
    assert fit.names == ["A", "B", "C"]
    assert fit.n_comparisons == 3000
    for name, low, high in zip(fit.names, fit.ci_low, fit.ci_high, strict=True):
        assert fit.strength(name) == pytest.approx(truth[name], abs=0.15)
        assert low <= truth[name] <= high, (name, low, high)
        assert high - low < 0.4
    assert sum(fit.strengths) == pytest.approx(0.0, abs=1e-9)
    assert fit.probability("A", "C") == pytest.approx(sigmoid(fit.strength("A") - fit.strength("C")))
    assert sum(fit.wins) + sum(fit.ties) / 2 == pytest.approx(3000)
    assert sum(fit.wins) == sum(fit.losses)


def test_fit_two_players_closed_form():
    """a beats b 7 times of 10: the MLE solves 10 * sigmoid(d) = 7, so d = t_a - t_b = log(7/3) and,
    with mean 0, t_a = log(7/3)/2 = 0.423649. prior = 1e-9 moves this by ~1e-10."""
    comps = [("a", "b", "a")] * 7 + [("b", "a", "b")] * 3
    fit = fit_bradley_terry(comps, n_bootstrap=0, prior=1e-9)
    assert fit.names == ["a", "b"]
    assert fit.strengths == pytest.approx([math.log(7 / 3) / 2, -math.log(7 / 3) / 2], abs=1e-7)
    assert (fit.wins, fit.ties, fit.losses) == ([7, 3], [0, 0], [3, 7])
    assert fit.ci_low is None and fit.to_dict()["players"][0]["ci_low"] is None


def test_fit_ties_count_half():
    """One win of a and one tie: a scores 1.5 of 2, so sigmoid(d) = 3/4 and d = log 3, exactly as
    3 wins of a and 1 of b (the likelihood is the same up to a power of 2). Counts: a 1 win 1 tie,
    b 1 tie 1 loss. Only ties: strengths 0."""
    with_tie = fit_bradley_terry([("a", "b", "a"), ("a", "b", "tie")], n_bootstrap=0, prior=1e-9)
    assert with_tie.strength("a") - with_tie.strength("b") == pytest.approx(math.log(3), abs=1e-6)
    as_wins = fit_bradley_terry([("a", "b", "a")] * 3 + [("a", "b", "b")], n_bootstrap=0, prior=1e-9)
    assert with_tie.strengths == pytest.approx(as_wins.strengths, abs=1e-6)
    assert (with_tie.wins, with_tie.ties, with_tie.losses) == ([1, 0], [1, 1], [0, 1])
    only_ties = fit_bradley_terry([("a", "b", "tie")] * 4, n_bootstrap=0)
    assert only_ties.strengths == pytest.approx([0.0, 0.0], abs=1e-12)


def test_never_losing_player_is_finite_and_optimal():
    """a beats b 5 times, b beats c 5 times: the unpenalised MLE is infinite. With prior 0.01 the
    estimate is finite, strictly ordered, and the penalised gradient
    g_i = sum_c (s_ic - sigmoid(t_i - t_opp)) - prior * t_i vanishes at the returned strengths."""
    comps = [("a", "b", "a")] * 5 + [("b", "c", "b")] * 5
    fit = fit_bradley_terry(comps, n_bootstrap=50, prior=0.01)
    t = dict(zip(fit.names, fit.strengths, strict=True))
    assert fit.names == ["a", "b", "c"] and all(math.isfinite(v) for v in fit.strengths)
    assert 2.0 < t["a"] < 20.0
    grad_a = 5 * (1 - sigmoid(t["a"] - t["b"])) - 0.01 * t["a"]
    grad_b = 5 * (0 - sigmoid(t["b"] - t["a"])) + 5 * (1 - sigmoid(t["b"] - t["c"])) - 0.01 * t["b"]
    assert grad_a == pytest.approx(0.0, abs=1e-8) and grad_b == pytest.approx(0.0, abs=1e-8)
    assert all(math.isfinite(v) for v in fit.ci_low + fit.ci_high)
    stronger = fit_bradley_terry(comps, n_bootstrap=0, prior=0.001)
    assert stronger.strength("a") > t["a"]  # a weaker penalty lets the unbeaten player drift further


def test_fit_bootstrap_is_seeded():
    comps = sample_bt({"x": 0.5, "y": 0.0, "z": -0.5}, 200, seed=5)
    one, two = (fit_bradley_terry(comps, n_bootstrap=100, seed=7) for _ in range(2))
    other = fit_bradley_terry(comps, n_bootstrap=100, seed=8)
    assert one.to_dict() == two.to_dict()
    assert one.ci_low != other.ci_low
    assert one.strengths == other.strengths
    assert one.elo()[0] == pytest.approx(1000 + 400 / math.log(10) * one.strengths[0])


@pytest.mark.parametrize(
    ("comps", "match", "field"),
    [
        ([("a", "b", "c")], "winner 'c' is neither a", "winner"),
        ([("a", "a", "a")], "compared with itself", "b"),
        ([("a", "", "a")], "'b' must be a non-empty name", "b"),
        ([("tie", "b", "b")], "reserved", "a"),
    ],
)
def test_fit_rejects_bad_comparisons(comps, match, field):
    with pytest.raises(PreftuneError, match=match) as err:
        fit_bradley_terry(comps, n_bootstrap=0)
    assert err.value.field == field
    with pytest.raises(PreftuneError, match="no comparisons"):
        fit_bradley_terry([], n_bootstrap=0)


# ----------------------------------------------------------------------------- file errors


def _expect_error(tmp_path, name, text, reader, *, line, field, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PreftuneError, match=match) as err:
        reader(path)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), line, field)
    where = f"{path}:{line}" + (f" field '{field}'" if field else "")
    assert str(err.value).startswith(where + ": ")
    return err.value


@pytest.mark.parametrize(
    ("name", "text", "line", "field", "match"),
    [
        ("r.csv", "", 1, None, "empty"),
        ("r.csv", "\n  \n", 1, None, "empty"),
        ("r.csv", "g1,1,2,3\ng2,0,1,2\n", 1, None, "missing header"),
        ("r.csv", "group,y1\ng1,1\n", 1, None, "missing header"),
        ("r.csv", "group,y1,y2\n", 1, None, "no rating rows"),
        ("r.csv", "group,y1,y2\ng1,1,2\ng2,1,abc\n", 3, "y2", "'abc' for group|'abc' is not a number"),
        ("r.csv", "group,y1,y2\ng1,1,nan\n", 2, "y2", "not finite"),
        ("r.csv", "group,y1,y2,y3\ng1,1,2,3\ng2,1,2\n", 3, "group", "2 ratings but the header names 3"),
        ("r.csv", "group,y1,y2\ng1,1,2\ng1,2,1\n", 3, "group", "duplicate group 'g1' \\(first on line 2\\)"),
        ("r.csv", "group,y1,y1\ng1,1,2\n", 1, "y1", "duplicate response name 'y1'"),
        ("r.json", '{"g1": {"y1": 1, "y2": "high"}}', 1, "y2", "'high' for group 'g1' is not a number"),
        ("r.json", '{\n "g1": {"y1": 1, "y2": 2},\n "g2": {"y1": 1, "y3": 2}\n}', 3, "g2", "same responses"),
        ("r.json", '{\n "g1": {"y1": 1, "y2": 2},\n "g1": {"y1": 2, "y2": 1}\n}', 3, "g1", "duplicate name 'g1'"),
        ("r.json", '{\n "g1": {"y1": 1, "y2": 2,\n}', 3, None, "malformed JSON"),
        ("r.json", "  ", 1, None, "empty"),
        ("r.json", '{\n "g1": {"y1": true, "y2": 2}\n}', 2, "y1", "not a number"),
        ("r.json", '{"responses": ["y1", "y2"], "ratings": {"g1": [1, 2, 3]}}', 1, "g1", "list of 2"),
    ],
)
def test_ratings_errors_name_file_line_field(tmp_path, name, text, line, field, match):
    _expect_error(tmp_path, name, text, read_ratings, line=line, field=field, match=match)


@pytest.mark.parametrize(
    ("name", "text", "line", "field", "match"),
    [
        ("c.csv", "a,b,winner\nx,y,x\nx,y,z\n", 3, "winner", "winner 'z' is neither a \\('x'\\), b \\('y'\\)"),
        ("c.csv", "a,b,result\nx,y,x\n", 1, "winner", "missing column 'winner'"),
        ("c.csv", "a,b,winner\nx,y\n", 2, "winner", "missing 'winner'"),
        ("c.csv", "a,b,winner\nx,x,x\n", 2, "b", "itself"),
        ("c.csv", "", 1, None, "empty"),
        ("c.csv", "a,b,winner\n\n", 1, None, "no comparisons"),
        ("c.jsonl", '{"a": "x", "b": "y", "winner": "x"}\n{"a": "x", "b": "y"}\n', 2, "winner", "missing 'winner'"),
        ("c.jsonl", '{"a": "x", "b": "y", "winner": "x"}\n\n{"a": "x", "b": \n', 3, None, "malformed JSON"),
        ("c.jsonl", '["x", "y", "x"]\n', 1, None, "expected a JSON object"),
    ],
)
def test_comparisons_errors_name_file_line_field(tmp_path, name, text, line, field, match):
    _expect_error(tmp_path, name, text, read_comparisons, line=line, field=field, match=match)


def test_read_comparisons_formats(tmp_path):
    """CSV (extra columns ignored, 'Tie' accepted) and JSONL read to the same triples."""
    csv_path, jsonl_path = tmp_path / "c.csv", tmp_path / "c.jsonl"
    csv_path.write_text("prompt,a,b,winner\np1,x,y,x\np2, y ,x,Tie\n")
    jsonl_path.write_text('{"a": "x", "b": "y", "winner": "x"}\n\n{"a": "y", "b": "x", "winner": "tie"}\n')
    assert read_comparisons(csv_path) == read_comparisons(jsonl_path) == [("x", "y", "x"), ("y", "x", "tie")]
    example = read_comparisons(EXAMPLES / "comparisons.csv")
    assert len(example) == 60 and {w for _, _, w in example} >= {"tie"}


def test_json_errors_point_at_the_rating_line(tmp_path):
    """In examples/course/ratings.json subpopulation_3 opens on line 12 and its y3 (0) is on line 15;
    a string rating on its own line is reported on that line."""
    with pytest.raises(PreftuneError) as err:
        bradley_terry_table(read_ratings(EXAMPLES / "ratings.json"), scale="ratio")
    assert (err.value.line, err.value.field) == (15, "y3")
    path = tmp_path / "r.json"
    path.write_text('{\n  "g1": {\n    "y1": 1,\n    "y2": "two"\n  }\n}\n')
    with pytest.raises(PreftuneError) as err:
        read_ratings(path)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 4, "y2")
