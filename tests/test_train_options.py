"""Training options the loop promises: TensorBoard through accelerate's trackers, gradient checkpointing.

Both train the tiny in-process Llama of `preftune.models.tiny` for a few SFT steps on CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from preftune.config import from_mapping
from preftune.train.loop import read_metrics, train
from preftune.train.sft import SFTConfig, SFTMethod

EXAMPLES = [
    {"prompt": "Question: what is two plus two? Answer:", "completion": " four."},
    {"prompt": "Please write a short poem about the sea.", "completion": " The sea is blue and the sky is wide."},
    {"prompt": "What colour is the sky?", "completion": " Blue."},
    {"prompt": "To be, or not to be:", "completion": " that is the question."},
]


def _config(model: Path, out: Path, **values) -> SFTConfig:
    base = {"model": str(model), "data": "in-memory", "output_dir": str(out), "report_to": "none",
            "learning_rate": 1e-3, "lr_scheduler": "constant", "batch_size": 2, "log_every": 1, "seed": 0,
            "dtype": "float32"}
    return from_mapping(SFTConfig, {**base, **values})


def test_tensorboard_events_hold_the_metrics_jsonl_values(tiny_model_dir: Path, tmp_path: Path) -> None:
    """report_to tensorboard writes event files under OUTPUT_DIR/logs whose `loss` and `eval/loss` points
    are the values of metrics.jsonl at the same steps (TensorBoard stores float32, hence rel 1e-6)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(SFTMethod(examples=EXAMPLES[:2] * 2, eval_examples=EXAMPLES[2:]),
          _config(tiny_model_dir, out, max_steps=3, eval_every=2, report_to="tensorboard"))
    events = sorted((out / "logs").rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {out / 'logs'}"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    records = read_metrics(out / "metrics.jsonl")
    for key in ("loss", "grad_norm", "learning_rate", "eval/loss"):
        want = [(r["step"], r[key]) for r in records if key in r]
        got = sorted(scalars.get(key, []))
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3] and [s for s, _ in scalars["eval/loss"]] == [2, 3]


def test_gradient_checkpointing_changes_memory_not_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    """gradient_checkpointing: true recomputes activations in backward; with no dropout the recomputed
    forward is the same arithmetic, so the loss curve and the final weights equal those of a plain run
    (float32 on CPU: rel 1e-5). The model really runs with checkpointing on (else this test proves nothing)."""
    from safetensors.torch import load_file

    runs = {}
    for name, flag in (("plain", False), ("ckpt", True)):
        method = SFTMethod(examples=EXAMPLES)
        final = train(method, _config(tiny_model_dir, tmp_path / name, max_steps=3, gradient_checkpointing=flag))
        model = method.model
        on = getattr(model, "is_activation_checkpointing", None)
        on = on if on is not None else model.is_gradient_checkpointing
        assert bool(on) is flag, name
        runs[name] = (read_metrics(tmp_path / name / "metrics.jsonl"), load_file(str(final / "model.safetensors")))
    (plain, w_plain), (ckpt, w_ckpt) = runs["plain"], runs["ckpt"]
    assert [r["step"] for r in plain] == [r["step"] for r in ckpt] == [1, 2, 3]
    for a, b in zip(plain, ckpt, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert w_plain.keys() == w_ckpt.keys()
    for key in w_plain:
        torch.testing.assert_close(w_ckpt[key], w_plain[key], rtol=1e-5, atol=1e-7, msg=key)
