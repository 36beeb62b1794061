"""`preftune compare`: judge two or more models' completions; win / tie / loss, win rates, ranking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from preftune.cli._common import console, handle_errors, print_json
from preftune.errors import PreftuneError

COLOURS = {"W": "[green]W[/]", "T": "[dim]T[/]", "L": "[red]L[/]"}


def _pair_table(res: Any) -> Table:
    from preftune.compare import _short

    ids = sorted({r["completion_id"] for r in res.rows}, key=lambda c: (len(c), c))
    table = Table(title=f"{res.candidate} vs {res.baseline} (W = {res.candidate} won)")
    table.add_column("#", justify="right")
    table.add_column("prompt")
    for c in ids:
        table.add_column(c, justify="center")
    for name in ("W", "T", "L"):
        table.add_column(name, justify="right")
    for p in res.per_prompt():
        table.add_row(str(p["prompt_id"]), _short(p["prompt"], 40),
                      *(COLOURS.get(p["verdicts"].get(c, ""), "") for c in ids),
                      str(p["wins"]), str(p["ties"]), str(p["losses"]))
    table.add_section()
    table.add_row("", "[bold]total[/]", *("" for _ in ids), str(res.wins), str(res.ties), str(res.losses))
    return table


def _ranking_table(fit: Any) -> Table:
    table = Table(title="Bradley-Terry ranking (log-strength, 95% bootstrap interval)")
    for name, justify in (("rank", "right"), ("model", "left"), ("strength", "right"), ("95% CI", "right"),
                          ("W", "right"), ("T", "right"), ("L", "right")):
        table.add_column(name, justify=justify)
    for p in fit.to_dict()["players"]:
        ci = f"[{p['ci_low']:.3f}, {p['ci_high']:.3f}]" if p["ci_low"] is not None else ""
        table.add_row(str(p["rank"]), p["name"], f"{p['strength']:.3f}", ci, str(p["wins"]), str(p["ties"]),
                      str(p["losses"]))
    return table


@handle_errors
def compare(
    files: list[Path] = typer.Argument(..., help="Generations JSONL files; the FIRST is the baseline (e.g. SFT)."),
    judge: str = typer.Option(..., "--judge", "-j",
                              help="reward:PATH | function:module:fn | function:file.py:fn | llm:PATH | human:DB"),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for comparison.json, comparison.md, plots."),
    margin: float = typer.Option(0.0, help="reward/function judges: a tie when the scores differ by <= margin."),
    batch_size: int = typer.Option(8, "--batch-size", help="reward/llm judges: pairs per forward pass."),
    n_bootstrap: int = typer.Option(1000, "--n-bootstrap", help="Bootstrap resamples for the 95% intervals (0 = none)."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    as_json: bool = typer.Option(False, "--json", help="Print comparison.json to stdout instead of tables."),
) -> None:
    """Judge candidate vs baseline completions paired by prompt and completion id (1-A vs 1-A, ...).

    Verdicts are for the later file against the earlier: W = the later model won, T = tie, L = lost.
    Example: preftune compare sft.jsonl dpo.jsonl --judge function:examples/judges.py:score --output cmp/
    """
    from preftune.compare import compare_generations, compare_models, summary_lines, write_report
    from preftune.judges import make_judge

    if len(files) < 2:
        raise PreftuneError("give at least two generation files (the first is the baseline)")
    kind = judge.partition(":")[0]
    opts: dict[str, Any] = {}
    if kind in ("reward", "function"):
        opts["margin"] = margin
    if kind in ("reward", "llm"):
        opts["batch_size"] = batch_size
    judge_obj = make_judge(judge, **opts)
    if len(files) == 2:
        result: Any = compare_generations(files[0], files[1], judge_obj, n_bootstrap=n_bootstrap, seed=seed)
        pairs = [result]
    else:
        result = compare_models(files, judge_obj, n_bootstrap=n_bootstrap, seed=seed)
        pairs = result.pairs
    written = write_report(result, output)
    if as_json:
        print_json(result.to_dict())
        return
    for res in pairs:
        console.print(_pair_table(res))
        for line in summary_lines(res):
            console.print(line, highlight=False)
        console.print()
    if len(files) > 2:
        console.print(_ranking_table(result.ranking))
    console.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `preftune compare` to the root app."""
    app.command(name="compare")(compare)
