"""Configs of the online methods (``preftune train ppo | rloo | raft``), registered in ``preftune.config.CONFIGS``.

They extend ``TrainConfig`` (so every shared key, the YAML loading, the CLI overrides and the generated
help work the same) with the rollout, reward, KL and update keys of docs/rlhf.md. Batch arithmetic: one
optimizer step takes ``batch_size * grad_accum`` prompts per process, each with ``num_samples``
completions; a rollout is ``num_mini_batches`` steps' worth of prompts, generated at once and trained on
for ``update_epochs`` passes (``update_epochs * num_mini_batches`` optimizer steps per rollout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from preftune.config import CONFIGS, TrainConfig, _require, opt


@dataclass
class OnlineConfig(TrainConfig):
    """Keys shared by the online methods (ppo, rloo, raft): rollouts from the current policy, scored,
    KL-shaped against the reference. One optimizer step takes ``batch_size * grad_accum`` prompts per
    process (each with ``num_samples`` completions); a rollout holds ``num_mini_batches`` such steps of
    prompts and is trained on for ``update_epochs`` passes."""

    requires_data: ClassVar[bool] = False  # prompts may be given in memory (checked when training starts)

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
        from preftune.generate import TEMPLATES

        _require(self, "eval_data", not self.eval_data, "is not used by online methods: they are measured on "
                 "their own rollouts (see samples.jsonl); evaluate with generate + compare")
        _require(self, "eval_fraction", self.eval_fraction == 0.0, "is not used by online methods")
        _require(self, "group_by_length", not self.group_by_length, "is for offline methods (sft, reward, "
                 "dpo): an online step trains on the completions it has just sampled")
        _require(self, "num_samples", self.num_samples >= 1, "must be >= 1")
        _require(self, "max_new_tokens", 1 <= self.max_new_tokens < self.max_length,
                 f"must be >= 1 and < max_length ({self.max_length})")
        _require(self, "temperature", self.temperature > 0, "must be > 0 (sampling; greedy decoding has no "
                 "log-probs to learn from)")
        _require(self, "top_k", self.top_k >= 0, "must be >= 0")
        _require(self, "top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]")
        _require(self, "template", self.template in TEMPLATES or self.template == "chat"
                 or "{prompt}" in self.template, "must be raw, chat, tldr or contain {prompt}")
        _require(self, "generation_batch_size", self.generation_batch_size is None
                 or self.generation_batch_size >= 1, "must be >= 1 (or null)")
        _require(self, "kl_coef", self.kl_coef >= 0, "must be >= 0")
        _require(self, "kl_target", self.kl_target is None or self.kl_target > 0, "must be > 0 (or null)")
        _require(self, "kl_horizon", self.kl_horizon > 0, "must be > 0")
        _require(self, "kl_target", not (self.kl_target is not None and self.kl_coef == 0),
                 "needs a kl_coef > 0 to start from (the controller multiplies it)")
        _require(self, "update_epochs", self.update_epochs >= 1, "must be >= 1")
        _require(self, "num_mini_batches", self.num_mini_batches >= 1, "must be >= 1")
        _require(self, "ptx_coef", self.ptx_coef >= 0, "must be >= 0")
        _require(self, "ptx_coef", not (self.ptx_coef > 0 and not self.ptx_data), "needs ptx_data (SFT rows)")
        _require(self, "ptx_data", not (self.ptx_data and self.ptx_coef == 0), "is unused while ptx_coef is 0")
        _require(self, "sample_every", self.sample_every >= 0, "must be >= 0")
        _require(self, "sample_rows", self.sample_rows >= 1, "must be >= 1")


@dataclass
class PPOConfig(OnlineConfig):
    """`preftune train ppo`: PPO with a value network and GAE on KL-shaped per-token rewards."""

    output_dir: str = opt("runs/ppo", "run directory: config.yaml, metrics.jsonl, samples.jsonl, final/")
    update_epochs: int = opt(4, "passes over each rollout (PPO's K epochs)")
    whiten_advantages: bool = opt(True, "normalise the rollout's advantages to mean 0, variance 1")
    value_model: str | None = opt(None, "start of the value network: null = the reward model when `reward` "
                                  "is one, else the policy's starting model (a new scalar head)")
    clip_range: float = opt(0.2, "PPO ratio clip epsilon (Schulman et al. 2017, Eq. 7)")
    value_clip_range: float = opt(0.2, "clip of the value change around the rollout's values")
    vf_coef: float = opt(0.1, "weight of the value loss next to the policy loss")
    gamma: float = opt(1.0, "discount of the per-token rewards")
    lam: float = opt(0.95, "GAE lambda (Schulman et al. 2016): 0 = one-step TD, 1 = Monte Carlo")
    whiten_rewards: bool = opt(False, "scale the per-token rewards to unit variance before GAE")

    def validate(self) -> None:
        super().validate()
        _require(self, "clip_range", self.clip_range > 0, "must be > 0")
        _require(self, "value_clip_range", self.value_clip_range > 0, "must be > 0")
        _require(self, "vf_coef", self.vf_coef >= 0, "must be >= 0")
        _require(self, "gamma", 0.0 <= self.gamma <= 1.0, "must be in [0, 1]")
        _require(self, "lam", 0.0 <= self.lam <= 1.0, "must be in [0, 1]")


@dataclass
class RLOOConfig(OnlineConfig):
    """`preftune train rloo`: REINFORCE with the leave-one-out baseline over K samples per prompt."""

    output_dir: str = opt("runs/rloo", "run directory: config.yaml, metrics.jsonl, samples.jsonl, final/")
    num_samples: int = opt(4, "completions sampled per prompt in each rollout (K)")
    baseline: str = opt("leave_one_out", "leave_one_out = mean of the other K - 1 samples (RLOO); mean = the "
                        "rollout's mean (plain REINFORCE); none", choices=("leave_one_out", "mean", "none"))
    clip_range: float = opt(0.2, "sequence ratio clip when a rollout is used for more than one step")

    def validate(self) -> None:
        super().validate()
        _require(self, "num_samples", not (self.baseline == "leave_one_out" and self.num_samples < 2),
                 "must be >= 2 for the leave-one-out baseline (or set baseline: mean)")
        _require(self, "clip_range", self.clip_range > 0, "must be > 0")


@dataclass
class RAFTConfig(OnlineConfig):
    """`preftune train raft`: reward-ranked fine-tuning, SFT on the best of K samples."""

    output_dir: str = opt("runs/raft", "run directory: config.yaml, metrics.jsonl, samples.jsonl, final/")
    num_samples: int = opt(4, "completions sampled per prompt in each rollout (K)")
    kl_coef: float = opt(0.0, "beta: rank by score - beta * sequence KL; 0 = by the score alone")
    keep: str = opt("best_of_k", "best_of_k = the best sample of each prompt; top_fraction = the best "
                    "top_fraction of the whole rollout", choices=("best_of_k", "top_fraction"))
    top_fraction: float = opt(0.25, "with keep: top_fraction, the share of the rollout kept")

    def validate(self) -> None:
        super().validate()
        _require(self, "num_samples", self.keep == "top_fraction" or self.num_samples >= 2,
                 "must be >= 2 to keep the best of K")
        _require(self, "top_fraction", 0.0 < self.top_fraction <= 1.0, "must be in (0, 1]")
        rows = self.batch_size * self.grad_accum * self.num_mini_batches * self.num_samples
        _require(self, "top_fraction", self.keep != "top_fraction"
                 or round(self.top_fraction * rows) >= self.grad_accum * self.num_mini_batches,
                 f"keeps {round(self.top_fraction * rows)} of a rollout's {rows} completions, fewer than "
                 f"one per micro-batch ({self.grad_accum * self.num_mini_batches}); raise it or batch_size")


CONFIGS.update({"ppo": PPOConfig, "rloo": RLOOConfig, "raft": RAFTConfig})
