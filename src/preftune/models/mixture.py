"""The module a reward mixture trains: several scalar reward models in one ``nn.Module``.

``train reward`` with ``mixtures: K`` fits K reward models by EM, and runs its ``em_restarts`` R restarts
side by side, so one module holds R x K reward models (component ``i = restart * K + k``), and the loop's
one optimizer, clipping and checkpoints cover them all. Two ways to hold them:

* full copies (no ``lora``): R x K copies of the reward model, P parameters each;
* LoRA (``lora`` set): one base model carrying R x K adapters, each with its own score head (peft's
  ``modules_to_save``), named ``mixture-i``: P + R x K x (adapter + head) parameters.
  ``component_scores`` switches the active adapter, and keeps every adapter trainable (peft's
  ``set_adapter`` would freeze the others, whose gradients of the same micro-batch are still to come).

``save_component`` writes one component as a complete ``AutoModelForSequenceClassification`` directory
(an adapter is merged into a copy of the base first).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch


class RewardMixture(torch.nn.Module):
    """``count`` reward models started from ``base`` (a reward model, or a peft reward model with LoRA)."""

    def __init__(self, base: torch.nn.Module, count: int) -> None:
        from preftune.models.load import is_peft

        super().__init__()
        self.count, self.adapters = count, is_peft(base)
        if self.adapters:
            config = base.peft_config[base.active_adapter]
            default = base.active_adapter
            for i in range(count):
                base.add_adapter(self.name(i), copy.deepcopy(config))
            base.set_adapter(self.name(0))
            base.delete_adapter(default)
            self.peft = base
            self._adapter_params = [p for n, p in base.named_parameters()
                                    if any(f".{self.name(i)}." in n for i in range(count))]
            self._activate(0)
        else:
            self.models = torch.nn.ModuleList([base] + [copy.deepcopy(base) for _ in range(count - 1)])

    @staticmethod
    def name(i: int) -> str:
        return f"mixture-{i}"

    def _activate(self, i: int) -> torch.nn.Module:
        """Component ``i`` as a module to call: its copy, or the base with adapter i active (all trainable)."""
        if not self.adapters:
            return self.models[i]
        if self.peft.active_adapter != self.name(i):
            self.peft.set_adapter(self.name(i))
        for p in self._adapter_params:
            p.requires_grad_(True)
        return self.peft

    def component_scores(self, i: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """r_i of each row [B] (float32): the score at the last real token (``sequence_scores``)."""
        from preftune.models.load import sequence_scores

        return sequence_scores(self._activate(i), input_ids, attention_mask)

    def save_component(self, i: int, path: Path, tokenizer: Any) -> None:
        """Component ``i`` as a complete ``AutoModelForSequenceClassification`` directory, with the tokenizer."""
        if self.adapters:
            self._activate(i)
            model = copy.deepcopy(self.peft).merge_and_unload()
        else:
            model = self.models[i]
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    def parameter_counts(self) -> dict[str, int]:
        """``total``: parameters held; ``per_component``: those of one stand-alone reward model (P);
        ``adapter``: one component's adapter and score head (0 for full copies)."""
        total = sum(p.numel() for p in self.parameters())
        if not self.adapters:
            return {"total": total, "per_component": total // self.count, "adapter": 0}
        adapter = sum(p.numel() for p in self._adapter_params) // self.count
        return {"total": total, "per_component": total - adapter * self.count, "adapter": adapter}
