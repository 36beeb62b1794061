"""The module an online method trains: the policy, and for PPO a value network beside it.

One ``nn.Module`` holds both, so the loop's one optimizer, gradient clipping, checkpoints and DDP cover
the value network too; ``save_pretrained`` and ``merge_and_unload`` act on the policy alone, so the
final model is a plain causal LM.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch


class PolicyWithValue(torch.nn.Module):
    """The policy (a causal LM) and, optionally, a value network (a scalar head per token, PPO's V)."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.policy, self.value = policy, value
        # the blocks FSDP shards one by one (accelerate's transformer auto-wrap reads this list)
        self._no_split_modules = sorted({*(getattr(policy, "_no_split_modules", None) or ()),
                                         *(getattr(value, "_no_split_modules", None) or ())})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                use_cache: bool = False, with_values: bool = False) -> SimpleNamespace:
        """``.logits`` [B, T, V] of the policy and, ``with_values``, ``.values`` [B, T] of the value network
        (None otherwise). Positions come from the caller (``position_ids_from_mask``)."""
        from preftune.models.load import token_scores

        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).logits
        values = (token_scores(self.value, input_ids, attention_mask, position_ids=position_ids)
                  if with_values else None)
        return SimpleNamespace(logits=logits, values=values)

    def save_pretrained(self, path: Any, **kwargs: Any) -> None:
        """The policy only: the saved directory loads with ``AutoModelForCausalLM`` (a ``state_dict`` of the
        whole module, gathered from a sharded one, is cut to the policy's entries)."""
        if kwargs.get("state_dict") is not None:
            kwargs["state_dict"] = {k.removeprefix("policy."): v for k, v in kwargs["state_dict"].items()
                                    if k.startswith("policy.")}
        self.policy.save_pretrained(path, **kwargs)

    def merge_and_unload(self) -> torch.nn.Module:
        """With LoRA: the policy with its adapter merged (what ``merge_lora`` saves)."""
        return self.policy.merge_and_unload()


def load_value_network(source: str, *, config: Any, tokenizer: Any, log: Any) -> torch.nn.Module:
    """PPO's value network, a scalar-head model started from ``source`` (``config`` gives dtype, LoRA,
    gradient checkpointing); ``source`` must share the policy's ``tokenizer``."""
    from preftune.errors import PreftuneError
    from preftune.models.load import load_reward_model, load_tokenizer

    # the key `source` came from, for errors: value_model, else the reward model, else the policy's start
    field = next((k for k in ("value_model", "reward", "model") if getattr(config, k, None) == source), "value_model")
    if source != config.model and load_tokenizer(source, field=field).get_vocab() != tokenizer.get_vocab():
        raise PreftuneError(f"the value network's start {source!r} has another tokenizer than the policy",
                            field="value_model", hint="set value_model to the policy's model (or null with a "
                            "reward model that shares the policy's tokenizer)")
    value = load_reward_model(source, dtype=config.dtype, lora=config.lora,
                              gradient_checkpointing=config.gradient_checkpointing,
                              trust_remote_code=config.trust_remote_code, tokenizer=tokenizer, field=field)
    log(f"value network started from {source}")
    return value
