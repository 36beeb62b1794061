"""Many processes: two CPU processes (gloo) train exactly like one process on the same global batch;
the accelerate configs in examples/accelerate parse; the real-model configs in examples/real load.

The two-process run goes through the user's path: ``accelerate launch --config_file
examples/accelerate/multi_cpu.yaml -m preftune train dpo CONFIG.yaml --batch_size 4``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((REPO / "examples" / "accelerate").glob("*.yaml"))
REAL_CONFIGS = sorted((REPO / "examples" / "real").glob("*.yaml"))

PAIRS = [
    {"prompt": "Question: what is one plus one? Answer:", "chosen": " two.", "rejected": " three, I think."},
    {"prompt": "Shall I compare thee to a summer's day?", "chosen": " Thou art more lovely.", "rejected": " No."},
    {"prompt": "To be, or not to be:", "chosen": " that is the question.", "rejected": " maybe later"},
    {"prompt": "The quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " sleeps."},
    {"prompt": "What colour is the sky?", "chosen": " Blue.", "rejected": " Green, mostly, on Tuesdays."},
    {"prompt": "Rough winds do shake", "chosen": " the darling buds of May.", "rejected": " the trees"},
    {"prompt": "Answer yes or no: is water wet?", "chosen": " yes", "rejected": " no"},
    {"prompt": "Name a prime number.", "chosen": " Seven.", "rejected": " Nine."},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dpo_config(tmp_path: Path, model_dir: Path) -> Path:
    """A 2-step DPO config on PAIRS (float64 model, constant lr 1e-3, eval_batch_size 8)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    config = tmp_path / "dpo.yaml"
    config.write_text(
        f"model: {model_dir}\ndata: {data}\nreport_to: none\nlearning_rate: 1.0e-3\n"
        "lr_scheduler: constant\nmax_steps: 2\nlog_every: 1\nseed: 0\neval_batch_size: 8\nbeta: 0.1\n",
        encoding="utf-8")
    return config


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_two_cpu_processes_equal_one_process(float64_model_dir: Path, tmp_path: Path) -> None:
    """DPO, 2 optimizer steps of a global batch of 8 pairs: one process with batch_size 8, or two gloo
    processes with batch_size 4 each (the loop gives process p the p-th half of each step's 8 pairs).

    Expected equal: the logged loss, reward metrics and grad_norm of both steps, and the final weights.
    Why the tolerance is 1e-10: in float64 the two runs differ only in summation order (each process
    sums its 4 pairs' gradients, then gloo adds the two halves) and in padding width (4 vs 8 rows padded
    to their own longest), i.e. relative differences of ~1e-16 per operation, ~1e-14 after a few thousand
    accumulated terms. AdamW's first two updates, ``lr * m / (sqrt(v) + eps)``, amplify an absolute
    gradient difference d by at most ``lr / eps`` = 1e-3 / 1e-8 = 1e5 (at g ~ 0), and gradient entries
    are ~1e-3: 1e-14 * 1e-3 * 1e5 = 1e-12 < 1e-10. A real bug (a gradient mean over processes not
    undone, a wrong normaliser, one process's data used twice) changes values at the 1e-3 level.
    The reference log-probs are computed with eval_batch_size 8 in both runs, so they are bit-identical.
    """
    config = dpo_config(tmp_path, float64_model_dir)

    from preftune.train import run
    from preftune.train.loop import read_metrics

    run("dpo", config, batch_size=8, output_dir=str(tmp_path / "one"), ref_cache_dir=str(tmp_path / "cache1"))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "examples" / "accelerate" / "multi_cpu.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           "--num_cpu_threads_per_process", "1",
           "-m", "preftune", "train", "dpo", str(config), "--batch_size", "4",
           "--output_dir", str(tmp_path / "two"), "--ref_cache_dir", str(tmp_path / "cache2")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "batch_size 4 x grad_accum 1 x 2 processes" in proc.stdout + proc.stderr  # really two, each 4

    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    one_steps = [r for r in one if "loss" in r and "eval/loss" not in r]
    two_steps = [r for r in two if "loss" in r and "eval/loss" not in r]
    assert [r["step"] for r in one_steps] == [r["step"] for r in two_steps] == [1, 2]
    keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "logps/chosen", "logps/rejected"]
    for a, b in zip(one_steps, two_steps, strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-12), (a["step"], key)
    # step 1 is measured before any update: policy == reference, so the DPO loss is log 2, up to the
    # reference cache storing float32: |logp| ~ 30 rounds by <= 30 * 2**-24 ~ 2e-6 per value, so
    # |h| <= 8e-6 and |loss - log 2| = |log sigmoid(beta h) - log(1/2)| <= beta |h| / 2 ~ 4e-7.
    assert one_steps[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert one_steps[1]["loss"] < one_steps[0]["loss"]  # the first update did something

    w1, w2 = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    start = _weights(float64_model_dir)
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-10, msg=key)
    assert any(not torch.equal(w1[k], start[k]) for k in w1)  # training moved the weights


def test_two_processes_with_half_the_data_each_would_differ(float64_model_dir: Path) -> None:
    """The comparison above can fail: training on only half of the global batch (what a process
    would do if the gradients were not all-reduced) gives a different DPO gradient at step 1."""
    from preftune.core.forward import batch_logps
    from preftune.data.collate import collate_pairs
    from preftune.data.formats import PreferencePair
    from preftune.data.tokenize import tokenize_preferences
    from preftune.models import load_policy, load_tokenizer

    tok = load_tokenizer(str(float64_model_dir))
    model = load_policy(str(float64_model_dir), dtype="auto")
    items, _ = tokenize_preferences(tok, [PreferencePair(p["prompt"], p["chosen"], p["rejected"]) for p in PAIRS],
                                    max_length=64)

    def grad_of(chunk) -> torch.Tensor:
        model.zero_grad()
        logps, _ = batch_logps(model, collate_pairs(chunk, pad_token_id=tok.pad_token_id))
        half = logps.shape[0] // 2
        (-(logps[:half] - logps[half:]).sum() / len(chunk)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    full, first_half = grad_of(items), grad_of(items[:4])
    assert (full - first_half).abs().max() > 1e-4


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_parse_as_accelerate_launch_would(path: Path) -> None:
    """Each config goes through accelerate's own loader and launch-argument validation, and then the
    environment its launcher would set (FSDP / DeepSpeed / DDP keys) is built and checked."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    cfg = load_config_from_file(str(path))
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "preftune", "train", "dpo",
                                               "c.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.num_processes >= 2, "every example config is for several processes"
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        stage = cfg.deepspeed_config["zero_stage"]
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage) and stage in (2, 3)
        assert path.stem.endswith(f"zero{stage}")
    else:
        env = prepare_multi_gpu_env(args)
        if args.use_fsdp:
            assert env["ACCELERATE_USE_FSDP"] == "true"
            assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
            assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        else:
            assert args.multi_gpu  # spawned through torch.distributed.run
            assert cfg.use_cpu == (path.stem == "multi_cpu")


def test_every_kind_of_accelerate_config_is_there() -> None:
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"multi_cpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"} <= names


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: p.name)
def test_real_model_configs_load_through_the_config_loader(path: Path) -> None:
    """Every key is a valid key of its command with a valid value (unknown keys, bad types, bad choices,
    LoRA keys that are not peft.LoraConfig fields and loss hyperparameters the loss lacks all raise)."""
    from preftune.config import load_config
    from preftune.train import METHODS

    command = path.name.split("_")[0]
    config = load_config(METHODS[command].config, path)
    assert config.model.startswith(("Qwen/", "runs/"))
    assert config.dtype == "bfloat16" and config.mixed_precision == "bf16"


def test_real_model_configs_cover_sft_reward_dpo() -> None:
    assert {p.name.split("_")[0] for p in REAL_CONFIGS} == {"sft", "reward", "dpo"}
    assert (REPO / "examples" / "real" / "dpo_qwen2.5-0.5b_hh.yaml").is_file()
