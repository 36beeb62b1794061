"""The demo's report: ``report.md``, ``report.html`` (self-contained: plots embedded) and ``summary.json``,
written by the one report writer (``preftune.report``), so both documents say the same thing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.data.jsonl import read_records
from preftune.experiments.demo.reward import WEIGHTS
from preftune.experiments.demo.settings import DEFAULT, QUICK
from preftune.report import Doc

STAGE_TITLES = {
    "corpus": "corpus and prefixes", "base": "base language model", "sft": "SFT", "preferences":
    "completions + simulated labels", "reward": "reward model", "dpo": "DPO", "orpo": "ORPO", "ppo": "PPO",
    "rloo": "RLOO", "raft": "RAFT", "evaluate": "evaluation (generate + compare)", "report": "report",
}
JUDGES = {"ground_truth": "ground-truth reward", "reward_model": "learned reward model"}
ONLINE = ("ppo", "rloo", "raft")


def _ci(ci: Sequence[float] | None) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def summary(demo: Any) -> dict[str, Any]:
    """The figures of a finished run (summary.json)."""
    s = demo.settings
    ev, reward = demo.marker("evaluate"), demo.marker("reward")
    stages = {name: demo.marker(name) for name, _ in demo.stages if name != "report"}
    return {
        "settings": s.to_dict(),
        "methods": ev["results"],
        "reward_model": {k: reward[k] for k in ("heldout_pairs", "heldout_labels", "accuracy_vs_labels",
                                                "accuracy_vs_ground_truth", "eval_accuracy")},
        "preference_data": demo.marker("preferences"),
        "eval_prompts": demo.marker("corpus")["eval_prompts"],
        "completions_per_prompt": s.eval_completions,
        "seconds": {name: round(m["seconds"], 1) for name, m in stages.items()},
        "base_model_cached": stages["base"].get("cached", False),
    }


def write_demo_report(demo: Any) -> list[Path]:
    """Plots, report.md, report.html and summary.json in the demo's output directory."""
    from preftune import plots

    out, s = demo.out, demo.settings
    figs = out / "plots"
    data = summary(demo)
    methods = list(s.methods)
    results = data["methods"]
    gt = {m: results[m]["ground_truth"] for m in methods}

    # plots
    win_png = plots.win_rate_intervals(
        methods, {JUDGES[j]: [(results[m][j]["win_rate"], *(results[m][j]["win_rate_ci"] or (None, None)))
                              for m in methods] for j in JUDGES}, figs / "win_rates.png",
        title="Win rate against the SFT model (ties count half), 95% interval")
    wtl_png = plots.wtl_bars(methods, [gt[m]["wins"] for m in methods], [gt[m]["ties"] for m in methods],
                             [gt[m]["losses"] for m in methods], figs / "wtl.png",
                             title="Against SFT, ground-truth judge", legend=("tuned wins", "tie", "SFT wins"))
    eval_files = demo.marker("evaluate")["files"]
    generations = {name: read_records(Path(path)) for name, path in eval_files.items()}
    len_png = plots.length_histograms({n: [len(r["completion"]) for r in g] for n, g in generations.items()},
                                      figs / "lengths.png", title="Completion lengths on the held-out prefixes")
    curves_png = plots.training_curves(_curves(demo), figs / "training.png")

    doc = Doc()
    doc.h(1, "preftune demo: preference tuning on Shakespeare")
    doc.p(f"A {s.num_layers}-layer Llama-style model (width {s.hidden_size}, vocabulary {s.vocab_size}) learnt "
          f"Shakespeare from scratch on {demo.marker('corpus')['characters']:,} "
          "characters of the plays and poems, was fine-tuned to continue a line (SFT), and sampled "
          f"{s.completions_per_prompt} completions for each of {demo.marker('corpus')['preference_prompts']} "
          "prefixes. A panel of simulated annotators labelled pairs of them, preferring concise completions that "
          "finish the sentence in verse over rambles into other speakers' lines. From those labels a reward model, "
          + ", ".join(m.upper() for m in methods) + " were trained, and each tuned model wrote "
          f"{s.eval_completions} completions (A, B, C) for each of {data['eval_prompts']} held-out prefixes, judged "
          "pair by pair against the SFT model's (1-A against 1-A, ...).")
    doc.h(2, "Did preference tuning help?")
    rows = []
    for m in methods:
        g, r = results[m]["ground_truth"], results[m]["reward_model"]
        lc = g["length_controlled_win_rate"]  # None: not enough data for the fit (preftune.compare)
        rows.append([m.upper(), f"{g['wins']} / {g['ties']} / {g['losses']}", f"**{g['win_rate']:.2f}** {_ci(g['win_rate_ci'])}",
                     "not enough data" if lc is None else f"{lc:.2f}", f"{r['win_rate']:.2f} {_ci(r['win_rate_ci'])}"])
    doc.table(["method", "W / T / L vs SFT (ground truth)", "win rate, 95% CI", "length-controlled",
               "win rate by the reward model"], rows)
    rm = data["reward_model"]
    doc.p(f"Reward model on {rm['heldout_pairs']} held-out pairs (prefixes it never saw): accuracy "
          f"**{rm['accuracy_vs_ground_truth']:.2f}** against the ground-truth reward, "
          f"{rm['accuracy_vs_labels']:.2f} against the annotators' noisy labels (chance: 0.50). The interval "
          "resamples prompts (a clustered bootstrap); a tie counts half a win.")
    doc.image(win_png, "Win rates against SFT with 95% intervals, under both judges")
    doc.image(wtl_png, "Wins, ties and losses against SFT, ground-truth judge")
    _course_table(doc, demo, methods)
    _side_by_side(doc, generations, methods)
    doc.h(2, "Training")
    doc.image(curves_png, "Training curves")
    doc.image(len_png, "Completion lengths")
    _preference_section(doc, data["preference_data"])
    _base_samples(doc, demo)
    doc.h(2, "Where the time went")
    doc.table(["stage", "seconds"], [[STAGE_TITLES.get(k, k), f"{v:.1f}"] for k, v in data["seconds"].items()]
              + [["**total**", f"**{sum(data['seconds'].values()):.1f}**"]])
    if data["base_model_cached"]:
        doc.p("The base model came from the cache; its time is that of the run that trained it.")
    doc.h(2, "Reproduce and explore")
    doc.pre(_commands(demo))
    doc.h(2, "Settings")
    doc.p(f"Every number of this run (`preftune/experiments/demo/settings.py`), fingerprint `{s.fingerprint}`.")
    doc.pre("\n".join(f"{name} = {value!r}" for name, value in data["settings"].items()))

    (out / "summary.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(doc.markdown(out), encoding="utf-8")
    (out / "report.html").write_text(doc.html("preftune demo report"), encoding="utf-8")
    return [out / "report.md", out / "report.html", out / "summary.json"]


def _curves(demo: Any) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Panel title -> series name -> (steps, values), from each run's metrics.jsonl."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}

    def add(panel: str, name: str, path: Path, key: str) -> None:
        rows = [r for r in read_records(path) if key in r] if path.is_file() else []
        if rows:
            panels.setdefault(panel, {})[name] = ([r["step"] for r in rows], [r[key] for r in rows])

    add("base LM: loss (nats/token)", "train", demo.out / "base" / "metrics.jsonl", "loss")
    add("SFT: loss", "train", demo.out / "sft" / "metrics.jsonl", "loss")
    add("SFT: loss", "held out", demo.out / "sft" / "metrics.jsonl", "eval/loss")
    add("reward model: accuracy", "train", demo.out / "reward" / "metrics.jsonl", "accuracy")
    add("reward model: accuracy", "held out", demo.out / "reward" / "metrics.jsonl", "eval/accuracy")
    for m in demo.settings.methods:
        path = demo.out / m / "metrics.jsonl"
        if m not in ONLINE:  # an online method's loss is not a progress measure (RLOO's is ~0 by construction)
            add(f"{m.upper()}: loss", "train", path, "loss")
            add(f"{m.upper()}: loss", "held out", path, "eval/loss")
        add("rewards/accuracies (implicit reward)", m.upper(), path, "rewards/accuracies")
        add("online RL: objective/scores", m.upper(), path, "objective/scores")
        add("online RL: objective/kl", m.upper(), path, "objective/kl")
    return panels


def _course_table(doc: Doc, demo: Any, methods: list[str]) -> None:
    """The course exercise's table: for each of its five prefixes, the verdict of each completion id."""
    doc.h(2, "The course's table: the five course prefixes")
    doc.p("Verdict of each tuned model's completion against the SFT model's completion with the same id, "
          "under the ground-truth judge (W: the tuned model won, T: tie, L: SFT won).")
    header = ["prefix", *(m.upper() for m in methods)]
    rows = []
    per_method = {m: json.loads((demo.out / "eval" / f"{m}_vs_sft_ground_truth" / "comparison.json")
                                .read_text(encoding="utf-8"))["per_prompt"] for m in methods}
    for i in range(min(5, len(per_method[methods[0]]))):  # the course's five prefixes come first
        p = per_method[methods[0]][i]
        cells = []
        for m in methods:
            q = per_method[m][i]
            cells.append(" ".join(f"{c}:{v}" for c, v in sorted(q["verdicts"].items()))
                         + f" ({q['wins']}/{q['ties']}/{q['losses']})")
        rows.append([p["prompt"], *cells])
    doc.table(header, rows)


def _side_by_side(doc: Doc, generations: dict[str, list[dict[str, Any]]], methods: list[str]) -> None:
    from preftune.experiments.demo.reward import shakespeare_reward

    doc.h(2, "Completions side by side")
    doc.p("Completion A of the first three course prefixes, with its ground-truth reward.")
    names = ["sft", *methods]
    rows = []
    for prompt_id in (1, 2, 3):
        row = []
        for name in names:
            rec = next((r for r in generations[name] if r["prompt_id"] == prompt_id and r["completion_id"] == "A"), None)
            row.append("" if rec is None else f"{rec['completion'].strip()}\n(reward {shakespeare_reward(rec['prompt'], rec['completion']):.2f})")
        prompt = next(r["prompt"] for r in generations["sft"] if r["prompt_id"] == prompt_id)
        rows.append([f"**{prompt}**", *row])
    doc.table(["prefix", *(n.upper() for n in names)], rows)


def _preference_section(doc: Doc, prefs: dict[str, Any]) -> None:
    train = prefs["train"]
    doc.h(2, "Preference data")
    doc.p(f"{train['pairs']} pairs of SFT completions, {train['labels']} labels ({train['doubly_labelled']} pairs "
          f"labelled twice: agreement {train['percent_agreement']:.2f}, Cohen's kappa {train['cohen_kappa']:.2f}); "
          f"the labels agree with the ground-truth reward {train['agreement_with_ground_truth']:.2f} of the time. "
          "Ground-truth reward (`preftune.experiments.demo.reward:shakespeare_reward`): "
          + ", ".join(f"{w:+g} x {k}" for k, w in WEIGHTS.items()) + ".")
    doc.table(["annotator", "group", "Bradley-Terry temperature", "emphasis"],
              [[a["name"], a["group"], a["temperature"], ", ".join(f"{k} x{v:g}" for k, v in a["emphasis"].items()) or "-"]
               for a in prefs["panel"]])


def _base_samples(doc: Doc, demo: Any) -> None:
    path = demo.out / "base" / "samples.jsonl"
    if not path.is_file():
        return
    doc.h(2, "What the base model writes")
    doc.pre("\n\n".join(f"{r['prompt']}{r['completion']}" for r in read_records(path)))


def _commands(demo: Any) -> str:
    out = demo.out
    preset = {DEFAULT: "", QUICK: " --quick"}.get(demo.settings)
    again = (f"preftune demo --output {out}{preset}                 # run again: every finished stage is skipped"
             if preset is not None else
             f"# this run's settings are not a preset of `preftune demo`: run again with Demo({str(out)!r}, settings).run()")
    m = demo.settings.methods[0] if demo.settings.methods else "sft"   # dpo in both presets
    return "\n".join([
        again,
        f"preftune compare {out}/eval/sft.jsonl {out}/eval/{m}.jsonl --judge function:preftune.experiments.demo.reward:shakespeare_reward --output cmp",
        f"preftune generate --model {out}/{m}/final --prompts {out}/data/eval_prompts.txt --num 3 --output {m}.jsonl",
        f"preftune annotate serve --pairs {out}/preferences/pairs.jsonl --db labels.sqlite   # label them yourself",
        f"preftune data inspect {out}/preferences/train.jsonl",
    ])
