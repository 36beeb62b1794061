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
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from preftune.cli import app
from preftune.cli.prefs_loss import loss_app
from preftune.core.losses import LOSSES

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


# ------------------------------------------------------------- losses added with the registry-built commands


def test_hinge_hand_computed():
    """Course example, beta 2: h = log(4/3) = 0.287682, beta h = 0.575364, so the hinge max(0, 1 - beta h) is
    1 - 2 log(4/3) = 0.424636 (the margin 1/beta on h is not yet met). With beta 4, beta h = 1.150728 > 1:
    the margin is met and the loss is exactly 0 while 1 - beta h = -0.150728."""
    data = run_json("hinge", *DPO_ARGS)
    assert data["loss"] == pytest.approx(1 - 2 * math.log(4 / 3), abs=1e-12)
    assert data["slack"] == pytest.approx(data["loss"], abs=1e-12)
    assert data["h"] == pytest.approx(math.log(4 / 3), abs=1e-12)
    assert data["gradient_weight"] == pytest.approx(0.36, abs=1e-12)  # JSON only, as for ipo and cdpo
    met = run_json("hinge", *DPO_ARGS[:-1], "4")
    assert met["loss"] == 0.0
    assert met["slack"] == pytest.approx(1 - 4 * math.log(4 / 3), abs=1e-12)
    text = run("hinge", *DPO_ARGS).stdout
    assert "0.424636" in text and "max(0, 1 - beta h)" in text and "gradient weight" not in text


def test_robust_hand_computed():
    """rDPO, beta 2, eps 0.1. With l(z) = -log sigmoid(z) and z = beta h = 2 log(4/3): l(-z) = l(z) + z, so
    [(1 - eps) l(z) - eps l(-z)] / (1 - 2 eps) = l(z) - eps z / (1 - 2 eps) = log(25/16) - 0.25 log(4/3)
    = 0.446287 - 0.071921 = 0.374367. The DPO and flipped terms are cDPO's: l(z) and l(z) + z."""
    data = run_json("robust", *DPO_ARGS, "--label-smoothing", "0.1")
    a = math.log(1 + 9 / 16)
    assert data["loss"] == pytest.approx(a - 0.25 * math.log(4 / 3), abs=1e-12)
    assert data["dpo_term"] == pytest.approx(a, abs=1e-12)
    assert data["flipped_term"] == pytest.approx(a + 2 * math.log(4 / 3), abs=1e-12)
    assert run_json("robust", *DPO_ARGS, "--label-smoothing", "0")["loss"] == pytest.approx(a, abs=1e-12)
    text = run("robust", *DPO_ARGS).stdout
    assert "0.374367" in text and "(0.9 DPO term - 0.1 flipped) / 0.8" in text
    bad = run("robust", *DPO_ARGS, "--label-smoothing", "0.5", ok=False)
    assert bad.exit_code == 1 and "field '--label-smoothing': label_smoothing must be in [0, 0.5)" in bad.output


def test_unlikelihood_hand_computed():
    """Per-token probabilities 1/2 (chosen) and 1/3 (rejected), alpha 1: -log(1/2) - log(1 - 1/3)
    = log 2 + log 1.5 = log 3 = 1.098612. With alpha 2: log 2 + 2 log 1.5 = log 4.5 = 1.504077. The same
    per-token numbers as sequences, 0.25 over 2 tokens and 1/27 over 3, give the same loss. The rewards
    reported are m_w = -log 2 and m_l = -log 3 (no beta)."""
    a = run_json("unlikelihood", "--policy-chosen", "0.5", "--policy-rejected", repr(1 / 3))
    b = run_json("unlikelihood", "--policy-chosen", "0.25", "--chosen-length", "2", "--policy-rejected",
                 repr(1 / 27), "--rejected-length", "3")
    for data in (a, b):
        assert data["loss"] == pytest.approx(math.log(3), abs=1e-12)
        assert data["nll"] == pytest.approx(math.log(2), abs=1e-12)
        assert data["unlikelihood_term"] == pytest.approx(math.log(1.5), abs=1e-12)
        assert data["reward_rejected"] == pytest.approx(-math.log(3), abs=1e-12)
    two = run_json("unlikelihood", "--policy-chosen", "0.5", "--policy-rejected", repr(1 / 3), "--alpha", "2")
    assert two["loss"] == pytest.approx(math.log(4.5), abs=1e-12)
    assert "1.098612" in run("unlikelihood", "--policy-chosen", "0.5", "--policy-rejected", repr(1 / 3)).stdout
    bad = run("unlikelihood", "--policy-chosen", "0.5", "--policy-rejected", "0.3", "--alpha", "-1", ok=False)
    assert bad.exit_code == 1 and "field '--alpha': alpha must be >= 0" in bad.output


def test_ipo_length_normalize():
    """Course example with |y_w| = 2 and |y_l| = 4: per-token log-ratios 0 and log(0.75)/4, so the h IPO
    uses is log(4/3)/4 = 0.071921 and the loss (0.071921 - 1/4)^2 = 0.031712. Without the flag the token
    counts change nothing."""
    lengths = ["--chosen-length", "2", "--rejected-length", "4"]
    data = run_json("ipo", *DPO_ARGS, *lengths, "--length-normalize")
    assert data["h"] == pytest.approx(math.log(4 / 3) / 4, abs=1e-12)
    assert data["loss"] == pytest.approx((math.log(4 / 3) / 4 - 0.25) ** 2, abs=1e-12)
    assert run_json("ipo", *DPO_ARGS, *lengths)["loss"] == pytest.approx((math.log(4 / 3) - 0.25) ** 2, abs=1e-12)


def _loss_command(name: str):
    """The click command of `prefs loss NAME`, as the CLI builds it."""
    group = typer.main.get_command(app)
    ctx = click.Context(group)
    prefs = group.get_command(ctx, "prefs")
    loss = prefs.get_command(click.Context(prefs, parent=ctx), "loss")
    return loss.get_command(click.Context(loss, parent=ctx), name)


def test_every_registry_loss_is_a_command_with_its_hyperparameters():
    """Adding a loss to LOSSES is enough: it is listed, and its --help shows each hyperparameter as an
    option with the spec's default."""
    listing = run("--help").stdout
    for name in ["reward", *LOSSES]:
        assert name in listing
    for name, spec in LOSSES.items():
        text = run(name, "--help").stdout
        options = {p.name: p for p in _loss_command(name).params}
        for key, default in spec.hparams.items():
            assert "--" + key.replace("_", "-") in text, (name, key)
            assert options[key].default == default, (name, key)
        for flag in (["--ref-chosen", "--ref-rejected"] if spec.needs_reference else ["--chosen-length"]):
            assert flag in text, (name, flag)
        assert ("--beta-sweep" in text) == (spec.needs_reference and "beta" in spec.hparams), name


def test_a_new_loss_appears_with_generic_rows(monkeypatch, tmp_path):
    """A loss registered with no parts function still gets a command, generic rows and a sweep:
    (beta h - tau)^2 on the course example with beta 2, tau 0.5 is (2 log(4/3) - 0.5)^2 = 0.005679."""
    from preftune.core import losses as L

    def toy_loss(pc, pr, rc, rr, *, beta: float = 1.0, tau: float = 0.5):
        h = (pc - rc) - (pr - rr)
        return L.PreferenceLossOutput((beta * h - tau) ** 2, beta * (pc - rc), beta * (pr - rr))

    monkeypatch.setitem(L.LOSSES, "toy", L._spec(toy_loss, "Toy", needs_reference=True, summary="(beta h - tau)^2"))
    assert "--tau" in run("toy", "--help").stdout
    data = run_json("toy", *DPO_ARGS)
    assert data["loss"] == pytest.approx((2 * math.log(4 / 3) - 0.5) ** 2, abs=1e-12)
    assert data["margin"] == pytest.approx(2 * math.log(4 / 3), abs=1e-12)
    text = run("toy", *DPO_ARGS).stdout
    assert "Toy loss, beta = 2, tau = 0.5" in text and "(beta h - tau)^2" in text
    sweep = run_json("toy", *DPO_ARGS, "--beta-sweep", "1:2:2", "--plot", str(tmp_path / "toy.png"))
    assert sweep["losses"][1] == pytest.approx(data["loss"], abs=1e-12)


def test_hinge_beta_sweep(tmp_path):
    """Betas 1, 2, 3. With pi_ref(y_l) = 0.4, h = log(4/3) > 0 and the hinge 1 - beta h falls: 0.712318,
    0.424636, 0.136954. With pi_ref(y_l) = 0.2, h = log(0.2/0.2) - log(0.3/0.2) = -log 1.5 < 0 and it rises:
    1 + beta log 1.5 = 1.405465, 1.810930, 2.216395."""
    plot = tmp_path / "hinge.png"
    args = [a for a in DPO_ARGS if a not in ("--beta", "2")]
    data = run_json("hinge", *args, "--beta-sweep", "1:3:3", "--compare-ref-rejected", "0.2", "--plot", str(plot))
    h = math.log(4 / 3)
    assert data["losses"] == pytest.approx([1 - h, 1 - 2 * h, 1 - 3 * h], abs=1e-12)
    assert data["h"] == pytest.approx(h, abs=1e-12)
    assert data["compare"]["h"] == pytest.approx(-math.log(1.5), abs=1e-12)
    assert data["compare"]["losses"] == pytest.approx([1 + b * math.log(1.5) for b in (1, 2, 3)], abs=1e-12)
    assert data["inputs"] == {"policy_chosen": 0.2, "policy_rejected": 0.3, "ref_chosen": 0.2, "ref_rejected": 0.4,
                              "log": False}
    width, height = _png_size(plot)
    assert width > 300 and height > 200
    text = run("hinge", *args, "--beta-sweep", "1:3:3", "--plot", str(tmp_path / "t.png")).stdout
    assert "Hinge loss vs beta" in text and "0.424636" in text


def test_reference_free_losses_have_no_sweep():
    result = run("simpo", "--policy-chosen", "0.5", "--policy-rejected", "0.3", "--beta-sweep", "1:2:2", ok=False)
    assert result.exit_code == 2 and "No such option" in result.output


def test_importing_the_command_group_does_not_import_torch():
    """The registry's commands are built when `prefs loss` is listed or run, so `preftune --help` stays light."""
    code = "import sys, preftune.cli.prefs_loss; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
