"""PPO: how a rollout becomes advantages, and a mini-batch of it a loss.

Steps (1)-(3) and (6) are ``preftune.train.online``'s (generate K completions with the current policy,
score them, KL-shape the rewards per token). PPO's own steps:

(4) advantages. Each response token is an action; the per-token rewards are
    ``R_t = -beta * KL_t (+ r(x, y) at the last token)``. A value network ``V`` (its own backbone and a
    scalar head, started from ``value_model``, the reward model or the policy's start) gives ``V(s_t)``
    at the rollout; GAE turns rewards and values into advantages ``A_t`` and returns ``G_t = A_t + V_t``
    (Schulman et al. 2016; Schulman et al. 2017, Eqs. 11-12); ``whiten_advantages`` normalises ``A``.
(5) update, ``update_epochs`` passes over the rollout in ``num_mini_batches`` optimizer steps each::

        ratio_t = pi(y_t) / pi_old(y_t)
        L_t     = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps))      (Schulman et al. 2017, Eq. 7)
                  + vf_coef * 1/2 max((V_t - G_t)^2, (V_clip,t - G_t)^2)     (value clipping, ppo2)
        loss    = sum over the step's response tokens of L_t / their number  (+ ptx_coef * SFT NLL)

The unit is the response token. Policy and value network are one ``nn.Module`` (``PolicyWithValue``), so
the loop's one optimizer, clipping and checkpoints cover both; ``save`` writes only the policy.

Metrics (token means): ``policy/clipfrac``, ``policy/approxkl``, ``val/ratio``, ``val/vpred``,
``val/clipfrac``, ``loss/policy``, ``loss/value``; per rollout: ``objective/*``, ``completions/*``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from preftune.config_online import PPOConfig
from preftune.errors import PreftuneError
from preftune.train.base import RunContext, StepOutput
from preftune.train.online import OnlineMethod, Rollout


class PolicyWithValue(torch.nn.Module):
    """The policy (causal LM) and the value network (scalar head per token) as one module."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module) -> None:
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                use_cache: bool = False, with_values: bool = True) -> SimpleNamespace:
        """``.logits`` [B, T, V] of the policy and ``.values`` [B, T] of the value network (None without)."""
        from preftune.models import token_scores

        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).logits
        values = token_scores(self.value, input_ids, attention_mask) if with_values else None
        return SimpleNamespace(logits=logits, values=values)

    def merge_and_unload(self) -> torch.nn.Module:
        """With LoRA: the policy with its adapter merged (what ``merge_lora`` saves)."""
        return self.policy.merge_and_unload()


class PPOMethod(OnlineMethod):
    """PPO with a value network and GAE (see the module docstring)."""

    unit = "token"

    def build_model(self, policy: Any, config: PPOConfig, ctx: RunContext) -> torch.nn.Module:
        from preftune.models import load_reward_model, load_tokenizer
        from preftune.train.rollout import is_function_spec

        source = config.value_model or (config.reward if config.reward and self._reward_fn is None
                                        and not is_function_spec(config.reward) else config.model)
        if source != config.model and load_tokenizer(source).get_vocab() != self.tokenizer.get_vocab():
            raise PreftuneError(f"the value network's start {source!r} has another tokenizer than the policy",
                                field="value_model", hint="set value_model to the policy's model (or null with a "
                                "reward model that shares the policy's tokenizer)")
        value = load_reward_model(source, dtype=config.dtype, lora=config.lora,
                                  gradient_checkpointing=config.gradient_checkpointing,
                                  trust_remote_code=config.trust_remote_code, tokenizer=self.tokenizer)
        ctx.log(f"value network started from {source}")
        return PolicyWithValue(policy, value)

    def generation_model(self, model: Any) -> Any:
        from preftune.models import unwrap

        return unwrap(model).policy

    def value_model(self, model: Any) -> Any:
        from preftune.models import unwrap

        return unwrap(model).value

    def lm_logits(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from preftune.models import position_ids_from_mask

        return model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), with_values=False).logits

    # (4) advantages: GAE on the KL-shaped per-token rewards
    def advantages(self, ro: Rollout) -> tuple[list[dict[str, Any]], dict[str, float]]:
        from preftune.core.rl import gae, whiten

        c: PPOConfig = self.config
        rewards = whiten(ro.rewards, ro.mask, shift_mean=False) if c.whiten_rewards else ro.rewards
        advantages, returns = gae(rewards, ro.values, ro.mask, gamma=c.gamma, lam=c.lam)
        if c.whiten_advantages:
            advantages = whiten(advantages, ro.mask)
        return ro.items(old_logps=ro.logps, old_values=ro.values, advantages=advantages, returns=returns), {}

    # (5) update: the clipped surrogate and the clipped value loss, summed over tokens
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, normaliser: float) -> StepOutput:
        from preftune.core.rl import approx_kl, clip_fraction, clipped_value_loss, ppo_policy_loss
        from preftune.models import position_ids_from_mask
        from preftune.train.rollout import response_columns, response_logps

        c: PPOConfig = self.config
        mask = batch["response_mask"]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=position_ids_from_mask(batch["attention_mask"]))
        logps = response_logps(out.logits, batch, temperature=c.temperature)
        vpred = response_columns(out.values.float(), batch)
        pg, ratio = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], clip_range=c.clip_range)
        vf, vclipped = clipped_value_loss(vpred, batch["old_values"], batch["returns"], clip_range=c.value_clip_range)
        total = ((pg + c.vf_coef * vf) * mask).sum() / normaliser
        ptx, ptx_metrics = self.ptx_loss(model, batch, normaliser=normaliser)
        metrics = {"policy/clipfrac": (clip_fraction(ratio, clip_range=c.clip_range) * mask).sum(),
                   "policy/approxkl": (approx_kl(logps, batch["old_logps"]) * mask).sum(),
                   "val/ratio": (ratio * mask).sum(), "val/vpred": (vpred.detach() * mask).sum(),
                   "val/clipfrac": (vclipped * mask).sum(), "loss/policy": (pg.detach() * mask).sum(),
                   "loss/value": (vf.detach() * mask).sum(), **ptx_metrics}
        return StepOutput(loss=total + ptx, metric_sums=metrics, logs=dict(self.buffer["logs"]))


def train_ppo(config: PPOConfig | dict[str, Any] | str | Path, *, prompts: list[Any] | None = None,
              reward_fn: Any = None, **overrides: Any) -> Path:
    """Run ``preftune train ppo`` from Python; returns ``OUTPUT_DIR/final``. ``prompts`` and
    ``reward_fn(prompt, completion) -> float`` replace the ``data`` and ``reward`` keys."""
    from preftune.train.loop import resolve_config, train

    return train(PPOMethod(prompts=prompts, reward_fn=reward_fn), resolve_config("ppo", config, **overrides))
