"""Padding-free packing and prompt sharing: the same numbers as a padded batch, with no pads to compute.

A collated batch is ``N`` padded rows of ``T`` columns (``input_ids``, ``attention_mask``, ``labels``).
Real tokens are often half of the positions (a short chosen answer padded to its rejected twin) and a
DPO pair's prompt is computed twice. A *pack plan* (:func:`plan_packing`) says how to run the same tokens
as ``R`` rows of ``L`` slots without padding:

* every padded row becomes a *segment* of consecutive slots, its positions ``0, 1, 2, ...`` restarting
  at the segment, several segments per row (first-fit decreasing into rows of ``capacity`` slots);
* with ``groups`` (chosen row ``a`` and rejected row ``b`` of one DPO pair; the K responses of a
  reward model's pair or ranking), the longest common prefix of the rows' real tokens (the prompt, and
  more when the answers start alike) is one segment ``P`` computed once, followed by ``a``'s rest
  (segment ``A``, positions from ``|P|`` on) and ``b``'s rest (segment ``B``, same positions): ``B``
  attends to ``P`` and to itself, never to ``A``. Causal attention makes the hidden state of a prefix token depend on the prefix only,
  so ``P``'s states are exactly those both padded rows would have computed;
* attention is block-diagonal: slot ``i`` attends to slot ``j <= i`` when ``j`` is in the same segment
  or in the segment ``i``'s segment continues (its *parent*); a row's unused tail attends to itself.

The model runs once on the packed rows with that mask as a 4D tensor (``transformers`` passes a 4D mask
through unchanged to SDPA / eager attention) and positions from the plan. Then only the scored positions
go on: the plan lists, for every padded position ``(n, t)`` whose next token ``labels[n, t+1]`` is scored,
the packed slot whose hidden state predicts it (a shared prompt's last slot is listed twice: once for
the chosen answer's first token and once for the rejected's). The lm_head and the log-softmax run on
those ``M`` rows only (prompt positions are never projected to the vocabulary) and the log-probs are
scattered back to the padded ``[N, T]`` layout, so every loss, metric and sum downstream is unchanged.
The values equal the padded path's to float rounding (the matmuls see other shapes); the gradients too.

Reward models use the same plan with one query per row: the slot of its last real token, where the score
head is read (:func:`packed_scores`).

What it does not cover (the callers fall back to the padded path and say so): attention with a sliding
window shorter than a packed row, output heads that are not a plain ``torch.nn.Linear`` (LoRA on lm_head),
``logit_scale``, and attention implementations other than SDPA and eager (flash-attention takes
position ids, not a 4D mask).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

PACK_KEYS = ("pack_index", "pack_position_ids", "pack_segment", "pack_parent", "pack_query_slot",
             "pack_query_dest", "pack_query_target")


def _real_columns(attention_mask: Tensor) -> list[Tensor]:
    return [torch.nonzero(row, as_tuple=False).flatten() for row in attention_mask]


def _common_prefix(x: Tensor, y: Tensor) -> int:
    n = min(len(x), len(y))
    differ = torch.nonzero(x[:n] != y[:n], as_tuple=False)
    return int(differ[0]) if len(differ) else n


def plan_packing(input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None, *,
                 groups: Sequence[Sequence[int]] = (), capacity: int | None = None,
                 last_token_queries: bool = False) -> dict[str, Tensor]:
    """The pack plan of a padded batch, as ``pack_*`` tensors to add to the batch.

    ``labels`` (unshifted, -100 = not scored) give the log-prob queries; ``last_token_queries=True``
    gives one query per row instead, at its last real token (reward models). ``groups``: rows whose
    common prefix is computed once (a DPO pair; a ranking's K responses; each row in one group at most). ``capacity``: slots per packed row
    (at least the longest unit; default: the longest unit, so no row is longer than the longest
    prompt + chosen + rejected).

    Returned tensors (``R`` rows of ``L`` slots, ``M`` queries; flat indices are row-major):

    * ``pack_index`` [R, L]: flat index ``n * T + t`` of the padded token in each slot, -1 in a tail;
    * ``pack_position_ids`` [R, L], ``pack_segment`` [R, L] (-1 in a tail), ``pack_parent`` [R, L]
      (the segment a segment continues, -1 for none);
    * ``pack_query_slot`` [M]: flat slot ``r * L + l`` whose output is read;
    * ``pack_query_dest`` [M]: flat padded position ``n * T + t`` the value belongs to (log-probs: the
      position that predicts ``labels[n, t + 1]``, as in the padded path; scores: the row ``n``);
    * ``pack_query_target`` [M]: the token to score (0 for scores).
    """
    n_rows, width = input_ids.shape
    cols = _real_columns(attention_mask)
    ids = [input_ids[n, c] for n, c in enumerate(cols)]
    group_of: dict[int, int] = {}
    for g, rows_in_group in enumerate(groups):
        for n in rows_in_group:
            if n in group_of:
                raise ValueError(f"row {n} is in more than one group")
            group_of[n] = g
    # units: lists of (row, first real index, last real index + 1, parent: index of the unit's shared
    # prefix segment or None); a group's unit is [prefix of its first row, each row's rest]
    units: list[list[tuple[int, int, int, int | None]]] = []
    shared_rows: list[tuple[int, ...]] = []  # per unit, the rows whose prefix its first segment is
    for n in range(n_rows):
        if n in group_of:
            members = tuple(groups[group_of[n]])
            if n != members[0]:
                continue  # placed with the group's first row
            k = min(_common_prefix(ids[members[0]], ids[m]) for m in members[1:]) if len(members) > 1 else 0
            if k > 0:
                units.append([(members[0], 0, k, None), *((m, k, len(ids[m]), 0) for m in members)])
                shared_rows.append(members)
                continue
            for m in members:
                units.append([(m, 0, len(ids[m]), None)])
                shared_rows.append(())
            continue
        units.append([(n, 0, len(ids[n]), None)])
        shared_rows.append(())
    sizes = [sum(hi - lo for _, lo, hi, _ in unit) for unit in units]
    cap = max(max(sizes, default=1), 1, capacity or 0)
    # first-fit decreasing (stable on ties, so the plan is a pure function of the batch)
    rows: list[list[int]] = []
    room: list[int] = []
    for u in sorted(range(len(units)), key=lambda u: -sizes[u]):
        for r, free in enumerate(room):
            if sizes[u] <= free:
                rows[r].append(u)
                room[r] -= sizes[u]
                break
        else:
            rows.append([u])
            room.append(cap - sizes[u])
    length = max((cap - free for free in room), default=1)
    length = max(length, 1)
    index = torch.full((len(rows), length), -1, dtype=torch.long)
    position = torch.zeros((len(rows), length), dtype=torch.long)
    segment = torch.full((len(rows), length), -1, dtype=torch.long)
    parent = torch.full((len(rows), length), -1, dtype=torch.long)
    if labels is None and not last_token_queries:
        raise ValueError("plan_packing needs labels unless last_token_queries=True")
    slot_of = [torch.empty(len(c), dtype=torch.long) for c in cols]  # per padded row: real index -> flat slot
    next_segment = 0
    for r, members in enumerate(rows):
        at = 0
        for u in members:
            first_segment = next_segment
            for row, lo, hi, par in units[u]:
                span = slice(at, at + hi - lo)
                index[r, span] = row * width + cols[row][lo:hi]
                position[r, span] = torch.arange(lo, hi)
                segment[r, span] = next_segment
                if par is not None:
                    parent[r, span] = first_segment + par
                slots_here = torch.arange(r * length + at, r * length + at + hi - lo)
                for owner in (shared_rows[u] if par is None and shared_rows[u] else (row,)):
                    slot_of[owner][lo:hi] = slots_here  # a shared prefix: every member's slots
                at += hi - lo
                next_segment += 1
    slots: list[Tensor] = []
    dests: list[Tensor] = []
    targets: list[Tensor] = []
    for n in range(n_rows):
        c = cols[n]
        if last_token_queries:
            if len(c):
                slots.append(slot_of[n][-1:])
                dests.append(torch.tensor([n]))
                targets.append(torch.zeros(1, dtype=torch.long))
            continue
        row_labels = labels[n, c]
        scored = torch.nonzero(row_labels[1:] != -100, as_tuple=False).flatten()
        slots.append(slot_of[n][scored])
        dests.append(n * width + c[scored])
        targets.append(row_labels[scored + 1])
    joined = lambda parts: torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return {"pack_index": index, "pack_position_ids": position, "pack_segment": segment, "pack_parent": parent,
            "pack_query_slot": joined(slots), "pack_query_dest": joined(dests),
            "pack_query_target": joined(targets)}


def is_packed(batch: dict[str, Any]) -> bool:
    return "pack_index" in batch


def unpacked(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without its pack plan (the padded path)."""
    return {k: v for k, v in batch.items() if k not in PACK_KEYS}


def packing_mask(segment: Tensor, parent: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """[R, 1, L, L] attention mask of packed rows: slot ``i`` sees slot ``j <= i`` of its own segment or
    of its parent segment; a tail slot (segment -1) sees itself only. Boolean (True = attend), or, with
    a floating ``dtype``, additive (0 / the dtype's minimum) for eager attention."""
    length = segment.shape[-1]
    causal = torch.ones((length, length), dtype=torch.bool, device=segment.device).tril()
    seg_i, seg_j = segment[:, :, None], segment[:, None, :]
    allowed = ((seg_j == seg_i) | (seg_j == parent[:, :, None])) & (seg_j >= 0) & causal
    allowed |= torch.eye(length, dtype=torch.bool, device=segment.device)
    allowed = allowed[:, None]
    if dtype is None or dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)


def inner_model(model: Any) -> Any:
    """The Hugging Face model inside DDP / accelerate wrappers, an online method's policy-and-value
    module (its ``policy``) and peft's ``PeftModel`` (its base model, adapters still in place)."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    policy = getattr(inner, "policy", None)
    if isinstance(policy, torch.nn.Module):
        inner = policy
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) else inner


def _inner(model: Any) -> Any:
    return inner_model(model)


def _config(model: Any) -> Any:
    config = getattr(_inner(model), "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _attn_implementation(model: Any) -> str:
    config = getattr(_inner(model), "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def packing_unsupported(model: Any, *, longest_row: int | None = None) -> str | None:
    """Why packed rows would not give the padded path's numbers for ``model``, or None when they do."""
    impl = _attn_implementation(model)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (packing needs sdpa or eager: a 4D mask)"
    config = _config(model)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False and (longest_row is None
                                                                                or longest_row > window):
        return f"sliding-window attention (window {window})"
    return None


def packed_inputs(model: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` (4D) and ``position_ids`` of the packed rows, ready for the model."""
    flat = batch["input_ids"].reshape(-1)
    index = batch["pack_index"]
    ids = torch.where(index >= 0, flat[index.clamp(min=0)], flat.new_zeros(()))
    impl = _attn_implementation(model)
    mask_dtype = None if impl == "sdpa" else _compute_dtype(model)
    mask = packing_mask(batch["pack_segment"], batch["pack_parent"], dtype=mask_dtype)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": batch["pack_position_ids"]}


def _compute_dtype(model: Any) -> torch.dtype:
    device_type = next(_inner(model).parameters()).device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return next(_inner(model).parameters()).dtype


def scatter_queries(values: Tensor, batch: dict[str, Tensor], shape: Sequence[int]) -> Tensor:
    """Query values [M] into a zero tensor of ``shape`` (the padded layout) at ``pack_query_dest``."""
    out = values.new_zeros(int(torch.tensor(shape).prod()))
    return out.index_copy(0, batch["pack_query_dest"], values).reshape(*shape)


def packing_applies(config: Any, model: Any, log: Callable[[str], None], *, share_prompt: bool = False,
                    scores: bool = False) -> str:
    """How a run packs its micro-batches: ``"shared"`` (packed rows, a pair's prompt once), ``"rows"``
    (packed rows) or ``""`` (padded rows: the ``packing`` key is off, or the model is one the packed path
    does not reproduce exactly; then says why through ``log``). ``scores``: a reward model (its score
    head is read at the last token; the lm_head is not needed)."""
    from preftune.core.logprobs import lm_head_parts, sharded_launch

    if not getattr(config, "packing", False):
        return ""
    why = packing_unsupported(model, longest_row=2 * int(getattr(config, "max_length", 0) or 0) or None)
    if why is None and sharded_launch():
        why = "the launcher shards the parameters (FSDP, DeepSpeed ZeRO-3) and packed rows read the output head directly"
    if why is None and not scores and lm_head_parts(model) is None:
        why = ("the output head is not a plain, unsharded torch.nn.Linear without logit_scale (LoRA or "
               "modules_to_save on lm_head, FSDP)")
    if why is not None:
        log(f"packing: off for this model: {why}; training on padded rows (the same numbers, with the "
            "padding computed)")
        return ""
    return "shared" if share_prompt else "rows"


def pack_pairs(batch: dict[str, Any], mode: str, *, last_token_queries: bool = False) -> dict[str, Any]:
    """A collated batch of B pairs (rows b and B + b: chosen and rejected) with its pack plan for
    ``mode`` (:func:`packing_applies`; ``""`` returns the batch as it is)."""
    if not mode:
        return batch
    half = batch["input_ids"].shape[0] // 2
    groups = [(b, half + b) for b in range(half)] if mode == "shared" else ()
    return add_packing(batch, groups=groups, last_token_queries=last_token_queries)


def add_packing(batch: dict[str, Any], *, groups: Sequence[Sequence[int]] = (), capacity: int | None = None,
                last_token_queries: bool = False) -> dict[str, Any]:
    """``batch`` with its pack plan (:func:`plan_packing`) added."""
    batch.update(plan_packing(batch["input_ids"], batch["attention_mask"], batch.get("labels"), groups=groups,
                              capacity=capacity, last_token_queries=last_token_queries))
    return batch
