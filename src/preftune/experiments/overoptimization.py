"""Reward-model overoptimization (``preftune experiment overoptimization``): the true reward of a policy
that optimises an imperfect reward model, measured along training as the policy moves away from SFT.

The course's quiz ("how does the performance curve look if the reward model r is not perfect?") and
exercise E.4 (RLHF follows a wrong reward model, DPO follows the data), after Gao et al. 2023, "Scaling
Laws for Reward Model Overoptimization": as the policy's KL to its start grows, the proxy reward it
optimises keeps rising, while the true ("gold") reward rises, peaks and falls. For RL they found the gold
reward's gain over the start to follow ``R(d) = d (alpha - beta log d)`` in ``d = sqrt(KL(pi || pi_init))``.

The experiment:

1. the online run: ``method`` (RLOO by default, PPO or GRPO) from ``model`` against ``proxy_reward`` with a
   small ``kl_coef`` (so it can run far), for ``steps`` steps, in ``OUTPUT_DIR/runs/METHOD``;
2. with ``preferences``: DPO on those labels from the same model, in ``OUTPUT_DIR/runs/dpo`` (E.4: the
   proxy reward model was learned from the same labels);
3. the measurement along each run (``Measurement``, the loop's ``after_step`` hook of ``measured(cls)``):
   before the first update (step 0), every ``measure_every`` steps and after the last one, on the held-out
   prompts: ``eval_samples`` completions per prompt (the same seeds every time), their mean proxy and true
   rewards, and the sequence KL to ``model`` estimated from them, with standard errors
   (``train.rollout.evaluate_policy``). Each measurement is a ``heldout/*`` line of the run's metrics.jsonl,
   kept or dropped with the checkpoints like every metric, so a resumed run neither repeats nor loses one;
4. ``OUTPUT_DIR/overoptimization.json``: the config, the curve of each run, where its true reward peaked
   and whether it then fell (last point vs peak, in standard errors), Gao's fit of the true curve; and
   ``OUTPUT_DIR/overoptimization.png``. A finished run is not trained again (its keys must be the same).

``overoptimization(config)`` takes an ``OveroptimizationConfig``, a mapping of keys or a YAML path; the
prompts (lists) and the rewards (callables ``fn(prompt, completion) -> float``) may be given in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.config import Config, check_fields, fail, opt, require, to_dict
from preftune.errors import PreftuneError

ONLINE_METHODS = ("rloo", "ppo", "grpo")
IN_MEMORY = ("train_prompts", "heldout_prompts", "proxy_reward", "true_reward")
PREFIX = "heldout/"  # the measurement's metrics.jsonl names: heldout/kl, heldout/proxy_reward, ...
POINT = ("kl", "kl_se", "proxy_reward", "proxy_se", "true_reward", "true_se", "length")
FELL_SE = 2.0  # "fell": the last point lies more than this many standard errors of the difference below the peak
FIT_R2 = 0.9  # Gao et al.'s form "explains" a curve (is reported by the CLI and drawn) from this r2 on
SHARED = ("max_new_tokens", "temperature", "template", "max_length")  # top-level keys the online run gets
SET_HERE = {  # keys of the run mappings that the experiment sets itself, and where to set them instead
    "model": "`model` is the start and the KL reference of every run",
    "ref_model": "`model` is the KL reference of every run",
    "output_dir": "each run writes to OUTPUT_DIR/runs/NAME",
    "data": "give train_prompts (online) or preferences (dpo)",
}
SET_HERE_ONLINE = {
    "reward": "set proxy_reward", "rewards": "set proxy_reward (one reward)", "kl_coef": "set kl_coef",
    "max_steps": "set steps", **{key: f"set {key} (the measurement uses it too)" for key in SHARED},
}


@dataclass
class OveroptimizationConfig(Config):
    """`preftune experiment overoptimization`: proxy and true reward along an online run (and DPO) against KL."""

    @classmethod
    def label(cls) -> str:
        return "experiment overoptimization"

    model: str = opt("", "the SFT model: the start of every run and the reference of the KL (required)")
    train_prompts: str = opt("", "prompts the online method trains on (required)")
    heldout_prompts: str = opt("", "held-out prompts the measurement samples on (required)")
    proxy_reward: str = opt("", "the imperfect reward the policy optimises: a learned reward model (directory or "
                            "hub id) or module:function (required)")
    true_reward: str = opt("", "the ground truth it is judged by: module:function or file.py:function "
                           "(prompt, completion) -> float, or a reward model (required)")
    method: str = opt("rloo", "the online method", choices=ONLINE_METHODS)
    steps: int = opt(100, "optimizer steps of the online run (and of DPO unless `dpo` sets max_steps or epochs)",
                     ge=1)
    measure_every: int = opt(10, "steps between measurements (plus step 0 and the last step)", ge=1)
    kl_coef: float = opt(0.01, "KL coefficient of the online run: small, so the policy can run far", ge=0,
                         why="a negative coefficient would reward moving away from the reference")
    preferences: str | None = opt(None, "preference pairs: when given, DPO on them is trained beside and "
                                  "measured the same way; null = the online run only")
    dpo_measure_every: int | None = opt(None, "steps between DPO's measurements; null = measure_every", ge=1)
    online: dict[str, Any] = opt({}, "keys of the online run (learning_rate, num_samples, batch_size, save_every, ...)")
    dpo: dict[str, Any] = opt({}, "keys of the DPO run (beta, learning_rate, batch_size, max_steps or epochs, ...)")
    eval_samples: int = opt(4, "completions per held-out prompt at each measurement", ge=1)
    max_new_tokens: int = opt(32, "completion length for online training and the measurement", ge=1)
    temperature: float = opt(1.0, "sampling temperature of the same two", gt=0)
    template: str = opt("raw", "prompt template: raw, chat, tldr or a format string containing {prompt}")
    max_length: int = opt(512, "prompt + completion tokens at most (also DPO's unless `dpo` sets it)", ge=2)
    generation_batch_size: int = opt(32, "completions per generate call of the measurement", ge=1)
    seed: int = opt(0, "seed of the measurement samples (each run's own seed is its `seed` key)", ge=0)
    output_dir: str = opt("runs/overoptimization", "overoptimization.json, overoptimization.png, runs/NAME/")

    def validate(self) -> None:
        from preftune.train import METHODS

        check_fields(self)
        if self.method not in METHODS:
            fail(self, "method", f"{self.method!r} is not a training method of this installation",
                 f"registered online methods: {', '.join(m for m in ONLINE_METHODS if m in METHODS)}")
        for key in ("model", "output_dir"):
            require(self, key, bool(getattr(self, key)), "is required")
        require(self, "max_new_tokens", self.max_new_tokens < self.max_length, "must be < max_length")
        for mapping, fixed in (("online", {**SET_HERE, **SET_HERE_ONLINE}), ("dpo", SET_HERE)):
            for key in getattr(self, mapping):
                if key in fixed:
                    fail(self, f"{mapping}.{key}", "is set by the experiment, not in this mapping", fixed[key])
        if self.preferences is None and self.dpo:
            fail(self, "dpo", "holds keys but no DPO run is trained without `preferences`",
                 "give preferences, or remove the dpo keys")


@dataclass
class Run:
    name: str                # OUTPUT_DIR/runs/NAME and the curve's name: the online method's, or dpo
    command: str             # the `train` command
    keys: dict[str, Any]     # its keys, before output_dir and the reward
    every: int               # steps between its measurements


def plan_runs(config: OveroptimizationConfig) -> list[Run]:
    """The online run, then DPO when ``preferences`` is given, with the keys each gets."""
    online = {"model": config.model, **{key: getattr(config, key) for key in SHARED}, **config.online,
              "kl_coef": config.kl_coef, "max_steps": config.steps}
    runs = [Run(config.method, config.method, online, config.measure_every)]
    if config.preferences:
        length = {} if "max_steps" in config.dpo or "epochs" in config.dpo else {"max_steps": config.steps}
        keys = {"model": config.model, "max_length": config.max_length, **length, **config.dpo,
                "data": config.preferences}
        runs.append(Run("dpo", "dpo", keys, config.dpo_measure_every or config.measure_every))
    return runs


def schedule(total_steps: int, every: int) -> list[int]:
    """The steps measured: 0, every, 2 every, ... and the last (``schedule(10, 4) == [0, 4, 8, 10]``)."""
    return sorted({*range(0, total_steps + 1, every), total_steps})


# ------------------------------------------------------------------------------------------------ the experiment


def overoptimization(config: OveroptimizationConfig | dict[str, Any] | str | Path, *,
                     log: Callable[[str], None] = print, **in_memory: Any) -> dict[str, Any]:
    """Run the experiment (see the module docstring); returns what ``overoptimization.json`` holds.

    ``in_memory``: ``train_prompts`` / ``heldout_prompts`` as lists and ``proxy_reward`` / ``true_reward`` as
    callables instead of the keys; any other keyword (or a string for those four) overrides a key.
    """
    from preftune.config import from_mapping, load_config
    from preftune.data.prompts import load_prompts
    from preftune.models.rewards import load_scorer

    given = {k: v for k, v in in_memory.items() if k in IN_MEMORY and not isinstance(v, (str, Path))}
    overrides = {k: v for k, v in in_memory.items() if k not in given}
    if isinstance(config, (str, Path)):
        config = load_config(OveroptimizationConfig, config)  # type: ignore[arg-type]
    if isinstance(config, dict):
        config = from_mapping(OveroptimizationConfig, config)  # type: ignore[arg-type]
    if overrides:
        config = from_mapping(OveroptimizationConfig, {**to_dict(config), **overrides})  # type: ignore[arg-type]
    for key in IN_MEMORY:
        if key not in given and not getattr(config, key):
            raise PreftuneError("is required (or pass it to overoptimization() in memory)", field=key)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts = list(given["train_prompts"] if "train_prompts" in given else load_prompts(config.train_prompts))
    heldout = list(given["heldout_prompts"] if "heldout_prompts" in given else load_prompts(config.heldout_prompts))
    if len(heldout) * config.eval_samples < 2:
        raise PreftuneError(f"{len(heldout)} held-out prompt(s) x eval_samples {config.eval_samples} is one "
                            "completion per measurement: no standard error", field="eval_samples",
                            hint="raise eval_samples or give more held-out prompts")
    proxy_fn = given.get("proxy_reward")
    sources = {key: "in memory" if key in given else getattr(config, key) for key in ("proxy_reward", "true_reward")}
    scorers = {key: load_scorer(given[key] if key in given else getattr(config, key), device=_device(), field=key,
                                batch_size=config.generation_batch_size) for key in ("proxy_reward", "true_reward")}

    curves: dict[str, list[dict[str, Any]]] = {}
    runs = plan_runs(config)
    for number, run in enumerate(runs, start=1):
        measurement = Measurement(heldout, proxy=scorers["proxy_reward"], true=scorers["true_reward"],
                                  every=run.every, reference=config.model, settings=_settings(config))
        done = _train(run, config, out, measurement, prompts=train_prompts, proxy_fn=proxy_fn, sources=sources,
                      log=lambda message, n=number: log(f"[{n}/{len(runs)}] {message}"))
        log(f"[{number}/{len(runs)}] {run.name}: {done}")
        curves[run.name] = read_curve(out / "runs" / run.name / "metrics.jsonl")
        if not curves[run.name]:
            raise PreftuneError(f"run {run.name} holds no measurements", path=str(out / "runs" / run.name),
                                hint="delete the run's directory to train and measure it again")
    result = {"config": to_dict(config), "x_axis": "KL(pi || pi_ref) in nats; Gao et al. plot against sqrt(KL)",
              "curves": curves, "peak": {name: find_peak(curve) for name, curve in curves.items()},
              "fit": {name: gao_fit(curve) for name, curve in curves.items()}}
    (out / "overoptimization.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    from preftune.plots import overoptimization_plot

    overoptimization_plot(curves, out / "overoptimization.png", peaks=result["peak"], fits=result["fit"],
                          title=f"proxy vs true reward ({config.method} with kl_coef {config.kl_coef:g})")
    for name, peak in result["peak"].items():
        log(f"{name}: true reward peaked at {peak['true_reward']:.4f} (step {peak['step']}, KL {peak['kl']:.3f}); "
            f"last {peak['final_true_reward']:.4f}, {'fell' if peak['fell'] else 'did not fall'} "
            f"({describe_drop(peak)})")
    log(f"wrote {out / 'overoptimization.json'} and {out / 'overoptimization.png'}")
    return result


def _settings(config: OveroptimizationConfig) -> dict[str, Any]:
    """The keywords of ``evaluate_policy`` (the same for every measurement of every run)."""
    return {"num_samples": config.eval_samples, "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature, "template": config.template, "max_length": config.max_length,
            "seed": config.seed, "batch_size": config.generation_batch_size}


def _train(run: Run, config: OveroptimizationConfig, out: Path, measurement: Measurement, *,
           prompts: list[Any], proxy_fn: Any, sources: dict[str, str], log: Any) -> str:
    """Train one run with the measurement hooked in, unless its final model exists; says which it did. A run
    (finished or not) started with other keys or measurement settings is refused."""
    from preftune.train import method_spec, resolve_config
    from preftune.train.loop import train

    directory = out / "runs" / run.name
    keys = {**run.keys, "output_dir": str(directory)}
    if run.command == "dpo":
        keys = {"ref_cache_dir": str(out / "ref_cache"), **keys}
    elif proxy_fn is None:
        keys["reward"] = config.proxy_reward
    stamp = _jsonable({"keys": keys, "measure": {**_settings(config), "every": run.every, "reference": config.model,
                                                 "heldout_prompts": measurement.prompts, **sources}})
    record = directory / "overoptimization_run.json"
    saved = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
    finished = (directory / "final").is_dir()
    if (saved is not None or finished) and saved != stamp:
        raise PreftuneError(f"run {run.name} was {'trained' if finished else 'started'} with other keys or "
                            "measurement settings than this config gives it", path=str(record if saved else directory),
                            hint=f"delete {directory} to train it again, or use a new output_dir")
    if finished:
        return "finished before, skipped"
    log(f"training {run.name} ({run.command}), measured at {len(measurement.prompts)} held-out prompts x "
        f"{config.eval_samples} samples every {run.every} steps")
    resolved = resolve_config(run.command, keys)
    directory.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(stamp, indent=2), encoding="utf-8")
    cls = measured(method_spec(run.command).method)
    method = cls(measurement) if run.command == "dpo" else cls(measurement, prompts=prompts, reward_fn=proxy_fn)
    return f"trained, {train(method, resolved)}"


def describe_drop(peak: Mapping[str, Any]) -> str:
    """The drop from the peak in standard errors, as the log and the CLI say it."""
    if peak["drop_in_se"] is None:
        return "no sampling noise"
    return f"{peak['drop_in_se']:.1f} standard errors"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------ measurement


class Measurement:
    """Proxy reward, true reward and KL to the reference on the held-out prompts, along one run: the policy
    before its first update (step 0, logged after step 1), then after every ``every``-th and the last step.
    Only the main process measures (the others return no records)."""

    def __init__(self, prompts: list[Any], *, proxy: Callable[..., list[float]], true: Callable[..., list[float]],
                 every: int, reference: str, settings: dict[str, Any]) -> None:
        self.prompts, self.proxy, self.true, self.every = prompts, proxy, true, every
        self.reference_path, self.settings = reference, settings
        self.first: dict[str, float] | None = None

    def setup(self, method: Any, ctx: Any) -> None:
        """After the method's own setup: the run's length, the tokenizer and the reference (the online
        method's frozen copy of the start when it has one, else ``reference`` loaded)."""
        from preftune.models import load_reference
        from preftune.train.plan import plan_steps

        c, acc = ctx.config, ctx.accelerator
        self.total = plan_steps(len(method.train_items), c, acc.num_processes,
                                updates_per_batch=getattr(method, "updates_per_batch", 1)).total_steps
        self.main, self.tokenizer, self.log = acc.is_main_process, method.tokenizer, ctx.log
        self.metrics = Path(ctx.output_dir) / "metrics.jsonl"
        self.reference = getattr(method, "reference", None)
        if self.reference is None and self.main:
            self.reference = load_reference(self.reference_path, dtype=c.dtype, tokenizer=self.tokenizer,
                                            field="model").to(acc.device)

    def before_step(self, model: Any, step: int) -> None:
        if step == 0 and self.main:
            self.first = self.measure(model, 0)

    def after_step(self, model: Any, step: int) -> list[dict[str, Any]]:
        """The records of step ``step``: step 0's after step 1 (unless a run restarted without a checkpoint
        kept it in metrics.jsonl), this step's when it is due."""
        if not self.main:
            return []
        records = []
        if step == 1 and self.first is not None and not read_curve(self.metrics):
            records.append({"step": 0, **self.first})
        if step % self.every == 0 or step == self.total:
            records.append(self.measure(model, step))
        return records

    def measure(self, model: Any, step: int) -> dict[str, float]:
        """One measurement of the policy inside ``model`` (``heldout/*`` values)."""
        import torch

        from preftune.models import unwrap
        from preftune.models.value import PolicyWithValue
        from preftune.train.rollout import evaluate_policy

        inner = unwrap(model)
        policy = inner.policy if isinstance(inner, PolicyWithValue) else inner
        true: list[float] = []

        def proxy_and_true(prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
            true.extend(self.true(prompts, completions))  # the same completions, scored by the ground truth
            return self.proxy(prompts, completions)

        m = evaluate_policy(policy, self.reference, self.tokenizer, self.prompts, proxy_and_true, **self.settings)
        scores = torch.tensor(true, dtype=torch.float64)
        true_se = float(scores.std(unbiased=True) / math.sqrt(len(true)))
        values = {"kl": m["kl"], "kl_se": m["kl_se"], "proxy_reward": m["reward"], "proxy_se": m["reward_se"],
                  "true_reward": float(scores.mean()), "true_se": true_se, "length": m["length"]}
        self.log(f"step {step}: proxy reward {values['proxy_reward']:.4f} +- {values['proxy_se']:.4f}, true reward "
                 f"{values['true_reward']:.4f} +- {true_se:.4f}, KL {values['kl']:.3f} +- {values['kl_se']:.3f}")
        return {PREFIX + key: values[key] for key in POINT}


def measured(cls: type) -> type:
    """``cls`` (an online method or DPO) with ``Measurement`` in its setup, ``before_step`` and ``after_step``
    (after the method's own ``after_step``, if it has one); built as ``cls(measurement, **its_arguments)``."""

    class Measured(cls):  # type: ignore[valid-type, misc]
        def __init__(self, measurement: Measurement, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.measurement = measurement

        def setup(self, ctx: Any) -> None:
            super().setup(ctx)
            self.measurement.setup(self, ctx)

        def before_step(self, model: Any, step: int) -> Any:
            self.measurement.before_step(model, step)
            return super().before_step(model, step)

        def after_step(self, model: Any, step: int) -> tuple[list[dict[str, Any]], str | None]:
            own, done = super().after_step(model, step) if hasattr(cls, "after_step") else ([], None)
            return [*own, *self.measurement.after_step(model, step)], done

    Measured.__name__ = Measured.__qualname__ = f"Measured{cls.__name__}"
    return Measured


# ------------------------------------------------------------------------------------------------ the results


def read_curve(path: str | Path) -> list[dict[str, Any]]:
    """The measurements of a run's metrics.jsonl, one point per step in order of steps ({step, kl, kl_se,
    proxy_reward, proxy_se, true_reward, true_se, length}); [] when the file does not exist."""
    from preftune.data.jsonl import read_records

    if not Path(path).is_file():
        return []
    points = {r["step"]: {"step": r["step"], **{key: r[PREFIX + key] for key in POINT}}
              for r in read_records(path) if PREFIX + "true_reward" in r}
    return [points[step] for step in sorted(points)]


def find_peak(curve: Sequence[Mapping[str, Any]], *, threshold: float = FELL_SE) -> dict[str, Any]:
    """Where the true reward was highest (the first such point) and whether it then fell: the drop from the
    peak to the last point, in standard errors of the difference ``sqrt(se_peak^2 + se_last^2)``; ``fell``
    when it exceeds ``threshold`` (the peak is the maximum of noisy points, so a small drop means little)."""
    peak = max(curve, key=lambda p: p["true_reward"])
    last = curve[-1]
    drop = peak["true_reward"] - last["true_reward"]
    se = math.sqrt(peak["true_se"] ** 2 + last["true_se"] ** 2)
    in_se = drop / se if se > 0 else None  # None: no noise at all (every sample scored the same)
    return {"step": peak["step"], "kl": peak["kl"], "true_reward": peak["true_reward"], "true_se": peak["true_se"],
            "final_step": last["step"], "final_kl": last["kl"], "final_true_reward": last["true_reward"],
            "drop": drop, "drop_se": se, "drop_in_se": in_se,
            "fell": in_se > threshold if in_se is not None else drop > 0}


def gao_fit(curve: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Gao et al. 2023's form for RL, ``R(d) = d (alpha - beta log d)`` with ``d = sqrt(KL)`` and ``R`` the true
    reward's gain over step 0, fitted by least squares to the points with KL > 0; with ``r2`` and, when
    alpha and beta > 0, the KL at the fit's maximum (``d* = exp(alpha / beta - 1)``); ``clean`` when r2 >= FIT_R2
    (the plot draws only such a fit). None with fewer than 3 points."""
    import numpy as np

    start = curve[0]["true_reward"]
    points = [p for p in curve[1:] if p["kl"] > 0]
    if len(points) < 3:
        return None
    d = np.sqrt([p["kl"] for p in points])
    gain = np.array([p["true_reward"] - start for p in points])
    design = np.stack([d, -d * np.log(d)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, gain, rcond=None)
    residual = float(((design @ np.array([alpha, beta]) - gain) ** 2).sum())
    total = float(((gain - gain.mean()) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else None
    kl_peak = float(math.exp(2 * (alpha / beta - 1))) if alpha > 0 and 0 < beta and alpha / beta < 50 else None
    return {"alpha": float(alpha), "beta": float(beta), "r2": r2, "points": len(points), "kl_peak": kl_peak,
            "clean": r2 is not None and r2 >= FIT_R2}
