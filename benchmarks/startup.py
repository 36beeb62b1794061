"""Benchmark the start-up of `preftune train dpo`: where the time until the first optimizer step goes.

Builds a workload in a temporary directory (a Llama-style model, by default 8.4 M parameters with a
vocabulary of 8,192, and its byte-level BPE tokenizer, saved as a Hugging Face directory; and a few hundred
DPO pairs as JSONL: a 20-40 word prompt, a one-line chosen answer and a 3-6 line rejected one), then runs
`preftune train dpo CONFIG` (2 steps, otherwise preftune's defaults) as a subprocess, ``--repeats`` times,
and reports the medians of:

* ``preftune --help`` and ``python -c "import preftune.cli"`` (the CLI's own start-up);
* the seconds until the first optimizer step, from the run log's line
  ``ready to train after X s (imports a, accelerate b, model c, data d, reference e, prepare f)``, per phase;
* the whole process (wall and CPU time: 2 steps, the final save, exit);

with a warm reference cache (the log-probs of an earlier run are read) and a cold one (a fresh cache
directory: the reference pass runs; ``--no-cold`` skips these). ``--src DIR`` runs another source tree (a
checkout's ``src/``); given several times, the trees' runs alternate, so a change in a shared machine's
load affects all of them alike (before/after). ``--importtime`` adds a ``python -X importtime`` run per tree
and lists the packages and modules that cost the most.

    python benchmarks/startup.py                                   # 3 repeats, warm and cold
    python benchmarks/startup.py --no-cold --src ../before/src --src src   # before/after, warm cache
    python benchmarks/startup.py --importtime --repeats 1
    python benchmarks/startup.py --pairs 32 --hidden 64 --layers 2 --vocab 1024 --repeats 1   # smoke run

Runs use ``OMP_NUM_THREADS=--threads`` (2), ``HF_HUB_OFFLINE=1`` and a bytecode cache in the temporary
directory (as an installed package has one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFTUNE = [sys.executable, "-m", "preftune"]
READY = re.compile(r"ready to train after ([\d.]+) s \((.*)\)")


# ------------------------------------------------------------------------------------------------ the workload


def _words(rng: random.Random, n: int) -> list[str]:
    """``n`` pseudo-words of 1-4 consonant-vowel syllables: text a BPE tokenizer learns a real vocabulary
    (thousands of merges) from."""
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def _line(rng: random.Random, words: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def build_pairs(n: int, *, seed: int) -> list[dict[str, str]]:
    """``n`` rows ``{prompt, chosen, rejected}``: a 20-40 word question, a one-line chosen answer and a
    rejected answer of 3-6 lines (so the rejected row sets each micro-batch's padded length)."""
    rng = random.Random(seed)
    words = _words(rng, 6000)
    return [{"prompt": _line(rng, words, 20, 40)[:-1] + "?",
             "chosen": _line(rng, words, 8, 16),
             "rejected": "\n".join(_line(rng, words, 10, 16) for _ in range(rng.randint(3, 6)))}
            for _ in range(n)]


def build_workload(root: Path, *, pairs: int, vocab: int, hidden: int, layers: int, seed: int) -> tuple[Path, Path]:
    """A model directory (tokenizer with ``vocab`` tokens learnt from the data, Llama of width ``hidden``)
    and a JSONL file of ``pairs`` preference pairs under ``root``."""
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from preftune.models.tiny import build_tiny_model, build_tiny_tokenizer

    rows = build_pairs(pairs, seed=seed)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [t for r in rows for t in r.values()]
    tokenizer = build_tiny_tokenizer(vocab_size=vocab, texts=texts)
    model = build_tiny_model(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=4,
                             intermediate_size=4 * hidden, seed=seed)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"workload: {pairs} pairs, vocabulary {len(tokenizer):,}, {params:,} parameters "
          f"(hidden {hidden}, {layers} layers)", file=sys.stderr)
    return model_dir, data


def write_config(path: Path, *, model: Path, data: Path, out: Path, cache: Path, steps: int, batch: int) -> Path:
    """A DPO config with preftune's defaults but the workload's sizes (report_to stays auto: tensorboard when
    it is installed, as a user gets it)."""
    path.write_text("\n".join([
        f"model: {model}", f"data: {data}", f"output_dir: {out}", f"ref_cache_dir: {cache}",
        "eval_fraction: 0", f"max_steps: {steps}", f"batch_size: {batch}", "max_length: 256",
        "max_prompt_length: 128", "learning_rate: 1.0e-4", "log_every: 1", "save_every: 0", "",
    ]))
    return path


# ------------------------------------------------------------------------------------------------ measuring


def _env(threads: int, src: Path, pycache: Path) -> dict[str, str]:
    """The runs' environment: ``threads`` torch threads, offline, and compiled bytecode cached in ``pycache``
    (as an installed package has it; PYTHONDONTWRITEBYTECODE, which some sandboxes set, would make every run
    compile preftune's modules again, about 0.15 s)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPYCACHEPREFIX=str(pycache))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_command(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_train(config: Path, env: dict[str, str]) -> dict[str, float]:
    """One `preftune train dpo CONFIG` process: the phases of its "ready to train" line, its wall time and its
    CPU time (user + system, all threads: on a shared machine the wall time also holds the waits for a core)."""
    started, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run([*PREFTUNE, "train", "dpo", str(config)], env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, _children_cpu() - cpu
    if proc.returncode != 0:
        sys.exit(f"preftune train dpo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    match = READY.search(proc.stderr)
    if match is None:  # a version of preftune before the line: the whole process only
        return {"process": wall, "process cpu": cpu}
    phases = {"ready": float(match.group(1)), "process": wall, "process cpu": cpu}
    for name, seconds in re.findall(r"([a-z][a-z ]*?) ([\d.]+) s", match.group(2)):
        phases[name] = float(seconds)
    return phases


def importtime(config: Path, env: dict[str, str], *, top: int) -> None:
    """``python -X importtime`` of the whole command: the costliest modules (cumulative, self) and the
    top-level packages imported, with their cumulative time."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "preftune", "train", "dpo", str(config)],
                          env=env, capture_output=True, text=True)
    rows = []  # (module, self us, cumulative us, depth in the import stack: 0 = imported by preftune's own code)
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            self_us, cumulative, raw = line[len("import time:"):].split("|")
            rows.append((raw.strip(), int(self_us), int(cumulative), (len(raw) - len(raw.lstrip()) - 1) // 2))
    packages: dict[str, int] = {}
    for name, _, cumulative, depth in rows:
        if depth == 0:
            packages[name.split(".")[0]] = packages.get(name.split(".")[0], 0) + cumulative
    total = sum(packages.values())
    print(f"\nimports (python -X importtime): {total / 1e6:.2f} s in all, {len(rows)} modules")
    print("top-level packages by cumulative time:")
    for name, us in sorted(packages.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us / 1e6:6.2f} s  {name}")
    print("modules by self time:")
    for name, self_us, _, _ in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"  {self_us / 1e6:6.3f} s  {name}")


def _table(title: str, runs: dict[str, list[dict[str, float]]]) -> None:
    """Medians per phase (rows) and source tree (columns), with each tree's min..max over its runs."""
    names = list(dict.fromkeys(k for tree_runs in runs.values() for r in tree_runs for k in r))
    labels = list(runs)
    print(f"\n{title} (seconds; median [min .. max] of {max(len(r) for r in runs.values())} runs)")
    print(f"  {'':<16}" + "".join(f"{label[-30:]:>32}" for label in labels))
    for name in names:
        cells = []
        for label in labels:
            values = [r[name] for r in runs[label] if name in r]
            cells.append(f"{statistics.median(values):6.2f} [{min(values):.2f} .. {max(values):.2f}]" if values else "-")
        print(f"  {name:<16}" + "".join(f"{cell:>32}" for cell in cells))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each measurement (medians are reported)")
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="max_steps of each run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the runs")
    ap.add_argument("--importtime", action="store_true", help="also list the import costs (one more run per tree)")
    ap.add_argument("--top", type=int, default=15, help="rows of the import lists")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs (each runs the reference pass)")
    ap.add_argument("--src", type=Path, action="append", default=None,
                    help="a preftune source tree to run (default: this checkout's src/); give several to compare "
                         "them (before/after): their runs alternate, so a change in the machine's load hits all")
    ap.add_argument("--json", type=Path, default=None, help="write every run's figures here")
    args = ap.parse_args(argv)

    trees = [p.resolve() for p in (args.src or [ROOT / "src"])]
    labels = [str(p.parent.name if p.name == "src" else p.name) for p in trees]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in trees]
    print(f"load average {os.getloadavg()[0]:.1f} at the start", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="preftune-startup-") as tmp:
        root = Path(tmp)
        model, data = build_workload(root, pairs=args.pairs, vocab=args.vocab, hidden=args.hidden,
                                     layers=args.layers, seed=args.seed)
        common = {"model": model, "data": data, "steps": args.steps, "batch": args.batch_size}
        envs = {label: _env(args.threads, tree, root / f"pycache-{i}") for i, (label, tree) in
                enumerate(zip(labels, trees, strict=True))}
        results: dict[str, dict[str, list]] = {label: {"help": [], "import": [], "warm": [], "cold": []}
                                               for label in labels}
        # untimed: fill the bytecode caches and the reference cache (one directory for all trees: a file per key,
        # so trees that tokenise alike share it and one that does not adds its own)
        for i, (label, env) in enumerate(envs.items()):
            time_command([*PREFTUNE, "--help"], env)
            fill = run_train(write_config(root / f"fill{i}.yaml", out=root / f"run-fill{i}", cache=root / "warm",
                                          **common), env)
            print(f"{label}: filled the reference cache, ready after {fill.get('ready', fill['process']):.2f} s",
                  file=sys.stderr)
        for r in range(args.repeats):
            for i, (label, env) in enumerate(envs.items()):
                out = results[label]
                out["help"].append(time_command([*PREFTUNE, "--help"], env))
                out["import"].append(time_command([sys.executable, "-c", "import preftune.cli"], env))
                out["warm"].append(run_train(write_config(root / f"w{i}-{r}.yaml", out=root / f"run-w{i}-{r}",
                                                          cache=root / "warm", **common), env))
                message = f"repeat {r + 1}/{args.repeats}, {label}: warm cache {_ready(out['warm'][-1])}"
                if not args.no_cold:  # a fresh cache directory: the reference pass runs
                    out["cold"].append(run_train(write_config(root / f"c{i}-{r}.yaml", out=root / f"run-c{i}-{r}",
                                                              cache=root / f"cold{i}-{r}", **common), env))
                    message += f", cold cache {_ready(out['cold'][-1])}"
                print(message, file=sys.stderr)
        print(f"workload: {args.pairs} pairs, hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}, "
              f"{args.steps} steps of batch {args.batch_size}, {args.threads} threads")
        _table("CLI", {label: [{"preftune --help": h, "import cli": m} for h, m in
                               zip(results[label]["help"], results[label]["import"], strict=True)]
                       for label in labels})
        _table("`preftune train dpo`, warm reference cache (read from disk)",
               {label: results[label]["warm"] for label in labels})
        if not args.no_cold:
            _table("`preftune train dpo`, cold reference cache (the reference pass runs)",
                   {label: results[label]["cold"] for label in labels})
        if args.importtime:
            for i, (label, env) in enumerate(envs.items()):
                print(f"\n{label}:", end="")
                importtime(write_config(root / f"imports{i}.yaml", out=root / f"run-imports{i}",
                                        cache=root / "warm", **common), env, top=args.top)
        print(f"load average {os.getloadavg()[0]:.1f} at the end", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps({"results": results, "trees": dict(zip(labels, map(str, trees), strict=True)),
                                             "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


def _ready(run: dict[str, float]) -> str:
    return f"ready after {run['ready']:.2f} s" if "ready" in run else f"process {run['process']:.2f} s"


if __name__ == "__main__":
    main()
