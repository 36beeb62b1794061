"""`preftune data inspect`: what a preference or SFT dataset holds, and what is wrong with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from preftune.cli._common import console, err_console, handle_errors, plural, print_json, show_progress

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
    """Print the format, counts, lengths, length bias, duplicates, labels per annotator and per group (and
    how often the groups agree), and every problem found."""
    from preftune.data import describe, load_any

    if tokenizer:
        _check_tokenizer_path(tokenizer)
    examples, report = load_any(source, split=split, format=format, drop_invalid=drop_invalid,
                                assistant_tag=assistant_tag.replace("\\n", "\n"))
    tok = _load_tokenizer(tokenizer) if tokenizer else None
    if tok is not None and not as_json and show_progress():
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


def _check_tokenizer_path(name: str) -> None:
    """A path (./x, /x, ~/x) must exist; checked before the data is read and transformers is imported."""
    from preftune.errors import PreftuneError

    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise PreftuneError("no such tokenizer directory", path=name, field="--tokenizer",
                            hint="check the path, or give a hub id such as Qwen/Qwen2.5-0.5B")


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    from preftune.errors import PreftuneError

    _check_tokenizer_path(name)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any failure is reported with what was tried
        raise PreftuneError(f"cannot load a tokenizer: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                            path=name, field="--tokenizer",
                            hint="give a local tokenizer directory (save_pretrained) or a hub id") from None


def _fmt(x: float) -> str:
    return f"{x:,.1f}" if isinstance(x, float) and not float(x).is_integer() else f"{int(x):,}"


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
        console.print(f"[bold]rankings[/] {k} response{'' if k == '1' else 's'} each, "
                      f"{plural(c['pairs_from_rankings'], 'pair')} when expanded")
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
    console.print(f"[bold]duplicates[/] {plural(d['duplicate_rows'], 'duplicate row')}; "
                  f"{plural(d['distinct_prompts'], 'distinct prompt')}, {d['repeated_prompts']:,} repeated "
                  f"(max {plural(d['max_rows_per_prompt'], 'row')} per prompt)")
    _print_labellers(info)
    problems = info["problems"]
    if not problems:
        console.print("[bold green]no problems found[/]")
        return
    counts = ", ".join(f"{v:,} {k}" for k, v in info["problem_counts"].items())
    console.print(f"[bold yellow]{plural(len(problems), 'problem')}[/] ({counts})")
    for p in problems[:_SHOWN_PROBLEMS]:
        field = f" field '{p['field']}'" if p["field"] else ""
        console.print(f"  {escape(p['where'])}{escape(field)}: {escape(p['message'])} [dim]({p['kind']})[/]",
                      highlight=False)
    if len(problems) > _SHOWN_PROBLEMS:
        console.print(f"  ... and {len(problems) - _SHOWN_PROBLEMS:,} more (use --json to see them all)")


def _print_labellers(info: dict[str, Any]) -> None:
    """Labels per annotator (the most active first) and per group, and how often the groups agree."""
    from rich.markup import escape
    from rich.table import Table

    def table(title: str, columns: list[str], *, text: int = 1) -> Table:
        t = Table(title=title, title_justify="left", box=None, pad_edge=False)
        for i, col in enumerate(columns):
            t.add_column(col, justify="left" if i < text else "right")
        return t

    if "annotators" in info:
        a = info["annotators"]
        st = a["labels_per_annotator"]
        console.print(f"[bold]annotators[/] {a['count']:,}, labels each: min {_fmt(st['min'])}, median "
                      f"{_fmt(st['median'])}, max {_fmt(st['max'])}; "
                      f"{plural(a['without_annotator'], 'row')} without an annotator")
        t = table("labels per annotator", ["annotator", "groups", "labels", "pairs"], text=2)
        ranked = sorted(a["by_annotator"].items(), key=lambda kv: (-kv[1]["labels"], kv[0]))
        for name, e in ranked[:_SHOWN_PROBLEMS]:
            t.add_row(escape(name), escape(", ".join(e["groups"])), f"{e['labels']:,}", f"{e['pairs']:,}")
        console.print(t)
        if len(ranked) > _SHOWN_PROBLEMS:
            console.print(f"  ... and {len(ranked) - _SHOWN_PROBLEMS:,} more annotators (use --json to see them all)")
    if "groups" not in info:
        return
    g = info["groups"]
    console.print(f"[bold]groups[/] {g['count']:,}; {plural(g['without_group'], 'row')} without a group")
    t = table("labels per group", ["group", "annotators", "labels", "pairs"])
    for name, e in g["by_group"].items():
        t.add_row(escape(name), f"{e['annotators']:,}", f"{e['labels']:,}", f"{e['pairs']:,}")
    console.print(t)
    names = list(g["by_group"])
    cells = {(x["groups"][0], x["groups"][1]): x for x in g["agreement"]["between"]}
    cells.update({(n, n): x for n, x in g["agreement"]["within"].items()})
    if not any(x["pairs"] for x in cells.values()):
        console.print("[bold]group agreement[/] no pair was labelled by two groups, or twice within a group")
        return
    console.print("[bold]group agreement[/] the share of labels that prefer the same response of a pair both "
                  "groups labelled (the number of such pairs); the diagonal: within the group")
    t = table("", ["group", *names])
    for row in names:
        entries = [cells.get((row, col)) or cells.get((col, row)) for col in names]
        t.add_row(escape(row), *("-" if not e or e["agreement"] is None else f"{e['agreement']:.2f} ({e['pairs']:,})"
                                 for e in entries))
    console.print(t)


def register(app: typer.Typer) -> None:
    """Add `preftune data` to the root app."""
    app.add_typer(data_app, name="data")
