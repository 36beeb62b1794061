"""The reward mixture's EM on a synthetic task with known groups, and what LoRA adapters save.

    python benchmarks/mixture_em.py                      # K = 2, 3 and fewer labels; parameter counts
    python benchmarks/mixture_em.py --only params        # the parameter counts alone (no training)
    python benchmarks/mixture_em.py --write-labels labels.jsonl   # only write the task's labels (6 per annotator)

Task (as in tests/test_mixture.py): responses "the {bright|dull} {sun|moon}"; group A's reward is
bright + 2 sun, group B's bright - 2 sun (they agree on `bright`, disagree on sun versus moon). Each
annotator labels pairs of responses by its group's reward; 5 annotators of A, 3 of B. A 1-layer, 32-dim
Llama reward model built in process. Each setting prints the EM log-likelihood per iteration, the
sizes, purity and adjusted Rand index of the kept restart against the groups (never used for fitting).

Parameter counts: a Llama-3.2-1B-shaped and a GPT-2-shaped reward model built on the meta device (no
memory, no download): R x K full copies against one base with R x K LoRA adapters (r 16, all-linear,
each with its own score head).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

RESPONSES = [f"the {adjective} {noun}" for adjective in ("bright", "dull") for noun in ("sun", "moon")]


def write_labels(path: Path, *, majority: int, minority: int, pairs_each: int, seed: int = 0) -> Path:
    rng, rows = random.Random(seed), []
    every = [(x, y) for i, x in enumerate(RESPONSES) for y in RESPONSES[i + 1:]]
    for a in range(majority + minority):
        group = "A" if a < majority else "B"
        sun = 2 if group == "A" else -2
        for x, y in rng.sample(every, pairs_each):
            rx, ry = (("bright" in t) + sun * ("sun" in t) for t in (x, y))
            chosen, rejected = (x, y) if rx > ry else (y, x)
            rows.append({"prompt": rng.choice(["Say it: ", "Write: ", "Now: "]), "chosen": chosen,
                         "rejected": rejected, "annotator": f"u{a}", "group": group})
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def em_run(model: Path, root: Path, name: str, *, mixtures: int, pairs_each: int) -> None:
    from preftune.train import run
    from preftune.train.loop import read_metrics

    data = write_labels(root / f"{name}.jsonl", majority=5, minority=3, pairs_each=pairs_each)
    started = time.perf_counter()
    final = run("reward", {"model": str(model), "data": str(data), "output_dir": str(root / name),
                           "batch_size": 8, "learning_rate": 3e-3, "lr_scheduler": "constant", "report_to": "none",
                           "dtype": "float32", "seed": 0, "eval_batch_size": 64, "mixtures": mixtures,
                           "em_restarts": 2, "em_iterations": 5, "em_epochs": 2})
    summary = json.loads((final / "mixture.json").read_text())
    rows = [r for r in read_metrics(root / name / "metrics.jsonl") if r.get("em/restart") == summary["restart"]]
    curve = ", ".join(f"{r['em/log_likelihood']:.2f} ({r['em/changed']} moved)" for r in rows)
    print(f"{name}: K={mixtures}, {pairs_each} labels per annotator: sizes {summary['sizes']}, purity "
          f"{summary['purity']:.3f}, ARI {summary['ari']:.3f}; log-likelihood per iteration {curve}; "
          f"{time.perf_counter() - started:.0f} s")


def parameter_counts(restarts: int = 3, mixtures: int = 2, rank: int = 16) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, GPT2Config, LlamaConfig

    shapes = {
        "Llama-3.2-1B shape": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                          num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                          tie_word_embeddings=True, num_labels=1, pad_token_id=0),
        "GPT-2 (124M) shape": GPT2Config(num_labels=1, pad_token_id=0),
    }
    n = restarts * mixtures
    for name, config in shapes.items():
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
            base = sum(p.numel() for p in model.parameters())
            peft = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=32,
                                                    target_modules="all-linear"))
            adapter = sum(p.numel() for n_, p in peft.named_parameters() if "lora_" in n_ or "modules_to_save" in n_)
        copies, adapters = n * base, base + n * adapter
        print(f"{name}: P = {base:,}; {restarts} restarts x {mixtures} mixtures: copies {n} x P = {copies:,} "
              f"parameters, about {copies * 16 / 2**30:.1f} GiB to train in fp32 (weights, gradients, 2 AdamW "
              f"moments); adapters P + {n} x {adapter:,} = {adapters:,} ({adapters / copies:.1%}), about "
              f"{(base * 4 + n * adapter * 16) / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("em", "params"), default=None)
    parser.add_argument("--write-labels", metavar="PATH", help="write the task's labels to PATH and stop")
    args = parser.parse_args()
    if args.write_labels:
        write_labels(Path(args.write_labels), majority=5, minority=3, pairs_each=6)
        return
    if args.only != "em":
        parameter_counts()
    if args.only == "params":
        return
    from preftune.models.tiny import make_tiny

    root = Path(tempfile.mkdtemp(prefix="mixture-em-"))
    model = make_tiny(root / "tiny", hidden_size=32, num_layers=1)
    em_run(model, root, "k2", mixtures=2, pairs_each=6)
    em_run(model, root, "k3", mixtures=3, pairs_each=6)
    em_run(model, root, "k2-few", mixtures=2, pairs_each=2)


if __name__ == "__main__":
    main()
