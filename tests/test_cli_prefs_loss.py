"""`preftune prefs loss` through typer's CliRunner, against the course values and hand-derived ones.

Course example: pi(y_w)=0.2, pi(y_l)=0.3, pi_ref(y_w)=0.2, pi_ref(y_l)=0.4, beta=2. Then
log pi/pi_ref(y_w) = 0 and log pi/pi_ref(y_l) = log 0.75, so h = log(4/3) = 0.287682,
r_w = 0, r_l = 2 log 0.75 = -0.575364, e^(r_w - r_l) = (4/3)^2 = 16/9, and
loss = log(1 + 9/16) = 0.446287, gradient weight sigmoid(r_l - r_w) = 1/(1 + 16/9) = 9/25 = 0.36.
With pi_ref(y_l) = 0.2: r_l = 2 log 1.5, loss = log(1 + 2.25) = 1.178655.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from preftune.cli import app
from preftune.cli.prefs_loss import loss_app

COURSE = json.loads((Path(__file__).parent / "data" / "course_exercise.json").read_text())["expected"]
DPO_ARGS = ["--policy-chosen", "0.2", "--policy-rejected", "0.3", "--ref-chosen", "0.2", "--ref-rejected", "0.4",
            "--beta", "2"]
runner = CliRunner()


def run(*args: str, ok: bool = True):
    result = runner.invoke(app, ["prefs", "loss", *args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def run_json(*args: str) -> dict:
    return json.loads(run(*args, "--json").stdout)


def test_reward_course_value():
    """-log sigmoid(0.5 - 0.8) = log(1 + e^0.3) = 0.854355; P(y_w > y_l) = sigmoid(-0.3) = 0.425557."""
    inputs = COURSE["reward_loss"]["inputs"]
    data = run_json("reward", "--chosen", str(inputs["r_chosen"]), "--rejected", str(inputs["r_rejected"]))
    assert data["loss"] == pytest.approx(COURSE["reward_loss"]["loss"], abs=5e-7)
    assert data["loss"] == pytest.approx(math.log1p(math.exp(0.3)), abs=1e-12)
    assert data["p_chosen_preferred"] == pytest.approx(1 / (1 + math.exp(0.3)), abs=1e-12)
    text = run("reward", "--chosen", "0.5", "--rejected", "0.8").stdout
    assert "0.854355" in text and "0.425557" in text


def test_reward_margin():
    """r_w = 1, r_l = 0, margin 1: -log sigmoid(0) = log 2."""
    data = run_json("reward", "--chosen", "1", "--rejected", "0", "--margin", "1")
    assert data["loss"] == pytest.approx(math.log(2), abs=1e-12)
    assert data["inputs"]["margin"] == 1.0


def test_dpo_course_values_json():
    data = run_json("dpo", *DPO_ARGS)
    e = COURSE["dpo_loss"]
    assert data["loss"] == pytest.approx(e["loss"], abs=5e-7)
    assert data["loss"] == pytest.approx(math.log(1 + 9 / 16), abs=1e-12)
    assert data["reward_chosen"] == pytest.approx(e["implicit_reward_chosen"], abs=5e-7)
    assert data["reward_rejected"] == pytest.approx(e["implicit_reward_rejected"], abs=5e-7)
    assert data["margin"] == pytest.approx(-2 * math.log(0.75), abs=1e-12)
    assert data["gradient_weight"] == pytest.approx(0.36, abs=1e-12)
    assert data["h"] == pytest.approx(math.log(4 / 3), abs=1e-12)
    args = [*DPO_ARGS]
    args[args.index("--ref-rejected") + 1] = "0.2"
    modified = run_json("dpo", *args)
    assert modified["loss"] == pytest.approx(COURSE["dpo_loss_modified"]["loss"], abs=5e-7)
    assert modified["loss"] == pytest.approx(math.log(3.25), abs=1e-12)


def test_dpo_text_output_has_six_decimals():
    text = run("dpo", *DPO_ARGS).stdout
    for value in ("0.446287", "-0.575364", "0.360000", "0.575364"):
        assert value in text


def test_dpo_log_inputs_match_probabilities():
    """--log with log(0.2), log(0.3), log(0.2), log(0.4) gives the course loss 0.446287."""
    logs = [repr(math.log(p)) for p in (0.2, 0.3, 0.2, 0.4)]
    data = run_json("dpo", "--policy-chosen", logs[0], "--policy-rejected", logs[1], "--ref-chosen", logs[2],
                    "--ref-rejected", logs[3], "--beta", "2", "--log")
    assert data["loss"] == pytest.approx(math.log(1 + 9 / 16), abs=1e-12)
    assert data["inputs"]["log"] is True


def test_ipo_and_cdpo_parts():
    """IPO, beta 2: target 1/4, loss (log(4/3) - 1/4)^2 = 0.001420.
    cDPO, eps 0.1: 0.9 * a + 0.1 * (a + beta h) with a = 0.446287, beta h = 0.575364 -> 0.503824."""
    ipo = run_json("ipo", *DPO_ARGS)
    assert ipo["target"] == 0.25
    assert ipo["loss"] == pytest.approx((math.log(4 / 3) - 0.25) ** 2, abs=1e-12)
    cdpo = run_json("cdpo", *DPO_ARGS, "--label-smoothing", "0.1")
    a = math.log(1 + 9 / 16)
    assert cdpo["dpo_term"] == pytest.approx(a, abs=1e-12)
    assert cdpo["flipped_term"] == pytest.approx(a + 2 * math.log(4 / 3), abs=1e-12)
    assert cdpo["loss"] == pytest.approx(a + 0.1 * 2 * math.log(4 / 3), abs=1e-12)
    assert run_json("cdpo", *DPO_ARGS, "--label-smoothing", "0")["loss"] == pytest.approx(a, abs=1e-12)


def test_orpo_per_token_and_sequence_inputs_agree():
    """Per-token probabilities 1/2 and 1/3: loss = log 2 + 0.1 log 1.5 = 0.733694 (odds 1 and 1/2).
    The same per-token numbers as sequences: 0.25 over 2 tokens and 1/27 over 3 tokens."""
    want = math.log(2) + 0.1 * math.log(1.5)
    a = run_json("orpo", "--policy-chosen", "0.5", "--policy-rejected", repr(1 / 3))
    b = run_json("orpo", "--policy-chosen", "0.25", "--chosen-length", "2", "--policy-rejected", repr(1 / 27),
                 "--rejected-length", "3")
    for data in (a, b):
        assert data["loss"] == pytest.approx(want, abs=1e-12)
        assert data["log_odds_chosen"] == pytest.approx(0.0, abs=1e-12)
        assert data["log_odds_ratio"] == pytest.approx(math.log(2), abs=1e-12)
        assert data["odds_ratio_loss"] == pytest.approx(math.log(1.5), abs=1e-12)
    assert "0.733694" in run("orpo", "--policy-chosen", "0.5", "--policy-rejected", repr(1 / 3)).stdout


def test_simpo():
    """beta 2, gamma 0.5, per-token 1/2 vs 1/3: loss = log(1 + (4/9) e^0.5) = 0.549718."""
    data = run_json("simpo", "--policy-chosen", "0.5", "--policy-rejected", repr(1 / 3), "--gamma", "0.5")
    assert data["loss"] == pytest.approx(math.log(1 + 4 / 9 * math.exp(0.5)), abs=1e-12)
    assert data["margin_minus_gamma"] == pytest.approx(2 * math.log(1.5) - 0.5, abs=1e-12)


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_beta_sweep_writes_png_with_both_curves(tmp_path):
    """Betas 1, 2, 3. At beta 2 the two curves hold the course values 0.446287 (pi_ref(y_l)=0.4) and
    1.178655 (0.2). h > 0 for the first so the loss falls with beta; h < 0 for the second so it rises."""
    plot = tmp_path / "plots" / "sweep.png"
    args = [a for a in DPO_ARGS if a not in ("--beta", "2")]
    data = run_json("dpo", *args, "--beta-sweep", "1:3:3", "--compare-ref-rejected", "0.2", "--plot", str(plot))
    width, height = _png_size(plot)
    assert width > 300 and height > 200
    assert data["beta"] == pytest.approx([1.0, 2.0, 3.0])
    assert data["losses"][1] == pytest.approx(COURSE["dpo_loss"]["loss"], abs=5e-7)
    assert data["compare"]["ref_rejected"] == 0.2
    assert data["compare"]["losses"][1] == pytest.approx(COURSE["dpo_loss_modified"]["loss"], abs=5e-7)
    assert data["losses"][0] > data["losses"][1] > data["losses"][2]
    assert data["compare"]["losses"][0] < data["compare"]["losses"][1] < data["compare"]["losses"][2]
    assert data["plot"] == str(plot)


def test_beta_sweep_text_and_ipo(tmp_path):
    """IPO loss at beta = 1/(2h) is 0: with h = log(4/3) that is beta = 1.738049."""
    plot = tmp_path / "ipo.png"
    beta_star = 1 / (2 * math.log(4 / 3))
    args = [a for a in DPO_ARGS if a not in ("--beta", "2")]
    data = run_json("ipo", *args, "--beta-sweep", f"{beta_star}:{beta_star + 1}:2", "--plot", str(plot))
    assert data["losses"][0] == pytest.approx(0.0, abs=1e-20)
    assert data["compare"] is None
    _png_size(plot)
    text = run("dpo", *args, "--beta-sweep", "0.5:1:2", "--plot", str(tmp_path / "t.png")).stdout
    assert "plot written to" in text and "0.500000" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dpo", "--policy-chosen", "1.2", "--policy-rejected", "0.3", "--ref-chosen", "0.2", "--ref-rejected", "0.4"],
         "field '--policy-chosen': a probability must be in (0, 1], got 1.2"),
        (["dpo", "--policy-chosen", "0.2", "--policy-rejected", "0", "--ref-chosen", "0.2", "--ref-rejected", "0.4"],
         "field '--policy-rejected': a probability must be in (0, 1]"),
        (["dpo", "--policy-chosen", "0.2", "--policy-rejected", "0.3", "--ref-chosen", "0.2", "--ref-rejected", "0.4",
          "--log"], "a log-probability must be finite and <= 0"),
        ([*["dpo"], *DPO_ARGS[:-1], "0"], "field '--beta': must be > 0"),
        ([*["dpo"], *DPO_ARGS, "--beta-sweep", "1:2"], "'1:2' is not START:STOP:N"),
        ([*["dpo"], *DPO_ARGS, "--beta-sweep", "2:1:5"], "need 0 < START < STOP"),
        ([*["dpo"], *DPO_ARGS, "--compare-ref-rejected", "0.2"], "only used with --beta-sweep"),
        ([*["cdpo"], *DPO_ARGS, "--label-smoothing", "2"], "field '--label-smoothing': label_smoothing must be in"),
        (["orpo", "--policy-chosen", "0.5", "--policy-rejected", "0.3", "--chosen-length", "0"],
         "field '--chosen-length': a token count must be >= 1"),
    ],
)
def test_errors_are_one_clear_line(args, message):
    result = run(*args, ok=False)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_hint_for_log_probabilities():
    result = run("dpo", "--policy-chosen", "-1.6", "--policy-rejected", "-1.2", "--ref-chosen", "-1.6",
                 "--ref-rejected", "-0.9", ok=False)
    assert result.exit_code == 1 and "hint: pass --log" in result.output


def test_loss_app_on_its_own_typer():
    """The sub-app works wherever it is mounted."""
    local = typer.Typer()
    local.add_typer(loss_app, name="loss")
    result = runner.invoke(local, ["loss", "reward", "--chosen", "0.5", "--rejected", "0.8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["loss"] == pytest.approx(0.854355, abs=5e-7)


def test_help_lists_commands():
    text = run("--help").stdout
    for name in ("reward", "dpo", "ipo", "cdpo", "orpo", "simpo"):
        assert name in text
