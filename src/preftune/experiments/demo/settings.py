"""The demo's settings: one dataclass, two presets (the default run and ``--quick``).

Every number that shapes the run is here, so the report can print them and a changed setting is
noticed when a run directory is reused (``fingerprint``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from preftune.errors import PreftuneError

# Bump when a stage's recipe changes in a way the settings do not show, so cached base models are rebuilt.
RECIPE_VERSION = 1

# The settings that shape the base model (its cache key): those named with these prefixes, and the
# settings of every training stage that the base run reads too.
BASE_PREFIXES = ("vocab", "hidden", "num_layers", "base_")
BASE_SHARED = ("log_every", "group_by_length")
# The settings that shape the SFT model (with the base model and the SFT data, the key of the SFT model the
# groups scenario caches; the default scenario trains its SFT model in its run directory).
SFT_SHARED = ("seed", "log_every", "group_by_length", "max_length", "warmup_fraction")


@dataclass(frozen=True)
class DemoSettings:
    works: tuple[str, ...] | None = None   # corpus files to use (None = all shipped)
    seed: int = 0
    # tokenizer and base language model (trained from scratch on the corpus with `train sft` on {text} rows)
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    base_head_dim: int = 32                # attention heads (and KV heads): hidden_size // this, at least 1
    base_mlp_ratio: int = 3                # the MLP's intermediate size: hidden_size x this
    base_max_positions: int = 512          # the model's context window (position embeddings)
    base_block_chars: int = 400            # a base-LM row: consecutive speeches up to this many characters
    base_max_length: int = 160
    base_steps: int = 600
    base_batch_size: int = 16
    base_learning_rate: float = 4e-3
    base_warmup_fraction: float = 0.05     # warm-up steps: this fraction of base_steps (at least 1)
    base_weight_decay: float = 0.1
    base_saves: int = 4                    # checkpoints while training (every base_steps // base_saves steps)
    base_keep_checkpoints: int = 1         # checkpoints kept on disk (all deleted once the model is trained)
    preview_prompts: int = 3               # held-out prefixes the base model continues for the report
    preview_samples: int = 2               # its continuations of each (not part of the base model's cache key)
    # every training stage
    log_every: int = 5                     # training metrics written to metrics.jsonl every N steps
    group_by_length: bool = True           # offline stages (base, sft, reward, dpo, orpo): less padding
    max_length: int = 128                  # prompt + completion tokens at most, every stage after the base
    warmup_fraction: float = 0.1           # warm-up steps: this fraction of a stage's steps, after the base
    # SFT on (prefix -> continuation of sft_min_lines..sft_max_lines lines) pairs
    sft_examples: int = 2000
    sft_min_lines: int = 1
    sft_max_lines: int = 6
    sft_steps: int = 80
    sft_batch_size: int = 16
    sft_learning_rate: float = 1e-3
    sft_eval_fraction: float = 0.05        # SFT examples held out for the eval loss
    # preference data: K completions per prefix from the SFT model, pairs labelled by the panel
    pref_prompts: int = 600
    val_prompts: int = 40                  # held-out prefixes for the reward model's accuracy
    val_seed_offset: int = 1               # their completions, pairs and labels are drawn with seed + this
    completions_per_prompt: int = 4
    pairs_per_prompt: int = 6              # pairs drawn from the K-choose-2 of each prompt (6 = all of K = 4)
    second_opinion: float = 0.2            # fraction of pairs labelled by two annotators
    # sampling (preference data and evaluation)
    max_new_tokens: int = 64
    min_new_tokens: int = 2                # no empty completions (an empty text is not preference data)
    temperature: float = 1.0               # sampling the preference data and the RL rollouts
    eval_temperature: float = 0.7          # sampling the evaluation completions (every model alike)
    top_k: int = 50
    generate_batch_size: int = 64
    # preference training
    reward_steps: int = 160
    reward_learning_rate: float = 3e-4
    dpo_beta: float = 0.3
    dpo_learning_rate: float = 2e-4
    orpo_beta: float = 5.0                 # ORPO's lambda, the weight of the odds-ratio term
    orpo_learning_rate: float = 5e-4
    pref_epochs: float = 2.0
    pref_batch_size: int = 16
    # online RL against the learned reward model (prompts: the preference prefixes)
    rl_steps: int = 48
    rl_batch_size: int = 8                 # prompts per step (x rl_num_samples completions)
    rl_num_samples: int = 4
    rl_kl_coef: float = 0.05
    rl_lr_scheduler: str = "constant"      # learning-rate schedule after the warm-up
    rl_sample_every: int = 10              # rollout completions written to samples.jsonl every N steps
    ppo_learning_rate: float = 3e-4
    ppo_update_epochs: int = 2             # passes over each rollout
    ppo_num_mini_batches: int = 2          # optimizer steps per pass over a rollout
    rloo_learning_rate: float = 3e-4
    raft_learning_rate: float = 3e-4       # RAFT (SFT on the best of rl_num_samples), when in methods
    # evaluation: A, B, C, ... completions for each held-out prefix
    eval_prompts: int | None = None        # None = every prefix of corpus/heldout_prefixes.txt
    eval_completions: int = 3
    eval_seed_offset: int = 1000           # the evaluation completions are drawn with seed + this
    n_bootstrap: int = 1000
    methods: tuple[str, ...] = ("dpo", "orpo", "ppo", "rloo")  # stages, in order (see pipeline.METHODS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def base_recipe(self) -> dict[str, Any]:
        """The settings the base model depends on (with the corpus and the seed, its cache key)."""
        return {k: v for k, v in self.to_dict().items() if k.startswith(BASE_PREFIXES) or k in BASE_SHARED}

    def sft_recipe(self) -> dict[str, Any]:
        """The settings the SFT stage's training run reads (with the base model and the SFT data, its cache key)."""
        return {k: v for k, v in self.to_dict().items() if k.startswith("sft_") or k in SFT_SHARED}

    @property
    def fingerprint(self) -> str:
        text = json.dumps({**self.to_dict(), "recipe": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


DEFAULT = DemoSettings()

QUICK = replace(
    DEFAULT,
    works=("sonnets", "hamlet"),
    vocab_size=512, hidden_size=64, num_layers=2, base_steps=60, base_max_length=96, base_learning_rate=5e-3,
    sft_examples=240, sft_steps=20, pref_prompts=48, val_prompts=12, pairs_per_prompt=2, max_new_tokens=32,
    reward_steps=20, pref_epochs=1.0, pref_batch_size=8, eval_prompts=8, n_bootstrap=200, rl_steps=4,
    rl_batch_size=4, rl_num_samples=2,
)


def preset(quick: bool) -> DemoSettings:
    return QUICK if quick else DEFAULT


@dataclass(frozen=True)
class GroupsSettings(DemoSettings):
    """``preftune demo --scenario groups``: two groups of annotators with different ground truths
    (``groups_reward.py``, docs/diverse.md). The corpus, base model and SFT settings are the default
    scenario's (so both scenarios share the cached base and SFT models); the rest is this scenario's."""

    methods: tuple[str, ...] = ("pooled_rloo", "maxmin_rloo", "pooled_dpo", "grdpo")  # see groups.METHODS
    # the panel: annotators per group (majority "concise", minority "expansive") and their Bradley-Terry noise
    group_annotators: tuple[int, ...] = (16, 4)
    annotator_temperatures: tuple[float, ...] = (0.4, 0.6, 0.8, 1.0)  # cycled within each group
    panel_seed_offset: int = 7             # the annotators' ids are shuffled with seed + this
    # the mixture of reward models (`train reward` with `mixtures`, EM over annotators)
    mixtures: int = 2
    em_init: str = "random"                # the truth's groups are never shown to EM (reporting only)
    em_restarts: int = 1                   # random starts (each as costly as the whole EM); the best is kept
    em_iterations: int = 3                 # at most; EM stops once no annotator changes component
    em_epochs: int = 1                     # passes over the labels per M-step
    # MaxMin RLOO (`rewards` = the mixture's reward models) and group-robust DPO
    maxmin_aggregation: str = "maxmin"     # reward_aggregation of maxmin_rloo
    grdpo_step_size: float = 0.01          # group-robust DPO's eta (group_step_size)

    @property
    def fingerprint(self) -> str:
        from preftune.experiments.demo.groups_reward import RECIPE as REWARDS

        text = json.dumps({**self.to_dict(), "recipe": RECIPE_VERSION, "scenario": "groups", "rewards": REWARDS},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _groups(base: DemoSettings, **changes: Any) -> GroupsSettings:
    """A GroupsSettings with ``base``'s shared settings (corpus, base model, SFT, ...) and ``changes``."""
    shared = {f.name: getattr(base, f.name) for f in fields(DemoSettings) if f.name != "methods"}
    return GroupsSettings(**{**shared, **changes})


GROUPS = _groups(DEFAULT, pref_epochs=1.0)

GROUPS_QUICK = _groups(QUICK, group_annotators=(4, 1), em_iterations=2)

@dataclass(frozen=True)
class RoundsSettings(DemoSettings):
    """``preftune demo --scenario rounds``: offline DPO against DPO on the policy's own samples (online DPO,
    every step; iterative DPO, in rounds) and against GRPO, RLOO and PPO, all judged by the same learned reward
    model. The corpus, base model, SFT model,
    preference data and reward model are the default scenario's recipe (the base and SFT models are shared)."""

    methods: tuple[str, ...] = ("dpo", "online_dpo", "iterative_dpo", "grpo", "rloo", "ppo")  # see rounds.METHODS
    # online DPO: num_samples completions per prompt each step, the reward model's best vs worst
    online_dpo_steps: int = 96
    online_dpo_num_samples: int = 4
    online_dpo_beta: float = 0.3
    online_dpo_learning_rate: float = 2e-4
    # iterative DPO (`preftune iterate`): rounds over fresh slices of the preference prefixes
    rounds: int = 3
    round_prompts: int = 200               # prefixes per round (round r takes the r-th slice)
    round_samples: int = 4                 # completions per prefix from model r - 1; the reward model's best vs worst
    round_epochs: float = 2.0
    round_eval_prompts: int = 40           # held-out prefixes for each round's win rate and KL against SFT
    # GRPO (K = rl_num_samples; the KL as a k3 term in the loss)
    grpo_learning_rate: float = 3e-4
    grpo_kl_coef: float = 0.04
    # frontier: ground-truth reward and KL to SFT of every model on the held-out prefixes
    frontier_samples: int = 2

    @property
    def fingerprint(self) -> str:
        text = json.dumps({**self.to_dict(), "recipe": RECIPE_VERSION, "scenario": "rounds"}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _rounds(base: DemoSettings, **changes: Any) -> RoundsSettings:
    shared = {f.name: getattr(base, f.name) for f in fields(DemoSettings) if f.name != "methods"}
    return RoundsSettings(**{**shared, **changes})


ROUNDS = _rounds(DEFAULT)

ROUNDS_QUICK = _rounds(QUICK, online_dpo_steps=4, online_dpo_num_samples=2, rounds=2, round_prompts=12, round_samples=2,
                       round_epochs=1.0, round_eval_prompts=4, frontier_samples=1)

SCENARIOS = {"default": "the course's preference: one panel, DPO, ORPO, PPO and RLOO against SFT (docs/demo.md)",
             "groups": "two groups of annotators (80% / 20%) who want different things: EM finds them, pooled "
                       "vs MaxMin RLOO, pooled vs group-robust DPO, judged under each group (docs/diverse.md)",
             "rounds": "offline DPO vs online DPO vs iterative DPO (3 rounds) vs GRPO, RLOO and PPO on one learned "
                       "reward model: win rates and the reward-vs-KL frontier (docs/rounds.md)"}


def scenario_preset(scenario: str, quick: bool) -> DemoSettings:
    """The settings of ``preftune demo --scenario SCENARIO [--quick]``."""
    if scenario not in SCENARIOS:
        raise PreftuneError(f"unknown demo scenario {scenario!r}", field="--scenario",
                            hint=f"scenarios: {', '.join(SCENARIOS)}")
    if scenario == "groups":
        return GROUPS_QUICK if quick else GROUPS
    if scenario == "rounds":
        return ROUNDS_QUICK if quick else ROUNDS
    return preset(quick)
