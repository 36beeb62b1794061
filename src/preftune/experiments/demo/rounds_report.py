"""The rounds scenario's report: ``report.md``, ``report.html`` and ``summary.json`` (the one report writer,
``preftune.report``), figures first: offline vs online vs iterative DPO against SFT, the reward-vs-KL
frontier and the rounds."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.experiments.demo.settings import ROUNDS, ROUNDS_QUICK
from preftune.report import Doc

STAGE_TITLES = {
    "corpus": "corpus and prefixes", "base": "base language model", "sft": "SFT", "preferences":
    "completions + simulated labels", "reward": "reward model", "dpo": "offline DPO", "online_dpo": "online DPO",
    "iterative_dpo": "iterative DPO (rounds)", "grpo": "GRPO", "rloo": "RLOO", "ppo": "PPO",
    "evaluate": "evaluation (generate + compare)",
    "frontier": "frontier (ground-truth reward and KL)", "report": "report",
}

TITLES = {"sft": "SFT", "dpo": "offline DPO", "online_dpo": "online DPO", "iterative_dpo": "iterative DPO",
          "grpo": "GRPO", "rloo": "RLOO", "ppo": "PPO"}
# the frontier plot's method of each model (its marker), by stage name
FRONTIER_METHOD = {"sft": "sft", "dpo": "dpo", "online_dpo": "online-dpo", "iterative_dpo": "iterative-dpo",
                   "grpo": "grpo", "rloo": "rloo", "ppo": "ppo"}



def _ci(ci: Sequence[float] | None) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _pm(value: float, se: float, digits: int = 3) -> str:
    return f"{value:.{digits}f} ± {se:.{digits}f}" if not math.isnan(se) else f"{value:.{digits}f}"


def summary(demo: Any) -> dict[str, Any]:
    """The figures of a finished run (summary.json)."""
    s = demo.settings
    ev, reward = demo.marker("evaluate"), demo.marker("reward")
    stages = {name: demo.marker(name) for name, _ in demo.stages if name != "report"}
    points = {p["name"]: p for p in demo.marker("frontier")["points"]}
    return {
        "scenario": "rounds",
        "methods": {m: {**ev["results"][m], "frontier": points.get(m) or _last_round(points)} for m in s.methods},
        "sft": points["sft"],
        "rounds": demo.marker("iterative_dpo")["rounds"] if "iterative_dpo" in s.methods else [],
        "frontier": list(points.values()),
        "reward_model": {k: reward[k] for k in ("heldout_pairs", "accuracy_vs_labels", "accuracy_vs_ground_truth")},
        "eval_prompts": demo.marker("corpus")["eval_prompts"],
        "completions_per_prompt": s.eval_completions,
        "seconds": {name: round(m["seconds"], 1) for name, m in stages.items()},
        "base_model_cached": stages["base"].get("cached", False),
        "sft_model_cached": stages["sft"].get("cached", False),
        "settings": s.to_dict(),
    }


def _last_round(points: dict[str, Any]) -> dict[str, Any] | None:
    rounds = sorted((p for p in points.values() if p["method"] == "iterative-dpo"), key=lambda p: p["value"])
    return rounds[-1] if rounds else None


def write_rounds_report(demo: Any) -> list[Path]:
    """Plots, report.md, report.html and summary.json in the run's output directory."""
    from preftune import plots

    out, s = demo.out, demo.settings
    data = summary(demo)
    methods, results = list(s.methods), data["methods"]
    win_png = plots.win_rate_intervals(
        [TITLES[m] for m in methods],
        {"ground-truth reward": [(results[m]["ground_truth"]["win_rate"],
                                  *(results[m]["ground_truth"]["win_rate_ci"] or (None, None))) for m in methods],
         "learned reward model": [(results[m]["reward_model"]["win_rate"],
                                   *(results[m]["reward_model"]["win_rate_ci"] or (None, None))) for m in methods]},
        out / "plots" / "win_rates.png", title="Win rate against the SFT model (ties count half), 95% interval")

    doc = Doc()
    doc.h(1, "preftune demo --scenario rounds: DPO on its own samples, and an imperfect reward model")
    rm = data["reward_model"]
    doc.p("The default scenario's Shakespeare task: a small Llama-style model fine-tuned to continue a line (SFT), "
          "simulated annotators who prefer concise completions that finish the sentence in verse, and a reward model "
          f"learnt from their labels (held-out accuracy {rm['accuracy_vs_ground_truth']:.2f} against the ground truth, "
          f"{rm['accuracy_vs_labels']:.2f} against the labels). Offline DPO learns from the annotators' labels on SFT "
          "samples; online DPO, iterative DPO, GRPO, RLOO and PPO learn from the reward model on the policy's own "
          "samples. The ground-truth reward judges them all and is never seen in training.")
    doc.h(2, "Offline, online and iterative DPO side by side")
    rows = []
    for m in methods:
        g, r, p = results[m]["ground_truth"], results[m]["reward_model"], results[m]["frontier"]
        rows.append([TITLES[m], f"{g['wins']} / {g['ties']} / {g['losses']}",
                     f"**{g['win_rate']:.2f}** {_ci(g['win_rate_ci'])}", f"{r['win_rate']:.2f} {_ci(r['win_rate_ci'])}",
                     _pm(p["reward"], p["reward_se"]), _pm(p["kl"], p["kl_se"], 2), f"{data['seconds'].get(m, 0):.0f}"])
    sft = data["sft"]
    rows.append(["SFT", "", "", "", _pm(sft["reward"], sft["reward_se"]), "0", ""])
    doc.table(["method", "W / T / L vs SFT (ground truth)", "win rate, 95% CI", "win rate by the reward model",
               "ground-truth reward", "KL to SFT (nats)", "seconds"], rows)
    doc.p(f"Win rates: {s.eval_completions} completions per held-out prefix ({data['eval_prompts']} prefixes) at "
          f"temperature {s.eval_temperature}, judged pair by pair against SFT's; the interval resamples prefixes. "
          f"Reward and KL: {s.frontier_samples} samples per held-out prefix at temperature {s.temperature} (the "
          "policy's own distribution), mean ± standard error; KL is sum_t log pi/pi_SFT per completion.")
    doc.image(win_png, "Win rates against SFT with 95% intervals, under both judges")
    doc.h(2, "The reward-vs-KL frontier")
    doc.p("Up and to the left is better: more ground-truth reward for less distance from SFT. Each round of "
          "iterative DPO is one point (round=r), joined in order.")
    doc.image(Path(demo.marker("frontier")["plot"]), "Ground-truth reward against KL to SFT, every model")
    if data["rounds"]:
        doc.h(2, "Iterative DPO, round by round")
        doc.table(["round", "pairs", "win rate vs SFT, 95% CI", "KL to SFT", "ground-truth reward", "seconds"],
                  [[r["round"], r.get("pairs", ""), f"{r['win_rate']:.2f} {_ci(r.get('win_rate_ci'))}",
                    f"{r['kl']:.2f}", f"{r['reward']:.3f}" if r.get("reward") is not None else "",
                    f"{r.get('seconds', 0):.0f}"] for r in data["rounds"]])
        rounds_png = out / "iterative_dpo" / "rounds.png"
        if rounds_png.is_file():
            doc.image(rounds_png, "Win rate against SFT and KL after each round")
    doc.p("What happens when RL climbs this reward model far from SFT (the course's quiz on an imperfect reward "
          "model) is `preftune experiment overoptimization` on the default scenario's outputs: docs/rlhf.md.")
    doc.h(2, "Where the time went")
    doc.table(["stage", "seconds"], [[STAGE_TITLES.get(k, k), f"{v:.1f}"] for k, v in data["seconds"].items()]
              + [["**total**", f"**{sum(data['seconds'].values()):.1f}**"]])
    if data["base_model_cached"] or data["sft_model_cached"]:
        doc.p("Cached models (base, SFT) count the time of the run that loaded them, not of the run that trained them.")
    doc.h(2, "Reproduce")
    preset = {ROUNDS: "", ROUNDS_QUICK: " --quick"}.get(s, "")
    doc.pre(f"preftune demo --scenario rounds --output {out}{preset}   # again: every finished stage is skipped")
    doc.h(2, "Settings")
    doc.p(f"Every number of this run (`preftune/experiments/demo/settings.py`), fingerprint `{s.fingerprint}`.")
    doc.pre("\n".join(f"{name} = {value!r}" for name, value in data["settings"].items()))

    (out / "summary.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(doc.markdown(out), encoding="utf-8")
    (out / "report.html").write_text(doc.html("preftune demo: rounds"), encoding="utf-8")
    return [out / "report.md", out / "report.html", out / "summary.json"]


def summary_lines(data: dict[str, Any]) -> list[str]:
    """What `preftune demo --scenario rounds` prints at the end."""
    lines = []
    for m, r in data["methods"].items():
        g, p = r["ground_truth"], r["frontier"]
        lo, hi = g["win_rate_ci"] or (float("nan"), float("nan"))
        lines.append(f"[bold]{TITLES[m]:14}[/] vs SFT (ground truth): win rate [bold]{g['win_rate']:.2f}[/] "
                     f"({lo:.2f}-{hi:.2f}); ground-truth reward {p['reward']:.3f}, KL {p['kl']:.2f}")
    sft = data["sft"]
    lines.append(f"[bold]{'SFT':14}[/] ground-truth reward {sft['reward']:.3f}")
    return lines
