"""KTO (Ethayarajh et al. 2024, Eq. 8): the loss and its reference point z0 by hand, the data (unpaired rows,
split pairs, bad rows, a missing class, the weights advice), training on the tiny in-process Llama (the loss
falls; step 1 by hand; z0 over the whole step so batch 8 x accumulation 1 == 1 x 8 == 2 x 4; cached ==
online reference; LoRA), exact resume, and `preftune prefs loss kto`.

The running example (the course's numbers): beta 2, a desirable completion with pi = pi_ref = 0.2 and an
undesirable one with pi = 0.3, pi_ref = 0.4. Their log-ratios are r_D = 0 and r_U = log 0.75, so the
rewards are beta r_D = 0 and beta r_U = 2 log 0.75 = -0.575364 and, with z0 = 0,

    loss_D = 1 - sigma(beta (r_D - z0)) = 1 - sigma(0) = 0.5
    loss_U = 1 - sigma(beta (z0 - r_U)) = 1 - 1 / (1 + exp(2 log 0.75)) = 1 - 1 / (1 + 0.5625) = 0.36.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from preftune.cli import app
from preftune.config import from_mapping
from preftune.core.forward import batch_logps
from preftune.core.losses import kto_loss, kto_reference_point
from preftune.data.collate import collate_unpaired
from preftune.data.formats import PreferencePair, UnpairedExample
from preftune.errors import PreftuneError
from preftune.train.kto import (
    KTOConfig,
    KTOMethod,
    check_weights,
    kl_partners,
    load_kto_items,
    read_kto_examples,
    unpaired,
)
from preftune.train.loop import read_metrics, train

BETA = 2.0
LOGPS = torch.log(torch.tensor([0.2, 0.3], dtype=torch.float64))
REF = torch.log(torch.tensor([0.2, 0.4], dtype=torch.float64))
DESIRABLE = torch.tensor([True, False])

PROMPTS = ["Shall I compare thee ", "To be, or not to be ", "The quick brown fox ", "What is the answer? "]
GOOD, BAD = "yes yes the answer is yes", "no the sea is blue"
# 4 prompts x (a desirable and an undesirable completion) = 8 unpaired rows
ROWS = [{"prompt": p, "completion": c, "label": label} for p in PROMPTS for c, label in ((GOOD, True), (BAD, False))]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _config(model: Path, data: Path, out: Path, **keys) -> KTOConfig:
    base = {"model": str(model), "data": str(data), "output_dir": str(out), "report_to": "none", "beta": 0.1,
            "learning_rate": 1e-3, "lr_scheduler": "constant", "max_grad_norm": 0.0, "log_every": 1, "seed": 0,
            "batch_size": 8, "ref_cache_dir": str(out.parent / "ref-cache"), "dtype": "auto"}
    return from_mapping(KTOConfig, {**base, **keys})


def _steps(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_second"}
            for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ the math


def test_kto_loss_by_hand() -> None:
    """The running example (module docstring): losses [0.5, 0.36], rewards [0, 2 log 0.75]. With z0 = 0.1:
    loss_D = 1 - sigma(2 (0 - 0.1)) = sigma(0.2) = 0.549834 and loss_U = 1 - sigma(2 (0.1 - log 0.75))
    = 1 - 1 / (1 + 0.5625 e^-0.2) = 0.315320: a larger z0 asks more of a desirable completion and less of
    an undesirable one. Weights lambda_D = 2, lambda_U = 0.5 multiply each loss: [1.0, 0.18]."""
    out = kto_loss(LOGPS, REF, DESIRABLE, torch.tensor(0.0, dtype=torch.float64), beta=BETA)
    assert out.losses.tolist() == pytest.approx([0.5, 0.36], abs=1e-12)
    assert out.rewards.tolist() == pytest.approx([0.0, 2 * math.log(0.75)], abs=1e-12)
    shifted = kto_loss(LOGPS, REF, DESIRABLE, 0.1, beta=BETA).losses.tolist()
    assert shifted == pytest.approx([1 / (1 + math.exp(-0.2)), 1 - 1 / (1 + 0.5625 * math.exp(-0.2))], abs=1e-12)
    assert shifted == pytest.approx([0.549834, 0.315320], abs=5e-7)
    weighted = kto_loss(LOGPS, REF, DESIRABLE, 0.0, beta=BETA, desirable_weight=2.0, undesirable_weight=0.5)
    assert weighted.losses.tolist() == pytest.approx([1.0, 0.18], abs=1e-12)


def test_kto_gradient_by_hand_and_none_through_z0() -> None:
    """d loss_D / d log pi(y_D) = -lambda_D beta sigma(x)(1 - sigma(x)) at x = 0: -2 * 0.25 = -0.5 (pushes
    log pi(y_D) up); d loss_U / d log pi(y_U) = +lambda_U beta s (1 - s) with s = sigma(-2 log 0.75) = 0.64:
    2 * 0.64 * 0.36 = 0.4608 (pushes log pi(y_U) down). z0 is detached: no gradient reaches the mismatched
    pairs' log-probs, nor a z0 tensor that requires one."""
    logps = LOGPS.clone().requires_grad_(True)
    kl_policy = torch.tensor([-3.0, -5.0], dtype=torch.float64, requires_grad=True)
    z0 = kto_reference_point(kl_policy, torch.tensor([-4.0, -4.5], dtype=torch.float64))
    assert not z0.requires_grad
    z0_leaf = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    for point in (z0 * 0, z0_leaf):  # z0 * 0: the same graph position with value 0
        logps.grad = None
        kto_loss(logps, REF, DESIRABLE, point, beta=BETA).losses.sum().backward()
        assert logps.grad.tolist() == pytest.approx([-0.5, 0.4608], abs=1e-12)
    assert kl_policy.grad is None and z0_leaf.grad is None


def test_reference_point_by_hand_and_clamped_at_zero() -> None:
    """Mismatched log-ratios (-3 - -4, -5 - -4.5) = (1, -0.5): mean 0.25 = z0. Swapping policy and reference
    gives mean -0.25, clamped to 0 (a KL is never negative)."""
    policy, ref = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    assert kto_reference_point(policy, ref).item() == pytest.approx(0.25)
    assert kto_reference_point(ref, policy).item() == 0.0
    assert kto_reference_point(ref, policy).shape == ()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"beta": 0.0}, "beta must be > 0"), ({"desirable_weight": -1.0}, "desirable_weight must be >= 0"),
    ({"desirable": torch.tensor([True])}, "desirable must be a bool mask of shape (2,)"),
])
def test_kto_loss_checks_its_inputs(kwargs: dict, message: str) -> None:
    desirable = kwargs.pop("desirable", DESIRABLE)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kto_loss(LOGPS, REF, desirable, 0.0, **kwargs)
    with pytest.raises(ValueError, match="at least one mismatched pair"):
        kto_reference_point(torch.zeros(0), torch.zeros(0))


# ------------------------------------------------------------------------------------------------ data


def test_pairs_split_into_a_desirable_and_an_undesirable_example(tmp_path: Path, tiny_tokenizer) -> None:
    """Each pair gives (prompt, chosen, True) then (prompt, rejected, False), keeping id, group and source;
    unpaired rows pass through. From a file of 4 pairs with eval_fraction 0.25: one whole pair (both halves)
    is held out, so train has 3 + 3 and eval 1 + 1, and no prompt is in both."""
    pair = PreferencePair("p", "good", "bad", id="7", group="g", source="f.jsonl:3")
    row = UnpairedExample("q", "meh", False)
    out = unpaired([pair, row])
    assert [(e.prompt, e.completion, e.label) for e in out] == [("p", "good", True), ("p", "bad", False),
                                                                ("q", "meh", False)]
    assert (out[1].id, out[1].group, out[1].source) == ("7", "g", "f.jsonl:3")

    data = _write(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": GOOD, "rejected": BAD} for p in PROMPTS])
    config = _config(Path("m"), data, tmp_path / "run", eval_fraction=0.25)
    train_items, eval_items = load_kto_items(config, tiny_tokenizer, log=lambda _: None)
    assert sorted(i.desirable for i in train_items) == [False] * 3 + [True] * 3
    assert sorted(i.desirable for i in eval_items) == [False, True]

    def prompts(items: list) -> set[tuple[int, ...]]:  # the prompt tokens: those without a label
        return {tuple(t for t, label in zip(i.input_ids, i.labels, strict=True) if label == -100) for i in items}

    assert len(prompts(eval_items)) == 1 and not prompts(eval_items) & prompts(train_items)


def test_mismatched_pairs_are_fixed_and_use_another_prompt(tiny_tokenizer, tmp_path: Path) -> None:
    """Every example's KL completion is another example's completion, with another prompt, the same for
    the same seed; when all prompts agree it is simply another example. Tokenised: the KL row is the
    example's prompt + its partner's completion."""
    examples = unpaired([PreferencePair(p, GOOD + str(i), BAD + str(i)) for i, p in enumerate(PROMPTS)])
    partners = kl_partners(examples, seed=0)
    assert partners == kl_partners(examples, seed=0)
    assert all(examples[j].prompt != examples[i].prompt for i, j in enumerate(partners))
    same = [UnpairedExample("x", str(i), i % 2 == 0) for i in range(5)]
    assert all(j != i for i, j in enumerate(kl_partners(same, seed=3)))

    data = _write(tmp_path / "rows.jsonl", [{"prompt": e.prompt, "completion": e.completion, "label": e.label}
                                            for e in examples])
    items, _ = load_kto_items(_config(Path("m"), data, tmp_path / "run"), tiny_tokenizer, log=lambda _: None)
    for i, item in enumerate(items):
        prompt = tiny_tokenizer(examples[i].prompt)["input_ids"]
        partner = tiny_tokenizer(examples[partners[i]].completion, add_special_tokens=False)["input_ids"]
        assert item.kl_input_ids == prompt + partner + [tiny_tokenizer.eos_token_id]
        assert item.kl_labels[len(prompt):] == partner + [tiny_tokenizer.eos_token_id]


@pytest.mark.parametrize(("row", "field", "message"), [
    ({"prompt": "p", "completion": "c", "label": "maybe"}, "label", "expected a boolean"),
    ({"prompt": "p", "completion": "", "label": True}, "completion", "empty text"),
    ({"prompt": "p", "completion": "c", "label": None}, "label", "field 'label' is null"),
])
def test_bad_rows_name_file_line_and_field(tmp_path: Path, row: dict, field: str, message: str) -> None:
    data = _write(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(PreftuneError, match=message) as info:
        read_kto_examples(str(data), _config(Path("m"), data, tmp_path / "run"), log=lambda _: None)
    assert (info.value.path, info.value.line, info.value.field) == (str(data), 2, field)


def test_a_missing_class_and_rankings_are_refused(tmp_path: Path) -> None:
    """Desirable rows only: an error naming the file and the missing class. A ranking file: an error too."""
    data = _write(tmp_path / "good.jsonl", [r for r in ROWS if r["label"]])
    with pytest.raises(PreftuneError, match="4 desirable and 0 undesirable: no undesirable") as info:
        load_kto_items(_config(Path("m"), data, tmp_path / "run"), None, log=lambda _: None)
    assert (info.value.path, info.value.field) == (str(data), "label")
    ranks = _write(tmp_path / "ranks.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}])
    with pytest.raises(PreftuneError, match="rankings cannot train kto") as info:
        read_kto_examples(str(ranks), _config(Path("m"), ranks, tmp_path / "run"), log=lambda _: None)
    assert info.value.path == f"{ranks}:1"


def test_class_weights_advice_warns_with_the_weights_to_use(tmp_path: Path) -> None:
    """n_D = 3, n_U = 1 with weights 1: lambda_D n_D / (lambda_U n_U) = 3, outside [1, 4/3]. The advice:
    desirable_weight in [1/3, 4/9] = [0.3333, 0.4444] or undesirable_weight in [3 * 3/4, 3] = [2.25, 3].
    desirable_weight 0.4 gives 1.2: inside, no warning; so is 4 vs 3 examples (4/3, the upper end)."""
    lines: list[str] = []
    config = _config(Path("m"), tmp_path / "d.jsonl", tmp_path / "run")
    assert check_weights(3, 1, config, lines.append) == pytest.approx(3.0)
    assert "3 desirable and 1 undesirable" in lines[0]
    assert lines[1].startswith("warning:") and "desirable_weight in [0.3333, 0.4444]" in lines[1]
    assert "undesirable_weight in [2.25, 3]" in lines[1]
    lines.clear()
    check_weights(3, 1, _config(Path("m"), tmp_path / "d.jsonl", tmp_path / "run", desirable_weight=0.4), lines.append)
    check_weights(4, 3, config, lines.append)
    assert not any("warning" in line for line in lines)


@pytest.mark.parametrize(("key", "value"), [("beta", 0), ("desirable_weight", 0), ("undesirable_weight", -1)])
def test_config_refuses_non_positive_beta_and_weights(tmp_path: Path, key: str, value: float) -> None:
    with pytest.raises(PreftuneError) as info:
        _config(Path("m"), tmp_path / "d.jsonl", tmp_path / "run", **{key: value})
    assert info.value.field == key and "> 0" in info.value.message


# ------------------------------------------------------------------------------------------------ training


def test_training_lowers_the_loss_and_step_1_is_half_the_weight(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Step 1: policy == reference, so every log-ratio is 0, z0 = max(0, 0) = 0 and each loss is
    lambda_y (1 - sigma(0)) = lambda_y / 2: 0.5 with weights 1; with lambda_D = 2, lambda_U = 1 and 4 + 4
    examples (4 * 1 + 4 * 0.5) / 8 = 0.75 (float32 cached reference: 1e-6). Then 8 full-batch steps (lr
    1e-3): the loss falls and the desirable completions' rewards end above the undesirable ones'."""
    data = _write(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "run"
    method = KTOMethod()
    train(method, _config(tiny_model_dir, data, out, max_steps=8))
    steps = _steps(out)
    first, last = steps[0], steps[-1]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert (first["count/desirable"], first["count/undesirable"]) == (4.0, 4.0)
    assert last["loss"] < first["loss"] - 0.05
    assert last["rewards/chosen"] > last["rewards/rejected"] and last["rewards/margins"] > 0
    assert {"logps/chosen", "logps/rejected"} <= set(last)
    assert method.ref_hits == {"train": False}

    weighted = tmp_path / "weighted"
    train(KTOMethod(), _config(tiny_model_dir, data, weighted, max_steps=1, desirable_weight=2.0))
    assert _steps(weighted)[0]["loss"] == pytest.approx(0.75, abs=1e-6)


@pytest.fixture(scope="module")
def other_float64_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model (seed 1) in float64: the policy, with the seed-0 model as its reference, so that the
    two differ at step 1."""
    from transformers import AutoModelForCausalLM

    from preftune.models.tiny import make_tiny

    out = make_tiny(tmp_path_factory.mktemp("tiny64-seed1"), seed=1)
    AutoModelForCausalLM.from_pretrained(out).to(torch.float64).save_pretrained(out)
    return out


def test_z0_spans_the_whole_step_so_accumulation_does_not_change_it(float64_model_dir: Path,
                                                                     other_float64_model_dir: Path,
                                                                     tmp_path: Path) -> None:
    """z0 is computed from the mismatched pairs of every micro-batch of the step, so 8 examples as batch 8 x
    accumulation 1, 1 x 8 and 2 x 4 give the same z0, loss and update (float64 models, a reference
    forward every step: only the summation order differs, ~1e-16; see tests/test_loop.py for the 1e-10 on
    weights). A per-micro-batch z0 (TRL's) would give 1 x 8 eight different z0s, each from one pair.

    The reference is another model, so at step 1 the log-ratios are not 0 and z0 is checked by hand: the
    mean over the 8 mismatched pairs of log pi(y'|x) - log pi_ref(y'|x), clamped at 0 (the models are
    ordered so that it is positive), and the step-1 loss is the mean of kto_loss with that z0."""
    data = _write(tmp_path / "rows.jsonl", ROWS)
    runs = {}
    for batch, accum in [(8, 1), (1, 8), (2, 4)]:
        out = tmp_path / f"b{batch}a{accum}"
        method = KTOMethod()
        train(method, _config(other_float64_model_dir, data, out, batch_size=batch, grad_accum=accum, max_steps=3,
                              ref_model=str(float64_model_dir), precompute_ref_logps=False))
        runs[(batch, accum)] = (_steps(out), _weights(out / "final"))

    from preftune.models import load_policy

    batch = collate_unpaired(method.train_items, pad_token_id=method.tokenizer.pad_token_id)
    models = [load_policy(str(d), dtype="auto") for d in (other_float64_model_dir, float64_model_dir)]
    with torch.no_grad():
        kl_rows = {k: batch["kl_" + k] for k in ("input_ids", "attention_mask", "labels")}
        kl_policy, kl_ref = (batch_logps(m, kl_rows)[0] for m in models)
        policy, ref = (batch_logps(m, batch)[0] for m in models)
    mean = (kl_policy - kl_ref).mean().item()
    assert mean > 0.01  # z0 matters at step 1
    expected = kto_loss(policy, ref, batch["desirable"], mean, beta=0.1).losses.mean().item()

    base, w_base = runs[(8, 1)]
    assert base[0]["kl"] == pytest.approx(mean, rel=1e-12)
    assert base[0]["loss"] == pytest.approx(expected, rel=1e-12)
    assert all(r["kl"] > 0 for r in base)
    for steps, weights in runs.values():
        for a, b in zip(base, steps, strict=True):
            for key in ("loss", "kl", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen"):
                assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-15), key
        for key in w_base:
            torch.testing.assert_close(weights[key], w_base[key], rtol=0, atol=1e-10, msg=key)


def test_cached_reference_equals_a_reference_forward_every_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    """precompute_ref_logps true (both reference log-probs cached, then read back by a second run) and false
    give the same loss curve and z0 (float32 cache: 1e-5); LoRA without a cache (reference = adapter off)
    starts at loss 0.5 like the full model (the adapter starts at zero, so policy == reference)."""
    data = _write(tmp_path / "rows.jsonl", ROWS)
    keys = {"max_steps": 3, "batch_size": 4, "grad_accum": 2}
    methods = {}
    for name, extra in {"cached": {}, "again": {}, "online": {"precompute_ref_logps": False}}.items():
        methods[name] = KTOMethod()
        train(methods[name], _config(tiny_model_dir, data, tmp_path / name, **keys, **extra))
    assert methods["cached"].ref_hits == {"train": False} and methods["again"].ref_hits == {"train": True}
    for c, o in zip(_steps(tmp_path / "cached"), _steps(tmp_path / "online"), strict=True):
        assert c["loss"] == pytest.approx(o["loss"], abs=1e-5)
        assert c["kl"] == pytest.approx(o["kl"], abs=1e-5)
    train(KTOMethod(), _config(tiny_model_dir, data, tmp_path / "lora", max_steps=1, lora={"r": 4},
                               precompute_ref_logps=False))
    assert _steps(tmp_path / "lora")[0]["loss"] == pytest.approx(0.5, abs=1e-6)


class _InterruptAt(KTOMethod):
    """KTO that sends this process a real SIGINT (Ctrl-C) while preparing step ``at`` (0-based)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def before_step(self, model, step):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return None


def test_resume_is_exact(tiny_model_dir: Path, tmp_path: Path) -> None:
    """6 steps straight == Ctrl-C during step 3 (checkpoint step-3), then the same command again.

    Batch 2: 4 steps per epoch over the 8 rows, so the run crosses an epoch and some steps lack a class.
    log_every 2, so step 3 falls inside a log span: the class sums since the last line are the method's
    state (method_state_0.pt). Every metrics line after the resume and the final weights are EXACTLY those
    of the straight run."""
    data = _write(tmp_path / "rows.jsonl", ROWS)
    keys = {"batch_size": 2, "max_steps": 6, "log_every": 2, "save_every": 100}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(KTOMethod(), _config(tiny_model_dir, data, straight, **keys))
    with pytest.raises(KeyboardInterrupt):
        train(_InterruptAt(2), _config(tiny_model_dir, data, resumed, **keys))
    state = torch.load(resumed / "checkpoints" / "step-3" / "method_state_0.pt", weights_only=True)
    assert state["steps"] == 3 and state["since_log"][:, 2].sum().item() == 2.0  # step 3's 2 examples
    train(KTOMethod(), _config(tiny_model_dir, data, resumed, **keys))
    assert [r["step"] for r in _steps(straight)] == [2, 4, 6]
    assert _steps(resumed) == _steps(straight)
    assert {"kl", "rewards/chosen", "rewards/rejected", "count/desirable"} <= set(_steps(straight)[-1])
    a, b = _weights(straight / "final"), _weights(resumed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ prefs loss


def _prefs(*args: str):
    return CliRunner().invoke(app, ["prefs", "loss", "kto", *args])


def test_prefs_loss_kto_shows_the_parts() -> None:
    """The running example: r_D = 0, r_U = -0.575364, v_D / lambda_D = sigma(0) = 0.5, v_U / lambda_U =
    sigma(0.575364) = 1 / 1.5625 = 0.64, losses 0.5 and 0.36, their mean 0.43. With --z0 0.1 (module docstring
    of the math tests): 0.549834, 0.315320, mean 0.432577. One example alone: its loss; weight 1.33 on the
    desirable one: 1.33 * 0.5 = 0.665."""
    args = ["--policy-desirable", "0.2", "--ref-desirable", "0.2", "--policy-undesirable", "0.3",
            "--ref-undesirable", "0.4", "--beta", "2"]
    result = _prefs(*args)
    assert result.exit_code == 0, result.output
    for text in ("KTO loss, beta = 2", "-0.575364", "0.640000", "0.360000", "0.430000", "lambda_U - v_U"):
        assert text in result.stdout
    data = json.loads(_prefs(*args, "--z0", "0.1", "--json").stdout)
    assert data["loss_name"] == "kto" and data["inputs"]["z0"] == 0.1
    assert data["reward_undesirable"] == pytest.approx(2 * math.log(0.75), abs=1e-12)
    assert data["value_desirable"] == pytest.approx(1 / (1 + math.exp(0.2)), abs=1e-12)
    assert (data["loss_desirable"], data["loss_undesirable"]) == pytest.approx((0.549834, 0.315320), abs=5e-7)
    assert data["loss"] == pytest.approx((data["loss_desirable"] + data["loss_undesirable"]) / 2, abs=1e-15)
    alone = json.loads(_prefs("--log", "--policy-desirable", "-1.6", "--ref-desirable", "-1.6",
                              "--desirable-weight", "1.33", "--json").stdout)
    assert alone["loss"] == pytest.approx(0.665, abs=1e-12) and "loss_undesirable" not in alone


@pytest.mark.parametrize(("args", "message"), [
    ([], "field '--policy-desirable': no example given"),
    (["--policy-undesirable", "0.3"], "field '--ref-undesirable': needed with --policy-undesirable"),
    (["--policy-desirable", "0.2", "--ref-desirable", "0.2", "--z0", "-1"], "field '--z0': must be >= 0"),
    (["--policy-desirable", "1.5", "--ref-desirable", "0.2"], "field '--policy-desirable': a probability must be"),
    (["--policy-desirable", "0.2", "--ref-desirable", "0.2", "--undesirable-weight", "0"],
     "field '--undesirable-weight': must be > 0"),
])
def test_prefs_loss_kto_errors_are_one_line(args: list[str], message: str) -> None:
    result = _prefs(*args)
    assert result.exit_code != 0 and message in result.output, result.output
