"""Rollouts for the online methods: prompts -> sampled completions as token ids, their log-probs under
the policy and the reference, and their scores.

Layout of a rollout batch (as in TRL and torchtune): queries are LEFT-padded to a common width ``Tq`` and
responses RIGHT-padded after them, so every row's response starts at column ``Tq``::

    input_ids      [B, Tq + R]   <pad> <pad> q q q | y y y <eos> <pad>
    response_mask  [B, R]        1 on the response tokens (up to and including EOS)

Positions come from the attention mask (``position_ids_from_mask``), the same numbering ``generate``
used, so the log-probs of a forward pass match those of sampling. The logits at column ``Tq - 1 + j``
predict response token ``j``; ``response_logps`` returns them as [B, R] without slicing the [B, T, V]
logits. The policy is the temperature-scaled ``softmax(logits / temperature)`` everywhere (sampling,
log-probs, KL), so the gradient is that of the distribution that was sampled (top-k / top-p truncation,
when set, is not part of it, as in TRL).

Sampling is reproducible: each row draws with its own ``torch.Generator`` seeded from (seed, rollout,
row), through ``preftune.generate.RowSampler``, so a rollout depends on the seed and the policy only,
not on the batch size or on what ran before (resume regenerates nothing, see ``online.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.data.tokenize import IGNORE_INDEX
from preftune.errors import PreftuneError

Scorer = Callable[[Sequence[Any], Sequence[str]], list[float]]


# ------------------------------------------------------------------------------------------------ prompts


def encode_prompts(tokenizer: Any, prompts: Sequence[Any], *, template: str,
                   max_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids of each templated prompt, cut from the left to ``max_tokens``; and how many were cut."""
    from preftune.generate import format_prompt

    special = template != "chat"  # a chat template writes its own special tokens
    eos = tokenizer.eos_token_id
    out, cut = [], 0
    for prompt in prompts:
        text = format_prompt(prompt, template, tokenizer)
        ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
        if ids and ids[-1] == eos and not text.endswith(tokenizer.eos_token or "\0"):
            ids = ids[:-1]  # a post-processor that appends EOS to every text
        if len(ids) > max_tokens:
            ids, cut = ids[-max_tokens:], cut + 1
        if not ids:
            raise PreftuneError(f"prompt {len(out) + 1} tokenises to nothing", field="data")
        out.append(ids)
    return out, cut


def rollout_seed(seed: int, rollout: int, row: int, *, stream: int = 0) -> int:
    """A 63-bit seed for one row of one rollout (numpy SeedSequence mixing, no collisions by addition);
    ``stream`` separates independent uses (0: sampling, 1: the mini-batch order of a pass)."""
    import numpy as np

    state = np.random.SeedSequence([seed & 0xFFFFFFFF, stream, rollout, row]).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


# ------------------------------------------------------------------------------------------------ batches


def pad_rows(rows: Sequence[torch.Tensor], *, value: float = 0.0, left: bool = False) -> torch.Tensor:
    """Stack 1-D tensors of different lengths into [N, max_len], padded right (or left) with ``value``."""
    width = max((len(r) for r in rows), default=0)
    dtype = rows[0].dtype if rows else torch.float32
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        n = len(r)
        if n and left:
            out[i, width - n:] = r
        elif n:
            out[i, :n] = r
    return out


def response_lengths_mask(lengths: Sequence[int] | torch.Tensor, width: int | None = None) -> torch.Tensor:
    """[N, width] float mask with ``lengths[i]`` leading ones per row."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    width = int(lengths.max()) if width is None else width
    return (torch.arange(width)[None, :] < lengths[:, None]).float()


def collate_rollout(queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], *,
                    pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded queries + right-padded responses -> input_ids, attention_mask [B, Tq + R], targets
    [B, Tq + R] (the response tokens at the columns whose logits predict them, -100 elsewhere),
    response_mask [B, R] and query_width (Tq)."""
    q = pad_rows(queries, value=pad_token_id, left=True).long()
    r = pad_rows(responses, value=pad_token_id).long()
    q_mask = pad_rows([torch.ones(len(x)) for x in queries], left=True)
    r_mask = response_lengths_mask([len(x) for x in responses], r.shape[1])
    width = q.shape[1]
    targets = torch.full((q.shape[0], width + r.shape[1]), IGNORE_INDEX, dtype=torch.long)
    targets[:, width - 1:width - 1 + r.shape[1]] = torch.where(r_mask.bool(), r, IGNORE_INDEX)
    return {"input_ids": torch.cat([q, r], 1), "attention_mask": torch.cat([q_mask, r_mask], 1).long(),
            "targets": targets, "response_mask": r_mask, "query_width": torch.tensor(width)}


def policy_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V] of a causal LM on a rollout batch, with positions from the mask."""
    from preftune.models import position_ids_from_mask

    mask = batch["attention_mask"]
    return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                 use_cache=False).logits


def response_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor], *,
                   temperature: float = 1.0) -> torch.Tensor:
    """[B, R] log-probs of the response tokens under ``softmax(logits / temperature)`` (0 on padding),
    chunked (``preftune.core.logprobs.token_logps``: no fp32 [B, T, V] log-softmax)."""
    from preftune.core.logprobs import token_logps

    if temperature != 1.0:
        logits = logits / temperature
    per_token = token_logps(logits, batch["targets"])  # [B, T]
    return response_columns(per_token, batch)


def response_columns(per_position: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The columns of a [B, T] per-position tensor that predict the response tokens: [B, R], masked."""
    width, r = int(batch["query_width"]), batch["response_mask"].shape[1]
    return per_position[:, width - 1:width - 1 + r] * batch["response_mask"].to(per_position.dtype)


# ------------------------------------------------------------------------------------------------ sampling


@contextlib.contextmanager
def evaluating(*models: Any) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then each model's previous mode."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


@torch.no_grad()
def sample_responses(policy: Any, tokenizer: Any, queries: Sequence[torch.Tensor], *, seeds: Sequence[int],
                     settings: Any, batch_size: int) -> list[torch.Tensor]:
    """One sampled response per query (batched ``generate`` with the KV cache, left padding), each cut
    after its first EOS. ``settings`` is a ``preftune.generate.GenerationSettings``."""
    from transformers import GenerationConfig, LogitsProcessorList

    from preftune.generate import RowSampler

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(policy.parameters()).device
    out: list[torch.Tensor] = []
    with evaluating(policy):
        for start in range(0, len(queries), batch_size):
            chunk = queries[start:start + batch_size]
            ids = pad_rows(chunk, value=pad, left=True).long().to(device)
            mask = pad_rows([torch.ones(len(x)) for x in chunk], left=True).long().to(device)
            config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=pad,
                                      eos_token_id=eos)
            sampler = RowSampler(list(seeds[start:start + batch_size]), settings)
            generated = policy.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                        logits_processor=LogitsProcessorList([sampler]))[:, ids.shape[1]:].cpu()
            for row in generated:
                hits = (row == eos).nonzero()
                out.append(row[:int(hits[0]) + 1] if len(hits) else row)
    return out


@torch.no_grad()
def rollout_logps(model: Any, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], *,
                  pad_token_id: int, temperature: float, batch_size: int,
                  values: Any = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-row response log-probs (and per-token values of ``values``, a scalar-head model) without
    gradients and in eval mode, in batches of ``batch_size`` rows. Returns lists of 1-D tensors."""
    from preftune.models import token_scores

    device = next(model.parameters()).device
    logps: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []
    with evaluating(model, *([values] if values is not None else [])):
        for start in range(0, len(queries), batch_size):
            batch = collate_rollout(queries[start:start + batch_size], responses[start:start + batch_size],
                                    pad_token_id=pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            lengths = batch["response_mask"].sum(-1).long().tolist()
            lp = response_logps(policy_logits(model, batch), batch, temperature=temperature).cpu()  # >= fp32
            logps.extend(lp[i, :n] for i, n in enumerate(lengths))
            if values is not None:
                v = token_scores(values, batch["input_ids"], batch["attention_mask"])
                v = response_columns(v.to(torch.promote_types(v.dtype, torch.float32)), batch).cpu()
                vals.extend(v[i, :n] for i, n in enumerate(lengths))
    return logps, (vals if values is not None else None)


# ------------------------------------------------------------------------------------------------ measuring


@torch.no_grad()
def evaluate_policy(policy: Any, reference: Any, tokenizer: Any, prompts: Sequence[Any], scorer: Any, *,
                    num_samples: int, max_new_tokens: int, temperature: float = 1.0, template: str = "raw",
                    max_length: int = 512, seed: int = 0, batch_size: int = 32) -> dict[str, float]:
    """Mean reward and sequence-level KL(pi || pi_ref) of ``num_samples`` samples per prompt from ``policy``.

    The KL is the sample mean of ``sum_t log pi(y_t) - log pi_ref(y_t)`` (k1 summed over the completion:
    unbiased for the sequence KL under y ~ pi). Rows are seeded by (seed, row) only, so every policy is
    measured on the same random numbers. Returns ``reward``, ``reward_se``, ``kl``, ``kl_se`` (standard
    errors of the means), ``length`` (mean tokens) and ``samples``.
    """
    from preftune.generate import GenerationSettings

    queries, _ = encode_prompts(tokenizer, prompts, template=template, max_tokens=max_length - max_new_tokens)
    rows = [(i, torch.tensor(q)) for i, q in enumerate(queries) for _ in range(num_samples)]
    query_rows = [q for _, q in rows]
    settings = GenerationSettings(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, template=template)
    seeds = [rollout_seed(seed, 0, j) for j in range(len(rows))]
    responses = sample_responses(policy, tokenizer, query_rows, seeds=seeds, settings=settings, batch_size=batch_size)
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "temperature": temperature, "batch_size": batch_size}
    logps, _ = rollout_logps(policy, query_rows, responses, **kwargs)
    ref_logps, _ = rollout_logps(reference, query_rows, responses, **kwargs)
    kl = torch.tensor([float((a - b).sum()) for a, b in zip(logps, ref_logps, strict=True)], dtype=torch.float64)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rewards = torch.tensor(scorer([prompts[i] for i, _ in rows], texts), dtype=torch.float64)
    n = len(rows)

    def se(x: torch.Tensor) -> float:
        return float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

    return {"reward": float(rewards.mean()), "reward_se": se(rewards), "kl": float(kl.mean()), "kl_se": se(kl),
            "length": sum(len(r) for r in responses) / n, "samples": n}


# ------------------------------------------------------------------------------------------------ rewards


def is_function_spec(spec: str) -> bool:
    """True for ``module:function`` / ``file.py:function``; False for a model directory or hub id."""
    if Path(spec).is_dir():
        return False
    module, sep, name = spec.rpartition(":")
    return bool(sep and module and name.isidentifier())


def load_scorer(spec: str | Callable[..., float], *, device: str | None = None, batch_size: int = 16) -> Scorer:
    """``scorer(prompts, completions) -> [float]`` from a reward spec or a Python callable.

    A callable or ``module:function`` / ``file.py:function`` is called as ``fn(prompt_text, completion)``;
    anything else is loaded as a preftune reward model (directory or hub id) and scores prompt +
    completion + EOS exactly as in reward-model training.
    """
    from preftune.generate import prompt_text
    from preftune.judges import FunctionJudge, RewardModelJudge

    try:
        if callable(spec) or is_function_spec(spec):
            judge = FunctionJudge(spec)
            return lambda prompts, completions: judge.scores([prompt_text(p) for p in prompts], list(completions))
        judge = RewardModelJudge(spec, batch_size=batch_size, device=device)
    except PreftuneError as exc:  # re-raise naming the training key, not the judge option
        raise PreftuneError(exc.message, path=exc.path, line=exc.line, field="reward", hint=exc.hint) from None
    judge.model.requires_grad_(False)
    return lambda prompts, completions: judge.scores(list(prompts), list(completions))
