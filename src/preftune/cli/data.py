"""`preftune data inspect`: what a preference or SFT dataset holds, and what is wrong with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from preftune.cli._common import console, err_console, handle_errors, print_json

data_app = typer.Typer(help="Look at preference and SFT data before training on it.", no_args_is_help=True)

_SHOWN_PROBLEMS = 20


@data_app.command("inspect")
@handle_errors
def inspect(
    source: str = typer.Argument(..., help="A .jsonl/.json/.csv/.parquet file, a directory, or a dataset name."),
    split: str = typer.Option("train", "--split", help="Split of a dataset, or of split-named files."),
    format: str = typer.Option("auto", "--format", help="Force a format instead of detecting it."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Also count tokens (local dir or hub id)."),
    drop_invalid: bool = typer.Option(False, "--drop-invalid", help="Drop (and count) invalid rows."),
    assistant_tag: str = typer.Option("\\n\\nAssistant:", "--assistant-tag",
                                      help="Tag ending the prompt in implicit-prompt transcripts (\\n = newline)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON (all problems)."),
) -> None:
    """Print the format, counts, lengths, length bias, duplicates and every problem found."""
    from preftune.data import describe, load_any

    examples, report = load_any(source, split=split, format=format, drop_invalid=drop_invalid,
                                assistant_tag=assistant_tag.replace("\\n", "\n"))
    tok = _load_tokenizer(tokenizer) if tokenizer else None
    if tok is not None and not as_json:
        from rich.progress import Progress

        from preftune.data.validate import n_texts

        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task("counting tokens", total=n_texts(examples))
            info = describe(examples, report, tokenizer=tok, progress=lambda n: bar.advance(task, n))
    else:
        info = describe(examples, report, tokenizer=tok)
    if as_json:
        print_json(info)
    else:
        _print(info)


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    from preftune.errors import PreftuneError

    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise PreftuneError("no such tokenizer directory", path=name, field="--tokenizer",
                            hint="check the path, or give a hub id such as Qwen/Qwen2.5-0.5B")
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any failure is reported with what was tried
        raise PreftuneError(f"cannot load a tokenizer: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                            path=name, field="--tokenizer",
                            hint="give a local tokenizer directory (save_pretrained) or a hub id") from None


def _fmt(x: float) -> str:
    return f"{x:,.1f}" if isinstance(x, float) and not float(x).is_integer() else f"{int(x):,}"


def _n(k: int, noun: str) -> str:
    return f"{k:,} {noun}" + ("" if k == 1 else "s")


def _print(info: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    c = info["counts"]
    console.print(f"[bold]source[/]   {escape(info['source'])}")
    if info["files"] != [info["source"]]:
        console.print(f"[bold]files[/]    {escape(', '.join(info['files']))}")
    console.print(f"[bold]format[/]   {info['format']} ({escape(info['format_from'])})")
    kinds = ", ".join(f"{v:,} {k}" for k, v in c.items() if k[0].isupper())
    console.print(f"[bold]rows[/]     {c['rows']:,} read, {c['loaded']:,} loaded ({kinds or 'none'}), "
                  f"{c['dropped']:,} dropped")
    if "pairs_from_rankings" in c:
        r = c["responses_per_ranking"]
        k = _fmt(r["min"]) if r["min"] == r["max"] else f"{_fmt(r['min'])}-{_fmt(r['max'])}"
        console.print(f"[bold]rankings[/] {k} responses each, "
                      f"{c['pairs_from_rankings']:,} pairs when expanded")
    if "label_true" in c:
        console.print(f"[bold]labels[/]   {c['label_true']:,} true, {c['label_false']:,} false")

    for unit in ("chars", "tokens"):
        if unit not in info:
            continue
        table = Table(title=f"length ({unit})", title_justify="left", box=None, pad_edge=False)
        table.add_column("column")
        for stat in ("min", "mean", "median", "p95", "max"):
            table.add_column(stat, justify="right")
        for col, st in info[unit].items():
            table.add_row(col, *(_fmt(st[s]) for s in ("min", "mean", "median", "p95", "max")))
        console.print(table)
    for unit, b in info.get("length_bias", {}).items():
        console.print(f"[bold]length bias ({unit})[/] mean chosen - rejected {b['mean_chosen_minus_rejected']:+.2f}; "
                      f"chosen longer {b['frac_chosen_longer']:.0%}, shorter {b['frac_chosen_shorter']:.0%}, "
                      f"equal {b['frac_equal']:.0%}")
    d = info["duplicates"]
    console.print(f"[bold]duplicates[/] {_n(d['duplicate_rows'], 'duplicate row')}; "
                  f"{_n(d['distinct_prompts'], 'distinct prompt')}, {d['repeated_prompts']:,} repeated "
                  f"(max {_n(d['max_rows_per_prompt'], 'row')} per prompt)")
    problems = info["problems"]
    if not problems:
        console.print("[bold green]no problems found[/]")
        return
    counts = ", ".join(f"{v:,} {k}" for k, v in info["problem_counts"].items())
    console.print(f"[bold yellow]{_n(len(problems), 'problem')}[/] ({counts})")
    for p in problems[:_SHOWN_PROBLEMS]:
        field = f" field '{p['field']}'" if p["field"] else ""
        console.print(f"  {escape(p['where'])}{escape(field)}: {escape(p['message'])} [dim]({p['kind']})[/]",
                      highlight=False)
    if len(problems) > _SHOWN_PROBLEMS:
        console.print(f"  ... and {len(problems) - _SHOWN_PROBLEMS:,} more (use --json to see them all)")


def register(app: typer.Typer) -> None:
    """Add `preftune data` to the root app."""
    app.add_typer(data_app, name="data")
