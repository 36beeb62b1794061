"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): how a batch of
unpaired, labelled completions becomes a loss.

Data: rows ``{prompt, completion, label}`` (label true = desirable, a thumbs up; false = undesirable), or
preference pairs ``{prompt, chosen, rejected}``, each split into a desirable example (chosen) and an
undesirable one (rejected), as TRL does; an evaluation split keeps a pair's two halves together. Rankings
are refused, and so is data without one of the two classes. Per example (Eq. 8 of the paper,
``preftune.core.losses.kto_loss``)::

    r = log pi(y|x) - log pi_ref(y|x)                (summed over the completion tokens, EOS included)
    loss = lambda_D (1 - sigma(beta (r - z0)))    y desirable     (lambda_D = desirable_weight)
    loss = lambda_U (1 - sigma(beta (z0 - r)))    y undesirable   (lambda_U = undesirable_weight)

The unit is the example: the step's loss is the sum of the per-example losses divided by the number of
examples in the global batch (the loop's normaliser).

The reference point ``z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])`` estimates
KL(pi || pi_ref) from mismatched pairs (``core.losses.kto_reference_point``), detached. Two choices keep the
loss exact whatever the split of the global batch, and the reference cacheable:

* the mismatched completion ``y'_i`` of example i is FIXED for the run: that of the next example, in a
  shuffle of the split seeded by ``seed``, whose prompt differs (the next one outright when every example
  has the same prompt). TRL pairs each prompt with the next completion of the same micro-batch, so its
  pairs change with the batch order and their reference log-probs cannot be cached; fixed pairs can, and
  ``log pi_ref(y'_i|x_i)`` is cached next to ``log pi_ref(y_i|x_i)``;
* z0 is computed once per optimizer step, in ``prepare_step`` before the first forward with gradients, from
  the mismatched pairs of EVERY micro-batch of every process (a no-grad forward of the policy, gathered
  over processes). TRL computes it per micro-batch, so there batch 8 x accumulation 1 and batch 1 x
  accumulation 8 use different z0s; here they are the same step. Evaluation has no step: each evaluation
  batch uses its own z0 (``eval_batch_size`` examples on one process).

The reference pi_ref is ``ref_model``, else a frozen copy of the starting model, or with LoRA the model
with its adapter disabled. With ``precompute_ref_logps`` (default) both reference log-probs of every example
are computed once and cached on disk (``preftune.train.refcache``; in the cache file ``chosen`` holds
``log pi_ref(y|x)`` and ``rejected`` the mismatched pair's), then the reference is freed.

Class weights: the paper advises ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3] (n_D and n_U the numbers of
desirable and undesirable training examples); setup logs the counts and warns, with weights that would
satisfy it, when they do not.

Metrics: ``loss``; ``kl`` (z0); ``count/desirable``, ``count/undesirable`` (examples per step);
``rewards/chosen``, ``rewards/rejected`` (``beta * r`` of the desirable and of the undesirable examples),
``rewards/margins`` (their difference), ``logps/chosen``, ``logps/rejected``: means over the examples of
each class since the last log line (a step may hold none of a class), kept as the method's state
(checkpointed). Evaluation: ``eval/loss``, ``eval/kl`` and the four class means over the evaluation set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from preftune.config import opt
from preftune.errors import PreftuneError
from preftune.train.base import MethodSpec, OfflineMethod, PairConfig, RunContext, StepOutput

if TYPE_CHECKING:
    import torch

_ROWS = ("input_ids", "attention_mask", "labels")
WEIGHT_ADVICE = (1.0, 4.0 / 3.0)  # lambda_D n_D / (lambda_U n_U), Ethayarajh et al. 2024


@dataclass
class KTOConfig(PairConfig):
    """`preftune train kto`: KTO on unpaired labels (desirable / undesirable completions) or split pairs."""

    command: ClassVar[str] = "kto"

    learning_rate: float = opt(5e-7, "peak learning rate of AdamW", gt=0)
    output_dir: str = opt("runs/kto", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    data: str = opt("", "training data: {prompt, completion, label} rows, or {prompt, chosen, rejected} pairs "
                    "(chosen = desirable, rejected = undesirable); a file or a hub dataset id (required)")
    ref_model: str | None = opt(None, "reference pi_ref; null = the starting model (with lora: adapters off)")
    beta: float = opt(0.1, "KTO's beta: the scale of r - z0 inside the sigmoid", gt=0,
                      why="beta scales the implicit reward; 0 removes it and a negative beta reverses the labels")
    desirable_weight: float = opt(1.0, "lambda_D, the weight of a desirable example's loss; the paper advises "
                                  "desirable_weight*n_D / (undesirable_weight*n_U) in [1, 4/3]", gt=0,
                                  why="a weight of 0 ignores the class and a negative one reverses its label")
    undesirable_weight: float = opt(1.0, "lambda_U, the weight of an undesirable example's loss (see "
                                    "desirable_weight)", gt=0,
                                    why="a weight of 0 ignores the class and a negative one reverses its label")
    precompute_ref_logps: bool = opt(True, "compute reference log-probs once before training (cached on "
                                     "disk), then free the reference; false = a reference forward every step")
    ref_cache_dir: str | None = opt(None, "directory of the reference log-prob cache; "
                                    "null = ~/.cache/preftune/ref_logps")

    model_keys: ClassVar[tuple[str, ...]] = ("model", "ref_model")


# ------------------------------------------------------------------------------------------------ data


def read_kto_examples(source: str, config: Any, log: Any) -> list[Any]:
    """Unpaired examples or preference pairs of a file or hub dataset (rankings refused)."""
    from preftune.data import load_preferences

    items, report = load_preferences(source, split=config.data_split, format=config.data_format, rankings="keep")
    log(report.summary())
    for item in items:
        if hasattr(item, "responses"):
            raise PreftuneError("rankings cannot train kto", path=item.source or str(source), field="responses",
                                hint="give {prompt, completion, label} rows or {prompt, chosen, rejected} pairs")
    if not items:
        raise PreftuneError("no examples found", path=str(source), field="data",
                            hint="rows need prompt/completion/label or prompt/chosen/rejected (docs/losses.md)")
    return list(items)


def unpaired(items: list[Any]) -> list[Any]:
    """Unpaired examples as they are; each pair as a desirable (chosen) and an undesirable (rejected) example."""
    from preftune.data.formats import UnpairedExample

    out = []
    for item in items:
        if isinstance(item, UnpairedExample):
            out.append(item)
            continue
        who = {"id": item.id, "annotator": item.annotator, "group": item.group, "source": item.source}
        out += [UnpairedExample(item.prompt, item.chosen, True, **who),
                UnpairedExample(item.prompt, item.rejected, False, **who)]
    return out


def check_both_classes(labels: list[bool], *, what: str, path: str | None = None) -> tuple[int, int]:
    """(n_D, n_U); an error when either is 0 (the loss and z0 need both classes)."""
    n_d = sum(bool(label) for label in labels)
    n_u = len(labels) - n_d
    if n_d == 0 or n_u == 0:
        missing = "desirable (label true)" if n_d == 0 else "undesirable (label false)"
        raise PreftuneError(f"kto needs desirable and undesirable examples; {what} has {n_d} desirable and {n_u} "
                            f"undesirable: no {missing} example", path=path, field="label",
                            hint="add examples of the missing class (with desirable examples only, "
                                 "`preftune train sft` is the method)")
    return n_d, n_u


def kl_partners(examples: list[Any], seed: int) -> list[int]:
    """For each example, the index of the example whose completion makes its mismatched pair: the next one,
    in a shuffle seeded by ``seed``, whose prompt differs (the next one outright when all prompts agree)."""
    import random

    from preftune.data.formats import text_key

    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    keys = [text_key(e.prompt) for e in examples]
    one_prompt = len(set(keys)) <= 1
    partners = list(range(n))
    for pos, i in enumerate(order):
        for step in range(1, n + 1):
            j = order[(pos + step) % n]
            if one_prompt or keys[j] != keys[i]:
                partners[i] = j
                break
    return partners


def tokenize_kto(tokenizer: Any, examples: list[Any], config: Any, *, name: str, log: Any) -> list[Any]:
    """Token ids of each example and of its mismatched pair; truncation counted and logged."""
    from preftune.data.tokenize import TruncationStats, tokenize_unpaired

    partners, stats, items = kl_partners(examples, config.seed), TruncationStats(), []
    for index, (example, partner) in enumerate(zip(examples, partners, strict=True)):
        item = tokenize_unpaired(tokenizer, example, kl_completion=examples[partner].completion,
                                 max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                                 truncation=config.truncation, stats=stats, index=index)
        if item is not None:
            items.append(item)
    log(f"{name}: {stats.summary()} (max_length {config.max_length}, truncation {config.truncation})")
    if examples and not items:
        raise PreftuneError(f"every {name} example was dropped by truncation", field="max_length",
                            hint="raise max_length / max_prompt_length or set truncation: keep_end")
    return items


def load_kto_items(config: Any, tokenizer: Any, log: Any, *, examples: list[Any] | None = None,
                   eval_examples: list[Any] | None = None) -> tuple[list[Any], list[Any]]:
    """Read (or take) the data, split off eval_fraction (pairs whole), split pairs, check both classes, tokenise."""
    from preftune.train.data import _train_and_eval

    train, evaluation = _train_and_eval(config, lambda source: read_kto_examples(source, config, log), examples,
                                        eval_examples)
    train = unpaired(train)
    check_both_classes([e.label for e in train], what="the training data", path=config.data or None)
    items = tokenize_kto(tokenizer, train, config, name="train", log=log)
    check_both_classes([i.desirable for i in items], what="what truncation left of the training data")
    return items, tokenize_kto(tokenizer, unpaired(evaluation), config, name="eval", log=log) if evaluation else []


def check_weights(n_d: int, n_u: int, config: Any, log: Any) -> float:
    """Log the class counts and lambda_D n_D / (lambda_U n_U); warn, with weights in the advised range
    [1, 4/3] (Ethayarajh et al. 2024), when it lies outside. Returns the ratio."""
    dw, uw = config.desirable_weight, config.undesirable_weight
    ratio = dw * n_d / (uw * n_u)
    low, high = WEIGHT_ADVICE
    log(f"kto: {n_d} desirable and {n_u} undesirable training examples; desirable_weight*n_D / "
        f"(undesirable_weight*n_U) = {ratio:.4g}")
    if not low - 1e-9 <= ratio <= high + 1e-9:
        d_low, u_high = uw * n_u / n_d, dw * n_d / n_u
        log(f"warning: desirable_weight*n_D / (undesirable_weight*n_U) = {ratio:.4g} is outside [1, 4/3], the "
            f"range Ethayarajh et al. 2024 advise: set desirable_weight in [{d_low:.4g}, {high * d_low:.4g}] "
            f"(with undesirable_weight {uw:g}) or undesirable_weight in [{u_high / high:.4g}, {u_high:.4g}] "
            f"(with desirable_weight {dw:g})")
    return ratio


def _items_fingerprint(items: list[Any]) -> str:
    """Every token id and label of every example and of its mismatched pair, in order."""
    import hashlib
    import json

    h = hashlib.sha256()
    for item in items:
        for ids in (item.input_ids, item.labels, item.kl_input_ids, item.kl_labels):
            h.update(json.dumps(ids).encode())
        h.update(b";")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ metrics


class ClassMeans:
    """``rewards/`` and ``logps/`` of the desirable (``chosen``) and undesirable (``rejected``) examples:
    means over the examples of each class since the last log line. The step's sums (this process) are
    all-reduced after its last micro-batch; the running sums are the method's checkpointed state."""

    def __init__(self, log_every: int) -> None:
        import torch

        self.log_every, self.steps = log_every, 0
        self.since_log = torch.zeros(2, 3, dtype=torch.float64)  # desirable, undesirable x reward, logp, count
        self._step = torch.zeros(2, 3, dtype=torch.float64)

    def add(self, rewards: torch.Tensor, logps: torch.Tensor, desirable: torch.Tensor) -> None:
        import torch

        for row, mask in enumerate((desirable, ~desirable)):
            self._step[row] += torch.stack([rewards[mask].sum(), logps[mask].sum(), mask.sum()]).double().cpu()

    def finish_step(self, accelerator: Any) -> dict[str, float]:
        totals = accelerator.reduce(self._step.clone().to(accelerator.device), reduction="sum").cpu()
        self._step.zero_()
        self.since_log += totals
        self.steps += 1
        logs: dict[str, float] = {}
        for row, side in enumerate(("chosen", "rejected")):
            reward, logp, n = self.since_log[row].tolist()
            if n > 0:
                logs[f"rewards/{side}"], logs[f"logps/{side}"] = reward / n, logp / n
        if "rewards/chosen" in logs and "rewards/rejected" in logs:
            logs["rewards/margins"] = logs["rewards/chosen"] - logs["rewards/rejected"]
        if self.steps % self.log_every == 0:  # the loop writes a line after this step: start the next span
            self.since_log.zero_()
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {"since_log": self.since_log.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        self.since_log = state["since_log"].to(torch.float64).clone()
        self.steps = int(state["steps"])
        self._step.zero_()


# ------------------------------------------------------------------------------------------------ the method


class KTOMethod(OfflineMethod):
    """KTO (see the module docstring). ``examples`` / ``eval_examples`` (``UnpairedExample`` or
    ``PreferencePair`` objects) replace reading ``config.data`` / ``config.eval_data``."""

    def __init__(self, *, examples: list[Any] | None = None, eval_examples: list[Any] | None = None) -> None:
        super().__init__(examples, eval_examples)
        self.ref_model: torch.nn.Module | None = None
        self.ref_hits: dict[str, bool] = {}  # split -> whether its reference log-probs came from the cache
        self._z0: torch.Tensor | None = None  # this step's reference point, set by prepare_step
        self._left = 0  # training micro-batches of this step still to come
        self.packing = ""  # "rows" or "" (padded rows): the packing key, once setup has checked the model

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, ctx: RunContext) -> None:
        from preftune.core.packing import packing_applies
        from preftune.models import load_policy, load_tokenizer
        from preftune.models.load import build_reference
        from preftune.train import refcache

        config: KTOConfig = ctx.config
        self.config, self.accelerator = config, ctx.accelerator
        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.model = load_policy(config.model, dtype=config.dtype, lora=config.lora,
                                 gradient_checkpointing=config.gradient_checkpointing,
                                 trust_remote_code=config.trust_remote_code, tokenizer=self.tokenizer)
        self.packing = packing_applies(config, self.model, ctx.log)
        self.train_items, self.eval_items = load_kto_items(config, self.tokenizer, ctx.log, examples=self._given,
                                                           eval_examples=self._given_eval)
        check_weights(*check_both_classes([i.desirable for i in self.train_items], what="the training data"),
                      config, ctx.log)
        self.class_means = ClassMeans(config.log_every)
        self.state_dict, self.load_state_dict = self.class_means.state_dict, self.class_means.load_state_dict
        n_eval = sum(i.desirable for i in self.eval_items)  # eval: class sums x N / N_class = the class means
        self.eval_scale = [len(self.eval_items) / n if n else 0.0 for n in (n_eval, len(self.eval_items) - n_eval)]
        self.ref_model = build_reference(self.model, ref_model=config.ref_model, lora=config.lora, dtype=config.dtype,
                                         tokenizer=self.tokenizer, trust_remote_code=config.trust_remote_code)
        if config.precompute_ref_logps:
            self.ref_hits = refcache.precompute_splits((("train", self.train_items), ("eval", self.eval_items)),
                                                       self._precompute, ctx.log)
            self.ref_model = None  # every example now carries its reference log-probs
        elif self.ref_model is not None:
            self.ref_model.to(ctx.accelerator.device)

    def _reference_logps(self, model: Any, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed reference log-probs [B] of ``rows`` (input_ids, attention_mask, labels), without gradients."""
        from preftune.train.refcache import reference_logps

        return reference_logps(model, self.ref_model, rows)

    def _precompute(self, items: list[Any], *, name: str, log: Any) -> bool:
        """Both reference log-probs of every item from the disk cache, or one no-grad pass that fills it."""
        import torch

        from preftune.models import unwrap
        from preftune.train import refcache

        config, accelerator = self.config, self.accelerator
        reference = self.ref_model if self.ref_model is not None else unwrap(self.model)
        directory = refcache.cache_dir(config.ref_cache_dir)
        settings = {"method": "kto", "max_length": config.max_length, "max_prompt_length": config.max_prompt_length,
                    "truncation": config.truncation, "dtype": str(next(reference.parameters()).dtype),
                    "mixed_precision": config.mixed_precision}
        if self.packing:  # other rounding; named only when on, so the padded keys stay as they were
            settings["packing"] = self.packing
        key = refcache.cache_key(model=refcache.model_fingerprint(reference),
                                 tokenizer=refcache.tokenizer_fingerprint(self.tokenizer),
                                 items=_items_fingerprint(items), settings=settings)
        reference.to(accelerator.device)

        def forward(batch: dict[str, Any]) -> torch.Tensor:  # [2B]: the examples, then their mismatched pairs
            return torch.cat([self._reference_logps(self.model, _rows(batch, "")),
                              self._reference_logps(self.model, _rows(batch, "kl_"))])

        with accelerator.main_process_first():  # the main process computes and saves; the others read
            cached = refcache.load(directory, key, len(items))
            hit = cached is not None
            if cached is None:
                with accelerator.autocast():
                    cached = refcache.compute(items, forward=forward, collate=self.collate,
                                              batch_size=config.eval_batch_size or config.batch_size,
                                              device=accelerator.device, description=f"reference log-probs ({name})")
                refcache.save(directory, key, *cached, metadata={"method": "kto", "split": name,
                                                                 "examples": str(len(items))})
        for item, logp, kl in zip(items, cached[0].tolist(), cached[1].tolist(), strict=True):
            item.ref_logps, item.ref_kl_logps = logp, kl
        log(f"reference log-probs for {len(items)} {name} examples and their mismatched pairs: "
            f"{'read from' if hit else 'computed and saved to'} {directory / (key + '.safetensors')}")
        return hit

    # ------------------------------------------------------------------------------------------ per step
    def _kl_logps(self, model: Any, batches: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy (no gradient) and reference log-probs of the mismatched pairs of ``batches``."""
        import torch

        from preftune.core.forward import batch_logps

        policy, ref = [], []
        with torch.no_grad():
            for batch in batches:
                rows = {k: v.to(self.accelerator.device) for k, v in _rows(batch, "kl_").items()}
                logps = batch_logps(model, rows)[0]
                cached = batch.get("ref_kl_logps")
                policy.append(logps)
                ref.append(cached.to(logps.device, logps.dtype) if cached is not None
                           else self._reference_logps(model, rows).to(logps.dtype))
        return torch.cat(policy), torch.cat(ref)

    def prepare_step(self, model: Any, batches: list[dict[str, Any]]) -> None:
        """z0 of the step: the mismatched pairs of all of its micro-batches, gathered over processes."""
        from preftune.core.losses import kto_reference_point

        policy, ref = self._kl_logps(model, batches)
        self._z0 = kto_reference_point(self.accelerator.gather(policy), self.accelerator.gather(ref))
        self._left = len(batches)

    # ------------------------------------------------------------------------------------------ per batch
    def collate(self, items: list[Any]) -> dict[str, Any]:
        from preftune.core.packing import plan_packing
        from preftune.data.collate import collate_unpaired

        batch = collate_unpaired(items, pad_token_id=self.tokenizer.pad_token_id, padding_side="right")
        if self.packing:  # the examples and their mismatched pairs are two forwards: a plan for each
            batch.update(plan_packing(batch["input_ids"], batch["attention_mask"], batch["labels"]))
            kl = plan_packing(batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
            batch.update({f"kl_{k}": v for k, v in kl.items()})
        return batch

    def units(self, batch: dict[str, Any]) -> int:
        """Examples: one row each (their mismatched pairs are in ``kl_input_ids``)."""
        return int(batch["input_ids"].shape[0])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], *, normaliser: float) -> StepOutput:
        """``sum_examples kto_loss(...) / normaliser``; z0 from ``prepare_step`` (training) or from the batch."""
        from preftune.core.forward import batch_logps
        from preftune.core.losses import kto_loss, kto_reference_point

        logps, _ = batch_logps(model, batch)
        ref = batch.get("ref_logps")
        ref = ref.to(logps.dtype) if ref is not None else self._reference_logps(model, _rows(batch, "")).to(logps.dtype)
        desirable = batch["desirable"]
        if model.training:
            if self._z0 is None:
                raise RuntimeError("KTOMethod.loss in training needs prepare_step first (the loop calls it)")
            z0 = self._z0
        else:
            z0 = kto_reference_point(*self._kl_logps(model, [batch]))
        config = self.config
        out = kto_loss(logps, ref, desirable, z0, beta=config.beta, desirable_weight=config.desirable_weight,
                       undesirable_weight=config.undesirable_weight)
        sums = {"kl": z0.double() * logps.shape[0]}  # / the step's examples: z0
        loss = out.losses.sum() / normaliser
        if model.training:
            self.class_means.add(out.rewards, logps.detach(), desirable)
            shares = {"count/desirable": desirable.sum().double(), "count/undesirable": (~desirable).sum().double()}
            self._left -= 1
            if self._left > 0:
                return StepOutput(loss=loss, metric_sums=sums, metric_shares=shares)
            self._z0 = None
            return StepOutput(loss=loss, metric_sums=sums, metric_shares=shares,
                              logs=self.class_means.finish_step(self.accelerator))
        for side, mask, scale in (("chosen", desirable, self.eval_scale[0]), ("rejected", ~desirable, self.eval_scale[1])):
            if scale:  # a class the evaluation set lacks has no mean
                sums[f"rewards/{side}"] = out.rewards[mask].sum() * scale
                sums[f"logps/{side}"] = logps.detach()[mask].sum() * scale
        return StepOutput(loss=loss, metric_sums=sums)


def _rows(batch: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``input_ids``, ``attention_mask``, ``labels`` of a batch's examples (prefix "") or mismatched pairs ("kl_")."""
    from preftune.core.packing import PACK_KEYS

    return {k: batch[prefix + k] for k in (*_ROWS, *PACK_KEYS) if prefix + k in batch}


SPEC = MethodSpec("kto", KTOConfig, KTOMethod,
                  "Train a policy on unpaired thumbs-up / thumbs-down labels (or split pairs) with KTO.")
