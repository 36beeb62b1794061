"""Rewards r(x, y) for the online methods, the judges and the experiments: a trained reward model, or a
Python function.

* ``load_function("module:fn" | "path/to/file.py:fn")`` imports a scoring function
  ``fn(prompt, completion) -> float`` (rules, simulated annotators, ground-truth rewards);
* ``RewardModel(path)`` loads a preftune reward model (directory or hub id) and scores prompt +
  completion + EOS exactly as in reward-model training;
* ``load_scorer(spec)`` turns either (or a Python callable) into ``scorer(prompts, completions) -> [float]``.

Two kinds of silent nonsense are refused here, once for every user (judges, PPO / RLOO / RAFT rewards,
``preftune score``): a causal LM given where a reward model belongs (``check_reward_checkpoint``: its
score head would be freshly random), and a score that is NaN or infinite (``check_finite``: it would
turn every comparison into a tie, or every advantage into NaN).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from preftune.data.prompts import prompt_text
from preftune.errors import PreftuneError

Scorer = Callable[[Sequence[Any], Sequence[str]], list[float]]
LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM")  # architectures of LMs


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


def excerpt(text: Any, width: int = 60) -> str:
    """A text on one line, cut to ``width`` characters, quoted: for naming a prompt in an error."""
    text = " ".join(prompt_text(text).split())
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def check_finite(scores: Sequence[float], prompts: Sequence[Any], completions: Sequence[str], *, source: str,
                 field: str = "judge", hint: str | None = None) -> list[float]:
    """``scores`` unchanged when every one is a finite number; else an error naming the first bad
    score's prompt and completion and ``source`` (the function or model that gave it)."""
    for score, prompt, completion in zip(scores, prompts, completions, strict=True):
        if not math.isfinite(score):
            raise PreftuneError(f"{source} gave the score {score} for the prompt {excerpt(prompt)} "
                                f"(completion {excerpt(completion, 40)})", field=field,
                                hint=hint or "scores must be finite numbers: a NaN would make every "
                                             "comparison a tie")
    return list(scores)


def function_scores(fn: Callable[[str, str], Any], prompts: Sequence[str], completions: Sequence[str], *,
                    name: str, field: str = "judge") -> list[float]:
    """``float(fn(prompt, completion))`` for each pair; a value that is not a number, or is NaN or
    infinite, is an error naming the function and the prompt."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        value = fn(p, c)
        try:
            out.append(float(value))
        except (TypeError, ValueError):
            raise PreftuneError(f"the scoring function {name} returned {value!r}, not a number, for the prompt "
                                f"{excerpt(p)}", field=field) from None
    return check_finite(out, prompts, completions, source=f"the scoring function {name}", field=field,
                        hint="return a finite float from the function (a NaN or inf cannot be compared)")


def check_reward_checkpoint(path: str, *, field: str = "reward") -> None:
    """Refuse a checkpoint that is not a reward model: its config names only other architectures
    (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ``BertModel``, ...; not ``...ForSequenceClassification``
    nor a custom ``...Reward...`` class), so its weights hold no score head and loading it as a reward
    model would add a freshly random one. Checked before the weights load.

    The config comes the normal way (``AutoConfig.from_pretrained``: a local directory, or a hub id's
    config.json). One that cannot be read here (a LoRA adapter directory, a hub id out of reach) or names
    no architecture is left to the loader."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001 - not our verdict: the model loader reports a bad path in its words
        return
    finally:
        hf_logging.set_verbosity(verbosity)
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any("ForSequenceClassification" in a or "Reward" in a for a in architectures):
        kind = "language model" if any(a.endswith(LM_HEADS) for a in architectures) else "model"
        raise PreftuneError(f"a {kind} ({', '.join(architectures)}) without a trained reward head: as a "
                            "reward model it would score with a random head", path=str(path), field=field,
                            hint=f"train one with `preftune train reward examples/reward.yaml --model {path} "
                                 "--data PREFS.jsonl`, or pass a reward model (its final/ directory)")


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

            tokenizer = load_tokenizer(path)  # a bad path or hub id fails here, in the loader's words
            check_reward_checkpoint(path, field=field)  # before the weights load
            model = load_reward_model(path, tokenizer=tokenizer)
            model.to(default_device(device))
        if tokenizer is None:
            raise PreftuneError("a reward model needs its tokenizer", field=field)
        self.model, self.tokenizer, self.batch_size, self.path = model, tokenizer, batch_size, path
        self.field = field

    def scores(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        from preftune.models.load import score_texts

        values = score_texts(self.model, self.tokenizer, list(prompts), list(completions),
                             batch_size=self.batch_size)
        return check_finite([float(v) for v in values], prompts, completions,
                            source=f"the reward model {self.path or type(self.model).__name__}", field=self.field,
                            hint="the model's weights or its dtype give NaN (try float32, or retrain)")


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
