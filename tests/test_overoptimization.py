"""`preftune experiment overoptimization` on the tiny model: RLOO optimises a proxy reward that an exploit
fools, the proxy keeps rising while the true reward peaks and falls; DPO beside it is measured the same way;
measurements sit at steps 0, k, 2k, ..., last in metrics.jsonl and survive an interrupted run exactly.

The toy (``examples/rewards.py``): the true reward is the share of ASCII letters in the completion minus
0.25 per letter ``o`` beyond two (``letters_few_o``); the proxy is the share of letters plus 0.05 per ``o``
(``letters_and_o``), as if a reward model had learned "good answers contain an o". The random tiny model
writes about half letters and one ``o`` per 8-token completion, so optimising the proxy first raises both
(more letters), then piles up ``o``s: the proxy climbs to 1 + 8 x 0.05 = 1.4 (``oooooooo``) while the
true reward drops towards 1 - 6 x 0.25 = -0.5.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path

import pytest

from preftune.errors import PreftuneError
from preftune.experiments.overoptimization import (
    OveroptimizationConfig,
    find_peak,
    gao_fit,
    overoptimization,
    plan_runs,
    read_curve,
    schedule,
)
from preftune.models.rewards import load_function

REPO = Path(__file__).resolve().parents[1]
letters_and_o = load_function(f"{REPO}/examples/rewards.py:letters_and_o")
letters_few_o = load_function(f"{REPO}/examples/rewards.py:letters_few_o")

PROMPTS = ["Shall I compare thee to a summer's day?", "To be, or not to be, that is the question:",
           "The quick brown fox jumps over the lazy dog.", "Please write a short poem about the sea.",
           "Question: what colour is the sky? Answer:", "Rough winds do shake the darling buds of May,",
           "What is the answer?", "Here is a poem about the sea and the sky."]
HELDOUT = ["Thou art more lovely and more temperate:", "Whether 'tis nobler in the mind to suffer",
           "Question: what is two plus two? Answer:", "The slings and arrows of outrageous fortune,"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _keys(model: Path, out: Path, **keys) -> dict:
    online = {"learning_rate": 2e-2, "num_samples": 4, "batch_size": 4, "lr_scheduler": "constant", "seed": 0,
              "report_to": "none", "dtype": "float32", "sample_every": 0, "log_every": 100, **keys.pop("online", {})}
    return {"model": str(model), "output_dir": str(out), "steps": 20, "measure_every": 2, "kl_coef": 0.0,
            "eval_samples": 8, "max_new_tokens": 8, "max_length": 64, "online": online, **keys}


def _run(model: Path, out: Path, **keys) -> dict:
    return overoptimization(_keys(model, out, **keys), log=lambda message: None, train_prompts=PROMPTS,
                            heldout_prompts=HELDOUT, proxy_reward=letters_and_o, true_reward=letters_few_o)


def test_schedule_is_zero_every_k_and_the_last_step():
    assert schedule(10, 4) == [0, 4, 8, 10]
    assert schedule(8, 4) == [0, 4, 8]
    assert schedule(3, 5) == [0, 3]
    assert schedule(1, 1) == [0, 1]


def test_peak_and_fall_on_a_synthetic_curve():
    """Peak: the highest true reward (0.8 at step 4, KL 2.0). Last point 0.5: the drop 0.3 over the
    standard error of the difference sqrt(0.1^2 + 0.1^2) = 0.1414 is 2.12 > 2, so it fell; with standard
    errors of 0.2 it is 0.3 / 0.2828 = 1.06 standard errors: not a fall."""
    curve = [{"step": s, "kl": kl, "true_reward": r, "true_se": 0.1}
             for s, kl, r in ((0, 0.0, 0.5), (2, 1.0, 0.7), (4, 2.0, 0.8), (6, 3.0, 0.5))]
    peak = find_peak(curve)
    assert (peak["step"], peak["kl"], peak["true_reward"], peak["final_true_reward"]) == (4, 2.0, 0.8, 0.5)
    assert peak["drop"] == pytest.approx(0.3) and peak["drop_in_se"] == pytest.approx(0.3 / 0.1 / 2 ** 0.5)
    assert peak["fell"] is True
    noisy = find_peak([{**p, "true_se": 0.2} for p in curve])
    assert noisy["drop_in_se"] == pytest.approx(1.0607, abs=1e-4) and noisy["fell"] is False
    rising = find_peak(curve[:3])
    assert rising["step"] == rising["final_step"] == 4 and rising["drop"] == 0.0 and rising["fell"] is False


def test_gao_fit_recovers_alpha_and_beta():
    """Points made by R(d) = d (1.0 - 0.5 log d) above a start of 0.2, d = sqrt(KL): the fit gives alpha 1,
    beta 0.5, r2 1, and the maximum at log d* = alpha / beta - 1 = 1, KL* = e^2 = 7.389."""
    import math

    kls = [0.0, 0.5, 2.0, 5.0, 10.0, 20.0]
    curve = [{"kl": kl, "true_reward": 0.2 + (math.sqrt(kl) * (1.0 - 0.5 * math.log(math.sqrt(kl))) if kl else 0.0)}
             for kl in kls]
    fit = gao_fit(curve)
    assert fit["alpha"] == pytest.approx(1.0) and fit["beta"] == pytest.approx(0.5) and fit["r2"] == pytest.approx(1.0)
    assert fit["kl_peak"] == pytest.approx(math.e ** 2) and fit["points"] == 5
    assert gao_fit(curve[:3]) is None  # two points with KL > 0 cannot fix two parameters and a residual


def test_the_proxy_keeps_rising_while_the_true_reward_peaks_and_falls(tiny_model_dir, tmp_path):
    """RLOO (lr 2e-2, no KL penalty) on the proxy for 20 steps, measured every 2 steps on 4 held-out prompts
    x 8 samples; DPO on examples/data/prefs.jsonl beside it for 4 steps. On this machine: the proxy rises at
    every point, 0.58 -> 1.39; the true reward rises 0.53 -> 0.75 (step 10), then falls to -0.49."""
    out = tmp_path / "over"
    dpo = {"preferences": str(REPO / "examples/data/prefs.jsonl"), "dpo_measure_every": 3,
           "dpo": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "max_prompt_length": 32,
                   "report_to": "none", "dtype": "float32"}}
    result = _run(tiny_model_dir, out, **dpo)
    curve = result["curves"]["rloo"]
    assert [p["step"] for p in curve] == list(range(0, 21, 2))
    assert [p["step"] for p in result["curves"]["dpo"]] == [0, 3, 4]
    first, last = curve[0], curve[-1]
    assert first["kl"] == 0.0 and result["curves"]["dpo"][0] == first  # both start at the SFT model, same seeds
    assert last["kl"] > 10.0
    # the proxy keeps rising: every point at least as high as the one before, up to two standard errors
    assert all(b["proxy_reward"] >= a["proxy_reward"] - 2 * b["proxy_se"] for a, b in itertools.pairwise(curve))
    assert last["proxy_reward"] - first["proxy_reward"] > 10 * first["proxy_se"]
    # the true reward peaks strictly inside the run, above its start, then falls by many standard errors
    peak = result["peak"]["rloo"]
    assert 0 < peak["step"] < 20 and peak["true_reward"] - first["true_reward"] > 2 * first["true_se"]
    assert peak["fell"] and peak["drop_in_se"] > 5 and last["true_reward"] < first["true_reward"]
    assert result["peak"]["rloo"]["kl"] == next(p["kl"] for p in curve if p["step"] == peak["step"])

    saved = json.loads((out / "overoptimization.json").read_text())
    assert saved["curves"] == result["curves"] and saved["peak"] == result["peak"]
    assert (out / "overoptimization.png").stat().st_size > 10_000
    assert read_curve(out / "runs" / "rloo" / "metrics.jsonl") == curve  # the heldout/* lines of the run
    assert (out / "runs" / "dpo" / "final" / "config.json").is_file()

    stamp = (out / "runs" / "rloo" / "final" / "model.safetensors").stat().st_mtime_ns
    messages: list[str] = []
    again = overoptimization(_keys(tiny_model_dir, out, **dpo), log=messages.append, train_prompts=PROMPTS,
                             heldout_prompts=HELDOUT,
                             proxy_reward=letters_and_o, true_reward=letters_few_o)
    assert again["curves"] == result["curves"]
    assert "[1/2] rloo: finished before, skipped" in messages and "[2/2] dpo: finished before, skipped" in messages
    assert (out / "runs" / "rloo" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(PreftuneError, match="other keys or measurement settings") as info:
        _run(tiny_model_dir, out, eval_samples=4)
    assert "delete" in info.value.hint


def _interrupt_at_measurement(number: int):
    """The true reward with a real SIGINT (Ctrl-C) sent to this process while it scores measurement
    ``number`` (counting from 1): the loop finishes the step it is in, saves a checkpoint, and stops."""
    calls = {"n": 0, "prompt": None}

    def true(prompt, completion):
        if prompt == HELDOUT[0] and calls["prompt"] != prompt:  # the first row of a measurement
            calls["n"] += 1
            if calls["n"] == number:
                os.kill(os.getpid(), signal.SIGINT)
        calls["prompt"] = prompt
        return letters_few_o(prompt, completion)

    return true


def test_an_interrupted_run_resumes_with_the_same_points(tiny_model_dir, tmp_path):
    """6 steps measured every 2 (points 0, 2, 4, 6), checkpoints every step (keep 3). Interrupted during
    the measurement after step 2 (the 2nd): the loop finishes step 3 and saves step-3. Then the newest two
    checkpoints are deleted, so the rerun resumes from step 1, as after a crash just after the measurement
    at step 2: metrics.jsonl drops the lines after step 1 (the point at step 2 too), the resumed run
    measures steps 2, 4 and 6 again and does not repeat step 0's. The curve equals the uninterrupted one."""
    import shutil

    keys = {"steps": 6, "online": {"save_every": 1, "keep_checkpoints": 3}}
    straight = _run(tiny_model_dir, tmp_path / "straight", **keys)["curves"]["rloo"]
    assert [p["step"] for p in straight] == [0, 2, 4, 6]
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        overoptimization(_keys(tiny_model_dir, out, **keys), log=lambda message: None, train_prompts=PROMPTS,
                         heldout_prompts=HELDOUT, proxy_reward=letters_and_o, true_reward=_interrupt_at_measurement(2))
    run = out / "runs" / "rloo"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    assert [p["step"] for p in read_curve(run / "metrics.jsonl")] == [0, 2]
    for name in ("step-2", "step-3"):
        shutil.rmtree(run / "checkpoints" / name)
    resumed = _run(tiny_model_dir, out, **keys)["curves"]["rloo"]
    assert resumed == straight
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "heldout/true_reward" in r] == [0, 2, 4, 6]  # none twice


def test_a_restart_without_checkpoints_does_not_repeat_step_zero(tiny_model_dir, tmp_path):
    """Stopped during the measurement after step 2, its checkpoint then deleted (as after a crash before
    the first checkpoint): the rerun starts over from step 0; metrics.jsonl keeps only the lines at step
    <= 0 (the point at step 0), and the new run writes every later point once and step 0's not again."""
    import shutil

    keys = {"steps": 4}
    out = tmp_path / "restart"
    with pytest.raises(KeyboardInterrupt):
        overoptimization(_keys(tiny_model_dir, out, **keys), log=lambda message: None, train_prompts=PROMPTS,
                         heldout_prompts=HELDOUT, proxy_reward=letters_and_o, true_reward=_interrupt_at_measurement(2))
    shutil.rmtree(out / "runs" / "rloo" / "checkpoints")
    curve = _run(tiny_model_dir, out, **keys)["curves"]["rloo"]
    lines = [json.loads(line) for line in (out / "runs" / "rloo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "heldout/true_reward" in r] == [0, 2, 4]
    assert [p["step"] for p in curve] == [0, 2, 4]


def test_plan_runs_and_config_errors():
    config = OveroptimizationConfig(model="m", steps=30, measure_every=5, preferences="p.jsonl",
                                    online={"learning_rate": 1e-3}, dpo={"beta": 0.2})
    online, dpo = plan_runs(config)
    assert (online.name, online.command, online.every) == ("rloo", "rloo", 5)
    assert online.keys["max_steps"] == 30 and online.keys["kl_coef"] == 0.01 and online.keys["learning_rate"] == 1e-3
    assert online.keys["max_new_tokens"] == 32 and online.keys["model"] == "m"
    assert dpo.keys["max_steps"] == 30 and dpo.keys["data"] == "p.jsonl" and dpo.keys["beta"] == 0.2
    assert plan_runs(OveroptimizationConfig(model="m", preferences="p", dpo={"epochs": 2.0}))[1].keys.get(
        "max_steps") is None  # epochs decide DPO's length
    assert len(plan_runs(OveroptimizationConfig(model="m"))) == 1  # no preferences: no DPO

    cases = [({"method": "dpo"}, "method", "not one of"), ({"measure_every": 0}, "measure_every", ">= 1"),
             ({"kl_coef": -0.1}, "kl_coef", ">= 0"), ({"online": {"kl_coef": 0.1}}, "online.kl_coef", "set by"),
             ({"online": {"max_steps": 5}}, "online.max_steps", "set by"), ({"dpo": {"model": "x"}}, "dpo.model", "set by"),
             ({"dpo": {"beta": 0.1}}, "dpo", "no DPO run")]
    for keys, field, message in cases:
        with pytest.raises(PreftuneError, match=message) as info:
            overoptimization({"model": "m", **keys})
        assert info.value.field == field, keys
    with pytest.raises(PreftuneError, match="is required") as info:
        overoptimization({"model": "m", "output_dir": "unused"}, train_prompts=PROMPTS, heldout_prompts=HELDOUT,
                         proxy_reward=letters_and_o)
    assert info.value.field == "true_reward"
    with pytest.raises(PreftuneError, match="unknown key|did you mean") as info:
        overoptimization({"model": "m", "measure_evry": 3})


def test_cli_prints_the_curve_and_the_peak(tiny_model_dir, tmp_path):
    """The CLI on a 4-step run with the toy rewards named as file.py:function."""
    import yaml
    from typer.testing import CliRunner

    from preftune.cli import app

    keys = _keys(tiny_model_dir, tmp_path / "out", steps=4, train_prompts=str(REPO / "examples/data/prompts.txt"),
                 heldout_prompts=str(REPO / "examples/data/prompts_heldout.txt"),
                 proxy_reward=str(REPO / "examples/rewards.py") + ":letters_and_o",
                 true_reward=str(REPO / "examples/rewards.py") + ":letters_few_o")
    config = tmp_path / "over.yaml"
    config.write_text(yaml.safe_dump(keys))
    result = CliRunner().invoke(app, ["experiment", "overoptimization", str(config), "--measure_every", "3"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "overoptimization.json").read_text())
    assert [p["step"] for p in saved["curves"]["rloo"]] == [0, 3, 4]
    assert "true reward" in result.output and "peak" in result.output
    result = CliRunner().invoke(app, ["experiment", "overoptimization", str(config), "--online.max_steps", "3"])
    assert result.exit_code == 1 and "online.max_steps" in result.output and "set steps" in result.output
