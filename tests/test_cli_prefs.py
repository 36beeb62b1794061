"""`preftune prefs ...` through typer's runner, on the course example files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.core.bt_fit import fit_bradley_terry
from preftune.data.comparisons import read_comparisons

ROOT = Path(__file__).resolve().parents[1]
COURSE = json.loads((ROOT / "tests" / "data" / "course_exercise.json").read_text())
EXAMPLES = ROOT / "examples" / "course"
runner = CliRunner()


def run(*args: str, code: int = 0):
    result = runner.invoke(app, ["prefs", *args])
    assert result.exit_code == code, result.output
    return result


def run_json(*args: str):
    return json.loads(run(*args, "--json").stdout)


@pytest.mark.parametrize("ratings", ["ratings.csv", "ratings.json"])
def test_table_json_matches_course(ratings):
    """--json prints unrounded sigmoid(r_i - r_j); the course file holds them to 6 decimals."""
    out = run_json("table", str(EXAMPLES / ratings))
    assert out["scale"] == "logit"
    for group, pairs in COURSE["expected"]["pairwise"].items():
        for key, value in pairs.items():
            assert out["groups"][group]["pairwise"][key] == pytest.approx(value, abs=1e-6)
        assert out["groups"][group]["most_preferred"] == COURSE["expected"]["most_preferred"][group]
    assert out["groups"]["subpopulation_2"]["most_preferred"] == ["y1", "y3"]
    # unrounded: sigmoid(-1) to full precision, not 0.268941
    assert out["groups"]["subpopulation_1"]["pairwise"]["P(y1>y3)"] == pytest.approx(1 / (1 + math.e), abs=1e-15)


def test_table_text_rounds_to_six_decimals():
    text = run("table", str(EXAMPLES / "ratings.csv")).stdout
    for value in ("0.268941", "0.731059", "0.952574", "0.047426", "0.500000"):
        assert value in text
    assert "y1, y3" in text and "sigmoid(r_i - r_j)" in text


def test_table_ratio_scale():
    """strengths.csv group_a (2, 1, 1): P(y1>y2) = 2/3; group_b (1, 3, 4): P(y2>y3) = 3/7 = 0.428571."""
    out = run_json("table", str(EXAMPLES / "strengths.csv"), "--scale", "ratio")
    assert out["groups"]["group_a"]["pairwise"]["P(y1>y2)"] == pytest.approx(2 / 3, abs=1e-15)
    assert "0.428571" in run("table", str(EXAMPLES / "strengths.csv"), "--scale", "ratio").stdout


def test_table_matrix_layout_for_many_responses(tmp_path):
    """With 4 responses (6 pairs) the wide table is used; with 5 (10 pairs) one matrix per group.
    g: r = (0, 1, 2, 3, 4), so P(y5 > y1) = sigmoid(4) = 0.982014."""
    path = tmp_path / "five.csv"
    path.write_text("group,y1,y2,y3,y4,y5\ng,0,1,2,3,4\n")
    text = run("table", str(path)).stdout
    assert "P(row > column)" in text and "most preferred: y5" in text and "0.982014" in text


def test_aggregate_names_y2():
    out = run_json("aggregate", str(EXAMPLES / "ratings.csv"))
    assert out["maxmin"] == ["y2"]
    assert out["min_rating"] == {"y1": 0, "y2": 1, "y3": 0}
    assert out["utilitarian"] == ["y3"]
    assert out["favourites"] == COURSE["expected"]["most_preferred"]
    text = run("aggregate", str(EXAMPLES / "ratings.csv")).stdout
    assert "MaxMin: y2" in text and "utilitarian: y3" in text
    assert "no group ranks the MaxMin choice first" in " ".join(text.split())


def test_rank_two_rewards_is_sigmoid():
    """Rewards y1=1, y2=0: P(first = y1) = sigmoid(1) = 0.731059, and P(y1 > y2) is the same."""
    out = run_json("rank", "--rewards", "y1=1,y2=0")
    assert out["first_place"]["y1"] == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-15)
    assert out["ranking"] == ["y1", "y2"] and out["probability"] == pytest.approx(out["first_place"]["y1"])


def test_rank_with_ranking_top_k_and_text():
    """y1=1, y2=0.5, y3=-1, ranking y1 > y3 > y2: 0.574097 * e^-1 / (e^0.5 + e^-1) = 0.104730."""
    out = run_json("rank", "--rewards", "y1=1.0,y2=0.5,y3=-1", "--ranking", "y1,y3,y2", "--top-k", "2")
    assert out["probability"] == pytest.approx(0.104730, abs=1e-6)
    assert sum(out["top_k_probability"].values()) == pytest.approx(2.0)
    text = run("rank", "--rewards", "y1=1.0,y2=0.5,y3=-1", "--ranking", "y1,y3,y2").stdout
    assert "P(y1 > y3 > y2) = 0.104730" in text and "0.574097" in text


@pytest.mark.parametrize(("name", "text"), [("r.json", '{"y1": 1, "y2": 0}'), ("r.csv", "y1,1\n\ny2=0\n")])
def test_rank_rewards_from_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    out = run_json("rank", "--rewards", str(path))
    assert out["rewards"] == {"y1": 1.0, "y2": 0.0}
    assert out["first_place"]["y1"] == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-15)


def test_fit_json_equals_library_and_counts_add_up():
    """The CLI prints the library's fit; every comparison gives its two players one result each."""
    path = EXAMPLES / "comparisons.csv"
    out = run_json("fit", str(path), "--bootstrap", "200", "--seed", "3")
    lib = fit_bradley_terry(read_comparisons(path), n_bootstrap=200, seed=3)
    assert out == json.loads(json.dumps(lib.to_dict()))
    players = out["players"]
    assert [p["rank"] for p in players] == [1, 2, 3, 4]
    assert [p["strength"] for p in players] == sorted((p["strength"] for p in players), reverse=True)
    assert sum(p["wins"] + p["ties"] + p["losses"] for p in players) == 2 * out["n_comparisons"] == 120
    assert all(p["ci_low"] <= p["strength"] <= p["ci_high"] for p in players)


def test_fit_text():
    text = run("fit", str(EXAMPLES / "comparisons.csv"), "--bootstrap", "50", "--elo").stdout
    assert "Bradley-Terry fit of 60 comparisons" in text and "97.5%" in text and "Elo" in text
    assert "50 bootstrap resamples" in " ".join(text.split())
    assert "95%" not in run("fit", str(EXAMPLES / "comparisons.csv"), "--bootstrap", "0").stdout


@pytest.mark.parametrize(
    ("args", "file_text", "expected"),
    [
        (["table", "{path}"], "group,y1,y2\ng1,1,x\n", "{path}:2 field 'y2': rating 'x' is not a number"),
        (["table", "{path}", "--scale", "ratio"], "group,y1,y2\ng1,1,0\n", "{path}:2 field 'y2': rating 0"),
        (["aggregate", "{path}"], "group,y1,y2\ng1,1,2\ng1,1,2\n", "{path}:3 field 'group': duplicate group"),
        (["fit", "{path}"], "a,b,winner\nx,y,w\n", "{path}:2 field 'winner': comparison: winner 'w'"),
        (["rank", "--rewards", "{path}"], "y1,1\ny2,high\n", "{path}:2 field 'y2': reward 'high'"),
        (["rank", "--rewards", "y1=1,y2"], None, "field '--rewards': 'y2' is not name=reward"),
        (["rank", "--rewards", "y1=1,y2=0", "--ranking", "y1,y4"], None, "'y4' in the ranking has no reward"),
        (["table", "{path}", "--scale", "probit"], "group,y1,y2\ng1,1,2\n", "unknown scale 'probit'"),
        (["table", "{missing}"], None, "{missing}: file not found"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, args, file_text, expected):
    path, missing = tmp_path / "in.csv", tmp_path / "nope.csv"
    if file_text is not None:
        path.write_text(file_text)
    result = run(*(a.format(path=path, missing=missing) for a in args), code=1)
    stderr = " ".join(result.stderr.split())
    assert expected.format(path=path, missing=missing) in stderr
    assert "Traceback" not in result.output


def test_prefs_lists_every_subcommand():
    text = run("--help").stdout
    for name in ("table", "aggregate", "rank", "fit", "loss"):
        assert name in text
