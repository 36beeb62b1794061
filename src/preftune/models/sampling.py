"""Sampling with Hugging Face ``generate`` that depends on the seed only, not on the batch.

Hugging Face ``generate`` samples from the global RNG, so the same seed gives different completions when
the batch size or the order of prompts changes. Here each row of a batch owns a ``torch.Generator``
seeded from its own key (``row_seed``: (seed, prompt, completion) in ``preftune generate``, (seed,
rollout, row) in the online methods); the ``RowSampler`` logits processor draws that row's next token
with its own generator (temperature, top-k, top-p applied first) and hands ``generate`` a one-hot
distribution, so ``generate(do_sample=False)`` takes exactly the token drawn here. (Different hardware,
dtypes or library versions can still change the logits and hence the draws.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune.data.prompts import check_template
from preftune.errors import PreftuneError

BACKENDS = ("transformers", "vllm")


@dataclass
class GenerationSettings:
    """How completions are sampled; written into every output record."""

    temperature: float = 1.0      # softmax temperature; 0 = greedy decoding
    top_p: float = 1.0            # nucleus sampling: keep the smallest set of tokens with mass >= top_p
    top_k: int = 0                # keep the k most likely tokens; 0 = no limit
    max_new_tokens: int = 64      # completion length limit, in tokens
    min_new_tokens: int = 0       # end-of-sequence is not sampled before this many new tokens
    seed: int = 0                 # same seed -> same completions (see the module docstring)
    template: str = "raw"         # raw | chat | tldr | a format string containing {prompt}
    stop: list[str] = field(default_factory=list)  # cut a completion before the first of these strings
    backend: str = "transformers"  # transformers | vllm

    def check(self) -> None:
        """Raise a PreftuneError naming the first invalid setting."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN fails every comparison
            raise PreftuneError(f"temperature must be a finite number >= 0, got {self.temperature}",
                                field="temperature", hint="1 samples from the model's distribution; 0 is greedy")
        if not 0 < self.top_p <= 1:
            raise PreftuneError(f"top_p must be in (0, 1], got {self.top_p}", field="top_p",
                                hint="1 keeps every token; 0.9 keeps the most likely tokens with 90% of the mass")
        if self.top_k < 0:
            raise PreftuneError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}", field="top_k")
        if self.max_new_tokens < 1:
            raise PreftuneError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}", field="max_new_tokens",
                                hint="the length limit of each completion, in tokens, such as 64")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise PreftuneError(f"min_new_tokens must be in [0, max_new_tokens = {self.max_new_tokens}], "
                                f"got {self.min_new_tokens}", field="min_new_tokens")
        if not check_template(self.template):
            raise PreftuneError(f"unknown template {self.template!r}", field="template",
                                hint="use raw, chat, tldr or a format string containing {prompt}")
        if self.backend not in BACKENDS:
            raise PreftuneError(f"unknown backend {self.backend!r}", field="backend",
                                hint=f"use one of: {', '.join(BACKENDS)}")
        if any(not s for s in self.stop):
            raise PreftuneError("stop strings must not be empty", field="stop")


def row_seed(seed: int, *key: int) -> int:
    """A 63-bit seed for one row from the run's ``seed`` and the row's ``key`` (for example prompt id and
    completion index), mixed by numpy's SeedSequence: no collisions by addition, (1, 2) and (2, 1) give
    unrelated seeds."""
    import numpy as np

    state = np.random.SeedSequence([seed & 0xFFFFFFFF, *key]).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def sample_next_tokens(logits: Any, *, generators: Sequence[Any], temperature: float, top_k: int = 0,
                       top_p: float = 1.0) -> Any:
    """Draw one token per row of ``logits`` [B, V] with that row's generator.

    p = softmax(logits / temperature) restricted to the top-k tokens and then to the nucleus (the
    smallest set of most likely tokens whose mass is >= top_p; Holtzman et al. 2020, sec. 3.1);
    temperature 0 is greedy (argmax). Tokens already at -inf (banned by other processors) stay banned.
    """
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p  # the first token has mass_before 0 and is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return torch.stack([torch.multinomial(probs[r], 1, generator=generators[r])[0] for r in range(len(probs))])


class RowSampler:
    """A logits processor that samples each row with its own generator and returns a one-hot choice,
    so that ``generate(do_sample=False)`` (argmax) takes exactly the token drawn here."""

    def __init__(self, seeds: Sequence[int], settings: GenerationSettings) -> None:
        self.seeds, self.settings = list(seeds), settings
        self.generators: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if not self.generators:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        s = self.settings
        chosen = sample_next_tokens(scores, generators=self.generators, temperature=s.temperature,
                                    top_k=s.top_k, top_p=s.top_p)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(1, chosen[:, None], 0.0)
