"""The groups scenario's report: ``report.md``, ``report.html`` and ``summary.json`` (the one report writer,
``preftune.report``), figures first: who wins under each group, and the worst group."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.data.jsonl import read_records
from preftune.experiments.demo.groups_reward import (
    EXPANSIVE_CAP,
    EXPANSIVE_WORD,
    GROUND_TRUTHS,
    MAJORITY,
    MINORITY,
    REWARDS,
)
from preftune.experiments.demo.settings import GROUPS, GROUPS_QUICK
from preftune.report import Doc

STAGE_TITLES = {
    "corpus": "corpus and prefixes", "base": "base language model", "sft": "SFT", "preferences":
    "completions + labels of the two groups", "mixture": "mixture of reward models (EM)", "reward": "pooled reward model",
    "pooled_rloo": "pooled RLOO", "maxmin_rloo": "MaxMin RLOO", "pooled_dpo": "pooled DPO", "grdpo": "group-robust DPO",
    "evaluate": "evaluation (generate + compare per group)", "report": "report",
}
PAIRS = (("pooled_rloo", "maxmin_rloo"), ("pooled_dpo", "grdpo"))  # (pooled, robust): the comparisons that matter


def _ci(ci: Sequence[float] | None) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def summary(demo: Any) -> dict[str, Any]:
    """The figures of a finished run (summary.json)."""
    s = demo.settings
    ev, prefs, mixture, reward = (demo.marker(n) for n in ("evaluate", "preferences", "mixture", "reward"))
    stages = {name: demo.marker(name) for name, _ in demo.stages if name != "report"}
    methods = ev["results"]
    gaps = {}
    for pooled, robust in PAIRS:
        if pooled in methods and robust in methods:
            gaps[f"{robust}_minus_{pooled}"] = {
                "worst_group": methods[robust]["worst_group_win_rate"]["win_rate"]
                - methods[pooled]["worst_group_win_rate"]["win_rate"],
                **{g: methods[robust]["win_rate_by_group"][g]["win_rate"] - methods[pooled]["win_rate_by_group"][g]["win_rate"]
                   for g in REWARDS}}
    return {
        "scenario": "groups",
        "groups": {g: {"ground_truth": GROUND_TRUTHS[g], "annotators": n,
                       "share_of_labels": prefs["train"]["groups"][g]["share_of_labels"]}
                   for g, n in zip((MAJORITY, MINORITY), s.group_annotators, strict=True)},
        "conflict": prefs["conflict"],
        "em": {k: mixture[k] for k in ("purity", "ari", "component_group", "em_iterations", "em_log_likelihood",
                                      "assignments", "heldout")},
        "reward_model": {k: reward[k] for k in ("heldout_pairs", "accuracy_vs_truth", "accuracy_vs_labels")},
        "methods": methods,
        "gaps": gaps,
        "profiles": ev["profiles"],
        "training": _training(demo),
        "preference_data": {k: prefs[k] for k in ("train", "heldout", "panel")},
        "eval_prompts": demo.marker("corpus")["eval_prompts"],
        "completions_per_prompt": s.eval_completions,
        "seconds": {name: round(m["seconds"], 1) for name, m in stages.items()},
        "base_model_cached": stages["base"].get("cached", False),
        "sft_model_cached": stages["sft"].get("cached", False),
        "settings": s.to_dict(),
    }


def _training(demo: Any) -> dict[str, Any]:
    """The last logged value of what the robust methods steer by: the share of MaxMin steps on each reward
    model (``maxmin/chosen/<name>``) and group-robust DPO's weights (``group/alpha/<group>``)."""
    out: dict[str, Any] = {}
    for method in demo.settings.methods:
        path = demo.out / method / "metrics.jsonl"
        rows = read_records(path) if path.is_file() else []
        for prefix, key in (("maxmin/chosen/", "maxmin_chosen"), ("group/alpha/", "alpha")):
            last = {k[len(prefix):]: v for r in rows for k, v in r.items() if k.startswith(prefix)}
            if last:
                out.setdefault(method, {})[key] = last
    return out


def write_groups_report(demo: Any) -> list[Path]:
    """Plots, report.md, report.html, summary.json and eval/e2_ratings.csv in the run directory."""
    from preftune import plots
    out, s = demo.out, demo.settings
    data = summary(demo)
    methods, res = list(s.methods), data["methods"]
    title = {m: demo.table[m].title for m in methods}

    win_png = plots.win_rate_intervals(
        [title[m] for m in methods],
        {**{f"{g} group" + (" (majority)" if g == MAJORITY else " (minority)"):
            [(res[m]["win_rate_by_group"][g]["win_rate"], *(res[m]["win_rate_by_group"][g]["ci"] or (None, None)))
             for m in methods] for g in REWARDS},
         "worst group": [(res[m]["worst_group_win_rate"]["win_rate"], *(res[m]["worst_group_win_rate"]["ci"] or (None, None)))
                         for m in methods]},
        out / "plots" / "win_rates_by_group.png", title="Win rate against SFT under each group's ground truth, 95% interval")
    curves_png = plots.training_curves(_curves(demo), out / "plots" / "training.png")

    doc = Doc()
    doc.h(1, "preftune demo --scenario groups: two groups of annotators who want different things")
    n_maj, n_min = s.group_annotators
    conflict = data["conflict"]
    doc.p(f"{n_maj + n_min} simulated annotators label pairs of SFT completions of Shakespeare prefixes. {n_maj} of them "
          f"(the **{MAJORITY}** group, {data['groups'][MAJORITY]['share_of_labels']:.0%} of the labels) want the course's "
          "concise lines that finish the sentence with no other voice breaking in; "
          f"{n_min} (the **{MINORITY}** group, {data['groups'][MINORITY]['share_of_labels']:.0%}) "
          f"want{'s' if n_min == 1 else ''} a full speech: "
          f"{EXPANSIVE_WORD:g} per word of verse up to {EXPANSIVE_CAP}. On the SFT model's samples the two ground truths "
          f"correlate {_num(conflict['correlation'])} and order {_pct(conflict['opposite_order'])} of the pairs of "
          "completions of a prefix oppositely" + (": they conflict" if (conflict["correlation"] or 0) < 0 else
                                                  ": here they agree more often than they conflict")
          + ". Both can be satisfied at once (20 to 24 words of verse that end the sentence, no other voice), but a "
          "single reward model fitted to the pooled labels follows the majority. Every model below is judged against the SFT model under each group's ground truth, "
          f"on {data['eval_prompts']} held-out prefixes x {s.eval_completions} completions.")
    doc.h(2, "Who wins, by group")
    rows = []
    for m in methods:
        by, worst = res[m]["win_rate_by_group"], res[m]["worst_group_win_rate"]
        rows.append([title[m], *(f"{by[g]['win_rate']:.2f} {_ci(by[g]['ci'])}" for g in REWARDS),
                     f"**{worst['win_rate']:.2f}** {_ci(worst['ci'])} ({worst['group']})"])
    doc.table(["method", *(f"win rate, {g} group" for g in REWARDS), "worst-group win rate (group)"], rows)
    doc.p(_verdict(data, title))
    doc.p(_steering(data, title))
    doc.image(win_png, "Win rates against SFT by group, with 95% intervals")
    _profiles(doc, data, title)
    _em_section(doc, data)
    _conflict_section(doc, data)
    _e2_section(doc, demo, data, title)
    doc.h(2, "Training")
    doc.image(curves_png, "Training curves")
    doc.h(2, "Where the time went")
    doc.table(["stage", "seconds"], [[STAGE_TITLES.get(k, k), f"{v:.1f}"] for k, v in data["seconds"].items()]
              + [["**total**", f"**{sum(data['seconds'].values()):.1f}**"]])
    cached = [n for n, c in (("base", data["base_model_cached"]), ("SFT", data["sft_model_cached"])) if c]
    if cached:
        doc.p(f"The {' and '.join(cached)} model{'s' if len(cached) > 1 else ''} came from the cache; "
              "its time is that of reading it.")
    doc.h(2, "Reproduce and explore")
    doc.pre(_commands(demo))
    doc.h(2, "Settings")
    doc.p(f"Every number of this run (`preftune/experiments/demo/settings.py`, `GroupsSettings`), fingerprint "
          f"`{s.fingerprint}`.")
    doc.pre("\n".join(f"{name} = {value!r}" for name, value in data["settings"].items()))

    (out / "summary.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(doc.markdown(out), encoding="utf-8")
    (out / "report.html").write_text(doc.html("preftune demo: two groups"), encoding="utf-8")
    return [out / "report.md", out / "report.html", out / "summary.json", out / "eval" / "e2_ratings.csv"]


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _verdict(data: dict[str, Any], title: dict[str, str]) -> str:
    """What the pooled reward does to the minority, and what the robust methods change, in numbers."""
    res, rm = data["methods"], data["reward_model"]
    acc = rm["accuracy_vs_truth"]
    parts = [f"The pooled reward model orders {acc[MAJORITY]:.2f} of the held-out pairs as the {MAJORITY} group's "
             f"ground truth does and {acc[MINORITY]:.2f} as the {MINORITY} group's (0.50 is chance): it has averaged "
             "the minority away." if acc[MINORITY] < 0.5 else
             f"The pooled reward model orders {acc[MAJORITY]:.2f} of the held-out pairs as the {MAJORITY} group's "
             f"ground truth does and {acc[MINORITY]:.2f} as the {MINORITY} group's."]
    for pooled, robust in PAIRS:
        if pooled not in res or robust not in res:
            continue
        p, r = res[pooled], res[robust]
        pw, rw = p["worst_group_win_rate"], r["worst_group_win_rate"]
        parts.append(
            f"{title[pooled][0].upper()}{title[pooled][1:]} wins {p['win_rate_by_group'][MINORITY]['win_rate']:.2f} of its comparisons with SFT under "
            f"the {MINORITY} group's ground truth and {p['win_rate_by_group'][MAJORITY]['win_rate']:.2f} under the "
            f"{MAJORITY} group's; {title[robust]} {r['win_rate_by_group'][MINORITY]['win_rate']:.2f} and "
            f"{r['win_rate_by_group'][MAJORITY]['win_rate']:.2f}. Worst group: {rw['win_rate']:.2f} against "
            f"{pw['win_rate']:.2f} ({100 * (rw['win_rate'] - pw['win_rate']):+.0f} points); the majority "
            + ("pays " if r['win_rate_by_group'][MAJORITY]['win_rate'] < p['win_rate_by_group'][MAJORITY]['win_rate']
               else "gains ")
            + f"{100 * abs(r['win_rate_by_group'][MAJORITY]['win_rate'] - p['win_rate_by_group'][MAJORITY]['win_rate']):.0f} "
            "points for it.")
    return " ".join(parts)


def _steering(data: dict[str, Any], title: dict[str, str]) -> str:
    """How the robust methods got there: the share of MaxMin's steps on each group's reward model, and
    group-robust DPO's final weights (its loss weighs group g by alpha_g N / N_g: equally at the start)."""
    parts, groups = [], data["em"]["component_group"]
    for method, info in data["training"].items():
        if "maxmin_chosen" in info:
            parts.append(f"{title[method]} optimised " + " and ".join(
                f"{name} (the reward model of the {groups.get(name.rsplit('-', 1)[-1]) or 'no'} group) on {share:.0%}"
                for name, share in info["maxmin_chosen"].items()) + " of its steps.")
        if "alpha" in info:
            parts.append(f"{title[method][0].upper()}{title[method][1:]} weighs each group's mean loss (so the {MINORITY} group's labels count "
                         f"as much as the {MAJORITY} group's from the start) by alpha, which ended at "
                         + ", ".join(f"{g} {a:.2f}" for g, a in info["alpha"].items()) + ".")
    return " ".join(parts)


def _profiles(doc: Doc, data: dict[str, Any], title: dict[str, str]) -> None:
    doc.h(2, "What the models write")
    doc.p("Means over the held-out completions of each model: each group's ground-truth reward, words of verse, "
          "the share that finish a sentence, other voices (speaker names, stage directions) per completion.")
    rows = []
    for name, p in data["profiles"].items():
        rows.append([title.get(name, name.upper()), *(f"{p['mean_reward'][g]:.2f}" for g in REWARDS),
                     f"{p['verse_words']:.1f}", f"{p['finished']:.0%}", f"{p['voices']:.2f}", f"{p['characters']:.0f}"])
    doc.table(["model", *(f"reward, {g}" for g in REWARDS), "words of verse", "finished", "other voices", "characters"],
              rows)


def _em_section(doc: Doc, data: dict[str, Any]) -> None:
    em, rm = data["em"], data["reward_model"]
    doc.h(2, "The groups behind the labels: EM over annotators")
    doc.p(f"`train reward` with `mixtures: {len(em['component_group'])}` assigned each annotator to the reward "
          "model under which its labels are most likely (MaxMin-RLHF, Algorithm 2), from a random start; the groups "
          f"were never shown to it. Purity **{em['purity']:.2f}**, adjusted Rand index **{em['ari']:.2f}** "
          f"(1 = the groups exactly), after {em['em_iterations']} EM iteration{'s' if em['em_iterations'] != 1 else ''}. "
          "On the held-out pairs:")
    rows = [["pooled (every label)", *(f"{rm['accuracy_vs_truth'][g]:.2f}" for g in REWARDS)]]
    for k, acc in em["heldout"].items():
        rows.append([f"mixture-{k} (its annotators: mostly {em['component_group'][k]})",
                     *(f"{acc['accuracy_vs_truth'][g]:.2f}" for g in REWARDS)])
    doc.table(["reward model", *(f"accuracy vs the {g} ground truth" for g in REWARDS)], rows)
    groups: dict[int, list[str]] = {}
    for annotator, k in em["assignments"].items():
        groups.setdefault(k, []).append(annotator)
    truth = {a["name"]: a["group"] for a in data["preference_data"]["panel"]}
    doc.table(["component", "annotators (true group)"],
              [[f"mixture-{k}", ", ".join(f"{a} ({truth[a][0]})" for a in sorted(v))] for k, v in sorted(groups.items())])


def _conflict_section(doc: Doc, data: dict[str, Any]) -> None:
    c, train = data["conflict"], data["preference_data"]["train"]
    doc.h(2, "Do the two groups conflict?")
    doc.p(f"On the {c['completions']} completions the SFT model sampled for the preference data, the two ground "
          f"truths correlate {_num(c['correlation'])} (Pearson), order {_pct(c['opposite_order'])} of the "
          f"{c['pairs']} pairs of completions of a prefix oppositely (pairs one of them ties left out), and "
          f"{_pct(c['both_above_median'])} of the completions are above both groups' medians. Labels: "
          f"{train['labels']} on {train['pairs']} pairs; on the {train['cross_group_pairs']} pairs labelled by one "
          f"annotator of each group, they agree {_pct(train['cross_group_agreement'])} of the time.")
    doc.table(["group", "annotators", "labels", "share", *(f"labels agree with the {g} truth" for g in REWARDS)],
              [[g, v["annotators"], v["labels"], _pct(v["share_of_labels"]),
                *(_pct(v[f"agreement_with_{h}"]) for h in REWARDS)] for g, v in train["groups"].items()])


def _e2_section(doc: Doc, demo: Any, data: dict[str, Any], title: dict[str, str]) -> None:
    """The course's exercise E.2 on one prefix: each group's rating of completion A of every model, as z-scores
    against the SFT model's held-out completions (the two rewards' scales are arbitrary), then `prefs aggregate`."""
    from preftune.core.prefs import aggregate

    files = demo.marker("evaluate")["files"]
    gens = {name: read_records(Path(path)) for name, path in files.items()}
    sft = gens["sft"]
    stats = {}
    for g, fn in REWARDS.items():
        values = [fn(r["prompt"], r["completion"]) for r in sft]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 or 1.0
        stats[g] = (mean, std)
    first = {name: next(r for r in g if r["completion_id"] == "A") for name, g in gens.items()}
    ratings = {g: {name: round((fn(r["prompt"], r["completion"]) - stats[g][0]) / stats[g][1], 3)
                   for name, r in first.items()} for g, fn in REWARDS.items()}
    path = demo.out / "eval" / "e2_ratings.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["group", *first])
        for g, row in ratings.items():
            writer.writerow([g, *row.values()])
    result = aggregate(ratings)
    doc.h(2, "The course's exercise E.2 on one prefix")
    doc.p(f"Completion A of each model for the held-out prefix *{sft[0]['prompt'].strip()}*, rated by each group's ground "
          "truth as a z-score against the SFT model's held-out completions, then aggregated as in E.2 "
          f"(`preftune prefs aggregate {path}`). {result['summary']} E.2 picks one response for one prompt; a "
          "MaxMin policy maximises the worst group's *expected* reward over every prefix, so one sample per model "
          "says little about it: the win rates above, over every held-out completion, do.")
    doc.table(["model", "completion A", *(f"z, {g}" for g in REWARDS), "min", "mean"],
              [[title.get(n, n.upper()), first[n]["completion"].strip(), *(f"{ratings[g][n]:+.2f}" for g in REWARDS),
                f"{result['min_rating'][n]:+.2f}", f"{result['mean_rating'][n]:+.2f}"] for n in first])


def _curves(demo: Any) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Panel title -> series name -> (steps, values), from each run's metrics.jsonl."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}

    def add(panel: str, name: str, path: Path, key: str, x: str = "step") -> None:
        rows = [r for r in read_records(path) if key in r and x in r] if path.is_file() else []
        if rows:
            panels.setdefault(panel, {})[name] = ([r[x] for r in rows], [r[key] for r in rows])

    out = demo.out
    add("EM: log-likelihood of the labels", "mixture", out / "mixture" / "metrics.jsonl", "em/log_likelihood",
        x="em/iteration")
    add("EM: annotators that changed component", "mixture", out / "mixture" / "metrics.jsonl", "em/changed",
        x="em/iteration")
    add("pooled reward model: accuracy", "train", out / "reward" / "metrics.jsonl", "accuracy")
    add("pooled reward model: accuracy", "held out", out / "reward" / "metrics.jsonl", "eval/accuracy")
    for m in demo.settings.methods:
        path, name = out / m / "metrics.jsonl", demo.table[m].title
        if demo.table[m].reward == "pooled":  # MaxMin's objective/scores is in standardised units: its panel below
            add(f"{name}: objective/scores (pooled reward model)", name, path, "objective/scores")
        add("online RL: objective/kl", name, path, "objective/kl")
        for k in range(demo.settings.mixtures):
            add("MaxMin RLOO: F_u of each reward model (standardised)", f"mixture-{k}", path,
                f"maxmin/objective/mixture-{k}")
            add("MaxMin RLOO: share of steps on each reward", f"mixture-{k}", path, f"maxmin/chosen/mixture-{k}")
        for g in REWARDS:
            add("group-robust DPO: alpha per group", g, path, f"group/alpha/{g}")
            add("DPO: implicit-reward accuracy per group", f"{name}, {g}", path, f"group/accuracy/{g}")
        add("DPO: rewards/accuracies", name, path, "rewards/accuracies")
    return panels


def _commands(demo: Any) -> str:
    out, s = demo.out, demo.settings
    preset = {GROUPS: "", GROUPS_QUICK: " --quick"}.get(s)
    again = (f"preftune demo --scenario groups --output {out}{preset}   # run again: every finished stage is skipped"
             if preset is not None else
             f"# not a preset of `preftune demo`: run again with GroupsDemo({str(out)!r}, settings).run()")
    m = s.methods[0] if s.methods else "pooled_rloo"
    judges = " ".join(f"--judge {g}=function:{spec}" for g, spec in GROUND_TRUTHS.items())
    return "\n".join([
        again,
        f"preftune compare {out}/eval/sft.jsonl {out}/eval/{m}.jsonl {judges} --output cmp",
        f"preftune prefs aggregate {out}/eval/e2_ratings.csv          # E.2 on one prefix",
        f"preftune data inspect {out}/preferences/train.jsonl          # per annotator and per group",
        f"preftune train reward --model {demo.marker('sft')['model']} --data {out}/preferences/train.jsonl "
        f"--mixtures {s.mixtures} --output_dir mixture",
    ])
