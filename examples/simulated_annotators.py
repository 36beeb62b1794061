"""Scripted annotators: answer every pair of an annotation database, as people would in the browser.

    python examples/simulated_annotators.py --db runs/annotations.sqlite --generations runs/gen/sft.jsonl \
        --annotators alice,bob

takes the same --db / --pairs / --generations as `preftune annotate serve`, loads the pairs the same way,
and lets each annotator answer each pair once (through the same store the labelling page writes to):
annotator a prefers response y1 over y2 with probability sigmoid((r(y1) - r(y2)) / T), the
Bradley-Terry model with noise T, and calls a tie when the two scores are equal. The reward r is
`examples/rewards.py:letters` (the share of letters) unless --reward names another `file.py:function`
or `module:function` scoring (prompt, completion). Use it to try `annotate stats`, `annotate export`
and `compare --judge human:DB` without people, or in tests; the docs test runs it where the README
has people label.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from preftune.annotate import AnnotationStore
from preftune.annotate.sources import load_generations, load_pairs_file
from preftune.models.rewards import load_function


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", required=True, type=Path, help="the annotation database (created if missing)")
    parser.add_argument("--pairs", type=Path, help="JSONL of {id?, prompt, response_a, response_b}")
    parser.add_argument("--generations", type=Path, action="append", help="one or two generations files")
    parser.add_argument("--annotators", default="alice,bob", help="comma-separated names (default alice,bob)")
    parser.add_argument("--reward", default=str(Path(__file__).with_name("rewards.py")) + ":letters",
                        help="file.py:function or module:function scoring (prompt, completion)")
    parser.add_argument("--noise", type=float, default=0.1, help="T of sigmoid((r1 - r2) / T) (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    store = AnnotationStore(args.db)
    if args.pairs or args.generations:
        result = load_pairs_file(args.pairs) if args.pairs else load_generations(args.generations)
        added, present = store.add_pairs(result.pairs)
        print(f"loaded {added} new pairs ({present} already in the database); {store.count_pairs()} in all")
    reward = load_function(args.reward, field="reward")
    rng = random.Random(args.seed)
    answered = 0
    for name in [n.strip() for n in args.annotators.split(",") if n.strip()]:
        store.register_annotator(name)
        for pair in store.pairs():
            if not store.is_open(pair.id, name):
                continue                                  # answered on an earlier run
            shown = store.assignment(pair.id, name)       # which response is on the left, as on the page
            r_left = float(reward(pair.prompt, shown.left))
            r_right = float(reward(pair.prompt, shown.right))
            if r_left == r_right:
                side = "tie"
            else:
                p_left = 1.0 / (1.0 + math.exp(-(r_left - r_right) / args.noise))
                side = "left" if rng.random() < p_left else "right"
            store.record(pair_id=pair.id, annotator=name, side=side, order=shown.order_token)
            answered += 1
    print(f"{answered} answers; {store.count_labels()} labels in {args.db}")


if __name__ == "__main__":
    main()
