"""Batches of padded tensors: pad to the longest sequence in the batch (not to max_length).

DPO batches put chosen and rejected in ONE tensor of 2B rows (chosen rows first, then rejected) so the
policy and the reference each need a single forward pass per batch. Reward-model batches flatten all
responses of all items (2 per pair, K per ranking) into one tensor and say, per item, which rows are its
responses, best first.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from preftune.core.logprobs import IGNORE_INDEX
from preftune.data.tokenize import TokenizedPair, TokenizedRanking, TokenizedSequence, TokenizedUnpaired


def pad_sequences(sequences: Sequence[Sequence[int]], *, pad_value: int,
                  padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence: returns (ids [N, T] long, attention_mask [N, T] long)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    longest = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def _ids_labels(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], *, pad_token_id: int,
                padding_side: str) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_sequences(ids, pad_value=pad_token_id, padding_side=padding_side)
    padded_labels, _ = pad_sequences(labels, pad_value=IGNORE_INDEX, padding_side=padding_side)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": padded_labels}


def _optional(values: Sequence[float | None]) -> torch.Tensor:
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)


def _who(items: Sequence[Any]) -> dict[str, Any]:
    """``annotator`` and ``group`` per item, as lists of str | None (not tensors: they are labels)."""
    return {"annotator": [getattr(i, "annotator", None) for i in items],
            "group": [getattr(i, "group", None) for i in items]}


def collate_pairs(items: Sequence[TokenizedPair], *, pad_token_id: int,
                  padding_side: str = "right") -> dict[str, Any]:
    """B pairs -> ``input_ids``/``attention_mask``/``labels`` [2B, T]: rows 0..B-1 chosen, B..2B-1 rejected.

    Adds ``margin`` [B] (NaN where a pair has none) when any pair has one, and ``ref_chosen_logps`` /
    ``ref_rejected_logps`` [B] when every pair carries cached reference log-probs. ``annotator`` and
    ``group`` are lists of B strings or None (who labelled each pair; group-robust DPO reads ``group``).
    """
    batch = _ids_labels([p.chosen_input_ids for p in items] + [p.rejected_input_ids for p in items],
                        [p.chosen_labels for p in items] + [p.rejected_labels for p in items],
                        pad_token_id=pad_token_id, padding_side=padding_side)
    if any(p.margin is not None for p in items):
        batch["margin"] = _optional([p.margin for p in items])
    if items and all(p.ref_chosen_logps is not None and p.ref_rejected_logps is not None for p in items):
        batch["ref_chosen_logps"] = _optional([p.ref_chosen_logps for p in items])
        batch["ref_rejected_logps"] = _optional([p.ref_rejected_logps for p in items])
    batch.update(_who(items))
    return batch


def collate_unpaired(items: Sequence[TokenizedUnpaired], *, pad_token_id: int,
                     padding_side: str = "right") -> dict[str, Any]:
    """B unpaired examples (KTO) -> ``input_ids``/``attention_mask``/``labels`` [B, T] (prompt + completion),
    ``kl_input_ids``/``kl_attention_mask``/``kl_labels`` [B, T'] (prompt + another example's completion, for
    the KL estimate), ``desirable`` [B] bool; ``ref_logps`` / ``ref_kl_logps`` [B] when every item carries
    cached reference log-probs; ``annotator`` and ``group`` as lists."""
    batch = _ids_labels([i.input_ids for i in items], [i.labels for i in items], pad_token_id=pad_token_id,
                        padding_side=padding_side)
    kl = _ids_labels([i.kl_input_ids for i in items], [i.kl_labels for i in items], pad_token_id=pad_token_id,
                     padding_side=padding_side)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    batch["desirable"] = torch.tensor([bool(i.desirable) for i in items], dtype=torch.bool)
    if items and all(i.ref_logps is not None and i.ref_kl_logps is not None for i in items):
        batch["ref_logps"] = _optional([i.ref_logps for i in items])
        batch["ref_kl_logps"] = _optional([i.ref_kl_logps for i in items])
    batch.update(_who(items))
    return batch


def collate_responses(items: Sequence[TokenizedPair | TokenizedRanking], *, pad_token_id: int,
                      padding_side: str = "right") -> dict[str, Any]:
    """Pairs and rankings for a reward model: every response of every item in one [N, T] tensor.

    ``response_index`` [B, K] gives the rows of item b's responses best first (a pair is K=2: chosen,
    rejected), ``response_mask`` [B, K] marks the real ones, ``margin`` [B] is NaN where absent, and
    ``is_ranking`` [B] says which items are rankings (pairs use the Bradley-Terry loss, rankings the
    all-pairs InstructGPT loss). ``annotator`` and ``group`` are lists of B strings or None (the unit of
    a reward mixture's EM is the annotator).
    """
    sequences: list[list[int]] = []
    groups: list[list[int]] = []
    for item in items:
        responses = item.input_ids if isinstance(item, TokenizedRanking) else [item.chosen_input_ids,
                                                                                item.rejected_input_ids]
        groups.append(list(range(len(sequences), len(sequences) + len(responses))))
        sequences.extend(responses)
    input_ids, attention_mask = pad_sequences(sequences, pad_value=pad_token_id, padding_side=padding_side)
    width = max(len(g) for g in groups)
    index = torch.zeros((len(items), width), dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.bool)
    for b, group in enumerate(groups):
        index[b, : len(group)] = torch.as_tensor(group)
        mask[b, : len(group)] = True
    return {
        "input_ids": input_ids, "attention_mask": attention_mask,
        "response_index": index, "response_mask": mask,
        "margin": _optional([None if isinstance(i, TokenizedRanking) else i.margin for i in items]),
        "is_ranking": torch.tensor([isinstance(i, TokenizedRanking) for i in items], dtype=torch.bool),
        **_who(items),
    }


def collate_sft(items: Sequence[TokenizedSequence], *, pad_token_id: int,
                padding_side: str = "right") -> dict[str, torch.Tensor]:
    """SFT examples -> ``input_ids``/``attention_mask``/``labels`` [B, T] (labels -100 on pads and prompts)."""
    return _ids_labels([s.input_ids for s in items], [s.labels for s in items],
                       pad_token_id=pad_token_id, padding_side=padding_side)


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, *,
                         mega_batch_factor: int = 50) -> list[int]:
    """An epoch's order of example indices in which each run of ``batch_size`` has similar lengths.

    Shuffle (seeded), cut into mega-batches of ``batch_size * mega_batch_factor``, sort each by length
    (longest first), cut into batches, shuffle the batches, and put the batch holding the longest example
    first (an out-of-memory shows at step 0, not hours in); an incomplete batch stays last. Less padding,
    still random.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * mega_batch_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    short = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    batches += short  # the one incomplete batch stays last, so every run of batch_size is one batch
    return [i for batch in batches for i in batch]


def item_length(item: Any) -> int:
    """Length used for length grouping: the longest sequence of the item."""
    if isinstance(item, TokenizedSequence):
        return len(item.input_ids)
    return int(item.length)


def row_lengths(item: Any) -> list[int]:
    """The rows an item adds to its collated batch, as lengths: 1 (SFT), 2 (a pair), K (a ranking)."""
    if isinstance(item, TokenizedSequence):
        return [len(item.input_ids)]
    if isinstance(item, TokenizedPair):
        return [len(item.chosen_input_ids), len(item.rejected_input_ids)]
    if isinstance(item, TokenizedRanking):
        return [len(ids) for ids in item.input_ids]
    return [item_length(item)]


def real_token_share(rows: Sequence[Sequence[int]], batch_size: int) -> float:
    """Real tokens / padded positions when ``rows`` (the ``row_lengths`` of items, in order) are cut into
    batches of ``batch_size`` items and each batch is padded to its longest row, as the collate functions do."""
    real = padded = 0
    for start in range(0, len(rows), batch_size):
        batch = [n for item in rows[start:start + batch_size] for n in item]
        real += sum(batch)
        padded += len(batch) * max(batch, default=0)
    return real / padded if padded else 1.0
