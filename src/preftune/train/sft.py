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
``preftune.train.data.load_sft_items`` and ``preftune.data.collate.collate_sft``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from preftune.config import opt
from preftune.train.base import MethodSpec, OfflineMethod, RunContext, StepOutput, TrainConfig

if TYPE_CHECKING:
    import torch


@dataclass
class SFTConfig(TrainConfig):
    """`preftune train sft`: supervised fine-tuning on demonstrations."""

    command: ClassVar[str] = "sft"

    learning_rate: float = opt(2e-5, "peak learning rate of AdamW", gt=0)
    output_dir: str = opt("runs/sft", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    completion_only_loss: bool = opt(True, "loss on completion / assistant tokens only; false = on all tokens")
    fused_lm_head: bool = opt(False, "apply the lm_head chunk by chunk inside the log-prob, never holding "
                              "the [batch, time, vocab] logits: less memory at large vocabularies")


class SFTMethod(OfflineMethod):
    """Supervised fine-tuning on demonstrations (see the module docstring for the loss).

    ``examples`` / ``eval_examples`` (mappings or ``SFTExample`` objects) replace reading ``config.data``
    / ``config.eval_data``, for callers that hold the data in memory.
    """

    def __init__(self, *, examples: list[Any] | None = None, eval_examples: list[Any] | None = None) -> None:
        super().__init__(examples, eval_examples)
        self.fused_lm_head = False  # the fused_lm_head key, once setup has checked the model's head
        self.packing = ""  # "rows" or "" (padded rows): the packing key, once setup has checked the model

    def setup(self, ctx: RunContext) -> None:
        from preftune.core.logprobs import fused_lm_head_applies
        from preftune.core.packing import packing_applies
        from preftune.models import load_policy, load_tokenizer
        from preftune.train.data import load_sft_items

        config: SFTConfig = ctx.config
        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.model = load_policy(config.model, dtype=config.dtype, lora=config.lora,
                                 gradient_checkpointing=config.gradient_checkpointing,
                                 trust_remote_code=config.trust_remote_code, tokenizer=self.tokenizer)
        self.fused_lm_head = config.fused_lm_head and fused_lm_head_applies(self.model, ctx.log)
        self.packing = packing_applies(config, self.model, ctx.log)
        self.train_items, self.eval_items = load_sft_items(
            config, self.tokenizer, ctx.log, completion_only_loss=config.completion_only_loss,
            examples=self._given, eval_examples=self._given_eval)

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        from preftune.core.packing import add_packing
        from preftune.data.collate import collate_sft

        batch = collate_sft(items, pad_token_id=self.tokenizer.pad_token_id, padding_side="right")
        return add_packing(batch) if self.packing else batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Completion tokens that are predicted: labels at positions 1..T-1 that are not -100."""
        from preftune.core.logprobs import IGNORE_INDEX

        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, normaliser: float) -> StepOutput:
        """``-sum(log pi(completion tokens)) / normaliser`` and the count of correctly predicted tokens
        (the scored tokens that are the model's arg-max)."""
        import torch

        from preftune.core.forward import model_label_logps

        # [B, T] log-probs, 0 where nothing is scored; hits: scored tokens that are the arg-max
        logps, hits = model_label_logps(model, batch, fused=self.fused_lm_head, hits=True)
        return StepOutput(loss=-logps.sum() / normaliser,
                          metric_sums={"mean_token_accuracy": hits.sum().to(torch.float64)})



SPEC = MethodSpec("sft", SFTConfig, SFTMethod,
                  "Supervised fine-tuning on demonstrations ({prompt, completion}, {messages} or {text} rows).")
