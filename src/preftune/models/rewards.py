"""Rewards r(x, y) for the online methods, the judges and the experiments: a trained reward model, or a
Python function.

* ``load_function("module:fn" | "path/to/file.py:fn")`` imports a scoring function
  ``fn(prompt, completion) -> float`` (rules, simulated annotators, ground-truth rewards);
* ``RewardModel(path)`` loads a preftune reward model (directory or hub id) and scores prompt +
  completion + EOS exactly as in reward-model training;
* ``load_scorer(spec)`` turns either (or a Python callable) into ``scorer(prompts, completions) -> [float]``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from preftune.data.prompts import prompt_text
from preftune.errors import PreftuneError

Scorer = Callable[[Sequence[Any], Sequence[str]], list[float]]


def is_function_spec(spec: str) -> bool:
    """True for ``module:function`` / ``file.py:function``; False for a model directory or hub id."""
    if Path(spec).is_dir():
        return False
    module, sep, name = spec.rpartition(":")
    return bool(sep and module and name.isidentifier())


def load_function(spec: str, *, field: str = "judge") -> Callable[..., Any]:
    """Resolve ``"package.module:function"`` or ``"path/to/file.py:function"`` to the function
    (``field`` names the option in errors)."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise PreftuneError(f"cannot read the function spec {spec!r}", field=field,
                            hint="write module:function or path/to/file.py:function")
    if module_part.endswith(".py") or Path(module_part).is_file():
        path = Path(module_part)
        if not path.is_file():
            raise PreftuneError("file not found", path=str(path), field=field,
                                hint="give the path of a Python file that defines the scoring function")
        mod_name = f"_preftune_judge_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise PreftuneError("cannot load this file as Python", path=str(path), field=field)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise PreftuneError(f"cannot import module {module_part!r} ({exc})", field=field,
                                hint="check the module name, or give path/to/file.py:function") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise PreftuneError(f"{module_part!r} has no function {attr!r}", field=field,
                            hint="define score(prompt, completion) -> float there")
    return fn


def function_scores(fn: Callable[[str, str], Any], prompts: Sequence[str], completions: Sequence[str], *,
                    name: str, field: str = "judge") -> list[float]:
    """``float(fn(prompt, completion))`` for each pair; a value that is not a number is an error."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        value = fn(p, c)
        try:
            out.append(float(value))
        except (TypeError, ValueError):
            raise PreftuneError(f"the scoring function {name} returned {value!r}, not a number",
                                field=field) from None
    return out


class RewardModel:
    """A reward model r(x, y) ready to score: a directory or hub id, or a loaded ``model`` and ``tokenizer``.

    ``scores(prompts, completions)`` tokenises prompt + completion + EOS as reward-model training does
    (``preftune.models.score_texts``); prompts may be strings or chat messages.
    """

    def __init__(self, path: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 batch_size: int = 16, device: str | None = None, field: str = "judge") -> None:
        if model is None:
            if path is None:
                raise PreftuneError("give a reward model path (or a loaded model and tokenizer)", field=field)
            from preftune.models.load import default_device, load_reward_model, load_tokenizer

            tokenizer = load_tokenizer(path)
            model = load_reward_model(path, tokenizer=tokenizer)
            model.to(default_device(device))
        if tokenizer is None:
            raise PreftuneError("a reward model needs its tokenizer", field=field)
        self.model, self.tokenizer, self.batch_size, self.path = model, tokenizer, batch_size, path

    def scores(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        from preftune.models.load import score_texts

        values = score_texts(self.model, self.tokenizer, list(prompts), list(completions),
                             batch_size=self.batch_size)
        return [float(v) for v in values]


def load_scorer(spec: str | Callable[..., float], *, device: str | None = None, batch_size: int = 16,
                field: str = "reward") -> Scorer:
    """``scorer(prompts, completions) -> [float]`` from a reward spec or a Python callable.

    A callable or ``module:function`` / ``file.py:function`` is called as ``fn(prompt_text, completion)``;
    anything else is loaded as a preftune reward model (directory or hub id), frozen.
    """
    if callable(spec) or is_function_spec(spec):
        fn = spec if callable(spec) else load_function(spec, field=field)
        name = spec if isinstance(spec, str) else getattr(spec, "__name__", "function")
        return lambda prompts, completions: function_scores(fn, [prompt_text(p) for p in prompts],
                                                            list(completions), name=name, field=field)
    try:
        reward_model = RewardModel(spec, batch_size=batch_size, device=device, field=field)
    except PreftuneError as exc:  # name the option that gave the path (the loaders say `model`)
        raise PreftuneError(exc.message, path=exc.path, line=exc.line, field=field, hint=exc.hint) from None
    reward_model.model.requires_grad_(False)
    return reward_model.scores
