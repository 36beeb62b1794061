"""Which distributed strategy a run uses, said in its first log line, and refused when it cannot be honoured.

``accelerate launch`` passes its config to the processes it starts as environment variables
(``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_MIXED_PRECISION``, ...);
``torchrun`` passes only ``WORLD_SIZE`` and the ranks. :func:`make_accelerator` reads them, builds the
``Accelerator`` and checks that what it got is what was asked for:

* one process: no strategy; several processes: DDP (gloo on CPU, NCCL on CUDA), FSDP2 or DeepSpeed ZeRO-N;
* FSDP2 on CPU processes. accelerate turns its FSDP plugin on only for accelerator devices (its state
  machine gives CPU processes the ``MULTI_CPU`` type and drops the plugin: such a launch used to train with
  DDP without a word). PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) itself runs on CPU over
  gloo, so on CPU preftune builds the gloo Accelerator and then hands accelerate's state the FSDP plugin the
  launcher built; ``accelerator.prepare`` then shards the model with accelerate's own FSDP2 code (one
  ``fully_shard`` unit per transformer block and one for the rest), exactly as on GPUs. Nothing is sharded
  by hand;
* refused, with what to change: FSDP version 1 on CPU (FSDP1 needs a CUDA device), parameter offload on
  CPU (the parameters are in CPU memory already), ``fsdp_cpu_ram_efficient_loading`` (preftune needs the
  full weights in every process before sharding: the reference pass, the reference cache's fingerprint and
  the online methods' reference copy read them), DeepSpeed without CUDA, and a launcher whose mixed
  precision differs from the config's ``mixed_precision`` (accelerate would silently take the config's).

:func:`describe` is the line every run logs first, e.g. ``strategy: FSDP2 (full shard), 2 processes
(gloo, CPU), mixed precision no``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from preftune.core.logprobs import sharded_launch
from preftune.errors import PreftuneError

__all__ = ["describe", "is_fsdp", "launcher_strategy", "make_accelerator", "sharded_launch"]

_HINT_CPU_FSDP = "use examples/accelerate/fsdp_cpu.yaml, or set these keys in your accelerate config"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launcher_strategy() -> str:
    """What the launcher asked for: ``"fsdp"``, ``"deepspeed"``, ``"ddp"`` (several processes) or ``""``."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp" if world_size() > 1 else ""


def _distributed_cpu() -> bool:
    """Launched as several processes on a machine without CUDA: accelerate then needs ``cpu=True`` to form
    a gloo process group instead of running W separate copies."""
    return world_size() > 1 and not torch.cuda.is_available()


def _check_launcher(config: Any) -> None:
    """Refuse what the launcher asked for and this machine or preftune cannot do (see the module docstring)."""
    strategy = launcher_strategy()
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched is not None and launched.lower() != str(config.mixed_precision).lower():
        raise PreftuneError(f"the accelerate launcher config says mixed_precision {launched}, the training config "
                            f"says {config.mixed_precision}", field="mixed_precision",
                            hint=f"set mixed_precision: {launched} in the training config, or launch with "
                                 f"--mixed_precision {config.mixed_precision}")
    if strategy == "deepspeed" and not torch.cuda.is_available():
        raise PreftuneError("the launcher asks for DeepSpeed, which needs CUDA GPUs; this machine has none",
                            hint="on CPU processes use FSDP2 (examples/accelerate/fsdp_cpu.yaml) or DDP "
                                 "(examples/accelerate/multi_cpu.yaml)")
    if strategy != "fsdp":
        return
    if _flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise PreftuneError("fsdp_cpu_ram_efficient_loading: true cannot be honoured: preftune needs the full "
                            "weights in every process before sharding (reference pass, reference cache key, "
                            "the online methods' reference copy)",
                            hint="set fsdp_cpu_ram_efficient_loading: false (and fsdp_sync_module_states: false)")
    if torch.cuda.is_available() or world_size() < 2:
        return
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise PreftuneError(f"FSDP version {os.environ.get('FSDP_VERSION', '1')} needs CUDA devices; on CPU "
                            "processes preftune runs FSDP2", hint=f"set fsdp_version: 2 ({_HINT_CPU_FSDP})")
    if _flag("FSDP_OFFLOAD_PARAMS"):
        raise PreftuneError("fsdp_offload_params: true on CPU processes: the parameters are in CPU memory already",
                            hint=f"set fsdp_offload_params: false ({_HINT_CPU_FSDP})")


def make_accelerator(config: Any, **kwargs: Any) -> Any:
    """The run's ``Accelerator`` for the launcher's strategy (see the module docstring); ``kwargs`` go to it."""
    from accelerate import Accelerator

    _check_launcher(config)
    cpu = _distributed_cpu()
    accelerator = Accelerator(cpu=cpu, mixed_precision=config.mixed_precision, **kwargs)
    if cpu and launcher_strategy() == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin
        from accelerate.utils import DistributedType

        # the plugin as accelerate builds it from the launcher's FSDP_* variables
        plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
        from accelerate.state import PartialState

        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate's own set-up does
        if not accelerator.is_fsdp2:
            raise RuntimeError("accelerate did not take the FSDP2 plugin")  # accelerate changed: say so loudly
    return accelerator


def is_fsdp(accelerator: Any) -> bool:
    return "FSDP" in str(getattr(accelerator, "distributed_type", "")).upper()


def describe(accelerator: Any) -> str:
    """``strategy: ..., N processes (backend, device[, M nodes]), mixed precision ...``: the run's first log
    line (nodes: the processes over those of one machine, ``LOCAL_WORLD_SIZE``, when that is more than one)."""
    n, device = accelerator.num_processes, accelerator.device.type.upper()
    kind = str(accelerator.distributed_type).split(".")[-1].upper()
    if n == 1 and kind == "NO":
        return f"strategy: single process ({device}), mixed precision {accelerator.mixed_precision}"
    if is_fsdp(accelerator):
        plugin = accelerator.state.fsdp_plugin
        reshard = getattr(plugin, "reshard_after_forward", True)
        shard = "full shard" if reshard in (True, "FULL_SHARD", None) else "gradients and optimizer state"
        name = f"FSDP{getattr(plugin, 'fsdp_version', 1)} ({shard})"
    elif "DEEPSPEED" in kind:
        name = f"DeepSpeed ZeRO-{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    else:
        name = "DDP"
    backend = getattr(accelerator.state, "backend", None) or ("gloo" if device == "CPU" else "?")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    nodes = f", {n // local} nodes" if local and n > local else ""
    return f"strategy: {name}, {n} processes ({backend}, {device}{nodes}), mixed precision {accelerator.mixed_precision}"
