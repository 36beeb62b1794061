"""FSDP2 on two CPU processes (gloo) trains exactly like one process on the same global batch; so does DDP,
for every method.

Every run goes through the user's path: ``accelerate launch --config_file examples/accelerate/fsdp_cpu.yaml
-m preftune train METHOD CONFIG.yaml`` (``preftune.train.strategy`` turns accelerate's FSDP2 on for CPU
processes). The runs are float64, so the one- and two-process runs differ only in summation order (each
process sums its half of the step's gradient, the reduce-scatter adds the halves): ~1e-16 per operation,
amplified by AdamW's first updates by at most lr / eps = 1e5 (see tests/test_distributed.py), far below the
1e-9 asked. A run that did not synchronise (each process updating its shard from its half of the batch), or
one that dropped FSDP for DDP, fails: the controls below show both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import PAIRS, _free_port, _weights, dpo_config

REPO = Path(__file__).resolve().parents[1]
FSDP_CPU = REPO / "examples" / "accelerate" / "fsdp_cpu.yaml"

pytestmark = pytest.mark.slow


def launch(config_file: Path, args: list[str], cwd: Path, *, processes: int = 2, timeout: int = 420,
           check: bool = True, pythonpath: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file CONFIG -m preftune ARGS`` with ``processes`` processes (1 thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(map(str, (REPO / "src", *pythonpath)))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "--num_processes", str(processes), "--main_process_port", str(_free_port()),
           "--num_cpu_threads_per_process", "1", "-m", "preftune", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def step_records(path: Path) -> list[dict]:
    from preftune.train.loop import read_metrics

    return [r for r in read_metrics(path / "metrics.jsonl") if "loss" in r and "eval/loss" not in r]


def assert_same_run(one: Path, two: Path, keys: list[str], *, rel: float = 1e-9) -> None:
    """The logged values of every step and the final weights of two runs agree to ``rel``."""
    a, b = step_records(one), step_records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for x, y in zip(a, b, strict=True):
        for key in keys:
            assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-12), (x["step"], key, x[key], y[key])
    w1, w2 = _weights(one / "final"), _weights(two / "final")
    assert w1.keys() == w2.keys()
    for key in w1:
        assert w1[key].shape == w2[key].shape, key  # full tensors, not one process's shard
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-9, msg=key)


DPO_KEYS = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected"]


def test_fsdp2_dpo_two_processes_equal_one(float64_model_dir: Path, tmp_path: Path) -> None:
    """DPO (precomputed reference), 2 steps of 8 pairs: one process with batch 8 = FSDP2 over 2 processes
    with batch 4 each. The log names the strategy; final/ is a full model that loads without preftune."""
    config = dpo_config(tmp_path, float64_model_dir)
    from preftune.train import run

    # packing: false: the sharded run trains on padded rows (packed rows read the output head outside the
    # model's forward), and in float64 a shared prompt equals padded rows only to float32 (Llama's RMSNorm)
    run("dpo", config, batch_size=8, packing=False, output_dir=str(tmp_path / "one"),
        ref_cache_dir=str(tmp_path / "cache1"))
    proc = launch(FSDP_CPU, ["train", "dpo", str(config), "--batch_size", "4", "--output_dir",
                             str(tmp_path / "two"), "--ref_cache_dir", str(tmp_path / "cache2")], tmp_path)
    log = proc.stdout + proc.stderr
    assert "strategy: FSDP2 (full shard), 2 processes (gloo, CPU), mixed precision no" in log
    assert "batch_size 4 x grad_accum 1 x 2 processes" in log
    assert_same_run(tmp_path / "one", tmp_path / "two", DPO_KEYS)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(float64_model_dir).parameters())


def _common(model: Path) -> str:
    return (f"model: {model}\nreport_to: none\nlearning_rate: 1.0e-3\nlr_scheduler: constant\nmax_steps: 2\n"
            "log_every: 1\nseed: 0\npacking: false\n")


def _offline_config(tmp_path: Path, model: Path, command: str, extra: str = "") -> Path:
    """sft (prompt, completion) or reward / dpo (pairs) on PAIRS, 2 steps of 8 items."""
    rows = ([{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS] if command == "sft" else PAIRS)
    data = tmp_path / f"{command}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = tmp_path / f"{command}.yaml"
    config.write_text(_common(model) + f"data: {data}\neval_batch_size: 8\n{extra}", encoding="utf-8")
    return config


def _online_config(tmp_path: Path, model: Path, command: str, extra: str = "") -> Path:
    """The online methods on 8 prompts x K = 2, a rule reward (the spaces in the completion), 8-token
    completions (online DPO: no kl_coef, its beta keeps the policy near the reference)."""
    (tmp_path / "prompts.txt").write_text("\n".join(p["prompt"] for p in PAIRS) + "\n", encoding="utf-8")
    (tmp_path / "rewards.py").write_text("def space_count(prompt, completion):\n"
                                         "    return float(completion.count(' '))\n", encoding="utf-8")
    config = tmp_path / f"{command}.yaml"
    config.write_text(_common(model) + f"data: {tmp_path / 'prompts.txt'}\nreward: {tmp_path / 'rewards.py'}:"
                      "space_count\nnum_samples: 2\nmax_new_tokens: 8\nmax_length: 64\n"
                      f"{'' if command == 'online-dpo' else 'kl_coef: 0.1'}\nsample_every: 0\n{extra}",
                      encoding="utf-8")
    return config


CASES = {  # command, config maker, extra keys, logged keys compared
    "sft": ("sft", _offline_config, "", ["loss", "grad_norm"]),
    "reward": ("reward", _offline_config, "", ["loss", "grad_norm", "accuracy", "margin"]),
    "dpo-online-reference": ("dpo", _offline_config, "beta: 0.1\nprecompute_ref_logps: false\n", DPO_KEYS),
    # lora_dropout 0: dropout masks depend on how the rows are split over processes
    "dpo-lora": ("dpo", _offline_config, "beta: 0.1\nlora:\n  r: 4\n  lora_alpha: 8\n  lora_dropout: 0.0\n"
                 "  target_modules: [q_proj, v_proj]\n", DPO_KEYS),
    "rloo": ("rloo", _online_config, "", ["loss", "grad_norm", "objective/kl", "objective/scores"]),
    "ppo": ("ppo", _online_config, "update_epochs: 2\n", ["loss", "grad_norm", "objective/kl", "objective/scores"]),
    "kto": ("kto", _offline_config, "beta: 0.1\n", ["loss", "grad_norm"]),
    "grpo": ("grpo", _online_config, "", ["loss", "grad_norm", "objective/kl", "reward"]),
    "raft": ("raft", _online_config, "", ["loss", "grad_norm", "objective/kl"]),
    "online-dpo": ("online-dpo", _online_config, "", ["loss", "grad_norm"]),
}


STRATEGIES = {"fsdp2": (FSDP_CPU, "strategy: FSDP2 (full shard), 2 processes"),
              "ddp": (REPO / "examples" / "accelerate" / "multi_cpu.yaml", "strategy: DDP, 2 processes")}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CASES)
def test_methods_two_processes_equal_one(case: str, strategy: str, float64_model_dir: Path, tmp_path: Path) -> None:
    """Each method, 2 steps: one process with batch 8 = 2 processes with batch 4 each, sharded (FSDP2) or
    not (DDP): the logged values and final/. Under FSDP2, DPO's online reference is sharded like the
    policy; with LoRA, final/ is the adapter (the adapter weights compared); the online methods generate
    with every process stepping together (a decoding step is collective) and gather the policy's root
    weights around the rollout."""
    command, make, extra, keys = CASES[case]
    config = make(tmp_path, float64_model_dir, command, extra)
    from preftune.train import run

    run(command, config, batch_size=8, output_dir=str(tmp_path / "one"))
    launcher, line = STRATEGIES[strategy]
    proc = launch(launcher, ["train", command, str(config), "--batch_size", "4", "--output_dir",
                             str(tmp_path / "two")], tmp_path)
    assert line in proc.stdout + proc.stderr
    if case == "dpo-lora":
        a, b = step_records(tmp_path / "one"), step_records(tmp_path / "two")
        for x, y in zip(a, b, strict=True):
            for key in keys:
                assert y[key] == pytest.approx(x[key], rel=1e-9, abs=1e-12), (x["step"], key)
        from safetensors.torch import load_file

        w1, w2 = (load_file(tmp_path / d / "final" / "adapter_model.safetensors") for d in ("one", "two"))
        assert w1.keys() == w2.keys() and any("lora_A" in k for k in w1)
        for key in w1:
            torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-9, msg=key)
        return
    assert_same_run(tmp_path / "one", tmp_path / "two", keys)


def test_fsdp2_checkpoints_are_sharded_and_resume_exactly(float64_model_dir: Path, tmp_path: Path) -> None:
    """FSDP2, save_every 1: each checkpoint holds one model and one optimizer shard file per process (no
    pickle, no full model); a run of 2 steps extended to 3 resumes from its step-2 checkpoint and ends
    where a straight 3-step run ends."""
    config = _offline_config(tmp_path, float64_model_dir, "dpo", "beta: 0.1\nsave_every: 1\n")
    base = ["train", "dpo", str(config), "--batch_size", "4", "--ref_cache_dir", str(tmp_path / "cache")]
    launch(FSDP_CPU, [*base, "--max_steps", "3", "--output_dir", str(tmp_path / "straight")], tmp_path)
    launch(FSDP_CPU, [*base, "--max_steps", "2", "--output_dir", str(tmp_path / "resumed")], tmp_path)
    step2 = tmp_path / "resumed" / "checkpoints" / "step-2"
    manifest = json.loads((step2 / "manifest.json").read_text())
    assert manifest["sharded"] is True and manifest["num_processes"] == 2
    assert {"model_shard_0.safetensors", "model_shard_1.safetensors", "optimizer_shard_0.safetensors",
            "optimizer_shard_1.safetensors"} <= set(manifest["files"])
    assert "model.safetensors" not in manifest["files"] and not list(step2.glob("*.pkl")) + list(step2.glob("*.bin"))
    from safetensors.torch import load_file

    full = _weights(float64_model_dir)
    shards = [load_file(step2 / f"model_shard_{r}.safetensors") for r in (0, 1)]
    name = "model.layers.0.mlp.gate_proj.weight"
    assert shards[0][name].shape[0] + shards[1][name].shape[0] == full[name].shape[0]  # halves, not copies
    proc = launch(FSDP_CPU, [*base, "--max_steps", "3", "--output_dir", str(tmp_path / "resumed")], tmp_path)
    assert "step-2" in proc.stdout + proc.stderr
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", DPO_KEYS)


def test_fsdp2_without_gradient_synchronisation_would_differ(float64_model_dir: Path, tmp_path: Path) -> None:
    """The control: the same FSDP2 launch with the gradient reduce-scatter switched off (each process keeps
    its own half's gradient and never updates its shards from the other half) does not match the
    one-process run, so the comparisons above can fail."""
    config = dpo_config(tmp_path, float64_model_dir)
    from preftune.train import run

    run("dpo", config, batch_size=8, packing=False, output_dir=str(tmp_path / "one"),
        ref_cache_dir=str(tmp_path / "cache1"))
    hook = tmp_path / "nosync"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # every FSDP2 model prepared with its gradient sync off
        "import accelerate.accelerator as a\n"
        "_prepare = a.fsdp2_prepare_model\n"
        "def _no_sync(accelerator, model):\n"
        "    model = _prepare(accelerator, model)\n"
        "    model.set_requires_gradient_sync(False)\n"
        "    return model\n"
        "a.fsdp2_prepare_model = _no_sync\n", encoding="utf-8")
    launch(FSDP_CPU, ["train", "dpo", str(config), "--batch_size", "4", "--output_dir", str(tmp_path / "two"),
                      "--ref_cache_dir", str(tmp_path / "cache2")], tmp_path, pythonpath=(hook,))
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path / "one", tmp_path / "two", DPO_KEYS)
