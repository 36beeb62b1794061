"""Reference log-probs computed once, cached on disk, reused across runs.

The DPO family's reference terms ``log pi_ref(y_w|x)`` and ``log pi_ref(y_l|x)`` never change during
training, so one no-grad pass over the train (and eval) pairs before training replaces a reference
forward at every step, and the reference model can be freed before the policy trains.

The cache file ``CACHE_DIR/<key>.safetensors`` holds two float32 vectors, ``chosen`` and ``rejected``
(one value per pair, in item order). ``key`` is the SHA-256 of:

* the reference model's identity: its ``name_or_path``, its config (JSON) and a fingerprint of its
  weights (every parameter's name, shape, dtype, float64 sum and up to 64 strided values; LoRA adapter
  weights are left out because the reference runs with the adapter disabled);
* the tokenizer (its serialised vocabulary/merges, special tokens and chat template);
* the tokenisation settings (max_length, max_prompt_length, truncation), the compute dtype and, when on,
  ``fused_lm_head`` (the fused log-prob rounds differently from the one over the full logits);
* the data content: every token id of every pair, in order.

Change any of them (other data, another checkpoint, another max_length) and the key changes, so a
stale cache is never read. The default cache directory is ``~/.cache/preftune/ref_logps``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_CACHE_DIR = Path("~/.cache/preftune/ref_logps")
_SAMPLE = 64


def cache_dir(path: str | Path | None) -> Path:
    """The cache directory (``~/.cache/preftune/ref_logps`` when ``path`` is None), created."""
    out = Path(path).expanduser() if path else DEFAULT_CACHE_DIR.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return out


def model_fingerprint(model: torch.nn.Module, *, skip: str = "lora_") -> str:
    """Path + config + a weights fingerprint of a model (a few seconds even for billions of weights)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(str(getattr(config, "_name_or_path", "")).encode())
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if skip and skip in name:
                continue
            flat = param.detach().reshape(-1)
            stride = max(1, flat.numel() // _SAMPLE)
            sample = flat[::stride][:_SAMPLE].to(torch.float64).cpu()
            h.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{float(flat.double().sum()):.10e}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer's vocabulary/merges (fast tokenizers), special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(),
                                                                             sort_keys=True).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return h.hexdigest()


def items_fingerprint(items: Sequence[Any]) -> str:
    """Every token id and label of every pair, in order (the data content after tokenisation)."""
    h = hashlib.sha256()
    for item in items:
        for field in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            h.update(json.dumps(getattr(item, field)).encode())
        h.update(b";")
    return h.hexdigest()


def cache_key(*, model: str, tokenizer: str, items: str, settings: dict[str, Any]) -> str:
    """SHA-256 over the four parts (each itself a fingerprint or a JSON-able dict)."""
    h = hashlib.sha256()
    for part in (model, tokenizer, items, json.dumps(settings, sort_keys=True, default=str)):
        h.update(part.encode())
        h.update(b"\n")
    return h.hexdigest()


def load(directory: Path, key: str, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (chosen, rejected) log-probs for ``key``, or None (missing, or not ``n`` values)."""
    from safetensors.torch import load_file

    path = directory / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception:  # a truncated or foreign file: recompute and overwrite it
        return None
    chosen, rejected = tensors.get("chosen"), tensors.get("rejected")
    if chosen is None or rejected is None or chosen.numel() != n or rejected.numel() != n:
        return None
    return chosen, rejected


def save(directory: Path, key: str, chosen: torch.Tensor, rejected: torch.Tensor, *,
         metadata: dict[str, str] | None = None) -> Path:
    """Write the cache file atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    path = directory / f"{key}.safetensors"
    tmp = directory / f".{key}.{os.getpid()}.tmp"
    save_file({"chosen": chosen.detach().float().cpu().contiguous(),
               "rejected": rejected.detach().float().cpu().contiguous()}, str(tmp), metadata=metadata or {})
    os.replace(tmp, path)
    return path


@torch.no_grad()
def compute(items: Sequence[Any], *, forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
            collate: Callable[[list[Any]], dict[str, torch.Tensor]], batch_size: int, device: Any,
            description: str = "reference log-probs") -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``forward(batch) -> [2B]`` summed log-probs (chosen rows first) over all items, with a progress bar."""
    from rich.progress import track

    chosen, rejected = [], []
    starts = range(0, len(items), batch_size)
    for start in track(starts, description=description, transient=True, disable=len(starts) < 2):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in collate(list(items[start:start + batch_size])).items()}
        logps = forward(batch).float().cpu()
        half = logps.shape[0] // 2
        chosen.append(logps[:half])
        rejected.append(logps[half:])
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)


def attach(items: Sequence[Any], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Store each pair's reference log-probs on the item (``ref_chosen_logps`` / ``ref_rejected_logps``)."""
    for item, c, r in zip(items, chosen.tolist(), rejected.tolist(), strict=True):
        item.ref_chosen_logps, item.ref_rejected_logps = c, r


def ensure(items: Sequence[Any], *, key: str, directory: Path,
           compute_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]], metadata: dict[str, str] | None = None
           ) -> bool:
    """Attach cached reference log-probs to ``items``, computing and saving them on a miss; True on a hit."""
    cached = load(directory, key, len(items))
    hit = cached is not None
    if cached is None:
        cached = compute_fn()
        save(directory, key, *cached, metadata=metadata)
    attach(items, *cached)
    return hit


def reference_logps(policy: Any, ref_model: Any, batch: dict[str, torch.Tensor], *, fused: bool = False) -> torch.Tensor:
    """Summed reference log-probs of a batch's rows, without gradients: ``ref_model`` when there is one,
    else ``policy`` with its LoRA adapter disabled (the starting model, no extra memory)."""
    from preftune.core.forward import batch_logps
    from preftune.models import adapter_disabled

    with torch.no_grad():
        if ref_model is not None:
            return batch_logps(ref_model, batch, fused=fused)[0]
        with adapter_disabled(policy) as base:
            return batch_logps(base, batch, fused=fused)[0]


def precompute_splits(splits: Sequence[tuple[str, list[Any]]], precompute: Callable[..., bool],
                      log: Callable[[str], None]) -> dict[str, bool]:
    """Run ``precompute(items, name=, log=)`` for each non-empty split (train, eval) and free the memory the
    reference held (the caller drops its reference model): split -> whether it came from the cache."""
    import gc

    hits = {name: precompute(items, name=name, log=log) for name, items in splits if items}
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return hits
