"""RAFT, reward-ranked fine-tuning (Dong et al. 2023): how a rollout becomes SFT data, and a
mini-batch of it a loss.

Steps (1)-(3) and (6) are ``preftune.train.online``'s. A completion's rank is its sequence-level
KL-regularised reward ``R_i = r(x, y_i) - beta * sum_t KL_t`` (``kl_coef`` defaults to 0 here: ranked by
the score alone, the KL still logged).

(4) selection instead of advantages, by ``keep``:
    * ``best_of_k``: the highest-ranked of the K samples of each prompt (Dong et al. 2023, Alg. 1);
    * ``top_fraction``: the best ``top_fraction`` of the process's whole rollout, across prompts.
(5) update: supervised fine-tuning on the kept completions, the negative log-likelihood of their
    tokens under the policy (as ``train sft``, Ouyang et al. 2022, Sec. 3.5), for ``update_epochs``
    passes in ``num_mini_batches`` steps each.

The unit is the response token. Per rollout it logs ``raft/kept`` (completions kept) and
``raft/kept_scores`` (their mean score) next to ``objective/*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from preftune.config_online import RAFTConfig
from preftune.train.base import StepOutput
from preftune.train.online import OnlineMethod, Rollout


class RAFTMethod(OnlineMethod):
    """Reward-ranked fine-tuning (see the module docstring)."""

    unit = "token"

    # (4) keep the best of K (or the global top fraction) by the KL-regularised reward
    def advantages(self, ro: Rollout) -> tuple[list[dict[str, Any]], dict[str, float]]:
        c: RAFTConfig = self.config
        rank = ro.rewards.sum(-1)
        if c.keep == "best_of_k":
            groups = rank.reshape(-1, ro.num_samples)
            kept = (groups.argmax(-1) + torch.arange(groups.shape[0]) * ro.num_samples).tolist()
        else:
            kept = sorted(rank.topk(round(c.top_fraction * rank.numel())).indices.tolist())
        logs = {"raft/kept": float(len(kept)), "raft/kept_scores": float(ro.scores[kept].mean())}
        return ro.items(kept), logs

    # (5) update: SFT on the kept completions
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, normaliser: float) -> StepOutput:
        from preftune.train.rollout import policy_logits, response_logps

        nll = -response_logps(policy_logits(model, batch), batch).sum()
        ptx, ptx_metrics = self.ptx_loss(model, batch, normaliser=normaliser)
        return StepOutput(loss=nll / normaliser + ptx, metric_sums=ptx_metrics, logs=dict(self.buffer["logs"]))


def train_raft(config: RAFTConfig | dict[str, Any] | str | Path, *, prompts: list[Any] | None = None,
               reward_fn: Any = None, **overrides: Any) -> Path:
    """Run ``preftune train raft`` from Python; returns ``OUTPUT_DIR/final``. ``prompts`` and
    ``reward_fn(prompt, completion) -> float`` replace the ``data`` and ``reward`` keys."""
    from preftune.train.loop import resolve_config, train

    return train(RAFTMethod(prompts=prompts, reward_fn=reward_fn), resolve_config("raft", config, **overrides))
