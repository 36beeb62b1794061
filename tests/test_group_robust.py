"""Group-robust DPO (Ramesh et al. 2024, "Group Robust Preference Optimization in Reward-free RLHF"):
the alpha update by hand, one group == plain DPO bit for bit, alpha moves toward the group with the higher
loss, exact resume with alpha, accumulation (and two-process) invariance, GR-IPO, config errors.

Every training test runs the 2-layer, 64-dim tiny Llama of `preftune.models.tiny` for a few steps on CPU.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune.config import from_mapping
from preftune.core.group_robust import (
    group_loss_estimates,
    group_robust_loss,
    group_robust_weights,
    pair_weights,
)
from preftune.errors import PreftuneError
from preftune.train.dpo import DPOConfig, DPOMethod
from preftune.train.loop import read_metrics, train

REPO = Path(__file__).resolve().parents[1]

# 6 pairs of group "many" and 2 of group "few"; the two "few" pairs reverse two of the "many" preferences
# (same prompt and responses, chosen and rejected swapped): the groups disagree there.
MANY = [
    ("Question: what is one plus one? Answer:", " two.", " three, I think."),
    ("Shall I compare thee to a summer's day?", " Thou art more lovely.", " No."),
    ("To be, or not to be:", " that is the question.", " maybe later"),
    ("The quick brown fox", " jumps over the lazy dog.", " sleeps."),
    ("What colour is the sky?", " Blue.", " Green, mostly, on Tuesdays."),
    ("Rough winds do shake", " the darling buds of May.", " the trees"),
]
FEW = [(MANY[1][0], MANY[1][2], MANY[1][1]), (MANY[3][0], MANY[3][2], MANY[3][1])]


def _rows(groups: dict[str, list[tuple[str, str, str]]]) -> list[dict[str, str]]:
    return [{"prompt": p, "chosen": c, "rejected": r, "group": g} for g, pairs in groups.items() for p, c, r in pairs]


ROWS = _rows({"many": MANY, "few": FEW})


def _data(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _config(model: Path, data: Path, out: Path, **keys) -> DPOConfig:
    base = {"model": str(model), "data": str(data), "output_dir": str(out), "report_to": "none",
            "learning_rate": 1e-3, "lr_scheduler": "constant", "max_grad_norm": 0.0, "log_every": 1, "seed": 0,
            "ref_cache_dir": str(out.parent / "ref-cache"), "eval_batch_size": 8, "group_robust": True,
            "group_step_size": 1.0}
    return from_mapping(DPOConfig, {**base, **keys})


def _steps(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ the math


def test_alpha_update_and_loss_match_hand_computed_values() -> None:
    """Three groups of N_g = 6, 3, 1 training pairs (N = 10); a batch of B = 4 pairs of groups
    [0, 0, 1, 0] with losses [0.5, 0.7, 0.9, 0.3]; group 2 has no pair in it. alpha = [0.5, 0.3, 0.2], eta = 2.

    Group loss estimates hat L_g = (N / N_g) * (sum of g's losses) / B  (Ramesh et al. 2024, Alg. 1 line 6):
        g0: 10/6 * (0.5 + 0.7 + 0.3) / 4 = 10/6 * 1.5 / 4 = 0.625
        g1: 10/3 * 0.9 / 4                               = 0.75
        g2: no pair                                      = 0
    alpha' = alpha * exp(eta * hat L) = [0.5 e^1.25, 0.3 e^1.5, 0.2 e^0]
           = [1.7451714787, 1.3445067211, 0.2], sum 3.2896781998
    alpha  = alpha' / sum = [0.5304991469, 0.4087046329, 0.0607962201]
    (group 2 keeps 0.2 before the renormalisation, so its weight falls only through the others' growth).
    The loss, with the alpha the batch was drawn under: sum_g alpha_g hat L_g = 0.5*0.625 + 0.3*0.75 + 0.2*0
    = 0.5375; per pair, weights alpha_g N / N_g = [0.8333, 1.0, 2.0] and (0.8333*1.5 + 1.0*0.9) / 4 = 0.5375.
    With the batch's own counts instead of N_g (group_sizes None) hat L_g is each group's batch mean:
    [1.5/3, 0.9/1, 0] = [0.5, 0.9, 0].
    """
    losses = torch.tensor([0.5, 0.7, 0.9, 0.3], dtype=torch.float64, requires_grad=True)
    groups = torch.tensor([0, 0, 1, 0])
    sizes = torch.tensor([6, 3, 1])
    alpha = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)

    estimates = group_loss_estimates(losses, groups, 3, group_sizes=sizes)
    torch.testing.assert_close(estimates, torch.tensor([0.625, 0.75, 0.0], dtype=torch.float64), rtol=1e-15, atol=0)
    new = group_robust_weights(alpha, estimates, eta=2.0)
    torch.testing.assert_close(new, torch.tensor([0.5304991469438756, 0.4087046329242606, 0.060796220131863685],
                                                 dtype=torch.float64), rtol=1e-14, atol=0)
    assert new.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert (new[2] / new[0]).item() == pytest.approx(0.2 / (0.5 * math.exp(1.25)), rel=1e-14)  # g2 kept its 0.2

    torch.testing.assert_close(pair_weights(groups, alpha, group_sizes=sizes),
                               torch.tensor([10 / 12, 10 / 12, 1.0, 10 / 12], dtype=torch.float64))
    loss = group_robust_loss(losses, groups, alpha, group_sizes=sizes)
    assert loss.item() == pytest.approx(0.5375, rel=1e-15)
    assert loss.item() == pytest.approx((alpha * estimates).sum().item(), rel=1e-15)
    loss.backward()  # d loss / d loss_i = alpha_{g_i} (N / N_{g_i}) / B: alpha is a constant of the step
    torch.testing.assert_close(losses.grad, torch.tensor([10 / 48, 10 / 48, 0.25, 10 / 48], dtype=torch.float64))

    torch.testing.assert_close(group_loss_estimates(losses, groups, 3),
                               torch.tensor([0.5, 0.9, 0.0], dtype=torch.float64), rtol=1e-15, atol=0)


def test_one_group_weights_are_exactly_one_and_eta_zero_keeps_alpha() -> None:
    """One group: N / N_g = 1 and alpha = [1], so the loss is losses.sum() / B bit for bit (float32 too);
    eta = 0 leaves alpha unchanged whatever the losses (the groups then stay weighted equally)."""
    losses = torch.tensor([0.25, 1.5, 0.125, 3.0], dtype=torch.float32)
    one = torch.zeros(4, dtype=torch.long)
    loss = group_robust_loss(losses, one, torch.ones(1, dtype=torch.float64), group_sizes=torch.tensor([9]),
                             normaliser=7.0)
    assert torch.equal(loss, losses.sum() / 7.0)
    alpha = torch.tensor([0.25, 0.75], dtype=torch.float64)
    torch.testing.assert_close(group_robust_weights(alpha, torch.tensor([5.0, 0.1]), eta=0.0), alpha,
                               rtol=1e-15, atol=0)  # softmax(log alpha): alpha up to rounding
    with pytest.raises(ValueError, match="eta"):
        group_robust_weights(alpha, torch.tensor([5.0, 0.1]), eta=-1.0)


# ------------------------------------------------------------------------------------------------ training


def test_one_group_equals_plain_dpo_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Every pair in one group: group-robust DPO takes the same steps as plain DPO, bit for bit (3 steps of
    batch 2 x accumulation 2, into a second epoch): the same logged losses and rewards, the same weights.
    alpha stays [1.0]."""
    rows = [{**row, "group": "everyone"} for row in ROWS]
    data = _data(tmp_path / "pairs.jsonl", rows)
    keys = {"batch_size": 2, "grad_accum": 2, "max_steps": 3}
    train(DPOMethod(), _config(tiny_model_dir, data, tmp_path / "plain", group_robust=False, **keys))
    train(DPOMethod(), _config(tiny_model_dir, data, tmp_path / "robust", **keys))

    plain, robust = _steps(tmp_path / "plain"), _steps(tmp_path / "robust")
    assert [r["step"] for r in robust] == [1, 2, 3]
    for a, b in zip(plain, robust, strict=True):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"):
            assert a[key] == b[key], key
        assert b["group/alpha/everyone"] == 1.0
        assert "group/alpha/everyone" not in a
    w_plain, w_robust = _weights(tmp_path / "plain" / "final"), _weights(tmp_path / "robust" / "final")
    assert all(torch.equal(w_plain[k], w_robust[k]) for k in w_plain)
    assert any(not torch.equal(w_plain[k], _weights(tiny_model_dir)[k]) for k in w_plain)


def test_alpha_moves_toward_the_group_with_the_higher_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The full batch (8 pairs) every step, so the estimate hat L_g = (N/N_g) * (n_g L_g) / N is exactly
    group g's mean loss L_g (logged as group/loss/g), and each step moves log(alpha_many / alpha_few) by
    eta * (L_many - L_few). Step 1 is at policy == reference: both losses are log 2 and alpha stays 1/2.
    After 8 steps the group with the higher loss holds the larger weight, and the weighted loss moves
    training toward it: its loss ends lower than under plain (pooled) DPO on the same data."""
    data = _data(tmp_path / "pairs.jsonl", ROWS)
    keys = {"batch_size": 8, "max_steps": 8}
    train(DPOMethod(), _config(tiny_model_dir, data, tmp_path / "robust", **keys))
    train(DPOMethod(), _config(tiny_model_dir, data, tmp_path / "plain", group_robust=False, **keys))
    steps = _steps(tmp_path / "robust")

    assert steps[0]["group/loss/many"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["group/alpha/many"] == pytest.approx(0.5, abs=1e-5)
    previous = 0.0
    for record in steps:
        log_ratio = math.log(record["group/alpha/many"] / record["group/alpha/few"])
        expected = 1.0 * (record["group/loss/many"] - record["group/loss/few"])
        assert log_ratio - previous == pytest.approx(expected, rel=1e-9, abs=1e-12), record["step"]
        assert record["group/alpha/many"] + record["group/alpha/few"] == pytest.approx(1.0, abs=1e-12)
        previous = log_ratio
    last = steps[-1]
    worse = max(("many", "few"), key=lambda g: last[f"group/loss/{g}"])
    assert last[f"group/alpha/{worse}"] > 0.5
    # plain DPO, the same 8 steps: its worse group is worse off than that group is under group-robust DPO
    plain = _steps(tmp_path / "plain")
    plain_losses = {g: _group_loss(tiny_model_dir, tmp_path / "plain" / "final", g) for g in ("many", "few")}
    robust_losses = {g: _group_loss(tiny_model_dir, tmp_path / "robust" / "final", g) for g in ("many", "few")}
    assert max(robust_losses.values()) < max(plain_losses.values()), (robust_losses, plain_losses)
    assert len(plain) == 8


def _group_loss(reference: Path, policy: Path, group: str, beta: float = 0.1) -> float:
    """The mean DPO loss of one group's pairs under ``policy`` against ``reference`` (no training)."""
    from preftune.core.forward import batch_logps
    from preftune.core.losses import dpo_loss
    from preftune.data.collate import collate_pairs
    from preftune.data.formats import PreferencePair
    from preftune.data.tokenize import tokenize_preferences
    from preftune.models import load_policy, load_tokenizer

    tok = load_tokenizer(str(reference))
    pairs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS if r["group"] == group]
    batch = collate_pairs(tokenize_preferences(tok, pairs, max_length=1024)[0], pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        pol, _ = batch_logps(load_policy(str(policy), dtype="float32"), batch)
        ref, _ = batch_logps(load_policy(str(reference), dtype="float32"), batch)
    n = len(pairs)
    return dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=beta).losses.mean().item()


class _InterruptAt(DPOMethod):
    """DPO that sends this process a real SIGINT (Ctrl-C) while preparing step ``at`` (0-based)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def before_step(self, model, step):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return None


def test_resume_is_exact_with_alpha(tiny_model_dir: Path, tmp_path: Path) -> None:
    """6 steps straight == Ctrl-C during step 3 (checkpoint step-3), then the same command again.

    log_every 2, so step-3 falls inside a log span: the per-group sums since the last line are state too.
    The checkpoint holds method_state_0.pt with the group names and alpha (not uniform: eta 1 has moved
    it), and every metrics line after the resume (loss, alpha, group losses) and the final weights are
    EXACTLY those of the straight run."""
    data = _data(tmp_path / "pairs.jsonl", ROWS)
    keys = {"batch_size": 2, "max_steps": 6, "log_every": 2, "save_every": 100}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(DPOMethod(), _config(tiny_model_dir, data, straight, **keys))
    with pytest.raises(KeyboardInterrupt):
        train(_InterruptAt(2), _config(tiny_model_dir, data, resumed, **keys))
    state = torch.load(resumed / "checkpoints" / "step-3" / "method_state_0.pt", weights_only=True)
    assert state["names"] == ["few", "many"] and state["steps"] == 3
    assert abs(state["alpha"][0].item() - 0.5) > 1e-3
    train(DPOMethod(), _config(tiny_model_dir, data, resumed, **keys))

    def lines(out: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in _steps(out)]

    assert [r["step"] for r in lines(straight)] == [2, 4, 6]
    assert lines(resumed) == lines(straight)
    assert {"group/alpha/few", "group/loss/many", "group/accuracy/few"} <= set(lines(straight)[-1])
    a, b = _weights(straight / "final"), _weights(resumed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch8_accum1_equals_batch1_accum8(float64_model_dir: Path, tmp_path: Path) -> None:
    """alpha moves once per optimizer step, from the step's pairs over every micro-batch: 3 steps of the
    8 pairs as 1 x 8, 8 x 1 and 2 x 4 (batch x accumulation) give the same loss curve and alpha (float64
    model: only the summation order differs, ~1e-16 relative; see tests/test_loop.py for the 1e-10 on
    weights). Step 2's losses differ by group, so step 3 is weighted by an alpha that has moved; updating
    alpha after each micro-batch instead would give 1 x 8 eight updates per step and another curve."""
    data = _data(tmp_path / "pairs.jsonl", ROWS)
    runs = {}
    for batch, accum in [(8, 1), (1, 8), (2, 4)]:
        out = tmp_path / f"b{batch}a{accum}"
        train(DPOMethod(), _config(float64_model_dir, data, out, batch_size=batch, grad_accum=accum, max_steps=3))
        runs[(batch, accum)] = (_steps(out), _weights(out / "final"))
    (base, w_base) = runs[(8, 1)]
    assert abs(base[1]["group/alpha/few"] - 0.5) > 1e-3
    for (steps, weights) in runs.values():
        for a, b in zip(base, steps, strict=True):
            for key in ("loss", "group/alpha/few", "group/alpha/many", "group/loss/few", "group/loss/many",
                        "group/accuracy/few"):
                assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-15), key
        for key in w_base:
            torch.testing.assert_close(weights[key], w_base[key], rtol=0, atol=1e-10, msg=key)


def test_gr_ipo_runs_and_evaluation_reports_the_pooled_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    """GR-IPO is `loss: ipo` with group_robust. At step 1 the policy is the reference, h = 0, and every
    IPO loss is (0 - 1/(2 beta))^2 = 1 for beta 0.5 (up to the float32 reference cache: |h| < 1e-5).
    The weights stay on the simplex; evaluation (eval_fraction) reports the plain mean loss."""
    data = _data(tmp_path / "pairs.jsonl", ROWS * 2)
    out = tmp_path / "ipo"
    train(DPOMethod(), _config(tiny_model_dir, data, out, loss="ipo", beta=0.5, batch_size=4, max_steps=3,
                               eval_fraction=0.25))
    steps = _steps(out)
    assert steps[0]["group/loss/many"] == pytest.approx(1.0, abs=1e-4)
    assert steps[0]["group/loss/few"] == pytest.approx(1.0, abs=1e-4)
    for record in steps:
        assert record["group/alpha/few"] + record["group/alpha/many"] == pytest.approx(1.0, abs=1e-12)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r]
    assert evals and math.isfinite(evals[-1]["eval/loss"]) and not any(k.startswith("eval/group") for k in evals[-1])


# ------------------------------------------------------------------------------------------------ errors


def test_pairs_without_a_group_are_an_error_with_a_hint(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [dict(row) for row in ROWS]
    del rows[2]["group"], rows[5]["group"]
    data = _data(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(PreftuneError) as err:
        train(DPOMethod(), _config(tiny_model_dir, data, tmp_path / "run", batch_size=4, max_steps=1))
    assert err.value.field == "group_robust"
    assert "2 of 8 have none" in err.value.message and "pair 3" in err.value.message
    assert "`group`" in err.value.hint and "group_robust: false" in err.value.hint


@pytest.mark.parametrize("loss", ["orpo", "simpo", "unlikelihood"])
def test_reference_free_losses_are_refused(loss: str) -> None:
    with pytest.raises(PreftuneError) as err:
        from_mapping(DPOConfig, {"model": "m", "data": "d.jsonl", "loss": loss, "group_robust": True})
    assert err.value.field == "loss"
    assert "reference-based" in err.value.message and "ipo" in err.value.hint
    from_mapping(DPOConfig, {"model": "m", "data": "d.jsonl", "loss": loss})  # fine without group_robust


def test_a_negative_step_size_is_refused() -> None:
    with pytest.raises(PreftuneError) as err:
        from_mapping(DPOConfig, {"model": "m", "data": "d.jsonl", "group_robust": True, "group_step_size": -0.1})
    assert err.value.field == "group_step_size"


def test_the_example_config_loads_and_its_data_has_two_groups() -> None:
    """examples/grdpo.yaml (docs/diverse.md) validates; its data: 16 `concise` pairs, 4 `vivid` ones that
    reverse 4 of them."""
    from preftune.config import load_config
    from preftune.data import load_preferences

    config = load_config(DPOConfig, REPO / "examples" / "grdpo.yaml")
    assert config.group_robust and config.group_step_size == 0.1 and config.loss == "dpo"
    pairs, _ = load_preferences(str(REPO / config.data))
    assert sorted(p.group for p in pairs).count("concise") == 16 and [p.group for p in pairs].count("vivid") == 4
    concise = {(p.prompt, p.chosen, p.rejected) for p in pairs if p.group == "concise"}
    assert all((p.prompt, p.rejected, p.chosen) in concise for p in pairs if p.group == "vivid")


# ------------------------------------------------------------------------------------------------ processes


@pytest.mark.slow
def test_two_cpu_processes_equal_one_process(float64_model_dir: Path, tmp_path: Path) -> None:
    """Group-robust DPO, 3 steps of the 8 pairs: one process with batch_size 8, or two gloo processes with
    batch_size 4 each (`accelerate launch`, the user's path). alpha's update sums the group losses of
    both processes (one all-reduce per step), so the loss curve, alpha and the weights agree (1e-10: see
    tests/test_distributed.py); with each process updating alpha from its own half they would not."""
    data = _data(tmp_path / "pairs.jsonl", ROWS)
    config = tmp_path / "grdpo.yaml"
    config.write_text(f"model: {float64_model_dir}\ndata: {data}\nreport_to: none\nlearning_rate: 1.0e-3\n"
                      "lr_scheduler: constant\nmax_steps: 3\nlog_every: 1\nseed: 0\neval_batch_size: 8\n"
                      "group_robust: true\ngroup_step_size: 1.0\nmax_grad_norm: 0.0\n", encoding="utf-8")
    from preftune.train import run

    run("dpo", config, batch_size=8, output_dir=str(tmp_path / "one"), ref_cache_dir=str(tmp_path / "cache1"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "examples" / "accelerate" / "multi_cpu.yaml"),
           "--num_processes", "2", "--main_process_port", str(port), "--num_cpu_threads_per_process", "1",
           "-m", "preftune", "train", "dpo", str(config), "--batch_size", "4",
           "--output_dir", str(tmp_path / "two"), "--ref_cache_dir", str(tmp_path / "cache2")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "batch_size 4 x grad_accum 1 x 2 processes" in proc.stdout + proc.stderr

    one, two = _steps(tmp_path / "one"), _steps(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    assert abs(one[1]["group/alpha/few"] - 0.5) > 1e-3
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "group/alpha/few", "group/loss/few", "group/loss/many", "group/accuracy/many"):
            assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-12), (a["step"], key)
    w1, w2 = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-10, msg=key)
