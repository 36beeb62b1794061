"""The demo's settings: one dataclass, two presets (the default run and ``--quick``).

Every number that shapes the run is here, so the report can print them and a changed setting is
noticed when a run directory is reused (``fingerprint``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

# Bump when a stage's recipe changes in a way the settings do not show, so cached base models are rebuilt.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class DemoSettings:
    works: tuple[str, ...] | None = None   # corpus files to use (None = all shipped)
    seed: int = 0
    # tokenizer and base language model (trained from scratch on the corpus with `train sft` on {text} rows)
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    base_block_chars: int = 400            # a base-LM row: consecutive speeches up to this many characters
    base_max_length: int = 160
    base_steps: int = 600
    base_batch_size: int = 16
    base_learning_rate: float = 4e-3
    # SFT on (prefix -> continuation of 1..sft_max_lines lines) pairs
    sft_examples: int = 2000
    sft_max_lines: int = 6
    sft_steps: int = 80
    sft_learning_rate: float = 1e-3
    # preference data: K completions per prefix from the SFT model, pairs labelled by the panel
    pref_prompts: int = 600
    val_prompts: int = 40                  # held-out prefixes for the reward model's accuracy
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
    ppo_learning_rate: float = 3e-4
    rloo_learning_rate: float = 3e-4
    # evaluation: A, B, C, ... completions for each held-out prefix
    eval_prompts: int | None = None        # None = every prefix of corpus/heldout_prefixes.txt
    eval_completions: int = 3
    n_bootstrap: int = 1000
    methods: tuple[str, ...] = ("dpo", "orpo", "ppo", "rloo")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
