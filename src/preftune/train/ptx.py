"""PPO-ptx: supervised rows mixed into online training (Ouyang et al. 2022, Eq. 2, the
``gamma * E_x~D_pretrain[log pi(x)]`` term), so the policy keeps its language-modelling ability.

Each optimizer step takes its share of ``ptx_data`` in the loop's seeded order (the same plan as the
prompts), spreads the rows over the step's items, and adds ``ptx_coef * NLL / (the step's SFT tokens)``
to the method's loss; ``loss/ptx`` is the step's mean NLL per SFT token.
"""

from __future__ import annotations

from typing import Any


class PtxRows:
    """The SFT rows of ``ptx_data``, tokenised as ``train sft`` does (completion tokens only)."""

    def __init__(self, config: Any, tokenizer: Any, accelerator: Any, log: Any) -> None:
        from preftune.train.data import read_sft, tokenize_sft_items

        self.config, self.accelerator = config, accelerator
        self.items = tokenize_sft_items(tokenizer, read_sft(config.ptx_data, config, log), max_length=config.max_length,
                                        completion_only_loss=True, log=log, name="ptx")
        self.tokens = 1.0

    def attach(self, items: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
        """Spread this step's SFT rows over the step's items (round robin) and all-reduce their token count."""
        import torch

        from preftune.core.logprobs import IGNORE_INDEX
        from preftune.train.plan import process_share

        acc = self.accelerator
        share = process_share(len(self.items), step, config=self.config, process=acc.process_index,
                              num_processes=acc.num_processes)
        rows = [self.items[i] for i in share]
        items = [{**item, "ptx": []} for item in items]
        for k, row in enumerate(rows):
            items[k % len(items)]["ptx"].append(row)
        tokens = sum(sum(1 for label in row.labels[1:] if label != IGNORE_INDEX) for row in rows)
        total = torch.tensor(float(tokens), dtype=torch.float64, device=acc.device)
        self.tokens = max(acc.reduce(total, reduction="sum").item(), 1.0)
        return items

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """``ptx_coef * NLL / tokens`` of the batch's SFT rows and ``loss/ptx`` (a share of the step's mean
        NLL per SFT token); 0 and nothing when the batch has no SFT row."""
        if "ptx_input_ids" not in batch:
            return 0.0, {}
        from preftune.core.forward import forward_logits
        from preftune.core.logprobs import label_logps

        rows = {"input_ids": batch["ptx_input_ids"], "attention_mask": batch["ptx_attention_mask"]}
        nll = -label_logps(forward_logits(model, rows), batch["ptx_labels"]).sum()
        return self.config.ptx_coef * nll / self.tokens, {"loss/ptx": nll.detach() / self.tokens}
