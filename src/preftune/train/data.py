"""Training items from data: read (or take in memory), hold out the evaluation share, tokenise, and log
what was kept, cut and dropped.

Shared by the offline methods (``sft``: demonstrations; ``reward`` and ``dpo``: preference pairs and
rankings) and by PPO-ptx (its SFT rows). Formats and their detection are ``preftune.data``; tokenising
and truncation are ``preftune.data.tokenize``.
"""

from __future__ import annotations

import random
from typing import Any

from preftune import timing
from preftune.errors import PreftuneError


def split_eval(examples: list[Any], *, fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``round(fraction * n)`` examples (at least 1 when fraction > 0), chosen by a seeded shuffle."""
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    k = max(1, round(fraction * len(examples)))
    if k >= len(examples):
        raise PreftuneError(f"eval_fraction {fraction} leaves no training example out of {len(examples)}",
                            field="eval_fraction", hint="lower eval_fraction or give eval_data")
    held = set(order[:k])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def _train_and_eval(config: Any, read: Any, given: list[Any] | None,
                    given_eval: list[Any] | None) -> tuple[list[Any], list[Any]]:
    """Training and evaluation examples: given in memory, read from files, or an eval_fraction split."""
    timing.mark("data")  # reading and tokenising, on the start-up clock (preftune.timing)
    train = list(given) if given is not None else read(config.data)
    if given_eval is not None:
        return train, list(given_eval)
    if config.eval_data:
        return train, read(config.eval_data)
    return split_eval(train, fraction=config.eval_fraction, seed=config.seed)


# ------------------------------------------------------------------------------------------------ demonstrations


def read_sft(source: str, config: Any, log: Any) -> list[Any]:
    """SFT examples of a file or hub dataset (``prompt``/``completion``, ``messages`` or ``text`` rows)."""
    from preftune.data import load_sft

    examples, report = load_sft(source, split=config.data_split, format=config.data_format)
    log(report.summary())
    if not examples:
        raise PreftuneError("no SFT examples found", path=str(source), field="data",
                            hint="rows need prompt+completion, messages or text (see docs/data.md)")
    return list(examples)


def tokenize_sft_items(tokenizer: Any, examples: list[Any], *, max_length: int, completion_only_loss: bool,
                       log: Any, name: str) -> list[Any]:
    """Token ids + labels per example; truncations are counted and logged, label-less examples dropped."""
    from preftune.core.logprobs import IGNORE_INDEX
    from preftune.data.tokenize import tokenize_sft

    items, truncated, empty = [], 0, 0
    for example in examples:
        seq = tokenize_sft(tokenizer, example, max_length=max_length, completion_only_loss=completion_only_loss)
        if not any(label != IGNORE_INDEX for label in seq.labels[1:]):
            empty += 1  # the prompt filled max_length: nothing left to learn from
            continue
        truncated += bool(seq.response_truncated)
        items.append(seq)
    log(f"{name}: {len(items)} of {len(examples)} examples kept; {truncated} of them truncated to max_length "
        f"{max_length}; {empty} dropped with no completion token left")
    if examples and not items:
        raise PreftuneError(f"no {name} example has a completion token within max_length {max_length}",
                            field="max_length", hint="raise max_length or shorten the prompts")
    return items


def load_sft_items(config: Any, tokenizer: Any, log: Any, *, completion_only_loss: bool,
                   examples: list[Any] | None = None,
                   eval_examples: list[Any] | None = None) -> tuple[list[Any], list[Any]]:
    """Read (or take) the train and eval demonstrations, split off eval_fraction, tokenise, log counts."""
    train, evaluation = _train_and_eval(config, lambda source: read_sft(source, config, log), examples,
                                        eval_examples)
    options = {"max_length": config.max_length, "completion_only_loss": completion_only_loss, "log": log}
    return (tokenize_sft_items(tokenizer, train, name="train", **options),
            tokenize_sft_items(tokenizer, evaluation, name="eval", **options) if evaluation else [])


# ------------------------------------------------------------------------------------------------ preferences


def read_preferences(source: str, config: Any, log: Any, *, rankings: str) -> list[Any]:
    """Preference pairs (and, with ``rankings: keep``, rankings) of a file or hub dataset."""
    from preftune.data import load_preferences

    items, report = load_preferences(source, split=config.data_split, format=config.data_format,
                                     rankings=rankings)
    log(report.summary())
    for item in items:
        if not hasattr(item, "chosen") and not hasattr(item, "responses"):
            raise PreftuneError("unpaired rows (prompt, completion, label) cannot train a pairwise method",
                                path=getattr(item, "source", None) or source, field="label",
                                hint="give prompt/chosen/rejected pairs or rankings")
    if not items:
        raise PreftuneError("no preference pairs found", path=str(source), field="data",
                            hint="rows need prompt/chosen/rejected or prompt/responses/ranking (docs/data.md)")
    return list(items)


def load_preference_items(config: Any, tokenizer: Any, log: Any, *, rankings: str,
                          pairs: list[Any] | None = None,
                          eval_pairs: list[Any] | None = None) -> tuple[list[Any], list[Any]]:
    """Read (or take) the train and eval preference data, split off eval_fraction, tokenise, log counts."""
    from preftune.data.tokenize import tokenize_preferences

    train, evaluation = _train_and_eval(
        config, lambda source: read_preferences(source, config, log, rankings=rankings), pairs, eval_pairs)
    out = []
    for name, examples in (("train", train), ("eval", evaluation)):
        items, stats = tokenize_preferences(tokenizer, examples, max_length=config.max_length,
                                            max_prompt_length=config.max_prompt_length,
                                            truncation=config.truncation)
        if examples:
            log(f"{name}: {stats.summary()} (max_length {config.max_length}, truncation {config.truncation})")
        if examples and not items:
            raise PreftuneError(f"every {name} example was dropped by truncation", field="max_length",
                                hint="raise max_length / max_prompt_length or set truncation: keep_end")
        out.append(items)
    return out[0], out[1]
