"""Several rewards for the online methods (``rewards: [...]``), made into the one score r(x, y) that step (2)
of ``preftune.train.online`` hands to the KL shaping: MaxMin-RLHF (Chakraborty et al. 2024, "MaxMin-RLHF:
Alignment with Diverse Human Preferences", ICML) and its utilitarian, per-sample and weighted relatives.

Each rollout (``RewardSet.score``):

1. every reward r_u scores every (prompt, completion): a reward model or a function (``load_scorer``);
2. standardise: ``(r_u - m_u) / s_u``, with m_u and s_u the mean and standard deviation of r_u over
   ``reward_standardize_prompts`` prompts x ``num_samples`` completions of the STARTING policy (sampled
   before the first update, seeded by ``seed``: stream 3 picks the prompts, stream 2 samples). They stay
   fixed for the run, are written to ``OUTPUT_DIR/reward_stats.json`` and kept in every checkpoint, so a
   resumed run standardises with the same numbers. Rewards' scales are arbitrary (a Bradley-Terry model is
   defined up to a shift, a rule's range is its author's choice): without this the reward with the
   widest spread would dominate ``mean`` and ``weighted`` and would decide ``min`` and ``maxmin``;
3. aggregate (``preftune.core.rl.aggregate_rewards``): ``mean``, ``min`` (per sample), ``maxmin`` (every
   sample gets the reward of the group whose KL-regularised objective F_u = mean r_u - beta * KL, over
   the whole rollout of every process, is lowest: Algorithm 1) or ``weighted``;

then ``missing_eos_penalty`` applies to the aggregate, as to a single reward.

One reward (``rewards: [x]``, or an in-memory mapping of one) is exactly ``reward: x``: no standardisation
(nothing to put on a common scale), no aggregation; only ``objective/scores/<name>`` is logged besides.

Logs per rollout: ``objective/scores/<name>`` (the raw mean of each reward); with ``maxmin`` also
``maxmin/group`` (the index of the group optimised), ``maxmin/objective/<name>`` (F_u on the standardised
rewards) and ``maxmin/chosen/<name>`` (the share of the rollouts so far that optimised group u).

The config checks here are torch-free (``train/base.py`` imports them); torch loads inside the functions.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from preftune.config import fail, require
from preftune.errors import PreftuneError

AGGREGATIONS = ("mean", "min", "maxmin", "weighted")  # = preftune.core.rl.AGGREGATIONS (torch-free copy)
STATS_FILE = "reward_stats.json"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+\Z")  # a name goes into metric names: objective/scores/NAME
_SAMPLE_STREAM, _PROMPT_STREAM = 2, 3      # rollout_seed streams (0: rollouts, 1: mini-batch order)


def is_function_spec(spec: str) -> bool:
    """``module:function`` / ``file.py:function`` (as ``preftune.models.rewards.is_function_spec``, which
    this light module cannot import); a model directory or hub id otherwise."""
    if not spec or Path(spec).is_dir():
        return False
    module, sep, name = spec.rpartition(":")
    return bool(sep and module and name.isidentifier())


def default_reward_names(specs: Sequence[str]) -> list[str]:
    """A name per reward spec: a function's name (``rules.py:concise`` -> ``concise``), else the last part
    of the path or hub id that is not ``final`` (``runs/rm_a/final`` -> ``rm_a``); names that repeat get
    their position appended (``score_0``, ``score_1``)."""
    names = []
    for spec in specs:
        if is_function_spec(spec):
            name = spec.rpartition(":")[2]
        else:
            parts = [p for p in Path(spec.rstrip("/")).parts if p not in ("/", ".", "..", "final", "final-merged")]
            name = parts[-1] if parts else "reward"
        names.append(re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "reward")
    counts = Counter(names)
    return [f"{name}_{i}" if counts[name] > 1 else name for i, name in enumerate(names)]


# ------------------------------------------------------------------------------------------------ config checks


def check_reward_keys(c: Any) -> None:
    """The checks of ``reward``, ``rewards``, ``reward_names``, ``reward_aggregation`` and ``reward_weights``
    that need more than one key (``OnlineConfig.validate``); the count of rewards given in memory is
    checked again when training starts (``check_reward_count``)."""
    rewards = c.rewards
    require(c, "rewards", not (rewards is not None and c.reward), "cannot be used together with reward: set one "
            "of them (reward for one reward, rewards for several)")
    if rewards is not None:
        require(c, "rewards", len(rewards) > 0, "is an empty list: give one reward or more, or use reward")
        require(c, "rewards", all(spec.strip() for spec in rewards), "has an empty entry")
    if c.reward:
        require(c, "reward_aggregation", c.reward_aggregation == "mean",
                f"({c.reward_aggregation}) combines several rewards: list them under `rewards` instead of `reward`")
    require(c, "reward_names", c.reward_names is None or rewards is not None,
            "names the entries of `rewards`: set rewards (a reward given in memory is named by its mapping key)")
    require(c, "reward_weights", c.reward_weights is None or c.reward_aggregation == "weighted",
            f"is used only with reward_aggregation: weighted (not {c.reward_aggregation})")
    if c.reward_weights is not None:
        require(c, "reward_weights", all(w >= 0 for w in c.reward_weights) and sum(c.reward_weights) > 0,
                f"must be numbers >= 0 with a positive sum (got {c.reward_weights})")
    if rewards is not None:
        check_reward_count(c, len(rewards), names=c.reward_names or default_reward_names(rewards))


def check_reward_count(c: Any, count: int, *, names: Sequence[str], given: bool = False) -> None:
    """The keys that must match the number of rewards; ``names`` are the rewards' names (``given``: the
    keys of a mapping passed in memory)."""
    key = "reward_fn" if given else "reward_names"
    if c.reward_names is not None and not given:
        require(c, "reward_names", len(c.reward_names) == count,
                f"has {len(c.reward_names)} names for {count} rewards: give one name per entry of rewards")
    for name in names:
        if not _NAME.match(str(name)):
            fail(c, key, f"{name!r} cannot name a reward: use letters, digits, _, . and -",
                 "the name goes into the metric names objective/scores/NAME and maxmin/chosen/NAME")
    repeated = sorted(n for n, k in Counter(names).items() if k > 1)
    require(c, key, not repeated, f"names {', '.join(map(repr, repeated))} more than once: names must be unique")
    if c.reward_aggregation == "weighted":
        require(c, "reward_weights", c.reward_weights is not None,
                f"is required with reward_aggregation: weighted (one weight >= 0 per reward, {count} here)")
        require(c, "reward_weights", len(c.reward_weights) == count,
                f"has {len(c.reward_weights)} weights for {count} rewards: give one per reward")


def preflight_reward(c: Any, key: str, spec: str, *, label: str | None = None) -> None:
    """Before anything loads: a reward function's file (``file.py:fn``) exists; a reward-model directory
    holds a trained score head. Errors name ``key`` (``label``, e.g. ``rewards[1]``, in the message)."""
    prefix = f"{label} ({spec!r}): " if label else ""
    module, _, _ = spec.rpartition(":")
    if is_function_spec(spec) and module.endswith(".py") and not Path(module).expanduser().is_file():
        from preftune.models.load import missing_path_hint

        fail(c, key, f"{prefix}no such file: {module!r}",
             missing_path_hint(Path(module).expanduser(), "write module:function or path/to/file.py:function"))
    if Path(spec).expanduser().is_dir():
        from preftune.models.rewards import check_reward_checkpoint

        try:  # a language model without a trained score head: refused before the policy loads
            check_reward_checkpoint(str(Path(spec).expanduser()), field=key)
        except PreftuneError as exc:
            fail(c, key, prefix + exc.message, exc.hint)


# ------------------------------------------------------------------------------------------------ at run time


class RewardSet:
    """The run's rewards: scorers, names, the standardisation statistics and MaxMin's running counts."""

    def __init__(self, names: list[str], scorers: list[Callable[..., list[float]]], *, config: Any,
                 named: bool, specs: list[str] | None = None) -> None:
        self.names, self.scorers, self.config, self.named, self.specs = names, scorers, config, named, specs
        self.how, self.weights = config.reward_aggregation, config.reward_weights
        self.standardized = len(scorers) > 1 and config.reward_standardize_prompts > 0
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        self.chosen = [0] * len(names)  # maxmin: rollouts that optimised each group
        self.rollouts = 0

    @classmethod
    def load(cls, c: Any, given: Any, *, device: str, batch_size: int) -> RewardSet:
        """From the config (``reward`` or ``rewards``), or from ``given``: a callable (one reward) or a
        mapping name -> callable or spec (several; it replaces ``rewards`` and ``reward_names``)."""
        from preftune.models.rewards import load_scorer

        if isinstance(given, Mapping):
            names, specs, named = [str(n) for n in given], list(given.values()), True
            require(c, "reward_fn", len(specs) > 0, "is an empty mapping: give one reward or more")
            check_reward_count(c, len(specs), names=names, given=True)
        elif given is not None:
            names, specs, named = ["reward"], [given], False
        elif c.rewards:
            names, specs, named = list(c.reward_names or default_reward_names(c.rewards)), list(c.rewards), True
        else:
            names, specs, named = ["reward"], [c.reward], False
        field = "rewards" if named and not isinstance(given, Mapping) else "reward"
        scorers = [load_scorer(s, device=device, batch_size=batch_size, field=field) for s in specs]
        return cls(names, scorers, config=c, named=named,
                   specs=[s if isinstance(s, str) else getattr(s, "__name__", "function") for s in specs])

    # ---------------------------------------------------------------------------------------------- scoring
    def raw(self, prompts: Sequence[Any], texts: Sequence[str]) -> Any:
        """[R, N] float32: every reward's score of every (prompt, completion)."""
        import torch

        if not texts:
            return torch.zeros(len(self.scorers), 0)
        return torch.stack([torch.tensor(s(list(prompts), list(texts)), dtype=torch.float32) for s in self.scorers])

    def score(self, prompts: Sequence[Any], texts: Sequence[str], *, seq_kl: Any, kl_coef: float,
              reduce: Callable[[Any], Any]) -> tuple[Any, dict[str, float], dict[str, Any] | None]:
        """Step (2) for one process's rollout: (scores [N] float32, logs, each reward's raw scores or None).
        ``seq_kl`` [N] is each completion's KL sum, ``reduce`` sums a float64 tensor over processes."""
        import torch

        from preftune.core.rl import aggregate_rewards, maxmin_group, maxmin_objectives, standardize

        raw = self.raw(prompts, texts)
        if len(self.scorers) == 1:  # exactly `reward: x`
            logs = self._means(raw, raw, seq_kl, reduce)[0] if self.named else {}
            return raw[0], logs, ({self.names[0]: raw[0]} if self.named else None)
        if self.standardized:
            if self.mean is None or self.std is None:
                raise PreftuneError("the rewards' standardisation statistics are missing (neither computed at "
                                    "the first rollout nor restored from the checkpoint)")
            scaled = standardize(raw.double(), torch.tensor(self.mean, dtype=torch.float64),
                                 torch.tensor(self.std, dtype=torch.float64))
        else:
            scaled = raw.double()
        logs, scaled_means, mean_kl = self._means(raw, scaled, seq_kl, reduce)
        if self.how == "maxmin":  # every process chooses from the same global means: the same group
            objectives = maxmin_objectives(scaled_means, mean_kl, kl_coef=kl_coef)
            group = maxmin_group(objectives)
            self.chosen[group] += 1
            self.rollouts += 1
            logs["maxmin/group"] = float(group)
            for u, name in enumerate(self.names):
                logs[f"maxmin/objective/{name}"] = float(objectives[u])
                logs[f"maxmin/chosen/{name}"] = self.chosen[u] / self.rollouts
            scores = aggregate_rewards(scaled, "maxmin", objectives=objectives)
        else:
            scores = aggregate_rewards(scaled, self.how, self.weights)
        return scores.float(), logs, dict(zip(self.names, raw, strict=True))

    def _means(self, raw: Any, scaled: Any, seq_kl: Any, reduce: Callable[[Any], Any]) -> tuple[dict[str, float],
                                                                                               Any, float]:
        """Global means over every process's rollout: the logs ``objective/scores/<name>`` (raw), the
        means of the standardised rewards [R] and of the sequence KL."""
        import torch

        r = raw.shape[0]
        sums = reduce(torch.cat([raw.double().sum(1), scaled.double().sum(1), seq_kl.double().sum().reshape(1),
                                 torch.tensor([float(raw.shape[1])], dtype=torch.float64)])).cpu()
        n = float(sums[-1])
        logs = {f"objective/scores/{name}": float(sums[u]) / n for u, name in enumerate(self.names)}
        return logs, sums[r:2 * r] / n, float(sums[2 * r]) / n

    # ---------------------------------------------------------------------------------------------- statistics
    @property
    def needs_statistics(self) -> bool:
        return self.standardized and self.mean is None

    def fit_statistics(self, *, policy: Any, tokenizer: Any, queries: Sequence[Any], prompts: Sequence[Any],
                       settings: Any, accelerator: Any, batch_size: int, output_dir: Path, log: Any) -> None:
        """Each reward's mean and standard deviation over ``reward_standardize_prompts`` prompts (a seeded
        choice) x ``num_samples`` completions of ``policy`` (the starting policy: called before the first
        update), rows shared out over the processes and summed in float64; written to reward_stats.json."""
        import torch

        from preftune.train.rollout import rollout_seed, sample_responses

        c = self.config
        n = min(c.reward_standardize_prompts, len(queries))
        order = torch.randperm(len(queries), generator=torch.Generator().manual_seed(
            rollout_seed(c.seed, 0, 0, stream=_PROMPT_STREAM)))[:n].tolist()
        rows = [i for i in order for _ in range(c.num_samples)]
        mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
        with accelerator.autocast():
            responses = sample_responses(policy, tokenizer, [queries[rows[j]] for j in mine],
                                         seeds=[rollout_seed(c.seed, 0, j, stream=_SAMPLE_STREAM) for j in mine],
                                         settings=settings, batch_size=batch_size)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True) if responses else []
        raw = self.raw([prompts[rows[j]] for j in mine], texts).double()

        def total(x: torch.Tensor) -> torch.Tensor:
            return accelerator.reduce(x.to(accelerator.device), reduction="sum").cpu()

        sums = total(torch.cat([raw.sum(1), torch.tensor([float(len(mine))], dtype=torch.float64)]))
        count = float(sums[-1])
        mean = sums[:-1] / count
        std = (total((raw - mean[:, None]).pow(2).sum(1)) / max(count - 1.0, 1.0)).sqrt()
        for u, name in enumerate(self.names):
            if float(std[u]) < 1e-12:
                log(f"reward {name!r} is constant ({float(mean[u]):.6g}) on the starting policy's {int(count)} "
                    "samples: it is shifted by its mean but not scaled")
                std[u] = 1.0
        self.mean, self.std = mean.tolist(), std.tolist()
        log("rewards standardised on the starting policy's samples (" + ", ".join(
            f"{name}: mean {m:.4g}, std {s:.4g}" for name, m, s in zip(self.names, self.mean, self.std, strict=True))
            + f"; {n} prompts x {c.num_samples})")
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / STATS_FILE).write_text(json.dumps({
                "names": self.names, "rewards": self.specs, "mean": self.mean, "std": self.std, "prompts": n,
                "samples": len(rows), "seed": c.seed, "policy": c.model}, indent=1) + "\n", encoding="utf-8")

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "chosen": list(self.chosen), "rollouts": self.rollouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.std = state["mean"], state["std"]
        self.chosen, self.rollouts = list(state["chosen"]), int(state["rollouts"])
