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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from preftune.config import opt, require
from preftune.train.base import MethodSpec, OnlineConfig
from preftune.train.online import OnlineMethod, OnlineRecipe

if TYPE_CHECKING:
    import torch

    from preftune.train.rollout import Rollout


@dataclass
class RAFTConfig(OnlineConfig):
    """`preftune train raft`: reward-ranked fine-tuning, SFT on the best of K samples."""

    command: ClassVar[str] = "raft"

    output_dir: str = opt("runs/raft", "run directory: config.yaml, metrics.jsonl, samples.jsonl, final/")
    num_samples: int = opt(4, "completions sampled per prompt in each rollout (K)", ge=1)
    kl_coef: float = opt(0.0, "beta: rank by score - beta * sequence KL; 0 = by the score alone", ge=0,
                         why="a negative beta would rank completions higher the further they move from the reference")
    keep: str = opt("best_of_k", "best_of_k = the best sample of each prompt; top_fraction = the best "
                    "top_fraction of the whole rollout", choices=("best_of_k", "top_fraction"))
    top_fraction: float = opt(0.25, "with keep: top_fraction, the share of the rollout kept", gt=0, le=1)

    def validate(self) -> None:
        super().validate()
        require(self, "num_samples", self.keep == "top_fraction" or self.num_samples >= 2,
                 "must be >= 2 to keep the best of K")
        rows = self.batch_size * self.grad_accum * self.num_mini_batches * self.num_samples
        require(self, "top_fraction", self.keep != "top_fraction"
                 or round(self.top_fraction * rows) >= self.grad_accum * self.num_mini_batches,
                 f"keeps {round(self.top_fraction * rows)} of a rollout's {rows} completions, fewer than "
                 f"one per micro-batch ({self.grad_accum * self.num_mini_batches}); raise it or batch_size")


# (4) keep the best of K (or the global top fraction) by the KL-regularised reward
def keep_best(ro: Rollout, c: RAFTConfig) -> tuple[list[dict[str, Any]], dict[str, float]]:
    import torch

    rank = ro.rewards.sum(-1)
    if c.keep == "best_of_k":
        groups = rank.reshape(-1, ro.num_samples)
        kept = (groups.argmax(-1) + torch.arange(groups.shape[0]) * ro.num_samples).tolist()
    else:
        kept = sorted(rank.topk(round(c.top_fraction * rank.numel())).indices.tolist())
    logs = {"raft/kept": float(len(kept)), "raft/kept_scores": float(ro.scores[kept].mean())}
    return ro.items(kept), logs


# (5) update: SFT on the kept completions, the NLL of each token
def nll_loss(logps: torch.Tensor, values: None, batch: dict[str, torch.Tensor],
             c: RAFTConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return -logps, {}


class RAFTMethod(OnlineMethod):
    """Reward-ranked fine-tuning (see the module docstring)."""

    # SFT trains the model's own distribution: the log-probs of the loss are at temperature 1
    recipe = OnlineRecipe(unit="token", value_network=False, advantages=keep_best, loss=nll_loss,
                          loss_at_temperature=False)


SPEC = MethodSpec("raft", RAFTConfig, RAFTMethod,
                  "Reward-ranked fine-tuning: sample K per prompt, keep the best (or the top fraction), SFT on them.")
