"""Training: one loop (``loop.py``) and one file per method saying how a batch becomes a loss.

The registry: each method's file ends with ``SPEC = MethodSpec(name, config class, method class,
summary)``; ``METHODS`` below collects them, and the CLI (``preftune train NAME``, ``preftune train
keys``), the docs' key tables and ``run`` read it. Adding a method is one file and one line here.
Importing this package loads no torch: method files import it inside their functions.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.train import dpo, grpo, kto, online_dpo, ppo, raft, reward_mixture, rloo, sft
from preftune.train.base import MethodSpec, TrainConfig

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    sft.SPEC, reward_mixture.SPEC, dpo.SPEC, kto.SPEC, ppo.SPEC, rloo.SPEC, raft.SPEC, grpo.SPEC, online_dpo.SPEC,
)}

__all__ = ["METHODS", "MethodSpec", "method_spec", "resolve_config", "run"]


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name``; an unknown name is an error naming the nearest one."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        raise PreftuneError(f"unknown training method {name!r}",
                            hint=(f"did you mean {close[0]!r}? " if close else "") + f"methods: {', '.join(METHODS)}")
    return METHODS[name]


def resolve_config(command: str, config: TrainConfig | dict[str, Any] | str | Path, **overrides: Any) -> Any:
    """The validated config of ``train COMMAND`` from an instance, a mapping or a YAML path, plus overrides."""
    from preftune.config import from_mapping, load_config, to_dict

    cls = method_spec(command).config
    if isinstance(config, (str, Path)):
        config = load_config(cls, config)
    if isinstance(config, dict):
        config = from_mapping(cls, config)
    if overrides:
        config = from_mapping(cls, {**to_dict(config), **overrides})
    if not isinstance(config, cls):
        raise PreftuneError(f"`train {command}` needs a {cls.__name__}, got {type(config).__name__}")
    if not hasattr(config, "_sources"):  # an instance built directly: checked as the engine checks one
        config.validate()
    return config


def run(command: str, config: TrainConfig | dict[str, Any] | str | Path, *, method: Any = None,
        **overrides: Any) -> Path:
    """``preftune train COMMAND`` from Python: train, return ``OUTPUT_DIR/final``.

    ``config`` is a config instance, a mapping of keys or a YAML path; ``overrides`` change keys
    (``run("dpo", "dpo.yaml", beta=0.2)``); unknown keys and wrong types raise PreftuneError.
    ``method`` is a method instance built with data in memory (``DPOMethod(pairs=...)``,
    ``PPOMethod(prompts=..., reward_fn=...)``); by default the method reads the config's files.
    """
    from preftune.train.loop import train

    config = resolve_config(command, config, **overrides)
    config.preflight()  # the model directories and data files it names exist: said before anything loads
    if method is None:
        spec = method_spec(command)
        method = (spec.method_for(config) if spec.method_for else spec.method)()  # reward: the mixture when K > 1
    return train(method, config)
