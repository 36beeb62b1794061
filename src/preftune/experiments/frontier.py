"""The reward-vs-KL frontier (``preftune experiment frontier``): every method on one task with a known
ground-truth reward, each final policy placed at (KL to the reference, mean reward) on held-out prompts.

The DPO paper's central comparison (Rafailov et al. 2023, Fig. 2 left): an ideal method reaches a high
reward at a small KL(pi || pi_ref), so its points lie up and to the left. The experiment:

1. preference data: ``preferences`` when given; else ``preference_samples`` completions per train prompt
   from the SFT model, scored by the ground-truth reward, the best and the worst of each prompt making
   one pair (prompts whose completions all tie are dropped, counted);
2. training, each run in ``OUTPUT_DIR/runs/NAME`` from the SFT model: DPO at each of ``dpo_betas``, PPO,
   RLOO and GRPO at each of their KL coefficients (online, against the ground-truth reward itself), online
   DPO at each of ``online_dpo_betas`` (pairs judged by the same reward, every step), RAFT, and the
   unlikelihood baseline (DPO family, ``loss: unlikelihood``); a run whose ``final/`` exists is skipped
   (an interrupted run resumes from its checkpoints, if it saved any);
3. measurement of each final policy and of the SFT model itself, on the held-out prompts:
   ``eval_samples`` completions per prompt sampled from the policy (the same seeds for every policy),
   the mean ground-truth reward, and the sequence-level KL estimated by those samples,
   ``KL(pi || pi_ref) ~ mean_y sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]``, with
   standard errors over the samples;
4. ``OUTPUT_DIR/frontier.json`` (config + one record per point) and ``OUTPUT_DIR/frontier.png``.

``frontier(config)`` takes a ``FrontierConfig``, a mapping of keys or a YAML path; ``reward_fn``,
``train_prompts`` and ``heldout_prompts`` may be given in memory instead of the keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.config import Config, check_choices, opt, require, to_dict
from preftune.errors import PreftuneError


@dataclass
class FrontierConfig(Config):
    """`preftune experiment frontier`: DPO, PPO, RLOO, GRPO, online DPO, RAFT and unlikelihood on one
    ground-truth reward."""

    @classmethod
    def label(cls) -> str:
        return "experiment frontier"

    model: str = opt("", "the SFT model every run starts from; also the reference of the KL (required)")
    train_prompts: str = opt("", "prompts to train on and to sample preference data from (required)")
    heldout_prompts: str = opt("", "held-out prompts on which reward and KL are measured (required)")
    reward: str = opt("", "ground-truth reward: module:function or file.py:function (prompt, completion) -> "
                      "float, or a reward model (required)")
    output_dir: str = opt("runs/frontier", "frontier.json, frontier.png, preferences.jsonl, runs/NAME/")
    preferences: str | None = opt(None, "preference pairs for DPO and unlikelihood; null = sample them")
    preference_samples: int = opt(4, "completions per train prompt when sampling preferences (best vs worst)")
    dpo_betas: list[float] = opt([0.05, 0.1, 0.5], "one DPO run per beta; [] = none")
    ppo_kl_coefs: list[float] = opt([0.02, 0.05, 0.2], "one PPO run per KL coefficient; [] = none")
    rloo_kl_coefs: list[float] = opt([0.02, 0.05, 0.2], "one RLOO run per KL coefficient; [] = none")
    grpo_kl_coefs: list[float] = opt([0.04], "one GRPO run per KL coefficient (its k3 term in the loss; 0 = no "
                                     "KL term); [] = none")
    online_dpo_betas: list[float] = opt([0.1], "one online-DPO run per beta; [] = none")
    common: dict[str, Any] = opt({}, "keys given to every training run (max_steps, learning_rate, dtype, ...)")
    dpo: dict[str, Any] = opt({}, "keys of the DPO runs (and of the unlikelihood run)")
    ppo: dict[str, Any] = opt({}, "keys of the PPO runs")
    rloo: dict[str, Any] = opt({}, "keys of the RLOO runs")
    grpo: dict[str, Any] = opt({}, "keys of the GRPO runs")
    online_dpo: dict[str, Any] = opt({}, "keys of the online-DPO runs")
    raft: dict[str, Any] | None = opt({}, "keys of the RAFT run; null = no RAFT run")
    unlikelihood: dict[str, Any] | None = opt({}, "keys of the unlikelihood run (over `dpo`); null = none")
    max_new_tokens: int = opt(32, "completion length for preference sampling, online training and measurement")
    temperature: float = opt(1.0, "sampling temperature of the same three")
    template: str = opt("raw", "prompt template: raw, chat, tldr or a format string containing {prompt}")
    max_length: int = opt(512, "prompt + completion tokens at most")
    eval_samples: int = opt(4, "completions per held-out prompt for the measurement")
    generation_batch_size: int = opt(32, "completions per generate call")
    seed: int = opt(0, "seed of the preference samples and the measurement samples")

    def validate(self) -> None:
        check_choices(self)
        for key in ("model", "output_dir"):
            require(self, key, bool(getattr(self, key)), "is required")
        for key in ("preference_samples", "eval_samples", "generation_batch_size", "max_new_tokens"):
            require(self, key, getattr(self, key) >= 1, "must be >= 1")
        require(self, "preference_samples", self.preference_samples >= 2, "must be >= 2 (best vs worst)")
        require(self, "temperature", self.temperature > 0, "must be > 0")
        require(self, "max_new_tokens", self.max_new_tokens < self.max_length, "must be < max_length")
        for key in ("dpo_betas", "ppo_kl_coefs", "rloo_kl_coefs", "grpo_kl_coefs", "online_dpo_betas"):
            require(self, key, all(v >= 0 for v in getattr(self, key)), "must hold numbers >= 0")
        for key in ("dpo_betas", "online_dpo_betas"):
            require(self, key, all(v > 0 for v in getattr(self, key)), "must hold numbers > 0")


@dataclass
class Run:
    name: str            # directory under OUTPUT_DIR/runs and label in the plot
    method: str          # sft (not trained), dpo, unlikelihood, ppo, rloo, grpo, online-dpo, raft
    command: str         # the `train` command (dpo for unlikelihood)
    param: str | None    # the swept key (beta, kl_coef) or None
    value: float | None
    keys: dict[str, Any]


def plan_runs(config: FrontierConfig) -> list[Run]:
    """The training runs of the experiment, in order, with the keys each gets (before data and paths)."""
    shared = {"model": config.model, **config.common}
    online = {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature,
              "template": config.template, "max_length": config.max_length}
    runs = [Run(f"dpo-beta{b:g}", "dpo", "dpo", "beta", b, {**shared, **config.dpo, "loss": "dpo", "beta": b})
            for b in config.dpo_betas]
    for method, coefs, keys in (("ppo", config.ppo_kl_coefs, config.ppo), ("rloo", config.rloo_kl_coefs, config.rloo),
                                ("grpo", config.grpo_kl_coefs, config.grpo)):
        runs += [Run(f"{method}-kl{c:g}", method, method, "kl_coef", c, {**shared, **online, **keys, "kl_coef": c})
                 for c in coefs]
    runs += [Run(f"online-dpo-beta{b:g}", "online-dpo", "online-dpo", "beta", b,
                 {**shared, **online, **config.online_dpo, "beta": b}) for b in config.online_dpo_betas]
    if config.raft is not None:
        runs.append(Run("raft", "raft", "raft", None, None, {**shared, **online, **config.raft}))
    if config.unlikelihood is not None:
        keys = {**shared, **config.dpo, **config.unlikelihood, "loss": "unlikelihood"}
        keys.pop("beta", None)
        runs.append(Run("unlikelihood", "unlikelihood", "dpo", None, None, keys))
    return runs


# ------------------------------------------------------------------------------------------------ the experiment


def frontier(config: FrontierConfig | dict[str, Any] | str | Path, *, reward_fn: Callable[[str, str], float] | None = None,
             train_prompts: list[Any] | None = None, heldout_prompts: list[Any] | None = None,
             log: Callable[[str], None] = print, **overrides: Any) -> dict[str, Any]:
    """Run the experiment (see the module docstring); returns what ``frontier.json`` holds."""
    from preftune.config import from_mapping, load_config
    from preftune.data.prompts import load_prompts
    from preftune.models.rewards import load_scorer

    if isinstance(config, (str, Path)):
        config = load_config(FrontierConfig, config)  # type: ignore[arg-type]
    if isinstance(config, dict):
        config = from_mapping(FrontierConfig, config)  # type: ignore[arg-type]
    if overrides:
        config = from_mapping(FrontierConfig, {**to_dict(config), **overrides})  # type: ignore[arg-type]
    for key, given in (("train_prompts", train_prompts), ("heldout_prompts", heldout_prompts), ("reward", reward_fn)):
        if given is None and not getattr(config, key):
            raise PreftuneError("is required (or pass it to frontier() in memory)", field=key)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts = list(train_prompts) if train_prompts is not None else load_prompts(config.train_prompts)
    heldout_prompts = list(heldout_prompts) if heldout_prompts is not None else load_prompts(config.heldout_prompts)
    scorer = load_scorer(reward_fn if reward_fn is not None else config.reward)
    preferences = config.preferences or str(_sample_preferences(config, train_prompts, scorer, out, log))

    runs = plan_runs(config)
    for number, run in enumerate(runs, start=1):
        done = _train(run, config, out, preferences=preferences, prompts=train_prompts, reward_fn=reward_fn,
                      log=lambda message, n=number: log(f"[{n}/{len(runs)}] {message}"))
        log(f"[{number}/{len(runs)}] {run.name}: {done}")
    points = _measure_all([Run("sft", "sft", "", None, None, {}), *runs], config, out, heldout_prompts, scorer, log)
    result = {"config": to_dict(config), "preferences": preferences, "points": points}
    (out / "frontier.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    from preftune.plots import frontier_plot

    frontier_plot(points, out / "frontier.png", title=f"reward vs KL to the reference ({config.model})")
    log(f"wrote {out / 'frontier.json'} and {out / 'frontier.png'}")
    return result


def _sample_preferences(config: FrontierConfig, prompts: list[Any], scorer: Any, out: Path, log: Any) -> Path:
    """``OUTPUT_DIR/preferences.jsonl``: best vs worst of K SFT completions per prompt (kept if it exists)."""
    from preftune.generate import GenerationSettings, generate_completions
    from preftune.models import load_policy, load_tokenizer

    path = out / "preferences.jsonl"
    if path.is_file():
        log(f"preference data: {path} (exists)")
        return path
    tokenizer = load_tokenizer(config.model)
    policy = load_policy(config.model, dtype=config.common.get("dtype", "auto"), tokenizer=tokenizer).to(_device())
    settings = GenerationSettings(temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                                  seed=config.seed, template=config.template)
    records = generate_completions(policy, tokenizer, prompts, num=config.preference_samples, settings=settings,
                                   batch_size=config.generation_batch_size)
    scores = scorer([r["prompt"] for r in records], [r["completion"] for r in records])
    k, rows, ties = config.preference_samples, [], 0
    for start in range(0, len(records), k):
        group = sorted(zip(scores[start:start + k], range(k), strict=True), key=lambda pair: -pair[0])
        (best, i), (worst, j) = group[0], group[-1]
        if best == worst:
            ties += 1
            continue
        rows.append({"prompt": records[start]["prompt"], "chosen": records[start + i]["completion"],
                     "rejected": records[start + j]["completion"], "score_chosen": best, "score_rejected": worst})
    if not rows:
        raise PreftuneError("every prompt's sampled completions tie under the reward: no preference pairs",
                            field="reward", hint="raise preference_samples or max_new_tokens, or give preferences")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    log(f"preference data: {len(rows)} pairs from {len(prompts)} prompts x {k} samples; {ties} prompts dropped "
        f"(all {k} completions tied) -> {path}")
    return path


def _train(run: Run, config: FrontierConfig, out: Path, *, preferences: str, prompts: list[Any],
           reward_fn: Any, log: Any) -> str:
    """Train one run unless its final model exists with the same keys; says which it did."""
    from preftune.train import METHODS, resolve_config
    from preftune.train.loop import train

    directory = out / "runs" / run.name
    keys = {**run.keys, "output_dir": str(directory)}
    if run.command == "dpo":
        keys = {"ref_cache_dir": str(out / "ref_cache"), **keys, "data": preferences}
    elif reward_fn is None:
        keys["reward"] = config.reward
    record = directory / "frontier_run.json"
    if (directory / "final").is_dir():
        saved = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
        if saved is not None and saved != _jsonable(keys):
            raise PreftuneError(f"run {run.name} finished with other keys than this config gives it",
                                path=str(record), hint=f"delete {directory} to retrain it, or use a new output_dir")
        return "finished before, skipped"
    log(f"training {run.name} ({run.command})")
    resolved = resolve_config(run.command, keys)
    directory.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(_jsonable(keys), indent=2), encoding="utf-8")
    cls = METHODS[run.command].method
    method = cls(prompts=prompts, reward_fn=reward_fn) if run.command != "dpo" else cls()
    return f"trained, {train(method, resolved)}"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------------------------------------------------ measurement


def _measure_all(runs: list[Run], config: FrontierConfig, out: Path, prompts: list[Any], scorer: Any,
                 log: Any) -> list[dict[str, Any]]:
    """One point per run (cached in runs/NAME/frontier_point.json for the same measurement settings)."""
    from rich.console import Console

    from preftune.generate import progress_bar
    from preftune.models import load_policy, load_tokenizer
    from preftune.train.rollout import evaluate_policy

    tokenizer, reference = None, None  # loaded when a point is not cached
    dtype = config.common.get("dtype", "auto")
    settings = {"eval_samples": config.eval_samples, "max_new_tokens": config.max_new_tokens, "seed": config.seed,
                "temperature": config.temperature, "template": config.template, "prompts": len(prompts)}
    points = []
    with progress_bar(len(runs), "measuring", enabled=Console(stderr=True).is_terminal) as advance:
        for run in runs:
            directory = out / "runs" / run.name
            cache = directory / "frontier_point.json"
            saved = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
            final = directory / "final" / "config.json"
            stamp = {**settings, "model_time": final.stat().st_mtime if final.is_file() else None}
            if saved.get("settings") == stamp:
                point = saved["point"]
            else:
                if reference is None:
                    tokenizer = load_tokenizer(config.model)
                    reference = load_policy(config.model, dtype=dtype, tokenizer=tokenizer).to(_device())
                policy = reference if run.method == "sft" else load_policy(
                    str(directory / "final"), dtype=dtype, tokenizer=tokenizer).to(_device())
                point = {"name": run.name, "method": run.method, "param": run.param, "value": run.value,
                         **evaluate_policy(policy, reference, tokenizer, prompts, scorer,
                                           num_samples=config.eval_samples, max_new_tokens=config.max_new_tokens,
                                           temperature=config.temperature, template=config.template,
                                           max_length=config.max_length, seed=config.seed,
                                           batch_size=config.generation_batch_size)}
                directory.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps({"settings": stamp, "point": point}, indent=2), encoding="utf-8")
            log(f"{run.name}: reward {point['reward']:.4f} +- {point['reward_se']:.4f}, "
                f"KL {point['kl']:.4f} +- {point['kl_se']:.4f}")
            points.append(point)
            advance(1)
    return points


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
