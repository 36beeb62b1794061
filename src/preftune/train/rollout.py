"""Rollouts for the online methods: prompts -> sampled completions as token ids, their log-probs under
the policy and the reference, and their scores.

Layout of a rollout batch (as in TRL and torchtune): queries are LEFT-padded to a common width ``Tq`` and
responses RIGHT-padded after them, so every row's response starts at column ``Tq``::

    input_ids      [B, Tq + R]   <pad> <pad> q q q | y y y <eos> <pad>
    labels         [B, Tq + R]   -100 ...            | y y y <eos> -100     (the response tokens)
    response_mask  [B, R]        1 on the response tokens (up to and including EOS)

Log-probs take the one path of ``preftune.core.logprobs`` (positions from the attention mask, the same
numbering ``generate`` used, so a forward pass matches sampling; the one label shift); the logits at
column ``Tq - 1 + j`` predict response token ``j``, and ``response_logps`` returns them as [B, R]
without slicing the [B, T, V] logits. The policy is the temperature-scaled ``softmax(logits / temperature)`` everywhere (sampling,
log-probs, KL), so the gradient is that of the distribution that was sampled (top-k / top-p truncation,
when set, is not part of it, as in TRL).

Sampling is reproducible: each row draws with its own ``torch.Generator`` seeded from (seed, rollout,
row), through ``preftune.models.sampling.RowSampler``, so a rollout depends on the seed and the policy
only, not on the batch size or on what ran before (resume regenerates nothing, see ``online.py``).

Also here: the ``Rollout`` a method's advantages are computed from, ``samples.jsonl`` and
``evaluate_policy`` (reward and KL of a policy on held-out prompts, for the frontier experiment).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune.core.logprobs import IGNORE_INDEX
from preftune.data.jsonl import append_jsonl, truncate_jsonl
from preftune.errors import PreftuneError

# ------------------------------------------------------------------------------------------------ a rollout


@dataclass
class Rollout:
    """One process's rollout of N = P x K completions (the K samples of a prompt adjacent); token
    tensors are [N, R] over response tokens, right-padded, ``mask`` 1 on real tokens."""

    prompt_index: list[int]         # index into the method's prompts, per row
    queries: list[torch.Tensor]     # prompt token ids per row
    responses: list[torch.Tensor]   # response token ids per row (ending with EOS when it stopped)
    texts: list[str]                # decoded responses
    mask: torch.Tensor              # [N, R]
    logps: torch.Tensor             # [N, R] log pi_old(y_t), the policy that sampled
    ref_logps: torch.Tensor | None  # [N, R] log pi_ref(y_t); None when no reference is loaded (KL 0, not logged)
    values: torch.Tensor | None     # [N, R] V(s_t) of the value network (PPO)
    scores: torch.Tensor            # [N] r(x, y), several rewards' aggregate (minus missing_eos_penalty)
    kl: torch.Tensor                # [N, R] per-token KL estimate
    rewards: torch.Tensor           # [N, R] KL-shaped rewards (rl.shaped_rewards)
    ended: torch.Tensor             # [N] bool: stopped with EOS
    num_samples: int                # K
    reward_scores: dict[str, torch.Tensor] | None = None  # [N] raw score of each of several rewards, by name
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # a float64 tensor summed over every process

    def total(self, sums: torch.Tensor) -> torch.Tensor:
        """``sums`` (float64) summed over every process's rollout, on the CPU (one process: as it is).
        A collective: every process calls it, the same number of times."""
        return sums if self.reduce is None else self.reduce(sums).cpu()

    def items(self, rows: list[int] | None = None, **fields: torch.Tensor) -> list[dict[str, Any]]:
        """Training items of ``rows`` (all by default): query, response and each field, [N, R] tensors
        cut to the row's response length and [N] tensors as 0-d tensors."""
        rows = list(range(len(self.queries))) if rows is None else rows
        lengths = self.mask.sum(-1).long().tolist()
        out = []
        for i in rows:
            item: dict[str, Any] = {"query": self.queries[i], "response": self.responses[i]}
            for name, value in fields.items():
                item[name] = value[i, :lengths[i]].clone() if value.dim() == 2 else value[i].clone()
            out.append(item)
        return out


class SamplesFile:
    """``OUTPUT_DIR/samples.jsonl``: rows of rollouts (step, prompt, completion, score, reward, kl, ...).
    On resume, rows written after the checkpoint's step are dropped (they are written again), and so is a
    torn last line (a write cut off by a crash; said through ``log``)."""

    def __init__(self, path: Path, *, enabled: bool, every: int = 0, steps_per_rollout: int = 1,
                 log: Any = None) -> None:
        self.path, self.enabled, self.started, self.log = path, enabled, False, log
        self.every, self.steps_per_rollout = every, steps_per_rollout

    def due(self, rollout: int, step: int) -> bool:
        """Whether rollout ``rollout`` (starting at ``step``) is written: the first one, then one whenever
        a multiple of ``every`` steps falls within a rollout; never when ``every`` is 0."""
        every = self.every
        return bool(every) and (rollout == 0 or step // every != (step - self.steps_per_rollout) // every)

    def start(self, *, keep_before: int) -> None:
        truncate_jsonl(self.path, lambda record: record["step"] < keep_before, on_torn_tail=self.log)
        self.started = True

    def write(self, step: int, ro: Rollout, prompts: list[Any], *, limit: int) -> None:
        if not self.enabled:
            return
        seq_kl, reward = ro.kl.sum(-1), ro.rewards.sum(-1)
        append_jsonl(self.path, [
            {"step": step, "prompt": prompts[ro.prompt_index[i]], "sample": i % ro.num_samples,
             "completion": ro.texts[i], "score": float(ro.scores[i]),
             **({"kl": float(seq_kl[i])} if ro.ref_logps is not None else {}),  # no reference: no KL
             "rlhf_reward": float(reward[i]), "length": int(ro.mask[i].sum()), "eos": bool(ro.ended[i]),
             **({"reward_scores": {name: float(v[i]) for name, v in ro.reward_scores.items()}}
                if ro.reward_scores else {})}
            for i in range(min(limit, len(ro.texts)))])


# ------------------------------------------------------------------------------------------------ prompts


def encode_prompts(tokenizer: Any, prompts: Sequence[Any], *, template: str,
                   max_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids of each templated prompt, cut from the left to ``max_tokens``; and how many were cut."""
    from preftune.data.prompts import format_prompt

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
    """A 63-bit seed for one row of one rollout (``preftune.models.sampling.row_seed``); ``stream``
    separates independent uses (0: sampling, 1: the mini-batch order of a pass, 2 and 3: the starting
    policy's samples that standardise several rewards, and their prompts; ``train.multireward``)."""
    from preftune.models.sampling import row_seed

    return row_seed(seed, stream, rollout, row)


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
    """Left-padded queries + right-padded responses -> input_ids, attention_mask, labels [B, Tq + R]
    (the response tokens, -100 elsewhere), response_mask [B, R] and query_width (Tq)."""
    q = pad_rows(queries, value=pad_token_id, left=True).long()
    r = pad_rows(responses, value=pad_token_id).long()
    q_mask = pad_rows([torch.ones(len(x)) for x in queries], left=True)
    r_mask = response_lengths_mask([len(x) for x in responses], r.shape[1])
    width = q.shape[1]
    labels = torch.full((q.shape[0], width + r.shape[1]), IGNORE_INDEX, dtype=torch.long)
    labels[:, width:] = torch.where(r_mask.bool(), r, IGNORE_INDEX)
    return {"input_ids": torch.cat([q, r], 1), "attention_mask": torch.cat([q_mask, r_mask], 1).long(),
            "labels": labels, "response_mask": r_mask, "query_width": torch.tensor(width)}


def response_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor], *,
                   temperature: float = 1.0) -> torch.Tensor:
    """[B, R] log-probs of the response tokens under ``softmax(logits / temperature)`` (0 on padding),
    chunked (``preftune.core.logprobs.label_logps``: no fp32 [B, T, V] log-softmax)."""
    from preftune.core.logprobs import label_logps

    return response_columns(label_logps(logits, batch["labels"], temperature=temperature), batch)


def response_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor], *, temperature: float = 1.0) -> torch.Tensor:
    """[B, R] entropy of ``softmax(logits / temperature)`` at the positions that predict the response tokens
    (0 on padding), without gradient: each row's response columns in chunks (``core.rl.token_entropy``),
    so neither the [B, T, V] logits nor their response slice is copied to float32."""
    from preftune.core.rl import token_entropy

    width, mask = int(batch["query_width"]), batch["response_mask"]
    out = torch.zeros(mask.shape, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    for b, n in enumerate(mask.sum(-1).long().tolist()):
        out[b, :n] = token_entropy(logits[b, width - 1:width - 1 + n], temperature=temperature)
    return out


def response_columns(per_position: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The columns of a [B, T] per-position tensor that predict the response tokens: [B, R], masked."""
    width, r = int(batch["query_width"]), batch["response_mask"].shape[1]
    return per_position[:, width - 1:width - 1 + r] * batch["response_mask"].to(per_position.dtype)


def policy_response_logps(model: Any, batch: dict[str, torch.Tensor], *, temperature: float = 1.0) -> torch.Tensor:
    """[B, R] log-probs of a rollout batch's response tokens under ``model``, on packed rows when the batch
    carries a pack plan (``preftune.core.packing``), else on its padded rows."""
    from preftune.core.forward import forward_logits
    from preftune.core.packing import is_packed, packed_inputs

    if is_packed(batch):
        logits = model(**packed_inputs(model, batch), use_cache=False).logits
        return packed_response_outputs(logits, None, batch, temperature=temperature, entropy_temperature=None)[0]
    return response_logps(forward_logits(model, batch), batch, temperature=temperature)


def packed_response_outputs(logits: torch.Tensor, values: torch.Tensor | None, batch: dict[str, torch.Tensor], *,
                            temperature: float, entropy_temperature: float | None
                            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``response_logps``, ``response_columns`` of the values and ``response_entropy`` ([B, R] each) from the
    outputs of packed rows (``preftune.core.packing``): the plan's query slots are the positions that
    predict the response tokens, read there and put back in the rollout layout."""
    from preftune.core.logprobs import token_logps
    from preftune.core.packing import scatter_queries
    from preftune.core.rl import token_entropy

    slots, shape = batch["pack_query_slot"], batch["input_ids"].shape
    z = logits.reshape(-1, logits.shape[-1])[slots]  # [M, V]
    scaled = z / temperature if temperature != 1.0 else z
    logps = token_logps(scaled[None], batch["pack_query_target"][None])[0]
    out_logps = response_columns(scatter_queries(logps, batch, shape), batch)
    out_values = None
    if values is not None:
        out_values = response_columns(scatter_queries(values.float().reshape(-1)[slots], batch, shape), batch)
    entropy = None
    if entropy_temperature is not None:
        with torch.no_grad():
            entropy = response_columns(scatter_queries(token_entropy(z.detach(), temperature=entropy_temperature),
                                                       batch, shape), batch)
    return out_logps, out_values, entropy


def collate_items(items: list[dict[str, Any]], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Training items of a rollout -> the rollout layout (``collate_rollout``) plus each item field:
    per-token fields [B, R], per-sequence fields [B]; PPO-ptx rows (an item's ``ptx``) as
    ``ptx_input_ids`` / ``ptx_attention_mask`` / ``ptx_labels``."""
    from preftune.data.collate import collate_sft

    batch = collate_rollout([i["query"] for i in items], [i["response"] for i in items], pad_token_id=pad_token_id)
    for name in (n for n in items[0] if n not in ("query", "response", "ptx")):
        values = [i[name] for i in items]
        batch[name] = pad_rows(values) if values[0].dim() == 1 else torch.stack(values)
    ptx = [row for i in items for row in i.get("ptx", [])]
    if ptx:
        rows = collate_sft(ptx, pad_token_id=pad_token_id, padding_side="right")
        batch.update({f"ptx_{k}": v for k, v in rows.items()})
    return batch


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
    after its first EOS. ``settings`` is a ``preftune.models.sampling.GenerationSettings``."""
    from transformers import GenerationConfig, LogitsProcessorList

    from preftune.models.sampling import RowSampler
    from preftune.train.sharded import is_sharded

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(policy.parameters()).device
    synced = is_sharded(policy)  # FSDP: each decoding step is collective, so all processes step until all end
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
                                        logits_processor=LogitsProcessorList([sampler]),
                                        synced_gpus=synced)[:, ids.shape[1]:].cpu()
            for row in generated:
                hits = (row == eos).nonzero()
                out.append(row[:int(hits[0]) + 1] if len(hits) else row)
    return out


@torch.no_grad()
def rollout_logps(model: Any, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], *,
                  pad_token_id: int, temperature: float, batch_size: int,
                  values: Any = None, packing: str = "") -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-row response log-probs (and per-token values of ``values``, a scalar-head model) without
    gradients and in eval mode, in batches of ``batch_size`` rows. Returns lists of 1-D tensors.
    ``packing`` (``"rows"``, ``"shared"``: the rows of one query share its computation; ``""``: padded
    rows) as the training passes run (``preftune.core.packing``)."""
    from preftune.core.forward import forward_logits
    from preftune.core.packing import packed_inputs, scatter_queries
    from preftune.models import token_scores

    device = next(model.parameters()).device
    logps: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []
    with evaluating(model, *([values] if values is not None else [])):
        for start in range(0, len(queries), batch_size):
            batch = collate_rollout(queries[start:start + batch_size], responses[start:start + batch_size],
                                    pad_token_id=pad_token_id)
            if packing:
                batch = pack_same_queries(batch, queries[start:start + batch_size], shared=packing == "shared")
            batch = {k: v.to(device) for k, v in batch.items()}
            lengths = batch["response_mask"].sum(-1).long().tolist()
            if packing:
                inputs = packed_inputs(model, batch)
                lp = packed_response_outputs(model(**inputs, use_cache=False).logits, None, batch,
                                             temperature=temperature, entropy_temperature=None)[0].cpu()
            else:
                lp = response_logps(forward_logits(model, batch), batch, temperature=temperature).cpu()  # >= fp32
            logps.extend(lp[i, :n] for i, n in enumerate(lengths))
            if values is not None:
                if packing:
                    per_slot = token_scores(values, inputs["input_ids"], inputs["attention_mask"],
                                            position_ids=inputs["position_ids"])
                    v = scatter_queries(per_slot.float().reshape(-1)[batch["pack_query_slot"]], batch,
                                        batch["input_ids"].shape)
                else:
                    v = token_scores(values, batch["input_ids"], batch["attention_mask"])
                v = response_columns(v.to(torch.promote_types(v.dtype, torch.float32)), batch).cpu()
                vals.extend(v[i, :n] for i, n in enumerate(lengths))
    return logps, (vals if values is not None else None)


def pack_same_queries(batch: dict[str, torch.Tensor], queries: Sequence[torch.Tensor], *,
                      shared: bool) -> dict[str, torch.Tensor]:
    """A rollout batch with its pack plan (``preftune.core.packing``); with ``shared``, the rows whose
    query is the same (GRPO's and RLOO's K completions of a prompt) compute it once."""
    from preftune.core.packing import add_packing

    same: dict[tuple[int, ...], list[int]] = {}
    for row, query in enumerate(queries):
        same.setdefault(tuple(query.tolist()), []).append(row)
    return add_packing(batch, groups=[rows for rows in same.values() if len(rows) > 1] if shared else ())


def rollout_statistics(ro: Rollout, beta: float, reduce: Any) -> dict[str, float]:
    """Means over every process's rollout (``reduce``: a sum over processes of a float64 tensor):
    sequence KL, entropy estimate, scores, the KL-regularised reward, length and EOS rate; ``_sequences``
    is their count (for the adaptive KL controller). Without a reference (``ro.ref_logps`` None) the KL
    is not measured: ``objective/kl`` and ``objective/non_score_reward`` are left out."""
    from preftune.core.rl import sequence_entropy_estimate

    sums = torch.stack([ro.kl.sum(-1).sum(), sequence_entropy_estimate(ro.logps, ro.mask).sum(), ro.scores.sum(),
                        ro.mask.sum(), ro.ended.float().sum(), torch.tensor(float(len(ro.queries)))]).double()
    kl, entropy, scores, length, eos, n = reduce(sums).tolist()
    measured = ({"objective/kl": kl / n, "objective/non_score_reward": -beta * kl / n}
                if ro.ref_logps is not None else {})
    return {**measured, "objective/entropy": entropy / n, "objective/rlhf_reward": (scores - beta * kl) / n,
            "objective/scores": scores / n, "objective/kl_coef": beta, "completions/mean_length": length / n,
            "completions/eos_rate": eos / n, "_sequences": n}


def policy_and_reference_logps(policy: Any, reference: Any, queries: Sequence[torch.Tensor],
                               responses: Sequence[torch.Tensor], *, value: Any, pad_token_id: int,
                               temperature: float, batch_size: int, with_reference: bool = True,
                               packing: str = "") -> tuple[list[Any], list[Any] | None, list[Any] | None]:
    """Per-row response log-probs under the policy that sampled (and the value network's values, when
    ``value`` is one) and under the reference (``reference``, or the policy with its LoRA adapter
    disabled when ``reference`` is None; none at all, None, when ``with_reference`` is False)."""
    from preftune.models import adapter_disabled

    kwargs = {"pad_token_id": pad_token_id, "temperature": temperature, "batch_size": batch_size, "packing": packing}
    logps, values = rollout_logps(policy, queries, responses, values=value, **kwargs)
    if not with_reference:
        return logps, values, None
    if reference is not None:
        return logps, values, rollout_logps(reference, queries, responses, **kwargs)[0]
    with adapter_disabled(policy) as base:
        return logps, values, rollout_logps(base, queries, responses, **kwargs)[0]


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
    from preftune.models.sampling import GenerationSettings

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
