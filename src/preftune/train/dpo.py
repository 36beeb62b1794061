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

With ``group_robust: true`` (group-robust DPO, Ramesh et al. 2024; ``preftune.train.group_robust``) each
pair's loss is weighted by its group's alpha times N / N_g, alpha moves once per step towards the groups
with the higher loss, and ``group/alpha/<g>``, ``group/loss/<g>``, ``group/accuracy/<g>`` are logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from preftune.config import fail, opt, suggest
from preftune.train.base import MethodSpec, OfflineMethod, PairConfig, RunContext, StepOutput

if TYPE_CHECKING:
    import torch

    from preftune.train.group_robust import GroupRobust


# The flat loss keys; null means "the loss function's own default" (e.g. beta 0.1 for dpo, 2.0 for simpo).
_DPO_LOSS_KEYS = ("beta", "label_smoothing", "gamma", "alpha")


@dataclass
class DPOConfig(PairConfig):
    """`preftune train dpo`: direct preference optimisation and its family of losses."""

    command: ClassVar[str] = "dpo"

    learning_rate: float = opt(5e-7, "peak learning rate of AdamW", gt=0)
    output_dir: str = opt("runs/dpo", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    ref_model: str | None = opt(None, "reference pi_ref; null = the starting model (with lora: adapters off)")
    loss: str = opt("dpo", "preference loss: dpo, ipo, cdpo, hinge, robust, orpo, simpo, unlikelihood")
    beta: float | None = opt(None, "loss temperature beta; null = the loss's default (0.1 for dpo)", gt=0,
                             why="beta scales the preference term of every loss (ipo's target is 1/(2 beta)); "
                                 "0 removes it and a negative beta reverses it")
    label_smoothing: float | None = opt(None, "label-flip rate eps of cdpo / robust; null = their default",
                                        ge=0, lt=0.5, why="eps is the probability that a label is wrong; at 0.5 "
                                        "the labels carry no preference and above it they reverse it")
    gamma: float | None = opt(None, "SimPO target margin gamma; null = its default (0.5)", ge=0,
                              why="gamma is the reward margin the chosen response should win by")
    alpha: float | None = opt(None, "unlikelihood weight alpha; null = its default (1.0)", ge=0,
                              why="a negative weight would pull the rejected response up")
    loss_kwargs: dict[str, Any] = opt({}, "any other keyword hyperparameters of the loss function")
    precompute_ref_logps: bool = opt(True, "compute reference log-probs once before training (cached on "
                                     "disk), then free the reference; false = a reference forward every step")
    ref_cache_dir: str | None = opt(None, "directory of the reference log-prob cache; "
                                    "null = ~/.cache/preftune/ref_logps")
    fused_lm_head: bool = opt(False, "apply the lm_head chunk by chunk inside the log-prob, never holding "
                              "the [batch, time, vocab] logits: less memory at large vocabularies")
    group_robust: bool = opt(False, "group-robust DPO (Ramesh et al. 2024): minimise the worst group's loss by "
                             "weighting each group's pairs with a learned weight alpha_g (needs `group` on every "
                             "training pair)")
    group_step_size: float = opt(0.01, "step size eta of the group weights: alpha_g <- alpha_g exp(eta L_g), "
                                 "renormalised, once per step; 0 = the weights stay uniform (groups count equally)",
                                 ge=0, why="a negative step would move weight away from the worst-off group")

    model_keys: ClassVar[tuple[str, ...]] = ("model", "ref_model")

    def validate(self) -> None:
        super().validate()
        self.loss_hparams()
        from preftune.core.losses import LOSSES

        if self.group_robust and not LOSSES[self.loss].needs_reference:
            fail(self, "loss", f"group_robust needs a reference-based loss, not {self.loss!r}: group-robust DPO "
                 "is the worst-group form of the KL-regularised objective that those losses reparametrise through "
                 "pi_ref (Ramesh et al. 2024); orpo and unlikelihood also carry an NLL term that would "
                 "steer alpha by likelihood, not by how well each group's preferences are met",
                 "use loss: dpo (GR-DPO), ipo (GR-IPO), cdpo, hinge or robust, or set group_robust: false")

    def loss_hparams(self) -> dict[str, Any]:
        """The keyword hyperparameters for ``preftune.core.losses.preference_loss(self.loss, ...)``.

        Flat keys (beta, label_smoothing, gamma, alpha) that are set, plus ``loss_kwargs``; a key the
        chosen loss does not accept is an error naming it and listing what the loss accepts.
        """
        from preftune.core.losses import LOSSES  # torch only; imported when a DPO config is validated

        spec = LOSSES.get(self.loss)
        if spec is None:
            fail(self, "loss", f"unknown loss {self.loss!r}", suggest(self.loss, list(LOSSES)))
        hparams = {k: getattr(self, k) for k in _DPO_LOSS_KEYS if getattr(self, k) is not None}
        clash = sorted(set(hparams) & set(self.loss_kwargs))
        if clash:
            fail(self, "loss_kwargs", f"sets {', '.join(clash)} which is also a top-level key",
                 "set it in one place only")
        hparams.update(self.loss_kwargs)
        for key, value in hparams.items():
            where = f"loss_kwargs.{key}" if key in self.loss_kwargs else key
            if key not in spec.hparams:
                fail(self, where, f"loss {self.loss!r} has no hyperparameter {key!r}",
                     f"{self.loss} accepts: {', '.join(spec.hparams) or 'nothing'}")
            _check_hparam(self, where, key, value, spec.hparams[key])
        return hparams


def _check_hparam(config: DPOConfig, where: str, key: str, value: Any, default: Any) -> None:
    """A loss hyperparameter has the type of the loss function's default and, for the flat keys, their
    range (so ``loss_kwargs: {beta: 0}`` is refused like ``beta: 0``)."""
    import dataclasses

    from preftune.config import range_message

    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail(config, where, f"must be true or false (got {value!r})")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        fail(config, where, f"must be a number (got {value!r})")
    field = {f.name: f for f in dataclasses.fields(config)}.get(key)
    bounds = field.metadata.get("range") if field is not None else None
    if bounds is not None and value not in bounds:
        fail(config, where, f"{range_message(bounds, value, field.metadata.get('why'))} (loss {config.loss})",
             f"{field.metadata['help']}")


class DPOMethod(OfflineMethod):
    """DPO and its family (see the module docstring). ``pairs`` / ``eval_pairs`` replace reading
    ``config.data`` / ``config.eval_data`` for callers that hold ``PreferencePair`` objects in memory."""

    def __init__(self, *, pairs: list[Any] | None = None, eval_pairs: list[Any] | None = None) -> None:
        super().__init__(pairs, eval_pairs)
        self.ref_model: torch.nn.Module | None = None
        self.ref_hits: dict[str, bool] = {}  # split -> whether its reference log-probs came from the cache
        self.fused_lm_head = False  # the fused_lm_head key, once setup has checked the model's head
        self.packing = ""  # "shared", "rows" or "" (padded): the packing keys, once setup has checked the model
        self.group_robust: GroupRobust | None = None  # alpha and its sums, with group_robust: true

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, ctx: RunContext) -> None:
        from preftune import timing
        from preftune.core.logprobs import fused_lm_head_applies
        from preftune.core.losses import LOSSES
        from preftune.core.packing import packing_applies
        from preftune.models import load_policy, load_tokenizer
        from preftune.models.load import build_reference
        from preftune.train import refcache
        from preftune.train.data import load_preference_items
        from preftune.train.sharded import place_reference

        config: DPOConfig = ctx.config
        self.config, self.accelerator = config, ctx.accelerator
        self.loss_name, self.hparams = config.loss, config.loss_hparams()
        self.needs_reference = LOSSES[config.loss].needs_reference
        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.model = load_policy(config.model, dtype=config.dtype, lora=config.lora,
                                 gradient_checkpointing=config.gradient_checkpointing,
                                 trust_remote_code=config.trust_remote_code, tokenizer=self.tokenizer)
        self.fused_lm_head = config.fused_lm_head and fused_lm_head_applies(self.model, ctx.log)
        self.packing = packing_applies(config, self.model, ctx.log, share_prompt=config.share_prompt)
        self.train_items, self.eval_items = load_preference_items(
            config, self.tokenizer, ctx.log, rankings="pairs", pairs=self._given, eval_pairs=self._given_eval)
        if config.group_robust:
            from preftune.train.group_robust import GroupRobust

            self.group_robust = GroupRobust.from_items(self.train_items, config, ctx.log)
            # the method's state (checkpointed) exists only then, so plain DPO checkpoints stay as they were
            self.state_dict, self.load_state_dict = self.group_robust.state_dict, self.group_robust.load_state_dict
        if not self.needs_reference:
            if config.ref_model:
                ctx.log(f"loss {config.loss} uses no reference model; ref_model is ignored")
            return
        if config.precompute_ref_logps and not config.ref_model and not config.lora:
            # pi_ref is the policy as loaded: the one pass runs on it (eval mode, no gradients), not on a
            # copy (a copy would hold the weights twice while the optimizer state is allocated)
            timing.mark("reference")
            self.ref_model, was_training = self.model, self.model.training
            self.model.eval()
            try:
                self.ref_hits = refcache.precompute_splits((("train", self.train_items), ("eval", self.eval_items)),
                                                           self._precompute, ctx.log)
            finally:
                self.model.train(was_training)
            self.ref_model = None
            return
        self.ref_model = build_reference(self.model, ref_model=config.ref_model, lora=config.lora, dtype=config.dtype,
                                         tokenizer=self.tokenizer, trust_remote_code=config.trust_remote_code)
        if config.precompute_ref_logps:
            self.ref_hits = refcache.precompute_splits((("train", self.train_items), ("eval", self.eval_items)),
                                                       self._precompute, ctx.log)
            self.ref_model = None  # every pair now carries its reference log-probs
        elif self.ref_model is not None:
            self.ref_model = place_reference(self.ref_model, ctx.accelerator)

    def _reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed reference log-probs [2B] of a batch, without gradients."""
        from preftune.train.refcache import reference_logps

        return reference_logps(model, self.ref_model, batch, fused=self.fused_lm_head)

    def _precompute(self, items: list[Any], *, name: str, log: Any) -> bool:
        """Reference log-probs of ``items`` from the disk cache, or one no-grad pass that fills it."""
        from preftune.models import unwrap
        from preftune.train import refcache

        config, accelerator = self.config, self.accelerator
        reference = self.ref_model if self.ref_model is not None else unwrap(self.model)
        directory = refcache.cache_dir(config.ref_cache_dir)
        settings = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length,
                    "truncation": config.truncation, "dtype": str(next(reference.parameters()).dtype),
                    "mixed_precision": config.mixed_precision}
        if self.fused_lm_head:  # other rounding; named only when on, so the unfused keys stay as they were
            settings["fused_lm_head"] = True
        if self.packing:
            settings["packing"] = self.packing
        key = refcache.cache_key(
            model=refcache.model_fingerprint(reference), tokenizer=refcache.tokenizer_fingerprint(self.tokenizer),
            items=refcache.items_fingerprint(items), settings=settings)
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
        from preftune.core.packing import pack_pairs
        from preftune.data.collate import collate_pairs

        batch = collate_pairs(items, pad_token_id=self.tokenizer.pad_token_id, padding_side="right")
        return pack_pairs(batch, self.packing)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs: half the rows (chosen and rejected are stacked)."""
        return int(batch["input_ids"].shape[0] // 2)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, normaliser: float) -> StepOutput:
        """``sum_pairs loss_name(...) / normaliser`` plus the reward and log-prob metric sums."""
        from preftune.core.forward import batch_logps
        from preftune.core.losses import preference_loss

        logps, counts = batch_logps(model, batch, fused=self.fused_lm_head)
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
        if self.group_robust is not None and model.training:  # evaluation reports the plain (pooled) loss
            loss, logs = self.group_robust.loss(out.losses, rc > rr, batch["group"], normaliser=normaliser,
                                                accelerator=self.accelerator)
            return StepOutput(loss=loss, metric_sums=metrics, logs=logs)
        return StepOutput(loss=out.losses.sum() / normaliser, metric_sums=metrics)



SPEC = MethodSpec("dpo", DPOConfig, DPOMethod,
                  "Train a policy directly on preference pairs: DPO and its family (ipo, cdpo, orpo, simpo, ...).")
