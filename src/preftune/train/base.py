"""What the training methods share: their keys (``TrainConfig`` for every method, ``PairConfig`` for the
methods trained on preference pairs, ``OnlineConfig`` for the online ones), the contract between the one
loop and a method, and the entry a method registers.

The loop (``preftune.train.loop``) owns everything generic: accelerate, optimizer, scheduler, gradient
accumulation, clipping, evaluation, checkpoints with exact resume, metrics.jsonl, trackers, the progress
bar and saving the final model. A method owns only what is its own:

1. ``setup(ctx)``: load the trainable model, the tokenizer, the reference model if any, and the
   train / eval examples (already tokenized, one item per example or pair).
2. ``collate(items)``: a list of items -> a batch of padded tensors (pad to the longest in the batch).
3. ``units(batch)``: how many units the batch's loss is a sum over (examples, pairs or tokens). The loop
   sums units over the micro-batches of one optimizer step and over processes, and passes the total to
   ``loss`` as ``normaliser``, so batch 8 x accumulation 1 gives the same update as batch 1 x
   accumulation 8, and two processes the same as one.
4. ``loss(model, batch, normaliser=...)``: a ``StepOutput``: the SUM of per-unit losses divided by
   ``normaliser``, and metrics (see ``StepOutput`` for the three kinds and how the loop reduces each).
5. ``before_step(model, step)``: offline methods return None, and the loop takes the step's items from
   ``train_items`` in a seeded order (``preftune.train.plan``). An online method returns this process's
   items for the step (a list, at least ``grad_accum`` long: a mini-batch of its current rollout); the
   loop collates them into ``grad_accum`` micro-batches.
6. ``save(model, path)``: write the final model and tokenizer with ``save_pretrained``.

Optional, for online methods (``preftune.train.online``; offline methods define none of them):

* ``updates_per_batch`` (int, default 1): optimizer steps the method takes on each global batch of
  ``train_items`` (PPO's epochs over a rollout); the loop's plan has that many more steps per epoch.
* ``state_dict()`` / ``load_state_dict(state)``: what the method keeps between steps (a rollout buffer,
  an adaptive KL coefficient); saved per process in every checkpoint and restored on resume, so a run
  resumes exactly in the middle of a rollout.

The registry. Each method's file (``train/<method>.py``) defines its config (a ``TrainConfig`` with
``command`` set), its method class and ends with one ``SPEC = MethodSpec(...)``; ``preftune.train``
collects the specs into ``METHODS``, which the CLI, ``preftune train keys``, the docs' key tables and
``preftune.train.run`` read. Method files import torch inside their functions, so importing the
registry (as ``preftune --help`` does) stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from preftune.config import Config, check_choices, fail, opt, require, suggest

if TYPE_CHECKING:
    import torch


# ------------------------------------------------------------------------------------------------ keys


@dataclass
class TrainConfig(Config):
    """Keys shared by every training command; each method's config derives from it (or from PairConfig)."""

    command: ClassVar[str] = ""           # the method's name: `preftune train COMMAND`
    requires_data: ClassVar[bool] = True  # online methods may take their prompts in memory instead
    aliases: ClassVar[dict[str, str]] = {
        "lr": "learning_rate", "num_epochs": "epochs", "num_train_epochs": "epochs",
        "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
        "lr_scheduler_type": "lr_scheduler", "scheduler": "lr_scheduler", "max_seq_length": "max_length",
        "model_name_or_path": "model", "dataset": "data", "train_data": "data", "save_steps": "save_every",
        "eval_steps": "eval_every", "logging_steps": "log_every", "save_total_limit": "keep_checkpoints",
        "bf16": "mixed_precision", "fp16": "mixed_precision", "torch_dtype": "dtype", "peft": "lora",
        "resume_from_checkpoint": "resume", "ref_model_name_or_path": "ref_model",
    }

    model: str = opt("", "model to start from: a Hugging Face hub id or a local directory (required)")
    data: str = opt("", "training data: a JSONL/JSON/CSV/Parquet file or a hub dataset id (required)")
    data_format: str = opt("auto", "format of `data` and `eval_data` rows; auto = detect from the keys")
    data_split: str = opt("train", "split to read when `data` is a hub dataset")
    eval_data: str | None = opt(None, "evaluation data (same format as `data`); null = use eval_fraction")
    eval_fraction: float = opt(0.0, "fraction of `data` held out for evaluation when eval_data is null")
    output_dir: str = opt("runs/train", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    learning_rate: float = opt(1e-5, "peak learning rate of AdamW")
    batch_size: int = opt(8, "micro-batch: examples (or pairs) per forward pass per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step (step = batch_size*grad_accum*processes)")
    group_by_length: bool = opt(False, "put items of similar length in the same step: less padding "
                                "(sft, reward, dpo; not the online methods)")
    eval_batch_size: int | None = opt(None, "micro-batch size for evaluation; null = batch_size")
    max_steps: int | None = opt(None, "optimizer steps to train; null = run `epochs` over the data")
    epochs: float = opt(1.0, "passes over the training data (fractions allowed) when max_steps is null")
    max_length: int = opt(1024, "maximum tokens per sequence (prompt + response); longer ones are truncated")
    seed: int = opt(42, "seed of the data order, the eval split, dropout and LoRA initialisation")
    lora: dict[str, Any] | None = opt(None, "peft LoraConfig fields (e.g. {r: 8}); null = full fine-tuning")
    merge_lora: bool = opt(False, "with lora: also save the merged model in OUTPUT_DIR/final-merged")
    dtype: str = opt("auto", "dtype the weights are loaded in; auto = as stored in the checkpoint",
                     choices=("auto", "float32", "bfloat16", "float16"))
    mixed_precision: str = opt("no", "autocast compute in bf16/fp16 over the loaded weights (GPU)",
                               choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    lr_scheduler: str = opt("cosine", "learning-rate schedule after warmup",
                            choices=("cosine", "linear", "constant"))
    warmup_steps: int = opt(0, "steps of linear warmup from 0 (wins over warmup_ratio when > 0)")
    warmup_ratio: float = opt(0.0, "fraction of the total steps used for warmup when warmup_steps is 0")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay (not applied to biases and norms)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this; 0 = no clipping")
    log_every: int = opt(10, "write a metrics.jsonl line (and tracker point) every N steps")
    eval_every: int = opt(0, "evaluate every N steps; 0 = only at the end (when there is eval data)")
    save_every: int = opt(0, "checkpoint every N steps in OUTPUT_DIR/checkpoints/step-N; 0 = never")
    keep_checkpoints: int = opt(2, "keep only the last K checkpoints (0 = keep all)")
    resume: str = opt("auto", "auto = continue from the latest checkpoint in output_dir; never; or a path")
    report_to: str = opt("auto", "trackers, comma-separated: tensorboard, wandb, mlflow, none; "
                         "auto = tensorboard when installed")
    run_name: str | None = opt(None, "run name shown by the trackers; null = the output_dir name")
    trust_remote_code: bool = opt(False, "allow model code from the hub (only for models you trust)")

    @classmethod
    def label(cls) -> str:
        return f"train {cls.command}"

    @classmethod
    def keys_hint(cls) -> str:
        return f"`preftune train keys {cls.command}` lists every key"

    def validate(self) -> None:
        """Checks that need more than one key or a range; raise PreftuneError naming the key."""
        check_choices(self)
        require(self, "model", bool(self.model), "is required: a hub id or a local model directory")
        if self.requires_data:
            require(self, "data", bool(self.data), "is required: a data file or a hub dataset id")
        require(self, "learning_rate", self.learning_rate > 0, "must be > 0")
        require(self, "batch_size", self.batch_size >= 1, "must be >= 1")
        require(self, "grad_accum", self.grad_accum >= 1, "must be >= 1")
        require(self, "eval_batch_size", self.eval_batch_size is None or self.eval_batch_size >= 1, "must be >= 1")
        require(self, "max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1 (or null)")
        require(self, "epochs", self.epochs > 0, "must be > 0")
        require(self, "max_length", self.max_length >= 2, "must be >= 2")
        require(self, "eval_fraction", 0.0 <= self.eval_fraction < 1.0, "must be in [0, 1)")
        require(self, "eval_fraction", not (self.eval_data and self.eval_fraction > 0),
                 "cannot be used together with eval_data: set one of them")
        require(self, "warmup_ratio", 0.0 <= self.warmup_ratio <= 1.0, "must be in [0, 1]")
        for key in ("warmup_steps", "log_every", "eval_every", "save_every", "keep_checkpoints"):
            require(self, key, getattr(self, key) >= 0, "must be >= 0")
        require(self, "log_every", self.log_every >= 1, "must be >= 1")
        require(self, "max_grad_norm", self.max_grad_norm >= 0, "must be >= 0 (0 = no clipping)")
        require(self, "merge_lora", not (self.merge_lora and not self.lora), "needs `lora` to be set")
        if self.lora:
            _check_lora_keys(self)
        trackers = [t.strip() for t in self.report_to.split(",") if t.strip()]
        allowed = ("auto", "tensorboard", "wandb", "mlflow", "none")
        for tracker in trackers or [""]:
            if tracker not in allowed:
                fail(self, "report_to", f"unknown tracker {tracker!r}", suggest(tracker, allowed))



@dataclass
class PairConfig(TrainConfig):
    """Keys shared by the methods trained on preference pairs (prompt, chosen, rejected)."""

    max_prompt_length: int | None = opt(None, "maximum prompt tokens; null = max_length // 2")
    truncation: str = opt("keep_end", "too-long pairs: keep_end = cut the prompt's start, then the response's "
                          "end (counted); error = stop; drop = leave the pair out (counted)",
                          choices=("keep_end", "error", "drop"))

    def validate(self) -> None:
        super().validate()
        require(self, "max_prompt_length",
                 self.max_prompt_length is None or 1 <= self.max_prompt_length < self.max_length,
                 f"must be >= 1 and < max_length ({self.max_length})")



@dataclass
class OnlineConfig(TrainConfig):
    """Keys shared by the online methods (ppo, rloo, raft). One optimizer step takes ``batch_size *
    grad_accum`` prompts per process, each with ``num_samples`` completions; a rollout holds
    ``num_mini_batches`` such steps of prompts and is trained on for ``update_epochs`` passes."""

    requires_data: ClassVar[bool] = False  # prompts may be given in memory (checked when training starts)
    aliases: ClassVar[dict[str, str]] = {
        **TrainConfig.aliases, "init_kl_coef": "kl_coef", "beta": "kl_coef", "kl_penalty": "kl_estimator",
        "target_kl": "kl_target", "target": "kl_target", "horizon": "kl_horizon", "ppo_epochs": "update_epochs",
        "num_ppo_epochs": "update_epochs", "cliprange": "clip_range", "cliprange_value": "value_clip_range",
        "rloo_k": "num_samples", "num_generations": "num_samples", "response_length": "max_new_tokens",
        "reward_model": "reward", "reward_model_path": "reward", "prompts": "data",
    }

    data: str = opt("", "training prompts: a text file (one per line), JSONL with prompt or messages, or "
                    "preference data (its prompts)")
    learning_rate: float = opt(1e-6, "peak learning rate of AdamW")
    batch_size: int = opt(8, "prompts per micro-batch per process; each brings num_samples completions")
    epochs: float = opt(1.0, "passes over the prompts (x update_epochs optimizer steps) when max_steps is null")
    max_length: int = opt(512, "prompt + completion tokens at most; prompts are cut from the left to "
                          "max_length - max_new_tokens (counted)")
    reward: str = opt("", "reward: a preftune reward-model directory or hub id, or module:function / "
                      "file.py:function scoring (prompt, completion) -> float (required)")
    ref_model: str | None = opt(None, "reference pi_ref of the KL; null = the starting model (lora: adapter off)")
    num_samples: int = opt(1, "completions sampled per prompt in each rollout (K)")
    max_new_tokens: int = opt(64, "completion length limit in tokens")
    temperature: float = opt(1.0, "sampling temperature; log-probs are those of softmax(logits / temperature)")
    top_k: int = opt(0, "sample from the k most likely tokens; 0 = no limit (needed for an exact gradient)")
    top_p: float = opt(1.0, "nucleus sampling mass; 1 = off (needed for an exact gradient)")
    template: str = opt("raw", "prompt template: raw, chat, tldr or a format string containing {prompt}")
    generation_batch_size: int | None = opt(None, "completions per generate / scoring call; null = "
                                            "batch_size x num_samples")
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of a completion that did not "
                                            "end with EOS within max_new_tokens; null = no penalty")
    kl_coef: float = opt(0.05, "beta of the KL penalty in the reward (the start value when kl_target is set)")
    kl_estimator: str = opt("k1", "per-token KL estimator: k1 = log pi/pi_ref, k3 = (r - 1) - log r",
                            choices=("k1", "k3"))
    kl_target: float | None = opt(None, "adaptive KL: steer beta so the sequence KL approaches this (Ziegler "
                                  "et al. 2019); null = fixed kl_coef")
    kl_horizon: float = opt(10000.0, "adaptive KL horizon in sequences: beta changes by at most "
                            "20% x sequences / horizon per rollout")
    update_epochs: int = opt(1, "passes over each rollout (PPO's K epochs)")
    num_mini_batches: int = opt(1, "optimizer steps per pass over a rollout (its mini-batches)")
    whiten_advantages: bool = opt(False, "normalise the rollout's advantages to mean 0, variance 1")
    ptx_data: str | None = opt(None, "SFT data mixed in as a language-modelling loss (PPO-ptx); null = none")
    ptx_coef: float = opt(0.0, "weight gamma of the ptx loss (Ouyang et al. 2022, Eq. 2); needs ptx_data")
    sample_every: int = opt(10, "write rollout completions to OUTPUT_DIR/samples.jsonl every N steps; 0 = never")
    sample_rows: int = opt(8, "completions written each time (the first prompts of the rollout, all samples)")

    def validate(self) -> None:
        super().validate()
        from preftune.data.prompts import check_template

        require(self, "eval_data", not self.eval_data, "is not used by online methods: they are measured on "
                 "their own rollouts (see samples.jsonl); evaluate with generate + compare")
        require(self, "eval_fraction", self.eval_fraction == 0.0, "is not used by online methods")
        require(self, "group_by_length", not self.group_by_length, "is for offline methods (sft, reward, "
                 "dpo): an online step trains on the completions it has just sampled")
        require(self, "num_samples", self.num_samples >= 1, "must be >= 1")
        require(self, "max_new_tokens", 1 <= self.max_new_tokens < self.max_length,
                 f"must be >= 1 and < max_length ({self.max_length})")
        require(self, "temperature", self.temperature > 0, "must be > 0 (sampling; greedy decoding has no "
                 "log-probs to learn from)")
        require(self, "top_k", self.top_k >= 0, "must be >= 0")
        require(self, "top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]")
        require(self, "template", check_template(self.template), "must be raw, chat, tldr or contain {prompt}")
        require(self, "generation_batch_size", self.generation_batch_size is None
                 or self.generation_batch_size >= 1, "must be >= 1 (or null)")
        require(self, "kl_coef", self.kl_coef >= 0, "must be >= 0")
        require(self, "kl_target", self.kl_target is None or self.kl_target > 0, "must be > 0 (or null)")
        require(self, "kl_horizon", self.kl_horizon > 0, "must be > 0")
        require(self, "kl_target", not (self.kl_target is not None and self.kl_coef == 0),
                 "needs a kl_coef > 0 to start from (the controller multiplies it)")
        require(self, "update_epochs", self.update_epochs >= 1, "must be >= 1")
        require(self, "num_mini_batches", self.num_mini_batches >= 1, "must be >= 1")
        require(self, "ptx_coef", self.ptx_coef >= 0, "must be >= 0")
        require(self, "ptx_coef", not (self.ptx_coef > 0 and not self.ptx_data), "needs ptx_data (SFT rows)")
        require(self, "ptx_data", not (self.ptx_data and self.ptx_coef == 0), "is unused while ptx_coef is 0")
        require(self, "sample_every", self.sample_every >= 0, "must be >= 0")
        require(self, "sample_rows", self.sample_rows >= 1, "must be >= 1")


def _check_lora_keys(config: TrainConfig) -> None:
    """Each key under ``lora`` is a field of ``peft.LoraConfig`` (peft is imported only when lora is set)."""
    import dataclasses
    import difflib

    from peft import LoraConfig

    valid = [f.name for f in dataclasses.fields(LoraConfig) if f.init]
    for key in config.lora or {}:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            fail(config, f"lora.{key}", f"unknown LoRA option {key!r}",
                 (f"did you mean {close[0]!r}? " if close else "") + "keys are peft.LoraConfig fields "
                 "(r, lora_alpha, lora_dropout, target_modules, ...)")


# ------------------------------------------------------------------------------------------------ the contract


@dataclass
class StepOutput:
    """What a method's ``loss`` returns for one micro-batch. The loop reduces each kind over the step's
    micro-batches and processes:

    * ``metric_sums``: sums over the micro-batch's units; the loop adds them up and divides by the
      step's units (the normaliser), so they become means over the step's units;
    * ``metric_shares``: values the method has already divided by their own step-wide count (for
      example PPO-ptx's SFT tokens); the loop adds them up as they are;
    * ``logs``: final values (a rollout's statistics); the loop logs the last ones.
    """

    loss: torch.Tensor                                                  # scalar, already divided by the normaliser
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    metric_shares: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class RunContext:
    config: Any                 # the method's resolved config dataclass
    accelerator: Any            # accelerate.Accelerator
    output_dir: Path
    log: Any                    # callable(str) that prints on the main process only


class TrainingMethod(Protocol):
    model: torch.nn.Module
    tokenizer: Any
    train_items: list[Any]
    eval_items: list[Any]

    def setup(self, ctx: RunContext) -> None: ...

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]: ...

    def units(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, normaliser: float) -> StepOutput: ...

    def before_step(self, model: torch.nn.Module, step: int) -> list[Any] | None: ...

    def save(self, model: torch.nn.Module, path: Path) -> None: ...


class OfflineMethod:
    """What the offline methods (sft, reward, dpo) share: the training and evaluation data may be given in
    memory instead of the config's files, every step's items come from the loop's seeded order
    (``before_step`` returns None), and the final model is saved with its tokenizer."""

    def __init__(self, given: list[Any] | None = None, given_eval: list[Any] | None = None) -> None:
        self._given, self._given_eval = given, given_eval
        self.model: torch.nn.Module
        self.tokenizer: Any = None
        self.train_items: list[Any] = []
        self.eval_items: list[Any] = []

    def before_step(self, model: torch.nn.Module, step: int) -> None:
        return None

    def save(self, model: torch.nn.Module, path: Path) -> None:
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


# ------------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class MethodSpec:
    """One training method, as its file registers it: ``preftune train NAME``."""

    name: str                      # the command
    config: type[TrainConfig]      # its keys
    method: type                   # the TrainingMethod class; ``method()`` reads its data from the config
    summary: str                   # one line: the command's help and the docs
