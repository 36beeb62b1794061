"""Which strategy a run uses (its first log line) and the launcher configs that cannot be honoured.

``accelerate launch`` hands its config to the processes as environment variables; these tests set them as
the launcher would (``preftune.train.strategy`` reads nothing else), except the last test, which launches
the GPU FSDP example on CPU processes for real and expects the refusal, not a silent DDP run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from preftune.errors import PreftuneError
from preftune.train.strategy import _check_launcher, describe, launcher_strategy

REPO = Path(__file__).resolve().parents[1]
LAUNCH_KEYS = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_OFFLOAD_PARAMS", "FSDP_CPU_RAM_EFFICIENT_LOADING",
               "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_MIXED_PRECISION",
               "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@pytest.fixture
def launcher(monkeypatch):
    """Set the variables a launcher would, starting from none of them."""
    for key in LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)

    def set_env(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


def config(mixed_precision: str = "no") -> SimpleNamespace:
    return SimpleNamespace(mixed_precision=mixed_precision)


def test_what_the_launcher_asks_for(launcher) -> None:
    assert launcher_strategy() == ""
    launcher(WORLD_SIZE="2")
    assert launcher_strategy() == "ddp"
    launcher(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    assert launcher_strategy() == "fsdp"
    launcher(ACCELERATE_USE_DEEPSPEED="true")
    assert launcher_strategy() == "deepspeed"


@pytest.mark.parametrize(("env", "mixed", "field", "message"), [
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "no", "mixed_precision", "launcher config says mixed_precision bf16"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}, "no", None, "DeepSpeed, which needs CUDA"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "WORLD_SIZE": "2"}, "no", None, "FSDP version 1"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true", "WORLD_SIZE": "2"}, "no",
     None, "fsdp_offload_params"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
      "WORLD_SIZE": "2"}, "no", None, "fsdp_cpu_ram_efficient_loading"),
])
def test_launcher_settings_that_cannot_be_honoured_are_refused(launcher, env, mixed, field, message) -> None:
    import torch

    if torch.cuda.is_available() and field is None and "cpu_ram" not in message:
        pytest.skip("DeepSpeed, FSDP1 and parameter offload are honoured on CUDA machines")
    launcher(**env)
    with pytest.raises(PreftuneError, match=message) as caught:
        _check_launcher(config(mixed))
    assert caught.value.hint  # says what to change
    if field:
        assert caught.value.field == field


def test_honourable_launches_pass(launcher) -> None:
    _check_launcher(config())  # one process
    launcher(ACCELERATE_MIXED_PRECISION="no", WORLD_SIZE="2")
    _check_launcher(config())  # DDP
    launcher(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_OFFLOAD_PARAMS="false",
             FSDP_CPU_RAM_EFFICIENT_LOADING="false", ACCELERATE_MIXED_PRECISION="bf16")
    _check_launcher(config("bf16"))  # FSDP2 as examples/accelerate/fsdp_cpu.yaml, mixed precision agreeing


def test_the_first_log_line_names_strategy_processes_and_precision(launcher) -> None:
    device = SimpleNamespace(type="cpu")
    one = SimpleNamespace(num_processes=1, distributed_type="DistributedType.NO", device=device, mixed_precision="no",
                          state=SimpleNamespace(backend=None))
    assert describe(one) == "strategy: single process (CPU), mixed precision no"
    ddp = SimpleNamespace(num_processes=2, distributed_type="DistributedType.MULTI_CPU", device=device,
                          mixed_precision="no", state=SimpleNamespace(backend="gloo"))
    assert describe(ddp) == "strategy: DDP, 2 processes (gloo, CPU), mixed precision no"
    launcher(LOCAL_WORLD_SIZE="1")  # one process per machine: two machines
    assert describe(ddp) == "strategy: DDP, 2 processes (gloo, CPU, 2 nodes), mixed precision no"
    fsdp = SimpleNamespace(num_processes=4, distributed_type="DistributedType.FSDP", device=SimpleNamespace(type="cuda"),
                           mixed_precision="bf16", state=SimpleNamespace(
                               backend="nccl", fsdp_plugin=SimpleNamespace(fsdp_version=2, reshard_after_forward=False)))
    launcher(LOCAL_WORLD_SIZE="4")
    assert describe(fsdp) == ("strategy: FSDP2 (gradients and optimizer state), 4 processes (nccl, CUDA), "
                              "mixed precision bf16")


@pytest.mark.slow
def test_the_gpu_fsdp_example_on_cpu_processes_is_refused_not_run_as_ddp(tiny_model_dir, tmp_path) -> None:
    """examples/accelerate/fsdp.yaml asks for bf16; launched on CPU processes with a config at mixed_precision
    no, it used to train with DDP without a word. Now every process stops before loading anything."""
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": " b"}\n', encoding="utf-8")
    (tmp_path / "sft.yaml").write_text(f"model: {tiny_model_dir}\ndata: {tmp_path / 'sft.jsonl'}\nreport_to: none\n"
                                       f"max_steps: 1\noutput_dir: {tmp_path / 'out'}\n", encoding="utf-8")
    from test_distributed import _free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "examples" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--main_process_port",
           str(_free_port()), "-m", "preftune", "train", "sft", str(tmp_path / "sft.yaml")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "launcher config says mixed_precision bf16" in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_lora_reward_model_under_fsdp_is_refused_before_anything_loads(tmp_path) -> None:
    """A LoRA reward model is saved merged, which shards cannot be: refused at setup, not after training."""
    from preftune.config import from_mapping
    from preftune.train.base import RunContext
    from preftune.train.reward import RewardConfig, RewardMethod

    config = from_mapping(RewardConfig, {"model": str(tmp_path / "never-loaded"), "data": "d.jsonl",
                                         "lora": {"r": 4}})
    fsdp = SimpleNamespace(distributed_type="DistributedType.FSDP")
    with pytest.raises(PreftuneError, match="cannot be merged") as caught:
        RewardMethod().setup(RunContext(config=config, accelerator=fsdp, output_dir=tmp_path, log=print))
    assert caught.value.field == "lora"
