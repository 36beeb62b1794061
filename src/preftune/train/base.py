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

Optional, for online methods (``preftune.train.online``) and the reward mixture
(``preftune.train.reward_mixture``), ``state_dict`` for group-robust DPO (its group weights,
``preftune.train.group_robust``), ``prepare_step`` and ``state_dict`` for KTO (``preftune.train.kto``); the
other offline methods define none of them:

* ``updates_per_batch`` (int, default 1): optimizer steps the method takes on each global batch of
  ``train_items`` (PPO's epochs over a rollout); the loop's plan has that many more steps per epoch.
* ``state_dict()`` / ``load_state_dict(state)``: what the method keeps between steps (a rollout buffer,
  an adaptive KL coefficient); saved per process in every checkpoint and restored on resume, so a run
  resumes exactly in the middle of a rollout.
* ``prepare_step(model, batches)``: called once per step, before the first forward, with all of this
  process's micro-batches of the step (collated, on the CPU), in train mode; every process calls it, so
  it may all-reduce. KTO computes its reference point z0 there, from every micro-batch of every process,
  so that the step's loss does not depend on how the global batch is split.
* ``after_step(model, step) -> (records, done)``: work after step ``step`` (the mixture's E-step); the
  records become metrics.jsonl lines; a ``done`` sentence ends training, the planned steps left skipped.

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

from preftune.config import Config, check_fields, fail, opt, require, suggest
from preftune.errors import PreftuneError
from preftune.train.checks import (
    REQUIRED_WHAT,
    check_data_path,
    check_lora,
    check_output_dir,
    require_key,
)
from preftune.train.multireward import AGGREGATIONS, check_reward_keys, preflight_reward
from preftune.train.multireward import is_function_spec as _is_function_spec

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
        # TRL's names (trl sft / dpo / reward / ppo / rloo): suggested, never silently accepted
        "dataset_name": "data", "dataset_train_split": "data_split", "per_device_eval_batch_size": "eval_batch_size",
        "max_completion_length": "max_length", "max_prompt_length": "max_length", "sft_model_path": "model",
        "learning_rate_scheduler": "lr_scheduler", "use_peft": "lora", "lora_r": "lora.r",
        "lora_alpha": "lora.lora_alpha", "lora_dropout": "lora.lora_dropout",
        "lora_target_modules": "lora.target_modules", "loss_type": "loss", "dataset_text_field": "data_format",
        "adam_eps": "adam_epsilon", "optim_eps": "adam_epsilon",
        "eval_dataset": "eval_data", "test_data": "eval_data", "warmup": "warmup_steps",
    }
    alias_notes: ClassVar[dict[str, str]] = {
        "max_completion_length": "preftune limits prompt + response together with max_length",
        "max_prompt_length": "only the pair methods (reward, dpo) limit the prompt by itself; here max_length "
                             "limits prompt + response",
        "use_peft": "set lora to a mapping of LoraConfig fields, e.g. --lora.r 16",
        "dataset_text_field": "the row format is detected from the keys ({text} rows are plain text)",
        "bf16": "--mixed_precision bf16 (or --dtype bfloat16 to load the weights in bf16)",
        "fp16": "--mixed_precision fp16 (or --dtype float16)",
    }
    # keys a rerun into the same output_dir may change and still continue the run (preftune.train.rundir):
    # its length, how often it logs, evaluates and saves, where it writes; any other difference is refused
    resume_may_change: ClassVar[tuple[str, ...]] = (
        "output_dir", "resume", "max_steps", "epochs", "log_every", "eval_every", "eval_batch_size",
        "save_every", "keep_checkpoints", "report_to", "run_name", "ref_cache_dir",
    )

    model: str = opt("", "model to start from: a Hugging Face hub id or a local directory (required)")
    data: str = opt("", "training data: a JSONL/JSON/CSV/Parquet file or a hub dataset id (required)")
    data_format: str = opt("auto", "format of `data` and `eval_data` rows; auto = detect from the keys")
    data_split: str = opt("train", "split to read when `data` is a hub dataset")
    eval_data: str | None = opt(None, "evaluation data (same format as `data`); null = use eval_fraction")
    eval_fraction: float = opt(0.0, "fraction of `data` held out for evaluation when eval_data is null", ge=0, lt=1)
    output_dir: str = opt("runs/train", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    learning_rate: float = opt(1e-5, "peak learning rate of AdamW", gt=0)
    batch_size: int = opt(8, "micro-batch: examples (or pairs) per forward pass per process", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step (step = batch_size*grad_accum*processes)", ge=1)
    group_by_length: bool = opt(False, "put items of similar length in the same step: less padding "
                                "(sft, reward, dpo; not the online methods)")
    max_tokens_per_batch: int | None = opt(None, "token budget of one forward: each process's batch_size x "
                                           "grad_accum items of a step go in micro-batches of at most this many "
                                           "padded tokens (rows x longest row) instead of grad_accum of batch_size; "
                                           "null = off (sft, reward, dpo, kto)", ge=1)
    packing: bool = opt(True, "run each micro-batch as padding-free packed rows (the same numbers, no padding "
                        "to compute); false = padded rows")
    share_prompt: bool = opt(True, "with packing: compute a prompt once for the sequences that share it (a DPO "
                             "pair, a reward item's responses, an online prompt's completions)")
    eval_batch_size: int | None = opt(None, "micro-batch size for evaluation; null = batch_size", ge=1)
    max_steps: int | None = opt(None, "optimizer steps to train; null = run `epochs` over the data", ge=1)
    epochs: float = opt(1.0, "passes over the training data (fractions allowed) when max_steps is null", gt=0)
    max_length: int = opt(1024, "maximum tokens per sequence (prompt + response); longer ones are truncated",
                          ge=2)
    seed: int = opt(42, "seed of the data order, the eval split, dropout and LoRA initialisation", ge=0, lt=2**32)
    lora: dict[str, Any] | None = opt(None, "peft LoraConfig fields (e.g. {r: 8}); null = full fine-tuning")
    merge_lora: bool = opt(False, "with lora: also save the merged model in OUTPUT_DIR/final-merged")
    dtype: str = opt("auto", "dtype the weights are loaded in; auto = as stored in the checkpoint",
                     choices=("auto", "float32", "bfloat16", "float16"))
    mixed_precision: str = opt("no", "autocast compute in bf16/fp16 over the loaded weights (GPU)",
                               choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    lr_scheduler: str = opt("cosine", "learning-rate schedule after warmup",
                            choices=("cosine", "linear", "constant"))
    warmup_steps: int = opt(0, "steps of linear warmup from 0 (wins over warmup_ratio when > 0)", ge=0)
    warmup_ratio: float = opt(0.0, "fraction of the total steps used for warmup when warmup_steps is 0", ge=0, le=1)
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay (not applied to biases and norms)", ge=0)
    adam_beta1: float = opt(0.9, "AdamW beta1: decay of the gradient's running mean", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW beta2: decay of the squared gradient's running mean", ge=0, lt=1)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon, added to the denominator", gt=0)
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this; 0 = no clipping", ge=0)
    log_every: int = opt(10, "write a metrics.jsonl line (and tracker point) every N steps", ge=1)
    eval_every: int = opt(0, "evaluate every N steps; 0 = only at the end (when there is eval data)", ge=0)
    save_every: int = opt(0, "checkpoint every N steps in OUTPUT_DIR/checkpoints/step-N; 0 = never", ge=0)
    keep_checkpoints: int = opt(2, "keep only the last K checkpoints (0 = keep all)", ge=0)
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
        """The declared choices and ranges of every key (``check_fields``), then the checks that need more
        than one key; raise PreftuneError naming the key."""
        check_fields(self)
        require_key(self, "model", REQUIRED_WHAT["model"])
        if self.requires_data:
            require_key(self, "data", REQUIRED_WHAT["data"])
        from preftune.data.formats import FORMATS

        if self.data_format != "auto" and self.data_format not in FORMATS:
            fail(self, "data_format", f"unknown data format {self.data_format!r}", suggest(self.data_format,
                                                                                       ("auto", *FORMATS)))
        require(self, "eval_fraction", not (self.eval_data and self.eval_fraction > 0),
                 "cannot be used together with eval_data: set one of them")
        check_output_dir(self)
        require(self, "merge_lora", not (self.merge_lora and not self.lora), "needs `lora` to be set")
        if self.lora is not None:
            check_lora(self)
        trackers = [t.strip() for t in self.report_to.split(",") if t.strip()]
        allowed = ("auto", "tensorboard", "wandb", "mlflow", "none")
        for tracker in trackers or [""]:
            if tracker not in allowed:
                fail(self, "report_to", f"unknown tracker {tracker!r}", suggest(tracker, allowed))

    # the keys a run from the command line needs (from Python, data may be given in memory instead)
    required_on_cli: ClassVar[tuple[str, ...]] = ("model", "data")
    # the keys that name a model (hub id or local directory) and the keys that name data files
    model_keys: ClassVar[tuple[str, ...]] = ("model",)
    data_keys: ClassVar[tuple[str, ...]] = ("data", "eval_data")
    local_data_keys: ClassVar[tuple[str, ...]] = ()  # data keys that are always local files (never a hub id)

    def model_sources(self) -> dict[str, str]:
        """Key -> model it names (a hub id or a local directory), for the keys that are set."""
        return {key: getattr(self, key) for key in self.model_keys if getattr(self, key)}

    def check_required(self, keys: tuple[str, ...]) -> None:
        """Each of ``keys`` is set (the CLI passes ``required_on_cli``)."""
        for key in keys:
            require_key(self, key, REQUIRED_WHAT.get(key, "a value"))

    def preflight(self) -> None:
        """Before anything loads: every model key names an existing model directory or a hub id (a local
        path that does not exist is "no such directory", named by its key), every data key an existing
        file when it is written as a path (``preftune.models.load.model_source``, the data reader's rule)."""
        from preftune.models.load import model_source

        for key, name in self.model_sources().items():
            try:
                model_source(name, field=key)
            except PreftuneError as exc:
                fail(self, key, exc.message, exc.hint)
        for key in self.data_keys:
            check_data_path(self, key, always=key in self.local_data_keys)



@dataclass
class PairConfig(TrainConfig):
    """Keys shared by the methods trained on preference pairs (prompt, chosen, rejected)."""

    max_prompt_length: int | None = opt(None, "maximum prompt tokens; null = max_length // 2", ge=1)
    truncation: str = opt("keep_end", "too-long pairs: keep_end = cut the prompt's start, then the response's "
                          "end (counted); error = stop; drop = leave the pair out (counted)",
                          choices=("keep_end", "error", "drop"))

    def validate(self) -> None:
        super().validate()
        require(self, "max_prompt_length",
                 self.max_prompt_length is None or self.max_prompt_length < self.max_length,
                 f"must be < max_length ({self.max_length}): the response needs tokens too")



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
        "max_completion_length": "max_new_tokens", "max_prompt_length": "max_length", "kl_coeff": "kl_coef",
        "value_model_path": "value_model", "local_rollout_forward_batch_size": "generation_batch_size",
        "num_sample_generations": "sample_every",
    }
    alias_notes: ClassVar[dict[str, str]] = {
        **TrainConfig.alias_notes,
        "max_prompt_length": "prompts are cut from the left to max_length - max_new_tokens",
        "max_completion_length": "the completion's limit in tokens; max_length limits prompt + completion",
        "beta": "the KL coefficient of the online methods",
    }
    resume_may_change: ClassVar[tuple[str, ...]] = (*TrainConfig.resume_may_change, "sample_every", "sample_rows",
                                                    "vllm_gpu_memory_utilization")

    data: str = opt("", "training prompts: a text file (one per line), JSONL with prompt or messages, or "
                    "preference data (its prompts)")
    learning_rate: float = opt(1e-6, "peak learning rate of AdamW", gt=0)
    batch_size: int = opt(8, "prompts per micro-batch per process; each brings num_samples completions", ge=1)
    epochs: float = opt(1.0, "passes over the prompts (x update_epochs optimizer steps) when max_steps is null",
                        gt=0)
    max_length: int = opt(512, "prompt + completion tokens at most; prompts are cut from the left to "
                          "max_length - max_new_tokens (counted)", ge=2)
    reward: str = opt("", "reward: a preftune reward-model directory or hub id, or module:function / "
                      "file.py:function scoring (prompt, completion) -> float (this or rewards is required)")
    rewards: list[str] | None = opt(None, "several rewards, each as `reward` (e.g. one per group of users), "
                                    "standardised and combined by reward_aggregation; instead of reward")
    reward_names: list[str] | None = opt(None, "a name per entry of rewards (metrics objective/scores/NAME); "
                                         "null = the function's or the model directory's name")
    reward_aggregation: str = opt("mean", "how rewards become one: mean; min = per completion; maxmin = the "
                                  "group whose objective is lowest this rollout (MaxMin-RLHF); weighted",
                                  choices=AGGREGATIONS)
    reward_weights: list[float] | None = opt(None, "with reward_aggregation weighted: a weight >= 0 per reward "
                                             "(divided by their sum)")
    reward_standardize_prompts: int = opt(64, "with several rewards: prompts whose num_samples completions from "
                                          "the starting policy give each reward's mean and std; 0 = raw scores",
                                          ge=0)
    ref_model: str | None = opt(None, "reference pi_ref of the KL; null = the starting model (lora: adapter off)")
    num_samples: int = opt(1, "completions sampled per prompt in each rollout (K)", ge=1)
    max_new_tokens: int = opt(64, "completion length limit in tokens", ge=1)
    temperature: float = opt(1.0, "sampling temperature; log-probs are those of softmax(logits / temperature)",
                             gt=0, why="sampling needs a temperature; greedy decoding has no log-probs to learn from")
    top_k: int = opt(0, "sample from the k most likely tokens; 0 = no limit (needed for an exact gradient)", ge=0)
    top_p: float = opt(1.0, "nucleus sampling mass; 1 = off (needed for an exact gradient)", gt=0, le=1)
    template: str = opt("raw", "prompt template: raw, chat, tldr or a format string containing {prompt}")
    generation_batch_size: int | None = opt(None, "completions per generate / scoring call; null = "
                                            "batch_size x num_samples", ge=1)
    rollout_backend: str = opt("transformers", "what samples the rollouts: transformers (policy.generate) or vllm "
                               "(a vLLM engine on the training GPU, weights synced after updates; pip install "
                               "vllm; docs/vllm.md)", choices=("transformers", "vllm"))
    vllm_gpu_memory_utilization: float = opt(0.3, "with rollout_backend vllm: share of the GPU's memory the vLLM "
                                             "engine takes (its weights and KV cache); training has the rest",
                                             gt=0, le=1)
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of a completion that did not "
                                            "end with EOS within max_new_tokens; null = no penalty", ge=0,
                                            why="a negative penalty would reward completions that never end")
    kl_coef: float = opt(0.05, "beta of the KL penalty in the reward (the start value when kl_target is set)",
                         ge=0, why="a negative beta would reward moving away from the reference")
    kl_estimator: str = opt("k1", "per-token KL estimator: k1 = log pi/pi_ref, k3 = (r - 1) - log r",
                            choices=("k1", "k3"))
    kl_target: float | None = opt(None, "adaptive KL: steer beta so the sequence KL approaches this (Ziegler "
                                  "et al. 2019); null = fixed kl_coef", gt=0)
    kl_horizon: float = opt(10000.0, "adaptive KL horizon in sequences: beta changes by at most "
                            "20% x sequences / horizon per rollout", gt=0)
    update_epochs: int = opt(1, "passes over each rollout (PPO's K epochs)", ge=1)
    num_mini_batches: int = opt(1, "optimizer steps per pass over a rollout (its mini-batches)", ge=1)
    whiten_advantages: bool = opt(False, "normalise the rollout's advantages to mean 0, variance 1")
    ptx_data: str | None = opt(None, "SFT data mixed in as a language-modelling loss (PPO-ptx); null = none")
    ptx_coef: float = opt(0.0, "weight gamma of the ptx loss (Ouyang et al. 2022, Eq. 2); needs ptx_data", ge=0)
    sample_every: int = opt(10, "write rollout completions to OUTPUT_DIR/samples.jsonl every N steps; 0 = never",
                            ge=0)
    sample_rows: int = opt(8, "completions written each time (the first prompts of the rollout, all samples)",
                           ge=1)

    def validate(self) -> None:
        super().validate()
        from preftune.data.prompts import check_template

        require(self, "eval_data", not self.eval_data, "is not used by online methods: they are measured on "
                 "their own rollouts (see samples.jsonl); evaluate with generate + compare")
        require(self, "eval_fraction", self.eval_fraction == 0.0, "is not used by online methods")
        require(self, "group_by_length", not self.group_by_length, "is for offline methods (sft, reward, "
                 "dpo): an online step trains on the completions it has just sampled")
        require(self, "max_tokens_per_batch", self.max_tokens_per_batch is None, "is for offline methods (sft, "
                 "reward, dpo, kto): an online step's micro-batches are its rollout's")
        require(self, "max_new_tokens", self.max_new_tokens < self.max_length,
                 f"must be >= 1 and < max_length ({self.max_length}): the prompt needs tokens too")
        require(self, "template", check_template(self.template), "must be raw, chat, tldr or contain {prompt}")
        require(self, "kl_target", not (self.kl_target is not None and self.kl_coef == 0),
                 "needs a kl_coef > 0 to start from (the controller multiplies it)")
        require(self, "ptx_coef", not (self.ptx_coef > 0 and not self.ptx_data), "needs ptx_data (SFT rows)")
        require(self, "ptx_data", not (self.ptx_data and self.ptx_coef == 0), "is unused while ptx_coef is 0")
        check_reward_keys(self)

    def check_required(self, keys: tuple[str, ...]) -> None:
        """As TrainConfig's; ``rewards`` stands in for ``reward``."""
        super().check_required(tuple(k for k in keys if not (k == "reward" and self.rewards)))

    required_on_cli: ClassVar[tuple[str, ...]] = ("model", "data", "reward")
    model_keys: ClassVar[tuple[str, ...]] = ("model", "ref_model", "reward")
    data_keys: ClassVar[tuple[str, ...]] = ("data", "ptx_data")
    local_data_keys: ClassVar[tuple[str, ...]] = ("data",)  # prompts are read from a local file

    def model_sources(self) -> dict[str, str]:
        """As TrainConfig's, without a ``reward`` that is a function (``module:fn``, ``file.py:fn``), and with
        each reward model of ``rewards`` (as ``rewards[i]``)."""
        sources = super().model_sources()
        if _is_function_spec(self.reward):
            sources.pop("reward", None)
        sources.update({f"rewards[{i}]": spec for i, spec in enumerate(self.rewards or [])
                        if not _is_function_spec(spec)})
        return sources

    def preflight(self) -> None:
        """TrainConfig's checks; a reward function's file (``file.py:fn``) must exist and a reward-model
        directory must hold a score head, for ``reward`` and for each entry of ``rewards``."""
        super().preflight()
        if self.reward:
            preflight_reward(self, "reward", self.reward)
        for i, spec in enumerate(self.rewards or []):
            preflight_reward(self, "rewards", spec, label=f"rewards[{i}]")


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

    def save(self, model: torch.nn.Module, path: Path, *, state_dict: dict[str, Any] | None = None) -> None: ...


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

    def save(self, model: torch.nn.Module, path: Path, *, state_dict: dict[str, Any] | None = None) -> None:
        save_with_tokenizer(model, self.tokenizer, path, state_dict=state_dict)


def save_with_tokenizer(model: Any, tokenizer: Any, path: Path, *, state_dict: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` of the model and its tokenizer; ``state_dict``: the full weights gathered from a
    sharded model (``preftune.train.sharded.full_state_dict``), saved instead of the model's own shards."""
    model.save_pretrained(path, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(path)


# ------------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class MethodSpec:
    """One training method, as its file registers it: ``preftune train NAME``."""

    name: str                      # the command
    config: type[TrainConfig]      # its keys
    method: type                   # the TrainingMethod class; ``method()`` reads its data from the config
    summary: str                   # one line: the command's help and the docs
    method_for: Any = None         # config -> the class to run instead (reward, mixtures > 1: the EM mixture)
