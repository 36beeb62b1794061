"""`preftune demo`: the offline Shakespeare preference-tuning pipeline (what `make demo` runs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from preftune.cli._common import console, handle_errors


@handle_errors
def demo(
    output: Path = typer.Option(Path("demo_output"), "--output", "-o", help="Run directory (report.html, summary.json, ...)."),
    quick: bool = typer.Option(False, "--quick", help="Smaller everything, the same 11 stages: under a minute "
                                                      "on 2 CPU cores, against about 8 for the default run "
                                                      "(what the tests run)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete OUTPUT first and run every stage again."),
    until: str = typer.Option(None, "--until", help="Stop after this stage: corpus, base, sft, preferences, "
                                                    "reward, dpo, orpo, ppo, rloo, evaluate or report."),
    cache_dir: Path = typer.Option(None, "--cache-dir",
                                   help="Where the base model and reference log-probs are cached "
                                        "(default: $PREFTUNE_CACHE or ~/.cache/preftune)."),
    scenario: str = typer.Option("default", "--scenario",
                                 help="default: the course's preference, one panel of annotators, DPO, ORPO, PPO, "
                                      "RLOO. groups: two groups of annotators (80% / 20%) who want different things; "
                                      "EM finds them, pooled vs MaxMin RLOO, pooled vs group-robust DPO, judged "
                                      "under each group (stages: corpus, base, sft, preferences, mixture, reward, "
                                      "pooled_rloo, maxmin_rloo, pooled_dpo, grdpo, evaluate, report; "
                                      "docs/diverse.md). rounds: offline vs online vs iterative DPO (3 rounds) vs "
                                      "GRPO, RLOO, PPO on one learned reward model and the reward-vs-KL frontier "
                                      "(stages: corpus, base, sft, preferences, reward, dpo, online_dpo, iterative_dpo, "
                                      "grpo, rloo, ppo, evaluate, frontier, report; docs/rounds.md). Both reuse the default's cached base and "
                                      "SFT models."),
) -> None:
    """Preference tuning end to end on Shakespeare, offline, on a CPU: a base model trained from scratch,
    SFT, simulated annotators, a reward model, DPO, ORPO, PPO and RLOO, and a report comparing them with SFT.

    An interrupted run continues from its last finished stage when the same command runs again.
    """
    from preftune.experiments.demo.pipeline import Demo
    from preftune.experiments.demo.settings import scenario_preset

    settings = scenario_preset(scenario, quick)
    if fresh and output.exists():
        shutil.rmtree(output)
    if scenario in ("groups", "rounds"):
        if scenario == "groups":
            from preftune.experiments.demo.groups import GroupsDemo as Scenario
            from preftune.experiments.demo.groups import summary_lines
        else:
            from preftune.experiments.demo.rounds import RoundsDemo as Scenario  # type: ignore[assignment]
            from preftune.experiments.demo.rounds_report import summary_lines  # type: ignore[assignment]
        summary = Scenario(output, settings, cache_dir=cache_dir, log=lambda message: console.print(
            f"[bold cyan]demo[/] {message}", highlight=False, soft_wrap=True)).run(until=until)
        if summary is not None:
            for line in ["", *summary_lines(summary),
                         f"total {sum(summary['seconds'].values()):.0f} s; report: [bold]{output / 'report.html'}[/]"]:
                console.print(line, soft_wrap=True)
        return
    run = Demo(output, settings, cache_dir=cache_dir,
               log=lambda message: console.print(f"[bold cyan]demo[/] {message}", highlight=False, soft_wrap=True))
    summary = run.run(until=until)
    if summary is None:
        return
    console.print()
    for method, judges in summary["methods"].items():
        g = judges["ground_truth"]
        lo, hi = g["win_rate_ci"] or (float("nan"), float("nan"))
        console.print(f"[bold]{method.upper():5}[/] vs SFT (ground-truth judge): W/T/L {g['wins']}/{g['ties']}/"
                      f"{g['losses']}, win rate [bold]{g['win_rate']:.2f}[/] (95% CI {lo:.2f}-{hi:.2f})", soft_wrap=True)
    rm = summary["reward_model"]
    console.print(f"[bold]reward model[/] held-out accuracy {rm['accuracy_vs_ground_truth']:.2f} "
                  f"(vs ground truth), {rm['accuracy_vs_labels']:.2f} (vs the annotators' labels)", soft_wrap=True)
    console.print(f"total {sum(summary['seconds'].values()):.0f} s; report: [bold]{output / 'report.html'}[/]")


def register(app: typer.Typer) -> None:
    """Add `preftune demo` to the root app."""
    app.command(name="demo")(demo)
