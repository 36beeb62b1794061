"""preftune against TRL's DPOTrainer: same model, data, threads and settings, each tool a fresh process.

For each workload (``vs_trl_data.py``) the harness builds the model, a *different* reference model (a
second random init, so the first-step loss is not the trivial log 2) and the pairs locally (nothing is
downloaded), then runs ``preftune train dpo CONFIG`` (preftune's own environment) and
``benchmarks/trl_dpo_runner.py`` (inside a separate TRL environment that this script creates,
``.venv-trl`` beside ``.venv``: TRL 1.16.0 installed over the *same* torch / transformers / accelerate as
preftune's, through a ``.pth`` file) as subprocesses, and measures for each run:

* step time: the median interval between consecutive per-step log lines (preftune's ``metrics.jsonl``
  with ``log_every: 1``; the runner's line written in TRL's ``on_log``), over the steps after the first
  two; both files are watched by the same poller in this process (2 ms), so both tools are timed alike;
* epoch: the wall time of the whole process, from its start to its exit (imports, model load, data,
  reference pass, one epoch, final save);
* peak memory: ``ru_maxrss`` of that process (``os.wait4``);
* first-step loss of both and their difference: both tools see the same batches in the same order (the
  TRL data file is written in preftune's seeded epoch order and TRL's sampler is sequential), so in fp32
  the first losses must agree to < 2e-3.

Settings, equal for both: learning rate, constant schedule, no warmup, weight decay 0, max_grad_norm 1,
beta, sigmoid DPO loss, seed, one epoch, no evaluation, no intermediate checkpoint, a log line every step,
the same threads (OMP_NUM_THREADS / MKL_NUM_THREADS and torch.set_num_threads) and cold caches (a fresh
XDG_CACHE_HOME and reference-cache directory per run). Variants: ``defaults`` (each tool at its own
defaults otherwise: TRL's bf16 autocast, which on a CPU needs ``use_cpu``, and its online reference model;
preftune's precision and its cached reference), ``fp32`` (TRL ``bf16: false``) and ``bf16`` (preftune
``mixed_precision: bf16``). TRL's activation checkpointing, on by default in TRL 1.16, is turned off in
every TRL run (as preftune's default) unless a ``--trl-variant`` turns it on. Runs that resolve to the
same settings (a tool's defaults and its fp32 or bf16 run) are run once.

    python benchmarks/vs_trl.py                                    # every workload, 1 repeat
    python benchmarks/vs_trl.py --workloads short-chosen --repeats 3 --json vs_trl.json
    python benchmarks/vs_trl.py --workloads short-chosen --preftune-variant nopack:packing=false,share_prompt=false
    python benchmarks/vs_trl.py --workloads short-chosen --trl-variant ckpt:activation_checkpointing=true
    python benchmarks/vs_trl.py --workloads short-chosen,demo --pairs 16 --variants fp32   # a smoke test
    python benchmarks/vs_trl.py --setup-only                       # create the TRL environment and stop

Progress goes to stderr, the tables to stdout; ``--json FILE`` writes every figure of every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout without install
sys.path.insert(0, str(HERE))

from machine import Progress  # noqa: E402 - after the path
from vs_trl_data import WORKLOADS, Workload, prepare  # noqa: E402
from vs_trl_env import ensure_trl_env, shared_versions  # noqa: E402

TRL_DEFAULT_BF16 = True        # TRL 1.16 _BaseConfig: bf16 = not fp16 (the runner reports the resolved value)
ORDER_KEYS = {"group_by_length", "seed", "batch_size", "grad_accum", "max_tokens_per_batch"}  # change batches
VARIANTS = {  # name -> (preftune keys, TRL DPOConfig keys)
    "defaults": ({}, {}),
    "fp32": ({"mixed_precision": "no"}, {"bf16": False}),
    "bf16": ({"mixed_precision": "bf16"}, {"bf16": True}),
}


# ------------------------------------------------------------------------------------------- configs
def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,key=value`` -> (NAME, {key: value}); values are YAML scalars (true, 0.1, bf16)."""
    import yaml

    name, sep, rest = spec.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"variant {spec!r}: expected NAME:key=value[,key=value...]")
    keys = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"variant {spec!r}: {item!r} is not key=value")
        keys[key.strip()] = yaml.safe_load(value.strip())
    return name.strip(), keys


def preftune_config(workload: Workload, *, model: str, ref_model: str, data: str, output_dir: str,
                    ref_cache_dir: str, seed: int, keys: dict[str, Any]) -> dict[str, Any]:
    """The ``preftune train dpo`` config of one run: the shared settings, then the variant's keys."""
    return {"model": model, "ref_model": ref_model, "data": data, "output_dir": output_dir, "loss": "dpo",
            "beta": workload.beta, "learning_rate": workload.learning_rate, "lr_scheduler": "constant",
            "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "batch_size": workload.batch,
            "grad_accum": 1, "epochs": 1, "max_length": workload.max_length, "seed": seed, "log_every": 1,
            "eval_every": 0, "save_every": 0, "report_to": "none", "resume": "never",
            "ref_cache_dir": ref_cache_dir, **keys}


def trl_config(workload: Workload, *, seed: int, cpu: bool, keys: dict[str, Any]) -> dict[str, Any]:
    """``DPOConfig`` keyword arguments of one run (output_dir is the runner's): the shared settings, the
    TRL data order (sequential over the file written in preftune's order), then the variant's keys."""
    base = {"beta": workload.beta, "loss_type": ["sigmoid"], "learning_rate": workload.learning_rate,
            "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
            "per_device_train_batch_size": workload.batch, "gradient_accumulation_steps": 1,
            "num_train_epochs": 1, "max_length": workload.max_length, "seed": seed, "logging_steps": 1,
            "eval_strategy": "no", "save_strategy": "no", "report_to": "none",
            "train_sampling_strategy": "sequential", "dataloader_drop_last": True,
            "activation_checkpointing": False}
    if cpu:
        base["use_cpu"] = True  # TRL's default bf16 refuses to start on a CPU without it
    return {**base, **keys}


def write_yaml(path: Path, values: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class Run:
    """One tool at one resolved setting; ``names`` are the variants it stands for."""

    tool: str                      # "preftune" or "trl"
    keys: dict[str, Any]           # preftune config keys / DPOConfig keyword arguments of the variant
    resolved: str                  # the keys with the tool's defaults filled in (runs with equal ones are merged)
    precision: str                 # "fp32" or "bf16"
    names: list[str] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)  # one per repeat

    @property
    def label(self) -> str:
        return f"{'preftune' if self.tool == 'preftune' else 'TRL'} {' = '.join(self.names)}"


def plan_runs(variants: Sequence[str], preftune_extra: Sequence[tuple[str, dict[str, Any]]],
              trl_extra: Sequence[tuple[str, dict[str, Any]]], *, preftune_mixed_precision: str,
              trl_default_bf16: bool = TRL_DEFAULT_BF16) -> tuple[list[Run], list[tuple[str, Run, Run]]]:
    """The runs to make and the comparisons to print. A variant that resolves to the same settings as an
    earlier one (preftune's defaults = its fp32 run; TRL's defaults = its bf16 run) reuses that run. An
    extra preftune variant is compared with the TRL run of its precision, an extra TRL one likewise.
    ``preftune_mixed_precision``: the default of preftune's ``mixed_precision`` key ("no", "bf16")."""
    runs: list[Run] = []

    def get(tool: str, keys: dict[str, Any], name: str) -> Run:
        if tool == "preftune":
            full = {"mixed_precision": preftune_mixed_precision, **keys}
            precision = "bf16" if full["mixed_precision"] == "bf16" else "fp32"
        else:
            full = {"bf16": trl_default_bf16, **keys}
            precision = "bf16" if full["bf16"] else "fp32"
        resolved = json.dumps(full, sort_keys=True, default=str)
        run = next((r for r in runs if r.tool == tool and r.resolved == resolved), None)
        if run is None:
            run = Run(tool, dict(keys), resolved, precision)
            runs.append(run)
        if name not in run.names:
            run.names.append(name)
        return run

    pairs: list[tuple[str, Run, Run]] = []
    for name in variants:
        pt_keys, trl_keys = VARIANTS[name]
        pairs.append((name, get("preftune", pt_keys, name), get("trl", trl_keys, name)))
    for name, keys in preftune_extra:
        pt = get("preftune", keys, name)
        pairs.append((f"preftune {name} vs TRL {pt.precision}", pt,
                      get("trl", VARIANTS[pt.precision][1], pt.precision)))
    for name, keys in trl_extra:
        trl = get("trl", keys, name)
        pairs.append((f"preftune {trl.precision} vs TRL {name}",
                      get("preftune", VARIANTS[trl.precision][0], trl.precision), trl))
    return runs, pairs


# ------------------------------------------------------------------------------------------- running
@dataclass
class Watched:
    rc: int
    wall_s: float
    peak_mib: float
    lines: list[tuple[float, dict[str, Any]]]  # (seconds since the start when the line appeared, the record)


def watch_process(cmd: Sequence[str], *, env: dict[str, str], log_path: Path, watch: Path,
                  poll: float = 0.002) -> Watched:
    """Run ``cmd`` (output to ``log_path``), timestamping each complete line appended to ``watch`` as it
    appears; the wall time is from just before the start to the exit, the peak memory ``ru_maxrss``."""
    lines: list[tuple[float, dict[str, Any]]] = []
    seen, pending = 0, b""

    def read(now: float) -> None:
        nonlocal seen, pending
        try:
            size = watch.stat().st_size
        except FileNotFoundError:
            return
        if size < seen:        # rewritten from the start
            seen, pending = 0, b""
        if size == seen:
            return
        with open(watch, "rb") as f:
            f.seek(seen)
            data = f.read(size - seen)
        seen += len(data)
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                lines.append((now, json.loads(line)))

    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            now = time.perf_counter() - t0
            read(now)
            if pid:
                break
            time.sleep(poll)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Watched(proc.returncode, now, usage.ru_maxrss / 1024, lines)


def step_ms(times: Sequence[float], skip: int = 2) -> float | None:
    """Median interval (ms) between consecutive step-end times, over the steps after the first ``skip``
    (with fewer steps, over what there is: the second step's interval at least)."""
    intervals = [b - a for a, b in zip(times, times[1:], strict=False)]
    timed = intervals[max(skip - 1, 0):] or intervals
    return 1000 * statistics.median(timed) if timed else None


def run_once(run: Run, workload: Workload, ctx: dict[str, Any], run_dir: Path, *, keep: bool) -> dict[str, Any]:
    """One subprocess of ``run``'s tool on ``workload``; its figures."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(ctx["threads"]), "MKL_NUM_THREADS": str(ctx["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "XDG_CACHE_HOME": str(run_dir / "cache"), "PYTHONUNBUFFERED": "1"}
    out = run_dir / "out"
    if run.tool == "preftune":
        config = preftune_config(workload, model=ctx["policy"], ref_model=ctx["reference"], data=ctx["data"],
                                 output_dir=str(out), ref_cache_dir=str(run_dir / "ref_cache"),
                                 seed=ctx["seed"], keys=run.keys)
        write_yaml(run_dir / "config.yaml", config)
        cmd = [*ctx["preftune_cmd"], "train", "dpo", str(run_dir / "config.yaml")]
        watch = out / "metrics.jsonl"
    else:
        config = trl_config(workload, seed=ctx["seed"], cpu=ctx["cpu"], keys=run.keys)
        cmd = [ctx["trl_python"], str(HERE / "trl_dpo_runner.py"), "--model", ctx["policy"], "--ref-model",
               ctx["reference"], "--data", ctx["trl_data"], "--output-dir", str(out), "--steps-file",
               str(run_dir / "steps.jsonl"), "--info-file", str(run_dir / "info.json"), "--threads",
               str(ctx["threads"]), "--config", json.dumps(config)]
        watch = run_dir / "steps.jsonl"
    watched = watch_process(cmd, env=env, log_path=run_dir / "log.txt", watch=watch)
    records = [(t, r) for t, r in watched.lines if "loss" in r and "step" in r]
    result: dict[str, Any] = {
        "rc": watched.rc, "epoch_s": watched.wall_s, "peak_mib": watched.peak_mib, "steps": len(records),
        "step_ms": step_ms([t for t, _ in records]), "first_step_at_s": records[0][0] if records else None,
        "first_loss": records[0][1]["loss"] if records else None,
        "losses": [r["loss"] for _, r in records[:5]], "config": config}
    if run.tool == "trl" and (run_dir / "info.json").is_file():
        result["trl_info"] = json.loads((run_dir / "info.json").read_text())
    log = (run_dir / "log.txt").read_text(errors="replace")
    if run.tool == "preftune":  # its own summary lines: data, truncation, reference pass, packing, steps
        result["log_lines"] = [x for x in log.splitlines() if x.startswith("preftune ")][:15]
    if watched.rc != 0:
        result["log_tail"] = log[-3000:]
    result["wrote"] = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                             if p.is_file() and p.parts[len(run_dir.parts)] in ("out", "ref_cache"))
    shutil.rmtree(out, ignore_errors=True)  # the final model (GBs at the qwen2 shape)
    if not keep and watched.rc == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def summary(run: Run) -> dict[str, Any]:
    """Medians over the successful repeats of a run (None when none succeeded)."""
    ok = [r for r in run.results if r["rc"] == 0]
    out: dict[str, Any] = {"repeats_ok": len(ok), "repeats": len(run.results)}
    for key in ("step_ms", "epoch_s", "first_step_at_s", "peak_mib", "first_loss"):
        values = [r[key] for r in ok if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


# ------------------------------------------------------------------------------------------- report
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def comparison(pair: tuple[str, Run, Run]) -> dict[str, Any]:
    """preftune / TRL ratios of one comparison and the first-loss difference; the parity check applies to
    fp32 against fp32 with the same batches (no preftune key that changes them)."""
    name, pt, trl = pair
    a, b = summary(pt), summary(trl)
    diff = None if a["first_loss"] is None or b["first_loss"] is None else abs(a["first_loss"] - b["first_loss"])
    same_batches = not (ORDER_KEYS & set(pt.keys))
    checked = pt.precision == trl.precision == "fp32" and same_batches
    return {"comparison": name, "preftune": pt.label, "trl": trl.label,
            "step_ratio": _ratio(a["step_ms"], b["step_ms"]), "epoch_ratio": _ratio(a["epoch_s"], b["epoch_s"]),
            "memory_ratio": _ratio(a["peak_mib"], b["peak_mib"]), "first_loss_diff": diff,
            "parity": None if not checked or diff is None else diff < 2e-3,
            "same_batches": same_batches}


def print_workload(name: str, info: dict[str, Any], runs: list[Run], pairs: list[tuple[str, Run, Run]]) -> None:
    tok, shares = info["tokens"], info["shares"]
    print(f"\n## {name}: {info['about']}")
    print(f"model {info['params']:,} parameters ({info['model']}); {info['pairs']} pairs, batch {info['batch']}, "
          f"max_length {info['max_length']}, {shares['steps']} steps, {info['threads']} threads")
    print(f"tokens (prompt / chosen / rejected): preftune {_tokens(tok['preftune'])}; TRL {_tokens(tok['trl'])}"
          f"{'' if tok['trl_source'] == 'runner' else ' (emulated)'}; pairs tokenised differently: "
          f"{tok['pairs_that_differ']}; pairs over the length limits: {info['over_limits']}")
    print(f"real tokens {100 * shares['real_share']:.1f}% of padded positions; prompt {100 * shares['prompt_share']:.1f}%"
          f" of all tokens (counted in both rows of a pair)\n")
    print("| run | step ms | epoch s | first step at s | peak MiB | first loss | ok |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        s = summary(run)
        print(f"| {run.label} ({run.precision}) | {_fmt(s['step_ms'], '.0f')} | {_fmt(s['epoch_s'], '.1f')} | "
              f"{_fmt(s['first_step_at_s'], '.1f')} | {_fmt(s['peak_mib'], ',.0f')} | {_fmt(s['first_loss'], '.5f')} | "
              f"{s['repeats_ok']}/{s['repeats']} |")
    print("\n| comparison | step preftune/TRL (speed-up) | epoch preftune/TRL (speed-up) | peak memory preftune/TRL "
          "| first loss \\|d\\| |")
    print("|---|---|---|---|---|")
    for pair in pairs:
        c = comparison(pair)
        speed = [f"{_fmt(c[k], '.3f')}{'' if not c[k] else f' ({1 / c[k]:.2f}x)'}" for k in ("step_ratio", "epoch_ratio")]
        parity = {None: "" if c["same_batches"] else " (other batches)", True: " ok", False: " FAIL (>= 2e-3)"}
        print(f"| {c['comparison']} | {speed[0]} | {speed[1]} | {_fmt(c['memory_ratio'], '.2f')} | "
              f"{_fmt(c['first_loss_diff'], '.2e')}{parity[c['parity']]} |")
    for run in runs:
        for k, r in enumerate(run.results):
            if r["rc"] != 0:
                print(f"\n{run.label}, repeat {k + 1}: exit status {r['rc']}; end of its output:\n"
                      + "\n".join("    " + x for x in r.get("log_tail", "").splitlines()[-15:]))


def _tokens(t: dict[str, int]) -> str:
    return f"{t['prompt']:,} / {t['chosen']:,} / {t['rejected']:,}"


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/vs_trl.py", description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated: {', '.join(WORKLOADS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: defaults, fp32, bf16")
    p.add_argument("--preftune-variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="an extra preftune run with these config keys, compared with TRL at its precision "
                        "(e.g. nopack:packing=false,share_prompt=false); repeatable")
    p.add_argument("--trl-variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="an extra TRL run with these DPOConfig keys (e.g. ckpt:activation_checkpointing=true)")
    p.add_argument("--pairs", type=int, help="pairs per workload (default: each workload's own)")
    p.add_argument("--steps", type=int, help="at most this many steps per run (pairs = steps x batch)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each tool and variant (medians are shown)")
    p.add_argument("--threads", type=int, default=2, help="threads of every run (default 2)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", help="write every figure of every run to this file")
    p.add_argument("--trl-env", default=str(HERE.parent / ".venv-trl"), help="the TRL environment (created if needed)")
    p.add_argument("--work-dir", help="models, data and runs (kept; models are reused by a later run); "
                                      "default: a temporary directory, deleted at the end")
    p.add_argument("--keep", action="store_true", help="keep each run's directory (config, logs)")
    p.add_argument("--setup-only", action="store_true", help="create the TRL environment and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    unknown += [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        p.error(f"unknown workload or variant: {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress(not args.no_progress, width=7)
    preftune_extra = [parse_variant(s) for s in args.preftune_variant]
    trl_extra = [parse_variant(s) for s in args.trl_variant]
    trl_env = ensure_trl_env(Path(args.trl_env), progress)
    if args.setup_only:
        print(f"TRL environment {args.trl_env}: {json.dumps(trl_env)}")
        return 0

    import torch

    import preftune
    from preftune.experiments.demo.corpus import load_corpus
    from preftune.train.dpo import DPOConfig

    default_mixed_precision = next(f.default for f in fields(DPOConfig) if f.name == "mixed_precision")

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="vs_trl-"))
    script = Path(sys.executable).with_name("preftune")
    ctx_base = {"threads": args.threads, "seed": args.seed, "cpu": not torch.cuda.is_available(),
                "preftune_cmd": [str(script)] if script.exists() else [sys.executable, "-m", "preftune"],
                "trl_python": str(Path(args.trl_env) / "bin" / "python")}
    report: dict[str, Any] = {
        "versions": {"preftune": preftune.__version__, "trl": trl_env["trl"], "shared": shared_versions(),
                     "python": sys.version.split()[0]},
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "load_at_start": os.getloadavg()},
        "settings": vars(args), "workloads": {}}
    progress(f"preftune {preftune.__version__}, TRL {trl_env['trl']}, shared {report['versions']['shared']}; "
             f"work directory {work}")
    load = os.getloadavg()[0]
    if load > 0.5:
        progress(f"note: load average {load:.1f} at the start; other work on the machine moves the timings")
    corpus = load_corpus()
    failed = False
    try:
        for name in args.workloads.split(","):
            workload = WORKLOADS[name]
            n = args.pairs or workload.pairs
            if args.steps:
                n = min(n, args.steps * workload.batch)
            progress(f"{name}: building the model, the reference and {n} pairs")
            info = prepare(workload, work=work, corpus=corpus, n_pairs=n, seed=args.seed, progress=progress)
            info["threads"] = args.threads
            ctx = {**ctx_base, **{k: info[k] for k in ("policy", "reference", "data", "trl_data")}}
            runs, pairs = plan_runs([v for v in args.variants.split(",") if v], preftune_extra, trl_extra,
                                    preftune_mixed_precision=default_mixed_precision)
            for repeat in range(args.repeats):
                for k, run in enumerate(runs):
                    progress(f"{name}: {run.label} ({run.precision}), run {k + 1}/{len(runs)}, "
                             f"repeat {repeat + 1}/{args.repeats}")
                    result = run_once(run, workload, ctx, work / "runs" / name / f"{k}-{run.tool}-r{repeat}",
                                      keep=args.keep)
                    run.results.append(result)
                    if "trl_info" in result:
                        trl_tokens = result["trl_info"]["tokens"]
                        info["tokens"].update(trl=trl_tokens, trl_source="runner")
                    progress(f"  exit {result['rc']}: step {_fmt(result['step_ms'], '.0f')} ms, epoch "
                             f"{result['epoch_s']:.1f} s, peak {result['peak_mib']:,.0f} MiB, first loss "
                             f"{_fmt(result['first_loss'], '.5f')}, {result['steps']} steps")
                    failed |= result["rc"] != 0
            print_workload(name, info, runs, pairs)
            comparisons = [comparison(p) for p in pairs]
            failed |= any(c["parity"] is False for c in comparisons)
            report["workloads"][name] = {**info, "runs": [{"tool": r.tool, "names": r.names, "keys": r.keys,
                                                           "precision": r.precision, "summary": summary(r),
                                                           "results": r.results} for r in runs],
                                         "comparisons": comparisons}
    finally:
        if not args.work_dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_at_end"] = os.getloadavg()
    print(f"\nversions: preftune {preftune.__version__}, trl {trl_env['trl']} (its own environment over the same "
          f"{', '.join(f'{k} {v}' for k, v in report['versions']['shared'].items())}); python "
          f"{report['versions']['python']}; {_cpu_name()}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        progress(f"wrote {args.json}")
    return 1 if failed else 0


def _cpu_name() -> str:
    """The CPU's model name and whether it has native bf16 matmuls (AVX-512 BF16 or AMX), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((x.split(":", 1)[1].strip() for x in text.splitlines() if x.startswith("model name")), "unknown CPU")
    flags = set(next((x.split(":", 1)[1].split() for x in text.splitlines() if x.startswith("flags")), []))
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return f"{name} ({'native bf16: ' + ', '.join(native) if native else 'no native bf16 matmuls'})"


if __name__ == "__main__":
    sys.exit(main())
