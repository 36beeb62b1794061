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

With ``mixtures: K`` (K > 1) the same loss trains K reward models fitted by EM over the annotators
(``preftune.train.reward_mixture``; the registry's entry for ``train reward`` dispatches on ``mixtures``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from preftune.config import opt, require
from preftune.errors import PreftuneError
from preftune.train.base import (
    MethodSpec,
    OfflineMethod,
    PairConfig,
    RunContext,
    StepOutput,
    save_with_tokenizer,
)

if TYPE_CHECKING:
    import torch


@dataclass
class RewardConfig(PairConfig):
    """`preftune train reward`: a scalar reward model r_phi(x, y) from preference pairs."""

    command: ClassVar[str] = "reward"

    learning_rate: float = opt(1e-5, "peak learning rate of AdamW", gt=0)
    output_dir: str = opt("runs/reward", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    margin: bool = opt(False, "use the pair's `margin` field in -log sigmoid(r_w - r_l - m) (Llama 2)")
    rankings: str = opt("keep", "K-way rankings: keep = one item, all K-choose-2 pairs in one forward "
                        "(InstructGPT); pairs = split into separate pairs", choices=("keep", "pairs"))
    center_rewards_coefficient: float = opt(0.0, "weight of the (r_w + r_l)^2 penalty that centres rewards "
                                            "(Eisenstein et al. 2023); 0 = off", ge=0,
                                            why="a negative weight would push the rewards away from 0")
    # a mixture of K reward models fitted by EM over the annotators (train/reward_mixture.py)
    mixtures: int = opt(1, "K reward models fitted by EM, annotators as the unit (MaxMin-RLHF, Chakraborty et "
                        "al. 2024, Alg. 2): final/mixture-k/ each; 1 = one reward model", ge=1)
    em_init: str = opt("random", "EM's first assignment of annotators: random = seeded, every mixture "
                       "non-empty; groups = by the data's `group`", choices=("random", "groups"))
    em_restarts: int = opt(3, "EM runs from different random starts, trained side by side; the one with the "
                           "highest final log-likelihood is kept (em_init: groups runs one)", ge=1)
    em_iterations: int = opt(10, "EM iterations at most (M-step, then E-step); EM stops earlier once no "
                             "annotator changes mixture", ge=1)
    em_epochs: int = opt(1, "passes over the training pairs per M-step (each mixture trains on its "
                         "annotators' pairs)", ge=1)

    def validate(self) -> None:
        super().validate()
        if self.mixtures == 1:
            for key, default in _EM_DEFAULTS.items():
                require(self, key, getattr(self, key) == default, "is used only with mixtures > 1")
            return
        length = "the run's length is em_iterations x em_epochs passes over the pairs (EM may stop earlier)"
        require(self, "max_steps", self.max_steps is None, f"cannot be set with mixtures > 1: {length}")
        require(self, "epochs", self.epochs == 1.0, f"cannot be changed with mixtures > 1: {length}")
        for key in ("eval_data", "eval_fraction", "group_by_length", "max_tokens_per_batch", "merge_lora"):
            require(self, key, not getattr(self, key), "is not supported with mixtures > 1 (see docs/diverse.md): "
                    "EM's log-likelihood per iteration is in metrics.jsonl, and each final/mixture-k is merged")


def item_rewards(scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-response scores [N] -> [B, K] rewards, best first (masked slots hold 0)."""
    import torch

    rewards = scores[batch["response_index"]]
    return torch.where(batch["response_mask"], rewards, torch.zeros_like(rewards))


def reward_losses(rewards: torch.Tensor, batch: dict[str, torch.Tensor], *, use_margin: bool,
                  center_coefficient: float = 0.0) -> torch.Tensor:
    """Per-item loss [B]: Bradley-Terry for pairs (with margin), the InstructGPT all-pairs loss for rankings."""
    import torch

    from preftune.core.reward_losses import bradley_terry_loss, pairwise_ranking_loss

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
    import torch

    k = mask.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=mask.device).triu(1)
    pairs = (upper & mask[:, :, None] & mask[:, None, :]).float()
    return pairs, pairs.sum((1, 2))


def reward_metrics(rewards: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metric sums over items: accuracy, margin, rewards/chosen, rewards/rejected, rewards/mean."""
    import torch

    rewards = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))  # float64 stays float64
    maskf = mask.to(rewards.dtype)
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


class RewardMethod(OfflineMethod):
    """Reward-model training (see the module docstring). ``pairs`` / ``eval_pairs`` replace reading
    ``config.data`` / ``config.eval_data`` (``PreferencePair`` and ``Ranking`` objects)."""

    packing = ""  # "shared", "rows" or "" (padded rows): set by setup from the packing keys

    def __init__(self, *, pairs: list[Any] | None = None, eval_pairs: list[Any] | None = None) -> None:
        super().__init__(pairs, eval_pairs)

    def setup(self, ctx: RunContext) -> None:
        from preftune.core.packing import packing_applies
        from preftune.models import load_reward_model, load_tokenizer
        from preftune.train.data import load_preference_items
        from preftune.train.strategy import is_fsdp

        config: RewardConfig = ctx.config
        self.config = config
        if config.mixtures > 1 and type(self) is RewardMethod:
            raise PreftuneError("mixtures > 1 is trained by RewardMixtureMethod, not RewardMethod", field="mixtures",
                                hint="pass method=RewardMixtureMethod(pairs=...) (preftune.train.reward_mixture), "
                                "or no method: preftune.train.run picks it")
        if config.lora and is_fsdp(ctx.accelerator):  # before anything loads, not at the final save
            raise PreftuneError("a LoRA reward model is saved merged, and a model sharded with FSDP cannot be merged",
                                field="lora", hint="train the reward model with DDP (examples/accelerate/"
                                "multi_cpu.yaml or multi_gpu.yaml), or without LoRA")
        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.model = load_reward_model(config.model, dtype=config.dtype, lora=config.lora,
                                       gradient_checkpointing=config.gradient_checkpointing,
                                       trust_remote_code=config.trust_remote_code, tokenizer=self.tokenizer)
        self.packing = packing_applies(config, self.model, ctx.log, share_prompt=config.share_prompt, scores=True)
        self.train_items, self.eval_items = load_preference_items(
            config, self.tokenizer, ctx.log, rankings=config.rankings, pairs=self._given, eval_pairs=self._given_eval)
        ties = sum(_ties(item) for item in self.train_items)
        if ties:
            ctx.log(f"{ties} tied pairs inside rankings are trained in the given order (rankings: pairs skips them)")

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        from preftune.core.packing import add_packing
        from preftune.data.collate import collate_responses

        batch = collate_responses(items, pad_token_id=self.tokenizer.pad_token_id, padding_side="right")
        if not self.packing:
            return batch
        groups = ([[int(r) for r, real in zip(rows, mask, strict=True) if real]
                   for rows, mask in zip(batch["response_index"], batch["response_mask"], strict=True)]
                  if self.packing == "shared" else ())
        return add_packing(batch, groups=groups, last_token_queries=True)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Items: pairs and rankings."""
        return int(batch["response_index"].shape[0])

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, normaliser: float) -> StepOutput:
        from preftune.core.forward import packed_scores
        from preftune.core.packing import is_packed
        from preftune.models import sequence_scores
        from preftune.models.load import score_head

        if is_packed(batch):  # [N] at each response's last token, from padding-free rows
            scores = packed_scores(model, batch, score_head(model))
        else:
            scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])  # [N], all responses at once
        rewards = item_rewards(scores, batch)
        losses = reward_losses(rewards, batch, use_margin=self.config.margin,
                               center_coefficient=self.config.center_rewards_coefficient)
        logs = {"rewards/std": float(scores.detach().float().std())} if scores.numel() > 1 else {}
        return StepOutput(loss=losses.sum() / normaliser, metric_sums=reward_metrics(rewards, batch["response_mask"]),
                          logs=logs)

    def save(self, model: torch.nn.Module, path: Path, *, state_dict: dict[str, Any] | None = None) -> None:
        """A complete ``AutoModelForSequenceClassification`` directory (LoRA is merged into a copy first;
        ``state_dict``: the full weights gathered from a sharded model)."""
        import copy

        from preftune.models import is_peft

        if is_peft(model):  # (setup refuses LoRA under FSDP, where the weights are shards)
            model = copy.deepcopy(model).merge_and_unload()
        save_with_tokenizer(model, self.tokenizer, path, state_dict=state_dict)


def _ties(item: Any) -> int:
    scores = getattr(item, "scores", None) or []
    return sum(1 for i in range(len(scores)) for j in range(i + 1, len(scores)) if scores[i] == scores[j])


_EM_DEFAULTS = {"em_init": "random", "em_restarts": 3, "em_iterations": 10, "em_epochs": 1}


SPEC = MethodSpec("reward", RewardConfig, RewardMethod,
                  "Train a scalar reward model r(x, y) on preference pairs (Bradley-Terry loss); with "
                  "mixtures: K, K reward models by EM over the annotators.")
# the registry takes reward_mixture.SPEC: this entry, running RewardMixtureMethod when mixtures > 1
