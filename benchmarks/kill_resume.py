"""Kill -9 at random moments, resume, and compare with an uninterrupted run, bit for bit.

For each method (dpo, rloo, ppo by default) on the tiny in-process Llama (``preftune.models.tiny``):

1. one uninterrupted run (a subprocess) gives the reference: ``final/model.safetensors`` and the loss
   curve of ``metrics.jsonl``, and its wall time T;
2. N trials: each starts the same run in a fresh directory and SIGKILLs it at a random moment of its
   training: once it has started step k (k uniform in 1..steps; the child prints ``@step N`` as each
   step starts), after a delay uniform in (0, the reference's time per step), so kills land in
   every part of a step: the forward/backward, the log line, the checkpoint write, the next rollout.
   ``--kills`` times, the command started again in the same directory each time (as a user would after
   a crash; a kill that comes after the run finished is not made); then the command runs once more, to
   the end;
3. a trial is exact when its final weights are bit-identical to the reference's and its metrics.jsonl
   holds the same lines (every value but tokens_per_second, which is a timing).

Checkpoints are saved every step (``save_every: 1``), so kills land inside checkpoint writes too. The
line printed per method: ``K of N resumes exact``, with where each kill landed (steps already logged)
(the step, and the checkpoint being written if any) and the step each rerun resumed from.

    python benchmarks/kill_resume.py --n 5                        # dpo, rloo, ppo; 5 trials each
    python benchmarks/kill_resume.py --n 20 --methods ppo --kills 3

Not part of the test suite: it takes minutes (each run is a fresh Python process importing torch).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without install

PROMPTS = ["Shall I compare thee to a summer's day?", "To be, or not to be, that is the question:",
           "The quick brown fox jumps over the lazy dog.", "Please write a short poem about the sea.",
           "Question: what colour is the sky? Answer:", "Rough winds do shake the darling buds of May,",
           "What is the answer?", "Here is a poem about the sea and the sky."]
PAIRS = [
    {"prompt": "Question: what is one plus one? Answer:", "chosen": " two.", "rejected": " three, I think."},
    {"prompt": "Shall I compare thee to a summer's day?", "chosen": " Thou art more lovely.", "rejected": " No."},
    {"prompt": "To be, or not to be:", "chosen": " that is the question.", "rejected": " maybe later"},
    {"prompt": "The quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " sleeps."},
    {"prompt": "What colour is the sky?", "chosen": " Blue.", "rejected": " Green, mostly, on Tuesdays."},
    {"prompt": "Rough winds do shake", "chosen": " the darling buds of May.", "rejected": " the trees"},
    {"prompt": "Answer yes or no: is water wet?", "chosen": " yes", "rejected": " no"},
    {"prompt": "Name a prime number.", "chosen": " Seven.", "rejected": " Nine."},
]
COMMON = {"report_to": "none", "log_every": 1, "save_every": 1, "keep_checkpoints": 2, "seed": 0,
          "dtype": "float32", "lr_scheduler": "cosine", "warmup_steps": 1}
KEYS = {
    "dpo": {"batch_size": 2, "learning_rate": 1e-3, "max_length": 64, "beta": 0.1},
    "rloo": {"batch_size": 2, "num_samples": 2, "max_new_tokens": 8, "max_length": 64, "learning_rate": 1e-2,
             "kl_coef": 0.05, "sample_every": 2},
    "ppo": {"batch_size": 2, "num_samples": 2, "update_epochs": 2, "max_new_tokens": 8, "max_length": 64,
            "learning_rate": 1e-2, "kl_coef": 0.05, "kl_target": 1.0, "kl_horizon": 100.0, "sample_every": 2},
}


def letters(prompt: str, completion: str) -> float:
    """The toy reward: the share of ASCII letters in the completion."""
    return sum(c.isascii() and c.isalpha() for c in completion) / max(len(completion), 1)


def child(method: str, model: str, out: str, data: str, steps: int) -> None:
    """One training command (what a user would run again after a crash)."""
    import torch

    torch.set_num_threads(1)
    from preftune.train import METHODS, resolve_config
    from preftune.train.loop import train

    keys = {**COMMON, **KEYS[method], "model": model, "output_dir": out, "max_steps": steps}
    if method == "dpo":
        keys |= {"data": data, "ref_cache_dir": str(Path(out).parent / (Path(out).name + "-cache"))}
        instance = METHODS[method].method()
    else:
        instance = METHODS[method].method(prompts=PROMPTS, reward_fn=letters)
    prepare = instance.before_step

    def before_step(model, step):  # tells the parent where the run is: step (0-based) starts
        sys.stderr.write(f"@step {step}\n")
        sys.stderr.flush()
        return prepare(model, step)

    instance.before_step = before_step
    train(instance, resolve_config(method, keys))


def _command(method: str, model: Path, out: Path, data: Path, steps: int) -> list[str]:
    return [sys.executable, __file__, "--child", method, "--model", str(model), "--out", str(out),
            "--data", str(data), "--steps", str(steps)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1"}


def _run(cmd: list[str], log: Path) -> tuple[int, str]:
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env()).returncode
    return rc, log.read_text(errors="replace")


def _started_steps(log: Path, offset: int) -> list[int]:
    """The steps the run writing ``log`` from ``offset`` on has started (its ``@step N`` lines)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return [int(n) for n in re.findall(r"^@step (\d+)$", text, re.M)]


def _timed_reference(cmd: list[str], log: Path) -> tuple[int, str, float]:
    """Run the reference; (rc, its log, the median seconds between the starts of two steps)."""
    starts: list[float] = []
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
        while proc.poll() is None:
            if len(_started_steps(log, 0)) > len(starts):
                starts.append(time.perf_counter())
            time.sleep(0.002)
    gaps = sorted(b - a for a, b in zip(starts, starts[1:], strict=False)) or [1.0]
    return proc.returncode, log.read_text(errors="replace"), gaps[len(gaps) // 2]


def _kill_during(cmd: list[str], log: Path, *, target: int, delay: float) -> str | None:
    """Start ``cmd``; once it has started ``target`` steps, wait ``delay`` seconds and SIGKILL it. Returns
    where the kill landed, or None when the run finished first."""
    out = Path(cmd[cmd.index("--out") + 1])
    offset = log.stat().st_size if log.exists() else 0
    seen = None
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
        while proc.poll() is None:
            started = _started_steps(log, offset)
            if seen is None and len(started) >= target:
                seen = time.perf_counter()
            if seen is not None and time.perf_counter() - seen >= delay:
                saving = sorted(p.name for p in (out / "checkpoints").glob("step-*.tmp"))
                final = (out / "final").exists()
                proc.kill()
                proc.wait()
                if final:
                    return f"after step {started[-1] + 1}, while saving final/ or exiting"
                return f"in step {started[-1] + 1}" + (f", while writing {saving[0]}" if saving else "")
            time.sleep(0.002)
    return None


def _final(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def _curve(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_second"} for line in lines if line.strip()]


def _same(a: Path, b: Path) -> tuple[bool, bool]:
    import torch

    wa, wb = _final(a), _final(b)
    weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return weights, _curve(a) == _curve(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5, help="trials per method")
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per trial before the run may finish")
    parser.add_argument("--methods", default="dpo,rloo,ppo")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of each run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.out, args.data, args.steps)
        return

    from preftune.models.tiny import make_tiny

    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kill-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_tiny(work / "tiny", seed=0)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    print(f"runs in {work}; {args.steps} steps, a checkpoint every step, {args.kills} kill(s) per trial")
    summary = {}
    for method in args.methods.split(","):
        ref = work / method / "reference"
        ref.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        rc, text, step_time = _timed_reference(_command(method, model, ref, data, args.steps),
                                               work / method / "reference.log")
        wall = time.perf_counter() - started
        if rc != 0:
            raise SystemExit(f"{method}: the reference run failed:\n{text[-3000:]}")
        exact, notes = 0, []
        for trial in range(args.n):
            out, log = work / method / f"trial-{trial}", work / method / f"trial-{trial}.log"
            cmd = _command(method, model, out, data, args.steps)
            landed = []
            for _ in range(args.kills):
                where = _kill_during(cmd, log, target=rng.randint(1, args.steps),
                                     delay=rng.uniform(0, step_time))
                landed.append(f"killed {where}" if where else "finished before the kill")
                if where is None:
                    break
            rc, text = _run(cmd, log)
            resumed = re.findall(r"resumed from \S*step-(\d+) at step", text)
            resumed += ["- (finished: nothing to train)"] * text.count("nothing to train")
            if rc != 0:
                notes.append(f"trial {trial}: {'; '.join(landed)}; the rerun FAILED (see {log})")
                continue
            weights, curve = _same(ref, out)
            exact += weights and curve
            notes.append(f"trial {trial}: {'; '.join(landed)}; resumed from step "
                         f"{', '.join(resumed) or '- (none)'}; weights {'exact' if weights else 'DIFFER'}, "
                         f"metrics {'exact' if curve else 'DIFFER'}")
        summary[method] = (exact, args.n)
        print(f"\n{method}: reference run {wall:.1f} s, {step_time:.2f} s per step (checkpoint included)")
        for note in notes:
            print(f"  {note}")
        print(f"{method}: {exact} of {args.n} resumes exact")
    total = sum(e for e, _ in summary.values()), sum(n for _, n in summary.values())
    print(f"\nall: {total[0]} of {total[1]} resumes exact "
          f"({', '.join(f'{m} {e}/{n}' for m, (e, n) in summary.items())})")


if __name__ == "__main__":
    main()
