"""Reward models: how a batch of preference pairs and rankings becomes a loss.

A reward model ``r_phi(x, y)`` is a causal LM with a scalar head (``AutoModelForSequenceClassification``,
``num_labels=1``), usually started from the SFT model; the reward is the head's output at the last
real token of prompt + response + EOS (``preftune.models.sequence_scores``).

* A pair (y_w preferred to y_l): the Bradley-Terry negative log-likelihood
  ``-log sigma(r(x, y_w) - r(x, y_l) - m)`` (Ouyang et al. 2022, Eq. 1; with ``margin: true`` the pair's
  margin m as in Llama 2, Touvron et al. 2023, Eq. 2; m = 0 otherwise).
* A ranking of K responses (``rankings: keep``): one item whose K responses are scored in the same
  forward pass, loss ``-1/C(K,2) sum_{i<j} log sigma(r_i - r_j)`` over all pairs, best first
  (InstructGPT, Ouyang et al. 2022, Eq. 1: all K-choose-2 comparisons of a prompt in one batch element,
  which avoids over-fitting from seeing each response in K-1 separate pairs). Tied scores inside a
  ranking count in the given order; ``rankings: pairs`` splits rankings into pairs and skips ties.
* ``center_rewards_coefficient`` c adds ``c * mean_{i<j} (r_i + r_j)^2`` per item, which keeps rewards
  centred on 0 (Eisenstein et al. 2023, "Helping or Herding?", Sec. 3).

The unit is the item (pair or ranking). Metrics (sums per item; the loop averages): ``accuracy`` (share
of the item's ordered pairs scored in the right order), ``margin`` (mean r_i - r_j over those pairs),
``rewards/chosen`` (best response), ``rewards/rejected`` (worst), ``rewards/mean`` (mean over the item's
responses); ``rewards/std`` (over the responses of the step's last micro-batch) is logged as is.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from preftune.config import PairConfig, RewardConfig
from preftune.errors import PreftuneError
from preftune.train.base import RunContext, StepOutput


def _read_preferences(source: str, config: PairConfig, log: Any, *, rankings: str) -> list[Any]:
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


def load_preference_items(config: PairConfig, tokenizer: Any, log: Any, *, rankings: str,
                          pairs: list[Any] | None = None,
                          eval_pairs: list[Any] | None = None) -> tuple[list[Any], list[Any]]:
    """Read (or take) the train and eval preference data, split off eval_fraction, tokenise, log counts."""
    from preftune.data.tokenize import tokenize_preferences
    from preftune.train.sft import split_eval

    train = pairs if pairs is not None else _read_preferences(config.data, config, log, rankings=rankings)
    if eval_pairs is not None:
        evaluation = list(eval_pairs)
    elif config.eval_data:
        evaluation = _read_preferences(config.eval_data, config, log, rankings=rankings)
    else:
        train, evaluation = split_eval(list(train), fraction=config.eval_fraction, seed=config.seed)
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


def item_rewards(scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-response scores [N] -> [B, K] rewards, best first (masked slots hold 0)."""
    rewards = scores[batch["response_index"]]
    return torch.where(batch["response_mask"], rewards, torch.zeros_like(rewards))


def reward_losses(rewards: torch.Tensor, batch: dict[str, torch.Tensor], *, use_margin: bool,
                  center_coefficient: float = 0.0) -> torch.Tensor:
    """Per-item loss [B]: Bradley-Terry for pairs (with margin), the InstructGPT all-pairs loss for rankings."""
    from preftune.core.losses import bradley_terry_loss, pairwise_ranking_loss

    mask = batch["response_mask"]
    ranking = pairwise_ranking_loss(rewards, mask=mask)  # Ouyang et al. 2022, Eq. 1
    margin = torch.nan_to_num(batch["margin"].to(rewards.dtype), nan=0.0) if use_margin else None
    pair = bradley_terry_loss(rewards[:, 0], rewards[:, 1], margin=margin)  # Touvron et al. 2023, Eq. 2
    losses = torch.where(batch["is_ranking"], ranking, pair)
    if center_coefficient:
        upper, _ = _ordered_pairs(mask)
        sums = (rewards[:, :, None] + rewards[:, None, :]) ** 2
        losses = losses + center_coefficient * (sums * upper).sum((1, 2)) / upper.sum((1, 2))
    return losses


def _ordered_pairs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K, K] float: 1 where i < j are both real responses (i ranked above j); and the pair counts [B]."""
    k = mask.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=mask.device).triu(1)
    pairs = (upper & mask[:, :, None] & mask[:, None, :]).float()
    return pairs, pairs.sum((1, 2))


def reward_metrics(rewards: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metric sums over items: accuracy, margin, rewards/chosen, rewards/rejected, rewards/mean."""
    rewards, maskf = rewards.detach().float(), mask.float()
    pairs, counts = _ordered_pairs(mask)
    diff = rewards[:, :, None] - rewards[:, None, :]
    last = mask.long().sum(1) - 1
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return {
        "accuracy": (((diff > 0).float() * pairs).sum((1, 2)) / counts).sum(),
        "margin": ((diff * pairs).sum((1, 2)) / counts).sum(),
        "rewards/chosen": rewards[:, 0].sum(),
        "rewards/rejected": rewards[rows, last].sum(),
        "rewards/mean": ((rewards * maskf).sum(1) / maskf.sum(1)).sum(),
    }


class RewardMethod:
    """Reward-model training (see the module docstring). ``pairs`` / ``eval_pairs`` replace reading
    ``config.data`` / ``config.eval_data`` (``PreferencePair`` and ``Ranking`` objects)."""

    def __init__(self, *, pairs: list[Any] | None = None, eval_pairs: list[Any] | None = None) -> None:
        self._pairs, self._eval_pairs = pairs, eval_pairs
        self.model: torch.nn.Module
        self.tokenizer: Any = None
        self.train_items: list[Any] = []
        self.eval_items: list[Any] = []

    def setup(self, ctx: RunContext) -> None:
        from preftune.models import load_reward_model, load_tokenizer

        config: RewardConfig = ctx.config
        self.config = config
        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.model = load_reward_model(config.model, dtype=config.dtype, lora=config.lora,
                                       gradient_checkpointing=config.gradient_checkpointing,
                                       trust_remote_code=config.trust_remote_code, tokenizer=self.tokenizer)
        self.train_items, self.eval_items = load_preference_items(
            config, self.tokenizer, ctx.log, rankings=config.rankings, pairs=self._pairs, eval_pairs=self._eval_pairs)
        ties = sum(_ties(item) for item in self.train_items)
        if ties:
            ctx.log(f"{ties} tied pairs inside rankings are trained in the given order (rankings: pairs skips them)")

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        from preftune.data.collate import collate_responses

        return collate_responses(items, pad_token_id=self.tokenizer.pad_token_id, padding_side="right")

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Items: pairs and rankings."""
        return int(batch["response_index"].shape[0])

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, normaliser: float) -> StepOutput:
        from preftune.models import sequence_scores

        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])  # [N], all responses at once
        rewards = item_rewards(scores, batch)
        losses = reward_losses(rewards, batch, use_margin=self.config.margin,
                               center_coefficient=self.config.center_rewards_coefficient)
        logs = {"rewards/std": float(scores.detach().float().std())} if scores.numel() > 1 else {}
        return StepOutput(loss=losses.sum() / normaliser, metric_sums=reward_metrics(rewards, batch["response_mask"]),
                          logs=logs)

    def before_step(self, model: torch.nn.Module, step: int) -> None:
        return None

    def save(self, model: torch.nn.Module, path: Path) -> None:
        """A complete ``AutoModelForSequenceClassification`` directory (LoRA is merged into a copy first)."""
        from preftune.models import is_peft

        if is_peft(model):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def _ties(item: Any) -> int:
    scores = getattr(item, "scores", None) or []
    return sum(1 for i in range(len(scores)) for j in range(i + 1, len(scores)) if scores[i] == scores[j])


def train_reward(config: RewardConfig | dict[str, Any] | str | Path, **overrides: Any) -> Path:
    """Run ``preftune train reward`` from Python; returns ``OUTPUT_DIR/final``."""
    from preftune.train.loop import run

    return run("reward", config, **overrides)
