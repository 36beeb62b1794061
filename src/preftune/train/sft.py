"""Supervised fine-tuning: how a batch of demonstrations becomes a loss.

The loss is the negative log-likelihood of the completion tokens (Ouyang et al. 2022, Sec. 3.5, SFT;
the language-modelling objective of Radford et al. 2018, Eq. 1, restricted to the response)::

    L = - sum_{b,t} m_{b,t} log pi(x_{b,t+1} | x_{b,<=t}) / sum_{b,t} m_{b,t}

where ``m`` is 1 on completion / assistant tokens (and their final EOS) and 0 on prompt tokens and
padding (on every real token with ``completion_only_loss: false`` or for ``{text}`` rows). The unit is
the token and the normaliser is the number of completion tokens in the whole global batch, so the loss
is a token mean over all micro-batches and processes, not a mean of per-batch means.

Data rows: ``{prompt, completion}``, ``{messages}`` (the tokenizer's chat template; every assistant turn
is trained on) or ``{text}`` (plain language modelling). Tokenisation and padding are
``preftune.data.tokenize.tokenize_sft`` and ``preftune.data.collate.collate_sft``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from preftune.config import SFTConfig, TrainConfig
from preftune.errors import PreftuneError
from preftune.train.base import RunContext, StepOutput

IGNORE_INDEX = -100


class SFTMethod:
    """Supervised fine-tuning on demonstrations (see the module docstring for the loss).

    ``examples`` / ``eval_examples`` (mappings or ``SFTExample`` objects) replace reading ``config.data``
    / ``config.eval_data``, for callers that hold the data in memory.
    """

    def __init__(self, *, examples: list[Any] | None = None, eval_examples: list[Any] | None = None) -> None:
        self._examples, self._eval_examples = examples, eval_examples
        self.model: torch.nn.Module
        self.tokenizer: Any = None
        self.train_items: list[Any] = []
        self.eval_items: list[Any] = []

    def setup(self, ctx: RunContext) -> None:
        from preftune.models import load_policy, load_tokenizer

        config: SFTConfig = ctx.config
        self.completion_only_loss = bool(getattr(config, "completion_only_loss", True))
        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.model = load_policy(config.model, dtype=config.dtype, lora=config.lora,
                                 gradient_checkpointing=config.gradient_checkpointing,
                                 trust_remote_code=config.trust_remote_code, tokenizer=self.tokenizer)
        train, evaluation = self._load(config, ctx.log)
        self.train_items = self._tokenize(train, config, ctx.log, name="train")
        self.eval_items = self._tokenize(evaluation, config, ctx.log, name="eval") if evaluation else []

    def _load(self, config: TrainConfig, log: Any) -> tuple[list[Any], list[Any]]:
        """Training and evaluation examples: given in memory, read from files, or an eval_fraction split."""
        train = self._examples if self._examples is not None else _read(config.data, config, log)
        if self._eval_examples is not None:
            return list(train), list(self._eval_examples)
        if config.eval_data:
            return list(train), _read(config.eval_data, config, log)
        return split_eval(list(train), fraction=config.eval_fraction, seed=config.seed)

    def _tokenize(self, examples: list[Any], config: TrainConfig, log: Any, *, name: str) -> list[Any]:
        """Token ids + labels per example; truncations are counted and logged, label-less examples dropped."""
        from preftune.data.tokenize import tokenize_sft

        items, truncated, empty = [], 0, 0
        for example in examples:
            seq = tokenize_sft(self.tokenizer, example, max_length=config.max_length,
                               completion_only_loss=self.completion_only_loss)
            if not any(label != IGNORE_INDEX for label in seq.labels[1:]):
                empty += 1  # the prompt filled max_length: nothing left to learn from
                continue
            truncated += bool(seq.response_truncated)
            items.append(seq)
        log(f"{name}: {len(items)} of {len(examples)} examples kept; {truncated} of them truncated to max_length "
            f"{config.max_length}; {empty} dropped with no completion token left")
        if examples and not items:
            raise PreftuneError(f"no {name} example has a completion token within max_length {config.max_length}",
                                field="max_length", hint="raise max_length or shorten the prompts")
        return items

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        from preftune.data.collate import collate_sft

        return collate_sft(items, pad_token_id=self.tokenizer.pad_token_id, padding_side="right")

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Completion tokens that are predicted: labels at positions 1..T-1 that are not -100."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, normaliser: float) -> StepOutput:
        """``-sum(log pi(completion tokens)) / normaliser`` and the count of correctly predicted tokens."""
        from preftune.core.logprobs import token_logps

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits
        targets = next_token_labels(batch["labels"])
        logps = token_logps(logits, targets)  # [B, T]; 0 where the target is -100
        mask = targets != IGNORE_INDEX
        correct = ((logits.detach().argmax(-1) == targets) & mask).sum()
        return StepOutput(loss=-logps.sum() / normaliser,
                          metric_sums={"mean_token_accuracy": correct.to(torch.float64)})

    def before_step(self, model: torch.nn.Module, step: int) -> None:
        return None

    def save(self, model: torch.nn.Module, path: Path) -> None:
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits: position t is scored on token t+1 (the last position on nothing)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


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


def _read(source: str, config: TrainConfig, log: Any) -> list[Any]:
    from preftune.data import load_sft

    examples, report = load_sft(source, split=config.data_split, format=config.data_format)
    log(report.summary())
    if not examples:
        raise PreftuneError("no SFT examples found", path=str(source), field="data",
                            hint="rows need prompt+completion, messages or text (see docs/data.md)")
    return list(examples)


def train_sft(config: SFTConfig | dict[str, Any] | str | Path, **overrides: Any) -> Path:
    """Run ``preftune train sft`` from Python; returns ``OUTPUT_DIR/final``.

    ``config`` is an ``SFTConfig``, a mapping of keys, or a YAML path; ``overrides`` are keys to change.
    """
    from preftune.train.loop import run

    return run("sft", config, **overrides)
