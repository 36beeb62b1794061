"""The training loop: accumulation invariance, exact resume, metrics.jsonl, checkpoints, LoRA, group_by_length.

Every test trains the 2-layer, 64-dim tiny Llama of `preftune.models.tiny` for a few steps on CPU.
"""

from __future__ import annotations

import math
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from preftune.config import from_mapping, load_config
from preftune.data.collate import item_length, real_token_share
from preftune.train.loop import (
    _describe,
    batch_indices,
    epoch_order,
    plan_steps,
    read_metrics,
    train,
)
from preftune.train.plan import split_for_process
from preftune.train.sft import SFTConfig, SFTMethod

# Completions of different lengths, so a mean of per-micro-batch means would differ from the token mean.
EXAMPLES = [
    {"prompt": "Question: what is two plus two? Answer:", "completion": " four."},
    {"prompt": "Please write a short poem about the sea.", "completion": " The sea is blue and the sky is wide."},
    {"prompt": "What colour is the sky?", "completion": " Blue."},
    {"prompt": "Shall I compare thee to a summer's day?", "completion": " Thou art more lovely and more temperate."},
    {"prompt": "To be, or not to be:", "completion": " that is the question."},
    {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog."},
    {"prompt": "Rough winds do shake", "completion": " the darling buds of May."},
    {"prompt": "Answer yes or no:", "completion": " yes"},
]
# Eight more, from very short to long, for the group_by_length tests (16 items, 2+ steps per epoch).
MORE_EXAMPLES = [
    {"prompt": "Hi", "completion": " there."},
    {"prompt": "Count:", "completion": " one two three four five six seven eight nine ten eleven twelve."},
    {"prompt": "Now is the winter of our discontent", "completion": " made glorious summer by this sun of York."},
    {"prompt": "Say no.", "completion": " No."},
    {"prompt": "All the world's a stage,", "completion": " and all the men and women merely players; they have "
                                                          "their exits and their entrances."},
    {"prompt": "Two words:", "completion": " good night."},
    {"prompt": "If music be the food of love,", "completion": " play on."},
    {"prompt": "Describe the weather in a long sentence, please, with as much detail as you can.",
     "completion": " It rained all morning, the wind rose at noon, and by evening the sky was clear and cold."},
]


def _config(model: Path, out: Path, **values) -> SFTConfig:
    base = {"model": str(model), "data": "in-memory", "output_dir": str(out), "report_to": "none",
            "learning_rate": 1e-3, "lr_scheduler": "constant", "max_grad_norm": 0.0, "log_every": 1}
    return from_mapping(SFTConfig, {**base, **values})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with attention dropout 0.1, so every step consumes the torch RNG."""
    from preftune.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-dropout"), seed=0, attention_dropout=0.1)


def test_data_plan_is_a_function_of_the_step() -> None:
    """10 items, global batch 4 -> 2 steps per epoch (2 items left out each epoch); step 3 is the second
    batch of epoch 1, i.e. positions 4..7 of the permutation seeded by seed + 1."""
    config = from_mapping(SFTConfig, {"model": "m", "data": "d", "batch_size": 2, "grad_accum": 2, "epochs": 1.5})
    state = plan_steps(10, config, num_processes=1)
    assert (state.global_batch, state.steps_per_epoch, state.total_steps) == (4, 2, 3)
    assert batch_indices(state, 3, seed=7) == epoch_order(10, seed=7, epoch=1)[4:8]
    assert sorted(epoch_order(10, seed=7, epoch=0)) == list(range(10))
    assert epoch_order(10, seed=7, epoch=0) != epoch_order(10, seed=7, epoch=1)


def test_split_for_process_interleaves_micro_batches() -> None:
    """8 items, 2 micro-batches x 2 processes: chunk c = k*W + p, so process 1 gets chunks 1 and 3."""
    items = list("abcdefgh")
    assert split_for_process(items, micro_batches=2, process=0, num_processes=2) == [["a", "b"], ["e", "f"]]
    assert split_for_process(items, micro_batches=2, process=1, num_processes=2) == [["c", "d"], ["g", "h"]]


def test_batch8_accum1_equals_batch1_accum8(float64_model_dir: Path, tmp_path: Path) -> None:
    """One optimizer step on the same 8 examples, as 1 micro-batch of 8 or 8 micro-batches of 1.

    Both must produce the gradient of the global token mean L = sum_i S_i / sum_i n_i (S_i the summed
    completion NLL of example i, n_i its completion tokens). Checked three ways, in float64:
    * the logged loss and grad_norm of both runs equal the values computed here directly, one example
      at a time with no padding: L and ||grad L|| (a mean of per-micro-batch means, the usual bug, gives
      a different L and a gradient ~8x too large with 8 micro-batches);
    * the parameters after the AdamW step are equal (tolerance 1e-10: float64 rounding of
      differently-ordered sums is ~1e-16 relative; Adam's first step is lr * g / (|g| + eps)).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.data.tokenize import tokenize_sft

    runs = {}
    for name, (batch, accum) in {"b8a1": (8, 1), "b1a8": (1, 8)}.items():
        config = _config(float64_model_dir, tmp_path / name, batch_size=batch, grad_accum=accum, max_steps=1)
        train(SFTMethod(examples=EXAMPLES), config)
        runs[name] = (read_metrics(tmp_path / name / "metrics.jsonl")[0], _weights(tmp_path / name / "final"))

    model = AutoModelForCausalLM.from_pretrained(float64_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(float64_model_dir)
    total_nll, total_tokens = torch.zeros((), dtype=torch.float64), 0
    for example in EXAMPLES:
        seq = tokenize_sft(tokenizer, example, max_length=1024)
        ids, labels = torch.tensor([seq.input_ids]), torch.tensor(seq.labels[1:])
        logits = model(input_ids=ids).logits[0, :-1]
        keep = labels != -100
        total_nll = total_nll + torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
        total_tokens += int(keep.sum())
    expected_loss = total_nll / total_tokens
    expected_loss.backward()
    expected_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item()

    for name, (record, _) in runs.items():
        assert record["loss"] == pytest.approx(expected_loss.item(), rel=1e-12, abs=0), name
        assert record["grad_norm"] == pytest.approx(expected_norm, rel=1e-10, abs=0), name
    (_, w8), (_, w1) = runs["b8a1"], runs["b1a8"]
    assert w8.keys() == w1.keys()
    for key in w8:
        torch.testing.assert_close(w8[key], w1[key], rtol=0, atol=1e-10, msg=key)
    start = _weights(float64_model_dir)
    assert any(not torch.equal(w8[k], start[k]) for k in w8)  # the step did move the weights


class _InterruptAt(SFTMethod):
    """SFT that sends this process a real SIGINT (Ctrl-C) while preparing step ``at`` (0-based)."""

    def __init__(self, at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at = at

    def before_step(self, model, step):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return None


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_continues_the_identical_loss_curve(dropout_model_dir: Path, tmp_path: Path,
                                                   group_by_length: bool) -> None:
    """6 steps straight == Ctrl-C during step 3, checkpoint, then resume steps 4..6.

    Ctrl-C while step 3 runs lets step 3 finish, saves checkpoints/step-3 (model, AdamW moments, the
    cosine schedule, RNG states) and raises KeyboardInterrupt; the same command again resumes. The model
    has dropout, so the RNG state matters. Everything is deterministic on CPU, so the loss curves and the
    final weights are compared for EXACT equality. Two epochs (4 steps per epoch) so the data order of the
    second epoch is also covered, in random order and with steps grouped by length.
    """
    values = {"batch_size": 2, "max_steps": 6, "lr_scheduler": "cosine", "warmup_steps": 2,
              "max_grad_norm": 1.0, "save_every": 100, "group_by_length": group_by_length}
    straight = tmp_path / "straight"
    train(SFTMethod(examples=EXAMPLES), _config(dropout_model_dir, straight, **values))

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(_InterruptAt(2, examples=EXAMPLES), _config(dropout_model_dir, resumed, **values))
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-3"]
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3]
    assert not (resumed / "final").exists()
    train(SFTMethod(examples=EXAMPLES), _config(dropout_model_dir, resumed, **values))

    curve = [(r["step"], r["loss"], r["grad_norm"], r["learning_rate"]) for r in read_metrics(straight / "metrics.jsonl")]
    assert [c[0] for c in curve] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["loss"], r["grad_norm"], r["learning_rate"])
            for r in read_metrics(resumed / "metrics.jsonl")] == curve
    a, b = _weights(straight / "final"), _weights(resumed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_metrics_jsonl_schedule_eval_and_checkpoints(tiny_model_dir: Path, tmp_path: Path) -> None:
    """4 steps, linear schedule with 2 warmup steps, peak lr 1e-3, log every step, eval every 2, save every step.

    transformers' linear schedule multiplies the peak by s/2 during warmup (s = steps taken: 0, 1) and by
    (4 - s)/(4 - 2) after it (s = 2, 3); the logged rate is the one each step used:
    [0, 0.5e-3, 1e-3, 0.5e-3]. keep_checkpoints 2 leaves step-3 and step-4.
    """
    out = tmp_path / "run"
    config = _config(tiny_model_dir, out, batch_size=2, max_steps=4, lr_scheduler="linear", warmup_steps=2,
                     eval_every=2, save_every=1, keep_checkpoints=2)
    final = train(SFTMethod(examples=EXAMPLES[:6], eval_examples=EXAMPLES[6:]), config)

    records = read_metrics(out / "metrics.jsonl")
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
    assert [r["learning_rate"] for r in train_lines] == pytest.approx([0.0, 0.5e-3, 1e-3, 0.5e-3], abs=1e-15)
    assert [r["epoch"] for r in train_lines] == [0.3333, 0.6667, 1.0, 1.3333]  # 3 steps per epoch, 4 decimals
    for r in train_lines:
        assert set(r) >= {"step", "epoch", "loss", "grad_norm", "learning_rate", "tokens_per_second",
                          "mean_token_accuracy"}
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_second"] > 0
        assert 0.0 <= r["mean_token_accuracy"] <= 1.0
    assert [r["step"] for r in eval_lines] == [2, 4]
    assert all(set(r) == {"step", "epoch", "eval/loss", "eval/mean_token_accuracy"} for r in eval_lines)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-4"]
    assert load_config(SFTConfig, out / "config.yaml").max_steps == 4  # the resolved config reloads
    assert final == out / "final" and (final / "tokenizer.json").is_file()


def test_log_every_averages_the_steps_between_lines(tiny_model_dir: Path, tmp_path: Path) -> None:
    """log_every 2 writes steps 2 and 3 (the last step always): each line is the mean of its steps."""
    every = tmp_path / "every"
    train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, every, batch_size=2, max_steps=3))
    pairs = tmp_path / "pairs"
    train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, pairs, batch_size=2, max_steps=3, log_every=2))
    per_step = [r["loss"] for r in read_metrics(every / "metrics.jsonl")]
    lines = read_metrics(pairs / "metrics.jsonl")
    assert [r["step"] for r in lines] == [2, 3]
    assert lines[0]["loss"] == pytest.approx((per_step[0] + per_step[1]) / 2, rel=1e-12)
    assert lines[1]["loss"] == pytest.approx(per_step[2], rel=1e-12)


def test_lora_trains_only_the_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With lora, final/ holds an adapter whose B matrices moved from their zero init; loading base +
    adapter shows every base weight unchanged; final-merged differs from the base only in the adapted
    projections (q_proj, v_proj)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    config = _config(tiny_model_dir, out, batch_size=4, max_steps=2, learning_rate=1e-2, merge_lora=True,
                     lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    final = train(SFTMethod(examples=EXAMPLES), config)
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()

    base = _weights(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    state = peft_model.state_dict()
    lora_b = [k for k in state if "lora_B" in k]
    assert lora_b and all(state[k].abs().sum() > 0 for k in lora_b)
    for key, value in peft_model.get_base_model().state_dict().items():
        if "lora_" in key:
            continue
        assert torch.equal(value, base[key.replace("base_layer.", "")]), key

    merged = _weights(out / "final-merged")
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_resume_with_other_batch_settings_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A rerun into the run's output_dir with other batch settings is refused, naming each differing key
    (old -> new; see tests/test_resume_safety.py for the rest); the data plan is checked as well, for data
    that changed under the same settings (here in memory; in a file, rewritten in place). resume: never
    starts over: the old checkpoints go and metrics.jsonl starts afresh."""
    from preftune.errors import PreftuneError

    out = tmp_path / "run"
    train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, batch_size=2, max_steps=2, save_every=1))
    with pytest.raises(PreftuneError, match="other settings, which is not continued: batch_size: 2 -> 4"):
        train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, batch_size=4, max_steps=2))
    with pytest.raises(PreftuneError, match="group_by_length: false -> true"):
        train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, batch_size=2, max_steps=2,
                                                    group_by_length=True))
    with pytest.raises(PreftuneError, match="num_items = 8, this run has 6"):
        train(SFTMethod(examples=EXAMPLES[:6]), _config(tiny_model_dir, out, batch_size=2, max_steps=2))
    train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, batch_size=4, max_steps=1, resume="never"))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]  # a fresh run starts a fresh file
    assert not (out / "checkpoints").exists()


def test_too_few_examples_for_one_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    from preftune.errors import PreftuneError

    with pytest.raises(PreftuneError, match="only 8 training examples, but one optimizer step needs 12"):
        train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, tmp_path, batch_size=4, grad_accum=3))


def test_describe_counts_in_words() -> None:
    """The plan line says "1 step per epoch, 1 step" and "1 process", not "1 steps" / "1 processes"."""
    class Stub:
        model, eval_items = torch.nn.Linear(2, 1), []

    config = from_mapping(SFTConfig, {"model": "m", "data": "d", "batch_size": 2})
    lines: list[str] = []
    _describe(Stub(), plan_steps(3, config, num_processes=1), config, lines.append)
    assert lines[0] == ("3 training items, 0 eval items; 2 per step (batch_size 2 x grad_accum 1 x 1 process); "
                        "1 step per epoch, 1 step")
    assert lines[1].startswith("each epoch leaves out 1 item that does not fill a last step")
    lines.clear()
    _describe(Stub(), plan_steps(9, config, num_processes=2), config, lines.append)
    assert "x 2 processes); 2 steps per epoch, 2 steps" in lines[0]
    assert lines[1].startswith("each epoch leaves out 1 item that does not")


# ------------------------------------------------------------------------------------------------ group_by_length


def _pair_rows(n: int, seed: int = 0) -> list[list[int]]:
    """Row lengths of ``n`` synthetic pairs shaped like benchmarks/dpo_step.py's: a prompt of 48-80 tokens,
    each response 64-128."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = rng.randint(48, 80)
        rows.append([prompt + rng.randint(64, 128), prompt + rng.randint(64, 128)])
    return rows


def test_grouped_order_is_a_seeded_permutation_per_epoch() -> None:
    """100 items, global batch 8: 12 steps of 8 use 96 items, 4 are left out. The grouped order is a
    permutation, the same for the same (seed, epoch) (recomputed, not cached), different across epochs and
    seeds; it leaves out the same 4 items as the random order; each step's 8 items are sorted longest first,
    the step holding the longest item comes first and the other steps are not sorted by length."""
    from preftune.train.plan import _epoch_order

    lengths = [max(r) for r in _pair_rows(100)]
    order = epoch_order(100, seed=7, epoch=0, lengths=lengths, group=8)
    assert sorted(order) == list(range(100))
    _epoch_order.cache_clear()
    assert epoch_order(100, seed=7, epoch=0, lengths=lengths, group=8) == order
    assert epoch_order(100, seed=7, epoch=1, lengths=lengths, group=8) != order
    assert epoch_order(100, seed=8, epoch=0, lengths=lengths, group=8) != order
    plain = epoch_order(100, seed=7, epoch=0)
    assert order != plain and order[96:] == plain[96:] and sorted(order[:96]) == sorted(plain[:96])
    steps = [[lengths[i] for i in order[s:s + 8]] for s in range(0, 96, 8)]
    assert all(step == sorted(step, reverse=True) for step in steps)
    assert steps[0][0] == max(lengths)
    assert [s[0] for s in steps[1:]] != sorted((s[0] for s in steps[1:]), reverse=True)

    config = from_mapping(SFTConfig, {"model": "m", "data": "d", "batch_size": 4, "grad_accum": 2,
                                      "group_by_length": True})
    state = plan_steps(100, config, num_processes=1)
    assert state.steps_per_epoch == 12 and state.group_by_length
    assert batch_indices(state, 13, seed=7, lengths=lengths) == epoch_order(
        100, seed=7, epoch=1, lengths=lengths, group=8)[8:16]
    with pytest.raises(ValueError, match="99 lengths for 100 items"):
        epoch_order(100, seed=7, epoch=0, lengths=lengths[:99], group=8)


def test_grouped_order_depends_only_on_the_global_batch() -> None:
    """Step 5's items are the same for 8 x 1, 1 x 8 and 4 x 2 on one process and 4 x 1, 2 x 2 on two
    processes (all global batch 8), so accumulation and process invariance hold with grouping on."""
    lengths = [max(r) for r in _pair_rows(250)]
    steps = set()
    for batch, accum, world in [(8, 1, 1), (1, 8, 1), (4, 2, 1), (4, 1, 2), (2, 2, 2)]:
        config = from_mapping(SFTConfig, {"model": "m", "data": "d", "batch_size": batch, "grad_accum": accum,
                                          "group_by_length": True})
        steps.add(tuple(batch_indices(plan_steps(250, config, num_processes=world), 5, seed=0, lengths=lengths)))
    assert len(steps) == 1


@pytest.mark.parametrize(("batch_size", "grad_accum", "random_at_most", "grouped_at_least"),
                         [(8, 1, 0.83, 0.92), (4, 2, 0.85, 0.92), (2, 4, 0.88, 0.93)])
def test_grouped_micro_batches_pad_less(batch_size: int, grad_accum: int, random_at_most: float,
                                        grouped_at_least: float) -> None:
    """250 synthetic pairs (2 rows each, 112-208 tokens): the share of real tokens among the padded
    positions of the first epoch's micro-batches (each padded to its longest row, as collate_pairs does).
    Measured (seed 42): 8 x 1: random 81.4%, grouped 92.8%; 4 x 2: 83.8% -> 93.2%; 2 x 4: 87.3% -> 93.4%
    (a pair's two rows still pad to each other, so a micro-batch of 1 pair stays at 93.5% either way).
    Also the step's length spread: the mean (longest - shortest) item within a step shrinks at least 5x."""
    rows = _pair_rows(250)
    lengths = [max(r) for r in rows]
    config = from_mapping(SFTConfig, {"model": "m", "data": "d", "batch_size": batch_size,
                                      "grad_accum": grad_accum})
    state = plan_steps(250, config, num_processes=1)
    used, g = state.steps_per_epoch * state.global_batch, state.global_batch
    share, spread = {}, {}
    for grouped in (False, True):
        order = epoch_order(250, seed=42, epoch=0, lengths=lengths if grouped else None, group=g)[:used]
        share[grouped] = real_token_share([rows[i] for i in order], batch_size)
        steps = [[lengths[i] for i in order[s:s + g]] for s in range(0, used, g)]
        spread[grouped] = sum(max(s) - min(s) for s in steps) / len(steps)
    assert share[False] <= random_at_most and share[True] >= grouped_at_least, share
    assert spread[True] * 5 <= spread[False], spread


def test_real_token_share_counts_padding() -> None:
    """Rows [3, 5] and [2] in one batch pad to 5: 10 real of 15; alone they are 8/10 and 2/2."""
    assert real_token_share([[3, 5], [2]], batch_size=2) == pytest.approx(10 / 15)
    assert real_token_share([[3, 5], [2]], batch_size=1) == pytest.approx(10 / 12)


class _Recording(SFTMethod):
    """SFT that records the lengths of the items of every micro-batch it collates for training."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[list[int]] = []

    def collate(self, items):
        self.seen.append([item_length(i) for i in items])
        return super().collate(items)


def test_training_with_group_by_length_follows_the_grouped_order(tiny_model_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """16 examples, batch_size 2 x grad_accum 2, 6 steps (4 per epoch): the micro-batches the loop collates
    are consecutive pairs of the grouped order of each epoch, they pad less than the random order would,
    and the log says by how much (one line)."""
    method = _Recording(examples=EXAMPLES + MORE_EXAMPLES)
    train(method, _config(tiny_model_dir, tmp_path, batch_size=2, grad_accum=2, max_steps=6, group_by_length=True))
    lengths = [item_length(i) for i in method.train_items]
    expected = []
    for epoch, steps in ((0, 4), (1, 2)):
        order = epoch_order(16, seed=42, epoch=epoch, lengths=lengths, group=4)[:steps * 4]
        expected += [[lengths[i] for i in order[k:k + 2]] for k in range(0, len(order), 2)]
    assert method.seen == expected
    random_order = epoch_order(16, seed=42, epoch=0)
    padded = {name: sum(len(b) * max(b) for b in batches) for name, batches in (
        ("grouped", expected[:8]), ("random", [[lengths[i] for i in random_order[k:k + 2]] for k in range(0, 16, 2)]))}
    assert padded["grouped"] < padded["random"], padded
    log = [line for line in capsys.readouterr().err.splitlines() if "group_by_length:" in line]
    assert len(log) == 1 and "of the padded positions of the first epoch" in log[0] and "in random order" in log[0]


def test_accumulation_invariance_with_group_by_length(float64_model_dir: Path, tmp_path: Path) -> None:
    """group_by_length on, 16 examples, global batch 4, 2 steps: 4 x 1, 1 x 4 and 2 x 2 give the same loss
    curve (rel 1e-12) and the same weights (1e-10; see test_batch8_accum1_equals_batch1_accum8). The grouped
    steps are not the random ones, so a grouping that depended on the micro-batch would show here."""
    examples = EXAMPLES + MORE_EXAMPLES
    runs = {}
    for batch, accum in [(4, 1), (1, 4), (2, 2)]:
        out = tmp_path / f"b{batch}a{accum}"
        method = SFTMethod(examples=examples)
        train(method, _config(float64_model_dir, out, batch_size=batch, grad_accum=accum, max_steps=2,
                              group_by_length=True))
        runs[(batch, accum)] = ([r["loss"] for r in read_metrics(out / "metrics.jsonl")], _weights(out / "final"))
    lengths = [item_length(i) for i in method.train_items]
    state = plan_steps(16, _config(float64_model_dir, tmp_path, batch_size=4), num_processes=1)
    assert {frozenset(batch_indices(state, s, seed=42, lengths=lengths)) for s in (0, 1)} != {
        frozenset(batch_indices(state, s, seed=42)) for s in (0, 1)}
    (curve, weights), *others = runs.values()
    for other_curve, other_weights in others:
        assert other_curve == pytest.approx(curve, rel=1e-12, abs=0)
        for key in weights:
            torch.testing.assert_close(other_weights[key], weights[key], rtol=0, atol=1e-10, msg=key)
