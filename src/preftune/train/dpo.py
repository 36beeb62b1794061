"""The DPO family: how a batch of preference pairs becomes a loss.

For each pair the policy's sequence log-probs are summed over the response tokens, EOS included
(Rafailov et al. 2023, Eq. 7 uses ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)``)::

    logp(y|x) = sum_{t in response} log pi(y_t | x, y_<t)          and  |y| = number of those tokens

chosen and rejected go through the model in ONE forward pass (a [2B, T] batch, chosen rows first).
The loss is looked up by name in ``preftune.core.losses.LOSSES`` (dpo, ipo, cdpo, hinge, robust use the
reference terms ``logp_ref``; orpo, simpo, unlikelihood use the token counts ``|y|`` instead), with
``beta`` and the loss's own keys from the config. The unit is the pair: the loss is the sum of per-pair
losses divided by the number of pairs in the global batch.

The reference pi_ref is ``ref_model`` when given, else a frozen copy of the starting model, or, with
LoRA, the same model with its adapter disabled (no extra memory). By default its log-probs are
computed once before training and cached on disk (``preftune.train.refcache``); with
``precompute_ref_logps: false`` the reference runs next to the policy at every step.

Metrics (sums per pair; the loop averages): ``rewards/chosen``, ``rewards/rejected`` (the loss's implicit
rewards, e.g. ``beta * (logp - logp_ref)`` for dpo), ``rewards/margins``, ``rewards/accuracies`` (share of
pairs with chosen reward > rejected reward), ``logps/chosen``, ``logps/rejected``.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from preftune.config import DPOConfig
from preftune.data.tokenize import IGNORE_INDEX
from preftune.train.base import RunContext, StepOutput


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with a causal LM's logits: position t scores token t+1; the last scores nothing."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def sequence_logps(model: Any, batch: dict[str, torch.Tensor], *,
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [N] and response token counts [N] of every row of ``batch``.

    ``sum_t log pi(y_t | x, y_<t)`` over positions whose label is not -100 (the response and its EOS);
    positions come from the attention mask, so left and right padding give the same values.
    """
    from preftune.core.logprobs import token_logps
    from preftune.models import position_ids_from_mask

    mask = batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False).logits
    targets = next_token_labels(batch["labels"])
    per_token = token_logps(logits, targets, chunk_size=chunk_size)  # [N, T] float32, 0 where -100
    return per_token.sum(-1), (targets != IGNORE_INDEX).sum(-1).to(per_token.dtype)


class DPOMethod:
    """DPO and its family (see the module docstring). ``pairs`` / ``eval_pairs`` replace reading
    ``config.data`` / ``config.eval_data`` for callers that hold ``PreferencePair`` objects in memory."""

    def __init__(self, *, pairs: list[Any] | None = None, eval_pairs: list[Any] | None = None) -> None:
        self._pairs, self._eval_pairs = pairs, eval_pairs
        self.model: torch.nn.Module
        self.tokenizer: Any = None
        self.train_items: list[Any] = []
        self.eval_items: list[Any] = []
        self.ref_model: torch.nn.Module | None = None
        self.ref_hits: dict[str, bool] = {}  # split -> whether its reference log-probs came from the cache

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, ctx: RunContext) -> None:
        from preftune.core.losses import LOSSES
        from preftune.models import load_policy, load_tokenizer
        from preftune.train.reward import load_preference_items

        config: DPOConfig = ctx.config
        self.config, self.accelerator = config, ctx.accelerator
        self.loss_name, self.hparams = config.loss, config.loss_hparams()
        self.needs_reference = LOSSES[config.loss].needs_reference
        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.model = load_policy(config.model, dtype=config.dtype, lora=config.lora,
                                 gradient_checkpointing=config.gradient_checkpointing,
                                 trust_remote_code=config.trust_remote_code, tokenizer=self.tokenizer)
        self.train_items, self.eval_items = load_preference_items(
            config, self.tokenizer, ctx.log, rankings="pairs", pairs=self._pairs, eval_pairs=self._eval_pairs)
        if not self.needs_reference:
            if config.ref_model:
                ctx.log(f"loss {config.loss} uses no reference model; ref_model is ignored")
            return
        self.ref_model = self._build_reference(config)
        if config.precompute_ref_logps:
            for name, items in (("train", self.train_items), ("eval", self.eval_items)):
                if items:
                    self.ref_hits[name] = self._precompute(items, name=name, log=ctx.log)
            self.ref_model = None  # every pair now carries its reference log-probs
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        elif self.ref_model is not None:
            self.ref_model.to(ctx.accelerator.device)

    def _build_reference(self, config: DPOConfig) -> torch.nn.Module | None:
        """pi_ref: ``ref_model``; else None with LoRA (adapter disabled); else a frozen copy of the policy."""
        from preftune.models import load_reference, reference_from

        if config.ref_model:
            return load_reference(config.ref_model, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                                  tokenizer=self.tokenizer)
        if config.lora:
            return None
        return reference_from(self.model)

    def _reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed reference log-probs [2B] of a batch, without gradients."""
        from preftune.models import adapter_disabled

        with torch.no_grad():
            if self.ref_model is not None:
                return sequence_logps(self.ref_model, batch)[0]
            with adapter_disabled(model) as base:
                return sequence_logps(base, batch)[0]

    def _precompute(self, items: list[Any], *, name: str, log: Any) -> bool:
        """Reference log-probs of ``items`` from the disk cache, or one no-grad pass that fills it."""
        from preftune.models import unwrap
        from preftune.train import refcache

        config, accelerator = self.config, self.accelerator
        reference = self.ref_model if self.ref_model is not None else unwrap(self.model)
        directory = refcache.cache_dir(config.ref_cache_dir)
        key = refcache.cache_key(
            model=refcache.model_fingerprint(reference), tokenizer=refcache.tokenizer_fingerprint(self.tokenizer),
            items=refcache.items_fingerprint(items),
            settings={"max_length": config.max_length, "max_prompt_length": config.max_prompt_length,
                      "truncation": config.truncation, "dtype": str(next(reference.parameters()).dtype),
                      "mixed_precision": config.mixed_precision})
        device = accelerator.device
        reference.to(device)

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            with accelerator.autocast():
                return refcache.compute(items, forward=lambda b: self._reference_logps(self.model, b),
                                        collate=self.collate, batch_size=config.eval_batch_size or config.batch_size,
                                        device=device, description=f"reference log-probs ({name})")

        with accelerator.main_process_first():  # the main process computes and saves; the others read
            hit = refcache.ensure(items, key=key, directory=directory, compute_fn=compute,
                                  metadata={"model": str(getattr(reference.config, "_name_or_path", "")),
                                            "split": name, "pairs": str(len(items))})
        log(f"reference log-probs for {len(items)} {name} pairs: "
            f"{'read from' if hit else 'computed and saved to'} {directory / (key + '.safetensors')}")
        return hit

    # ------------------------------------------------------------------------------------------ per batch
    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        from preftune.data.collate import collate_pairs

        return collate_pairs(items, pad_token_id=self.tokenizer.pad_token_id, padding_side="right")

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs: half the rows (chosen and rejected are stacked)."""
        return int(batch["input_ids"].shape[0] // 2)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, normaliser: float) -> StepOutput:
        """``sum_pairs loss_name(...) / normaliser`` plus the reward and log-prob metric sums."""
        from preftune.core.losses import preference_loss

        logps, counts = sequence_logps(model, batch)
        pairs = logps.shape[0] // 2
        chosen, rejected = logps[:pairs], logps[pairs:]
        ref: dict[str, torch.Tensor] = {}
        if self.needs_reference:
            if "ref_chosen_logps" in batch:
                ref = {"ref_chosen_logps": batch["ref_chosen_logps"].to(logps.dtype),
                       "ref_rejected_logps": batch["ref_rejected_logps"].to(logps.dtype)}
            else:
                ref_logps = self._reference_logps(model, batch).to(logps.dtype)
                ref = {"ref_chosen_logps": ref_logps[:pairs], "ref_rejected_logps": ref_logps[pairs:]}
        out = preference_loss(self.loss_name, policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                              chosen_lengths=counts[:pairs], rejected_lengths=counts[pairs:], **ref, **self.hparams)
        rc, rr = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        metrics = {
            "rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(), "rewards/margins": (rc - rr).sum(),
            "rewards/accuracies": (rc > rr).float().sum(),
            "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum(),
        }
        return StepOutput(loss=out.losses.sum() / normaliser, metric_sums=metrics)

    def before_step(self, model: torch.nn.Module, step: int) -> None:
        return None

    def save(self, model: torch.nn.Module, path: Path) -> None:
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def train_dpo(config: DPOConfig | dict[str, Any] | str | Path, **overrides: Any) -> Path:
    """Run ``preftune train dpo`` from Python; returns ``OUTPUT_DIR/final``."""
    from preftune.train.loop import run

    return run("dpo", config, **overrides)
