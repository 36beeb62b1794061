"""vLLM as the generator of the online methods' rollouts (``rollout_backend: vllm``; docs/vllm.md).

Step (1) of a rollout (``online.py``) samples K completions per prompt. The transformers backend calls
``policy.generate`` (``rollout.sample_responses``); this one asks a vLLM engine that lives in the same
process, on the same GPU, as training (colocated; one engine per training process)::

    created   at the first rollout, not at setup: a directory holding only the policy's config (its
              architecture and vocabulary) and tokenizer, the engine's weights left random ("dummy"),
              then synced at once
    synced    before a rollout, when optimizer steps ran since the last sync (the loop's step moved):
              the policy's weights, a LoRA adapter merged into a copy (never into the trained weights),
              sharded (FSDP2) weights gathered; then the engine's prefix cache, computed with the old
              weights, is dropped
    asked     token ids in (the rollout's queries, no re-tokenisation), token ids out: one request per
              row with that row's seed (``rollout_seed``), so a row's completion depends on the seed and
              the weights only, not on the batch; each cut after its first EOS, as the transformers
              backend cuts them

Each sampling setting maps to one vLLM setting (``sampling_kwargs``); a value vLLM would change (a
temperature below its floor, stop strings) is an error, not a silent change.

vLLM is imported lazily. Tests hand ``VLLMRollout`` a stand-in for the module (``api``: an object with
``LLM`` and ``SamplingParams``, as the vllm module has), through ``OnlineMethod.vllm_api``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from preftune.errors import PreftuneError

FIELD = "rollout_backend"
TEMPERATURE_FLOOR = 0.01  # vLLM raises a temperature in (0, 0.01) to 0.01 (SamplingParams' _MAX_TEMP)
INSTALL_HINT = ("pip install vllm (or pip install 'preftune[vllm]'), on a machine with an NVIDIA GPU; "
                "or set rollout_backend: transformers")

# ------------------------------------------------------------------------------------------------ at setup


def check_backend(config: Any, accelerator: Any, api: Any = None) -> Any:
    """The vllm module (or the stand-in ``api``) for ``rollout_backend: vllm``, None for transformers;
    called first in setup so that a run that cannot use vLLM stops before any model loads: vllm missing,
    no GPU, ZeRO-3 (its weights are partitioned across processes) or a sampling setting vLLM would change."""
    from preftune.models.sampling import GenerationSettings

    if config.rollout_backend != "vllm":
        return None
    if api is None:
        try:
            import vllm as api
        except ImportError:
            raise PreftuneError("vllm needs the vllm package, which is not installed (vLLM runs on NVIDIA "
                                "GPUs only)", field=FIELD, hint=INSTALL_HINT) from None
        if accelerator.device.type != "cuda":
            raise PreftuneError(f"vllm needs a GPU; this run's device is {accelerator.device}",
                                field=FIELD, hint="train on a machine with an NVIDIA GPU, or set "
                                "rollout_backend: transformers")
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
        raise PreftuneError("vllm cannot read DeepSpeed ZeRO-3's partitioned weights",
                            field=FIELD, hint="use ZeRO-2, FSDP or one process, or rollout_backend: transformers")
    settings = GenerationSettings(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                  max_new_tokens=config.max_new_tokens)
    sampling_kwargs(settings, seed=0, eos_token_id=0)  # raises on a setting vLLM would not honour
    return api


def sampling_kwargs(settings: Any, *, seed: int, eos_token_id: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` keywords for one row, each from one of preftune's settings (see the table in
    docs/vllm.md). ``ignore_eos`` + ``stop_token_ids=[eos]``: stop at the tokenizer's EOS only, as
    ``generate(eos_token_id=eos)`` does, not at other ids a model's generation config may list."""
    if settings.stop:
        raise PreftuneError("stop strings cut text, not tokens; the vllm rollout backend returns token ids",
                            field="stop", hint="remove stop, or use rollout_backend: transformers")
    if 0 < settings.temperature < TEMPERATURE_FLOOR:
        raise PreftuneError(f"temperature {settings.temperature} is below vLLM's floor {TEMPERATURE_FLOOR}, to "
                            "which vLLM would raise it", field="temperature",
                            hint=f"use temperature >= {TEMPERATURE_FLOOR}, or rollout_backend: transformers")
    return {"n": 1, "temperature": settings.temperature, "top_p": settings.top_p,
            "top_k": settings.top_k if settings.top_k > 0 else -1, "max_tokens": settings.max_new_tokens,
            "min_tokens": settings.min_new_tokens, "seed": seed, "ignore_eos": True, "stop_token_ids": [eos_token_id],
            "detokenize": False}


# ------------------------------------------------------------------------------------------------ the engine


class VLLMRollout:
    """One process's colocated vLLM engine: made at the first ``sample``, synced when the step moved."""

    def __init__(self, api: Any, config: Any, tokenizer: Any, accelerator: Any, *, log: Any, real: bool) -> None:
        self.api, self.config, self.tokenizer, self.accelerator, self.log = api, config, tokenizer, accelerator, log
        self.real = real            # the vllm package (not a stand-in): set the launcher's environment
        self.engine: Any = None
        self.synced_step: int | None = None  # the loop's step at the last weight sync
        self.syncs = 0
        self._model_dir: tempfile.TemporaryDirectory[str] | None = None

    def sample(self, policy: Any, queries: Sequence[torch.Tensor], *, seeds: Sequence[int], settings: Any,
               step: int) -> list[torch.Tensor]:
        """One completion per query (``rollout.sample_responses``' contract: 1-D token tensors, each cut
        after its first EOS) from the engine holding the policy's weights as of ``step``."""
        if self.engine is None:
            self.engine = self._start(policy)
        if self.synced_step != step:
            self.sync(policy, step)
        eos = self.tokenizer.eos_token_id
        requests = [{"prompt_token_ids": [int(t) for t in q]} for q in queries]
        params = [self.api.SamplingParams(**sampling_kwargs(settings, seed=s, eos_token_id=eos)) for s in seeds]
        with torch.autocast(device_type=self.accelerator.device.type, enabled=False):
            outputs = self.engine.generate(requests, params, use_tqdm=False)
        return [cut_at_eos(out.outputs[0].token_ids, eos) for out in outputs]

    def sync(self, policy: Any, step: int) -> None:
        """Load the policy's current weights into the engine and drop its prefix cache."""
        load_weights(self.engine, policy_weights(policy))
        if hasattr(self.engine, "reset_prefix_cache"):
            self.engine.reset_prefix_cache()  # cached prompt keys/values were computed with the old weights
        self.synced_step, self.syncs = step, self.syncs + 1

    def _start(self, policy: Any) -> Any:
        """The engine, from a directory with the policy's config and tokenizer and random weights."""
        c, acc = self.config, self.accelerator
        dtype = engine_dtype(c, policy)
        self._model_dir = tempfile.TemporaryDirectory(prefix="preftune-vllm-")
        write_config_dir(policy, self.tokenizer, self._model_dir.name)
        if self.real:
            launcher_environment(acc)
        kwargs = {"model": self._model_dir.name, "tokenizer": self._model_dir.name, "load_format": "dummy",
                  "dtype": dtype, "seed": c.seed, "max_model_len": c.max_length,
                  "gpu_memory_utilization": c.vllm_gpu_memory_utilization, "tensor_parallel_size": 1,
                  "distributed_executor_backend": "external_launcher", "enable_prefix_caching": True,
                  "trust_remote_code": c.trust_remote_code}
        try:
            engine = self.api.LLM(**kwargs)
        except PreftuneError:
            raise
        except Exception as exc:  # vLLM's own errors (an architecture it lacks, memory) say what went wrong
            raise PreftuneError(f"vLLM could not start an engine for this policy: {type(exc).__name__}: {exc}",
                                field=FIELD, hint="lower vllm_gpu_memory_utilization if memory ran out, or use "
                                "rollout_backend: transformers") from exc
        version = getattr(self.api, "__version__", "?")
        self.log(f"rollouts: vLLM {version} engine on {acc.device} (process {acc.process_index + 1} of "
                 f"{acc.num_processes}), dtype {dtype}, gpu_memory_utilization {c.vllm_gpu_memory_utilization}; "
                 "weights synced before each rollout that follows an update")
        return engine


def cut_at_eos(token_ids: Sequence[int], eos: int) -> torch.Tensor:
    """The completion up to and including its first EOS (all of it when there is none), as a long tensor."""
    ids = [int(t) for t in token_ids]
    if eos in ids:
        ids = ids[:ids.index(eos) + 1]
    return torch.tensor(ids, dtype=torch.long)


def engine_dtype(config: Any, policy: Any) -> str:
    """The dtype the policy computes in: mixed precision's when set, else its weights' (not vLLM's "auto",
    which would run a float32 checkpoint in float16)."""
    mixed = {"bf16": "bfloat16", "fp16": "float16"}.get(config.mixed_precision)
    return mixed or str(next(policy.parameters()).dtype).removeprefix("torch.")


def write_config_dir(policy: Any, tokenizer: Any, path: str) -> None:
    """The policy's config (architecture named, so vLLM picks its model class) and tokenizer, no weights
    (the engine's dtype is given to it, not read from here)."""
    import copy

    from preftune.models.load import is_peft

    base = policy.get_base_model() if is_peft(policy) else policy
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)


def launcher_environment(accelerator: Any) -> None:
    """vLLM's ``external_launcher`` runs the engine in this process and reads torch.distributed's variables;
    a single process started without a launcher has none, so they are set for a world of one."""
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    defaults = {"RANK": accelerator.process_index, "LOCAL_RANK": accelerator.local_process_index,
                "WORLD_SIZE": accelerator.num_processes, "MASTER_ADDR": "127.0.0.1"}
    for name, value in defaults.items():
        os.environ.setdefault(name, str(value))


# ------------------------------------------------------------------------------------------------ weights


def policy_weights(policy: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight of the policy under its Hugging Face name (what vLLM's
    ``load_weights`` reads): a LoRA adapter merged in as W + delta (peft's own ``get_delta_weight``; the
    trained weights are not touched), sharded DTensors gathered (every process calls this together)."""
    from preftune.models.load import is_peft

    deltas = lora_deltas(policy) if is_peft(policy) else {}
    for name, tensor in policy.state_dict().items():
        if is_peft(policy) and (".lora_" in name or ".original_module." in name):
            continue
        value = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if name in deltas:
            value = value + deltas[name].to(value.dtype)
        yield hf_name(name) if is_peft(policy) else name, value.detach()


def lora_deltas(policy: Any) -> dict[str, torch.Tensor]:
    """state-dict name of each LoRA-wrapped base weight -> its active adapters' summed delta."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for name, module in policy.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        active = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
        if any(module.use_dora.get(a, False) for a in active):
            raise PreftuneError("the vllm rollout backend cannot merge a DoRA adapter", field="lora",
                                hint="drop use_dora, or use rollout_backend: transformers")
        if active:
            with torch.no_grad():
                out[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in active)
    return out


def hf_name(name: str) -> str:
    """A peft state-dict name as the plain model names it: no ``base_model.model.`` prefix, no
    ``base_layer.``, a ``modules_to_save`` copy in place of the original."""
    import re

    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def load_weights(engine: Any, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Hand ``weights`` to the engine's model in this process: ``LLM.apply_model`` (vLLM >= 0.9), else the
    model runner's model (older versions; what TRL's colocate mode uses)."""
    if hasattr(engine, "apply_model"):
        engine.apply_model(lambda model: model.load_weights(weights))
        return
    try:
        model = engine.llm_engine.model_executor.driver_worker.model_runner.model
    except AttributeError:
        raise PreftuneError("this vLLM version offers no way to load weights into its model in this process",
                            field=FIELD, hint="install a vLLM with LLM.apply_model (0.9 or newer)") from None
    model.load_weights(weights)
