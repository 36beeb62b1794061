"""`preftune compare`: judge two or more models' completions; win / tie / loss, win rates, ranking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from preftune.cli._common import console, handle_errors, print_json
from preftune.errors import PreftuneError

COLOURS = {"W": "[green]W[/]", "T": "[dim]T[/]", "L": "[red]L[/]"}


def _judges(specs: list[str], *, margin: float, batch_size: int) -> Any:
    """One judge from one plain SPEC (as always); a dict name -> judge from NAME=SPEC or several specs
    (an unnamed one among several is named by its spec)."""
    from preftune.judges import make_judge

    judges: dict[str, Any] = {}
    named = False
    for text in specs:
        name, sep, spec = text.partition("=")
        if not sep or ":" in name or not name:   # no NAME= prefix (a path may hold '=' after the kind)
            name, spec = text, text
        else:
            named = True
        if name in judges:
            raise PreftuneError(f"the judge name {name!r} is given twice", field="--judge",
                                hint="give each judge its own name: --judge NAME=SPEC")
        kind = spec.partition(":")[0]
        opts: dict[str, Any] = {}
        if kind in ("reward", "function"):
            opts["margin"] = margin
        if kind in ("reward", "llm"):
            opts["batch_size"] = batch_size
        judges[name] = make_judge(spec, **opts)
    return judges if named or len(judges) > 1 else next(iter(judges.values()))


def _print_judges(result: Any) -> None:
    """The judges side by side, then the worst win rate in words."""
    from preftune.compare import judge_rows, worst_line

    header, rows = judge_rows(result)
    table = Table(title=f"{escape(result.candidate)} vs {escape(result.baseline)}, judge by judge")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for k, row in enumerate(rows):
        if k == len(rows) - 1:
            table.add_section()
        table.add_row(*(escape(c) for c in row))
    console.print(table)
    console.print(worst_line(result), highlight=False, markup=False)


def _pair_table(res: Any, *, judge: bool = False) -> Table:
    from preftune.compare import _short

    ids = sorted({r["completion_id"] for r in res.rows}, key=lambda c: (len(c), c))
    cand, base = escape(res.candidate), escape(res.baseline)  # user text: never read as markup
    table = Table(title=f"{cand} vs {base} (W = {cand} won)" + (f", judge {escape(res.judge)}" if judge else ""))
    table.add_column("#", justify="right")
    table.add_column("prompt")
    for c in ids:
        table.add_column(c, justify="center")
    for name in ("W", "T", "L"):
        table.add_column(name, justify="right")
    for p in res.per_prompt():
        table.add_row(escape(str(p["prompt_id"])), escape(_short(p["prompt"], 40)),
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
        table.add_row(str(p["rank"]), escape(p["name"]), f"{p['strength']:.3f}", escape(ci), str(p["wins"]), str(p["ties"]),
                      str(p["losses"]))
    return table


@handle_errors
def compare(
    files: list[Path] = typer.Argument(..., help="Completions: generate's JSONL, or text with PREFIX/POST n and "
                                       "COMPLETION/SUMMARY n-A blocks (.txt); the FIRST is the baseline (e.g. SFT)."),
    judge: list[str] = typer.Option(..., "--judge", "-j",
                                    help="reward:PATH | function:module:fn | function:file.py:fn | llm:PATH | "
                                         "human:DB; NAME=SPEC names it; repeat for several judges at once "
                                         "(e.g. one per group: --judge a=reward:DIR --judge b=function:r.py:fn)"),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for comparison.json, comparison.md, plots."),
    margin: float = typer.Option(0.0, help="reward/function judges: a tie when the scores differ by <= margin."),
    batch_size: int = typer.Option(8, "--batch-size", help="reward/llm judges: pairs per forward pass."),
    n_bootstrap: int = typer.Option(1000, "--n-bootstrap", help="Bootstrap resamples for the 95% intervals (0 = none)."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    as_json: bool = typer.Option(False, "--json", help="Print comparison.json to stdout instead of tables."),
) -> None:
    """Judge candidate vs baseline completions paired by prompt and completion id (1-A vs 1-A, ...).

    Verdicts are for the later file against the earlier: W = the later model won, T = tie, L = lost.
    Example: preftune compare sft.jsonl dpo.jsonl --judge function:examples/rewards.py:letters --output cmp/
    With several judges (or a named one): W/T/L and the win rate under each, and the worst win rate.
    """
    from preftune.compare import compare_generations, compare_models, summary_lines, write_report

    if len(files) < 2:
        raise PreftuneError("give at least two generation files (the first is the baseline)")
    judge_obj = _judges(judge, margin=margin, batch_size=batch_size)
    if isinstance(judge_obj, dict) and len(files) > 2:
        raise PreftuneError("several judges (or a named one) compare two files at a time", field="--judge",
                            hint="compare each candidate with the baseline in its own run")
    if len(files) == 2:
        result: Any = compare_generations(files[0], files[1], judge_obj, n_bootstrap=n_bootstrap, seed=seed)
        pairs = result.pairs if isinstance(judge_obj, dict) else [result]
    else:
        result = compare_models(files, judge_obj, n_bootstrap=n_bootstrap, seed=seed)
        pairs = result.pairs
    written = write_report(result, output)
    if as_json:
        print_json(result.to_dict())
        return
    group = isinstance(judge_obj, dict)
    for res in pairs:
        console.print(_pair_table(res, judge=group))
        for line in summary_lines(res):
            console.print(line, highlight=False, markup=False)
        console.print()
    if group:
        _print_judges(result)
    if len(files) > 2:
        console.print(_ranking_table(result.ranking))
    console.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add `preftune compare` to the root app."""
    app.command(name="compare")(compare)
