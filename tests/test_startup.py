"""Start-up: the CLI loads none of the training libraries, the learning-rate schedule is transformers' own
to the last bit without importing it, the start-up clock's phases add up to the whole, batched tokenisation
gives the ids of one-by-one tokenisation, and a training run logs where its start-up time went."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from preftune import timing

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_cli_imports_no_training_library() -> None:
    """`preftune --help` and every command's parsing stay light: torch, transformers (and through it peft),
    accelerate and datasets load inside the commands that use them (tests/test_layers.py checks torch and
    transformers for the registry and config engine too)."""
    heavy = ("torch", "transformers", "accelerate", "peft", "datasets", "tensorboard")
    code = f"import sys, preftune.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(("warmup_steps", "warmup_ratio", "total"), [(0, 0.0, 7), (3, 0.0, 10), (0, 0.25, 9),
                                                                     (0, 0.0, 1), (5, 0.0, 5)])
def test_lr_schedule_equals_transformers_get_scheduler(kind, warmup_steps, warmup_ratio, total) -> None:
    """Every learning rate of every step, past the end too, is the float transformers' scheduler gives
    (``==``, not approx), and the state_dicts match, so checkpoints of either resume with the other."""
    import math
    from types import SimpleNamespace

    import torch
    from transformers import get_scheduler

    from preftune.train.schedule import lr_schedule

    config = SimpleNamespace(lr_scheduler=kind, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio)
    warmup = warmup_steps or math.ceil(warmup_ratio * total)
    ours_opt, theirs_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4) for _ in range(2))
    ours = lr_schedule(ours_opt, config, total)
    theirs = get_scheduler({"constant": "constant_with_warmup"}.get(kind, kind), theirs_opt,
                           num_warmup_steps=warmup, num_training_steps=total)
    for _ in range(total + 2):
        assert ours.get_last_lr() == theirs.get_last_lr()
        ours_opt.step(), theirs_opt.step()
        ours.step(), theirs.step()
    assert ours.state_dict() == theirs.state_dict()


def test_clock_phases_add_up_and_marks_without_a_clock_do_nothing() -> None:
    timing.stop()
    timing.mark("model")  # no clock: nothing happens
    assert timing.stop() is None
    timing.start("imports")
    time.sleep(0.01)
    timing.mark("model")
    time.sleep(0.02)
    timing.mark("imports")  # a phase seen before adds to its total
    timing.start("ignored")  # a running clock is not restarted
    total, phases = timing.stop()
    assert list(phases) == ["imports", "model"]
    assert phases["model"] >= 0.02 and phases["imports"] >= 0.01
    assert sum(phases.values()) == pytest.approx(total, abs=1e-6)
    assert timing.stop() is None
    assert timing.ready_line(12.34, {"imports": 5.0, "model": 0.123}) == \
        "ready to train after 12.3 s (imports 5.0 s, model 0.12 s)"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc")
def test_process_age_counts_from_the_start_of_the_process() -> None:
    code = "import time; from preftune.timing import process_age; time.sleep(0.3); print(process_age())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 0.3 <= float(result.stdout) < 60


def test_batched_tokenisation_gives_the_ids_of_one_by_one(tiny_tokenizer) -> None:
    """``tokenize_preferences`` encodes the plain-string texts ahead in two batched calls (``pre_encoded``);
    pairs, rankings, a message-list prompt (rendered by the chat template, not pre-encoded), a prompt shared
    by several items and truncation give exactly the items of encoding text by text."""
    from preftune.data import tokenize as tk
    from preftune.data.formats import PreferencePair, Ranking

    items = [PreferencePair("Shall I compare thee ", "to a summer's day?", "no."),
             PreferencePair("Shall I compare thee ", "Thou art more lovely", "to the sea " * 40),
             Ranking("What is the answer? ", ["yes", "The answer is yes.", "no"]),
             PreferencePair([{"role": "user", "content": "To be, or not to be"}], "that is the question", "yes"),
             PreferencePair("", "The quick brown fox", "the lazy dog")]
    options = {"max_length": 32, "max_prompt_length": 8}
    batched, batched_stats = tk.tokenize_preferences(tiny_tokenizer, items, **options)

    one_by_one = []
    for index, item in enumerate(items):
        fn = tk.tokenize_ranking if isinstance(item, Ranking) else tk.tokenize_pair
        one_by_one.append(fn(tiny_tokenizer, item, index=index, **options))
    assert batched == one_by_one
    assert batched_stats.response_truncated == 1
    assert tk._ENCODED.get() is None  # the batch is gone after the call

    with tk.pre_encoded(tiny_tokenizer, items[:1]):
        other = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
        assert tk._ahead(other) is None  # another tokenizer never reads this one's ids


def test_a_training_run_logs_where_its_start_up_went(tiny_model_dir: Path, tmp_path: Path, capfd) -> None:
    """`train` logs ``ready to train after X s (...)`` once, before the first step: its phases in the order
    they ran (imports, accelerate, model, data, reference, prepare) and adding up to X."""
    import json
    import re

    from preftune.train import run

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}? ", "chosen": "yes", "rejected": "no no"}) + "\n"
                            for i in range(4)))
    run("dpo", {"model": str(tiny_model_dir), "data": str(data), "output_dir": str(tmp_path / "run"),
                "max_steps": 1, "batch_size": 4, "report_to": "none", "ref_cache_dir": str(tmp_path / "cache")})
    lines = [line for line in capfd.readouterr().err.splitlines() if "ready to train after" in line]
    assert len(lines) == 1
    match = re.search(r"ready to train after ([\d.]+) s \((.*)\)", lines[0])
    phases = {name: float(s) for name, s in re.findall(r"([a-z]+) ([\d.]+) s", match.group(2))}
    assert list(phases) == ["imports", "accelerate", "model", "data", "reference", "prepare"]
    assert sum(phases.values()) == pytest.approx(float(match.group(1)), abs=0.01 * len(phases) + 0.05)
    assert timing.stop() is None  # the loop stopped its clock


def test_a_command_called_in_process_leaves_no_clock_and_freezes_nothing(tmp_path: Path) -> None:
    """A program (here a test) calling the app is not a process started for one command: a `train` that
    stops at a mistake leaves no start-up clock running, and nothing is ever gc-frozen in the caller."""
    import gc

    from typer.testing import CliRunner

    from preftune.cli import app

    result = CliRunner().invoke(app, ["train", "dpo", "--model", str(tmp_path / "missing"), "--data", "x.jsonl"])
    assert result.exit_code == 1
    assert timing.stop() is None
    assert gc.get_freeze_count() == 0


def test_the_train_command_counts_from_the_start_of_its_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`python -m preftune train dpo` (a process for one command: it imports up front and gc-freezes) logs the
    line with the imports counted from the process start: they include torch, so they take a while."""
    import json
    import os
    import re

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}? ", "chosen": "yes", "rejected": "no no"}) + "\n"
                            for i in range(4)))
    argv = [sys.executable, "-m", "preftune", "train", "dpo", "--model", str(tiny_model_dir), "--data", str(data),
            "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--batch_size", "4", "--report_to", "none",
            "--ref_cache_dir", str(tmp_path / "cache")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"ready to train after ([\d.]+) s \(imports ([\d.]+) s, accelerate", result.stderr)
    assert match is not None, result.stderr[-2000:]
    assert float(match.group(2)) > 0.3  # the interpreter, the CLI, torch, transformers: never this fast
    assert (tmp_path / "run" / "final" / "config.json").is_file()
