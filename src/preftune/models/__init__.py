"""Models of the flow of work: loading (hub id or local directory), LoRA, forward helpers, sampling,
rewards, and tiny in-process models (``preftune.models.tiny``).

The loaders and forward helpers of ``preftune.models.load`` are importable from here::

    from preftune.models import load_policy, load_tokenizer
"""

from preftune.models.load import (
    adapter_disabled,
    ensure_pad_token,
    freeze,
    hf_model,
    is_peft,
    last_token_index,
    load_policy,
    load_reference,
    load_reward_model,
    load_tokenizer,
    position_ids_from_mask,
    reference_from,
    resolve_dtype,
    score_texts,
    sequence_scores,
    token_scores,
    unwrap,
)

__all__ = [
    "adapter_disabled", "ensure_pad_token", "freeze", "hf_model", "is_peft", "last_token_index", "load_policy",
    "load_reference", "load_reward_model", "load_tokenizer", "position_ids_from_mask", "reference_from", "resolve_dtype", "score_texts",
    "sequence_scores", "token_scores", "unwrap",
]
