"""The checks of the shared training keys that look beyond one value: output_dir, required keys,
data paths, LoRA options. ``train/base.py`` calls them from ``validate`` and ``preflight``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.config import fail


def check_output_dir(config: Any) -> None:
    """``output_dir`` (or a folder above it) must not be an existing file: said before any model loads."""
    path = Path(config.output_dir)
    clash = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if clash is not None:
        fail(config, "output_dir", f"{clash} is a file, not a directory",
             "give a directory for the run (created if missing): config.yaml, metrics.jsonl, checkpoints/, "
             "final/ go there")


REQUIRED_WHAT = {
    "model": "a Hugging Face hub id or a local model directory",
    "data": "a data file (JSONL, JSON, CSV, Parquet) or a hub dataset id; for the online methods a prompts file",
    "reward": "a reward-model directory or hub id, or a function (module:function or file.py:function)",
}


def require_key(config: Any, key: str, what: str) -> None:
    if not getattr(config, key):
        fail(config, key, f"is required: {what}", f"set `{key}:` in the config file or pass --{key} on the command "
             f"line (`preftune train {config.command} --{key} ...`)")


_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".txt")


def check_data_path(config: Any, key: str, *, always: bool = False) -> None:
    """A data key written as a path (``x.jsonl``, or what ``looks_like_path`` calls a path: ``./x``, ``/x``,
    ``~/x``, ``a/b/c``; every value when ``always``) must exist: the readers would take anything else for a
    hub dataset id, or fail only after the model has loaded."""
    from preftune.models.load import looks_like_path, missing_path_hint

    value = getattr(config, key, None)
    if not value or value.startswith("hf:") or Path(value).expanduser().exists():
        return
    if always or value.lower().endswith(_DATA_SUFFIXES) or looks_like_path(value):
        fail(config, key, f"no such file or directory: {value!r}",
             missing_path_hint(Path(value).expanduser(), "write the file first or fix the path"))


def check_lora(config: Any) -> None:
    """``lora`` is a non-empty mapping of ``peft.LoraConfig`` fields with sensible values: r an integer
    >= 1, lora_alpha > 0, lora_dropout in [0, 1); then peft's own checks of the whole mapping."""
    lora = config.lora or {}
    if not lora:
        fail(config, "lora", "is an empty mapping", "write lora: {r: 16} for LoRA with the default settings, "
             "or lora: null for full fine-tuning")
    _check_lora_keys(config)
    checks = {"r": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
              "lora_alpha": ("a number > 0", lambda v: _is_number(v) and v > 0),
              "lora_dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)}
    for key, (what, ok) in checks.items():
        if key in lora and not ok(lora[key]):
            fail(config, f"lora.{key}", f"must be {what} (got {lora[key]!r})",
                 "r is the adapter's rank, lora_alpha its scale (the update is scaled by alpha / r), "
                 "lora_dropout the dropout on its input")
    from peft import LoraConfig

    try:
        LoraConfig(**{"target_modules": "all-linear", **lora})
    except (TypeError, ValueError) as exc:
        fail(config, "lora", f"peft refuses these LoRA options: {' '.join(str(exc).split())}",
             "keys are peft.LoraConfig fields (r, lora_alpha, lora_dropout, target_modules, ...)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# names people write for the LoRA fields (TRL's flags without lora_, other tools' words) -> peft's names
_LORA_ALIASES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target": "target_modules",
                 "modules": "target_modules", "lora_r": "r", "lora_target_modules": "target_modules"}


def _check_lora_keys(config: Any) -> None:
    """Each key under ``lora`` is a field of ``peft.LoraConfig`` (peft is imported only when lora is set)."""
    import dataclasses
    import difflib

    from peft import LoraConfig

    valid = [f.name for f in dataclasses.fields(LoraConfig) if f.init]
    for key in config.lora or {}:
        if key not in valid:
            close = ([_LORA_ALIASES[key]] if key in _LORA_ALIASES
                     else difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5))
            fail(config, f"lora.{key}", f"unknown LoRA option {key!r}",
                 (f"did you mean {close[0]!r}? " if close else "") + "keys are peft.LoraConfig fields "
                 "(r, lora_alpha, lora_dropout, target_modules, ...)")
