"""A model's forward pass to per-token log-probs: the one way from a batch to ``log pi(y_t | x, y_<t)``.

``model_label_logps`` (per token, in the batch's padded [B, T] layout) and ``batch_logps`` (summed per
row) call the model as a whole (DDP, peft and an online method's wrapper keep working) and take one of
three paths: the full logits (``forward_logits``, then ``preftune.core.logprobs.label_logps``), the fused
lm_head (``forward_hidden``, then ``token_logps_from_hidden``: never the [B, T, V] logits), or, when the
batch carries a pack plan (``preftune.core.packing``), padding-free packed rows whose hidden states are
read at the scored positions only (``packed_label_logps``). The maths of the log-probs is in
``preftune.core.logprobs``; the plan and the attention mask of packed rows in ``preftune.core.packing``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from preftune.core.logprobs import (
    IGNORE_INDEX,
    label_logps,
    lm_head_parts,
    next_token_labels,
    position_ids_from_mask,
    token_logps,
    token_logps_from_hidden,
)
from preftune.core.packing import inner_model, is_packed, packed_inputs, scatter_queries, unpacked


def forward_logits(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """The [B, T, V] logits of a causal LM on ``batch`` (``input_ids``, ``attention_mask``), positions
    from the mask. ``model`` may be wrapped (DDP, peft): it is called as a whole."""
    mask = batch["attention_mask"]
    return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                 use_cache=False).logits

def final_hidden(model: Any, **inputs: Any) -> Tensor:
    """The [B, T, H] final hidden states (after the last norm: what the lm_head multiplies) of a causal LM
    called as a whole with ``inputs`` (so DDP's gradient hooks and peft's adapters work).

    They are read from the output of the decoder inside the model (``base_model``: ``model.model`` of
    Llama, ``transformer`` of GPT-2), whose ``last_hidden_state`` is the normed one in every Hugging Face
    decoder, through a forward hook; the model is asked for the logits of one position only
    (``logits_to_keep=1``), so it never builds [B, T, V]. (``output_hidden_states`` is not used: what its
    last entry holds, before or after the final norm, differs between architectures.)"""
    captured: list[Tensor] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = inner_model(model).base_model.register_forward_hook(keep)
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]

def forward_hidden(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """The [B, T, H] final hidden states (:func:`final_hidden`) of a causal LM on ``batch``, positions from
    the mask, as :func:`forward_logits` calls the model."""
    mask = batch["attention_mask"]
    return final_hidden(model, input_ids=batch["input_ids"], attention_mask=mask,
                        position_ids=position_ids_from_mask(mask))

def model_label_logps(model: Any, batch: dict[str, Tensor], *, fused: bool = False, hits: bool = False,
                      chunk_size: int | None = None) -> tuple[Tensor, Tensor | None]:
    """[B, T] log-probs under ``model`` of a batch's labelled tokens (``input_ids``, ``attention_mask``,
    ``labels``), each at the position that predicts it, 0 where nothing is scored; and, with
    ``hits=True``, a [B, T] bool saying whether each labelled token is the model's arg-max there (False
    where nothing is scored; ``None`` without ``hits``).

    ``fused=False``: :func:`forward_logits`, then :func:`label_logps` (and ``logits.argmax``).
    ``fused=True`` (the ``fused_lm_head`` key): :func:`forward_hidden`, then the lm_head applied chunk by
    chunk in :func:`token_logps_from_hidden`, so neither the [B, T, V] logits nor their gradient is ever
    held; the values equal the unfused ones to the rounding of the matmul. Falls back to ``fused=False``
    when :func:`lm_head_parts` says the head cannot be fused.
    """
    labels = batch["labels"]
    if is_packed(batch):
        head = lm_head_parts(model)
        if head is not None:
            return packed_label_logps(model, batch, fused=fused, hits=hits, chunk_size=chunk_size, head_parts=head)
        batch = unpacked(batch)
    parts = lm_head_parts(model) if fused else None
    if parts is None:
        logits = forward_logits(model, batch)
        logps = label_logps(logits, labels, chunk_size=chunk_size)
        if not hits:
            return logps, None
        targets = next_token_labels(labels)
        return logps, (logits.detach().argmax(-1) == targets) & (targets != IGNORE_INDEX)
    weight, bias, softcap = parts
    return token_logps_from_hidden(forward_hidden(model, batch), weight, next_token_labels(labels),
                                   lm_head_bias=bias, softcap=softcap, chunk_size=chunk_size, hits=hits)

def batch_logps(model: Any, batch: dict[str, Tensor], *, fused: bool = False,
                chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Summed log-probs [B] of each row's labelled tokens and their counts [B]: the one way from a batch
    (``input_ids``, ``attention_mask``, ``labels``) to ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)``
    (Rafailov et al. 2023, Eq. 7). Left and right padding give the same values. ``fused``: see
    :func:`model_label_logps`."""
    per_token, _ = model_label_logps(model, batch, fused=fused, chunk_size=chunk_size)
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).to(per_token.dtype)
    return per_token.sum(-1), counts

def packed_hidden(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """[M, H] final hidden states (after the last norm) at the plan's query slots."""
    hidden = final_hidden(model, **packed_inputs(model, batch))
    return hidden.reshape(-1, hidden.shape[-1])[batch["pack_query_slot"]]

def packed_label_logps(model: Any, batch: dict[str, Tensor], *, fused: bool, hits: bool,
                       chunk_size: int | None, head_parts: tuple[Tensor, Tensor | None, float | None],
                       temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """``model_label_logps`` of a packed batch: [N, T] log-probs in the padded layout (0 where nothing is
    scored) and, with ``hits``, whether each scored token is the arg-max there."""
    hidden = packed_hidden(model, batch)
    targets = batch["pack_query_target"]
    weight, bias, softcap = head_parts
    shape = batch["input_ids"].shape
    if fused and temperature == 1.0:
        logps, hit = token_logps_from_hidden(hidden[None], weight, targets[None], lm_head_bias=bias,
                                             softcap=softcap, chunk_size=chunk_size, hits=hits)
        logps = logps[0]
        hit = None if hit is None else hit[0]
    else:
        logits = torch.nn.functional.linear(hidden, weight, bias)  # as the model's lm_head (autocast included)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if temperature != 1.0:
            logits = logits / temperature
        logps = token_logps(logits[None], targets[None], chunk_size=chunk_size)[0]
        hit = (logits.detach().argmax(-1) == targets) if hits else None
    per_token = scatter_queries(logps, batch, shape)
    if hit is None:
        return per_token, None
    return per_token, scatter_queries(hit, batch, shape).bool()

def packed_scores(model: Any, batch: dict[str, Tensor], head: torch.nn.Module) -> Tensor:
    """Score head output [N] at each row's last real token (a plan with ``last_token_queries``): the
    packed counterpart of ``sequence_scores``, read through a hook on ``head`` as that function does."""
    captured: list[Tensor] = []
    handle = head.register_forward_hook(lambda _m, _inp, out: captured.append(out))
    try:
        model(**packed_inputs(model, batch), use_cache=False)
    finally:
        handle.remove()
    per_slot = captured[-1][..., 0].reshape(-1)
    scores = scatter_queries(per_slot[batch["pack_query_slot"]], batch, (batch["input_ids"].shape[0],))
    return scores.to(torch.promote_types(scores.dtype, torch.float32))  # as models.load.sequence_scores
