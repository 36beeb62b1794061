"""`preftune annotate serve | load | export | stats`: people label pairs in a browser."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from preftune.cli._common import console, handle_errors, print_json
from preftune.errors import PreftuneError

annotate_app = typer.Typer(
    help="Label pairs of responses in a browser; export the labels as preference data.",
    no_args_is_help=True,
)

DB_OPTION = typer.Option(..., "--db", help="The annotation database (SQLite; created if missing).")
DB_EXISTING = typer.Option(..., "--db", help="The annotation database (SQLite) that `annotate serve` or "
                           "`annotate load` wrote; it must exist.")


def _read_sources(pairs: Path | None, generations: list[Path] | None):
    """Pairs from a pairs file or generations files (None when neither is given), read before the
    database is opened, so a bad file leaves no new database behind."""
    from preftune.annotate.sources import load_generations, load_pairs_file

    if pairs is not None and generations:
        raise PreftuneError("give either --pairs or --generations, not both", field="pairs")
    if pairs is not None:
        return load_pairs_file(pairs)
    if generations:
        return load_generations(list(generations))
    return None


def _load_into(store, result) -> None:
    """Add the pairs read by _read_sources to the store and print what happened."""
    if result is None:
        return
    added, present = store.add_pairs(result.pairs)
    console.print(f"loaded {_n(added, 'new pair')} ({present:,} already in the database); {store.count_pairs():,} in all")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")


def _n(k: int, noun: str) -> str:
    return f"{k:,} {noun}" + ("" if k == 1 else "s")


def _open_store(db: Path, *, must_exist: bool):
    from preftune.data.annotations import AnnotationStore

    if must_exist and not db.exists():
        raise PreftuneError("no annotation database here", path=str(db),
                            hint="start one with `preftune annotate serve --pairs FILE --db PATH`")
    return AnnotationStore(db, create=not must_exist)


@handle_errors
def serve(
    db: Path = DB_OPTION,
    pairs: Path | None = typer.Option(None, "--pairs", help="JSONL of {id?, prompt, response_a, response_b}; "
                                      "optional once the database holds pairs."),
    generations: list[Path] | None = typer.Option(None, "--generations", help="Generations file(s) from "
                                                  "`preftune generate` instead of --pairs: one (pairs within a "
                                                  "prompt) or two (paired by prompt and completion id)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for a network)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    per_pair: int | None = typer.Option(None, "--per-pair", help="K: offer a pair until it has K labels "
                                        "(skips do not count; 0 = every annotator). Default 1, kept in the db."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for the left/right order (default 0, kept in "
                                    "the db)."),
    allow_origin: list[str] | None = typer.Option(None, "--allow-origin", help="An origin (scheme://host[:port]) "
                                                  "besides the server's own address whose pages may send "
                                                  "answers, e.g. a proxy's https://label.example.org; "
                                                  "repeatable."),
) -> None:
    """Load pairs (if given) and run the labelling web app until Ctrl-C."""
    import uvicorn

    from preftune.annotate.app import create_app
    from preftune.annotate.security import loopback_hosts

    origins = list(allow_origin or [])
    hosts = loopback_hosts(host, origins)             # checks the origins before anything is loaded
    result = _read_sources(pairs, generations)
    store = _open_store(db, must_exist=False)
    store.configure(per_pair=per_pair, seed=seed)
    _load_into(store, result)
    if store.count_pairs() == 0:
        raise PreftuneError("the database holds no pairs", path=str(db),
                            hint="load some with --pairs FILE or --generations FILE")
    console.print(f"serving {_n(store.count_pairs(), 'pair')} from {escape(str(db))} (per pair: {store.per_pair or 'all'}, "
                  f"seed {store.seed}) at [bold]http://{host}:{port}/[/]", highlight=False)
    uvicorn.run(create_app(store, allow_origins=origins, hosts=hosts), host=host, port=port, log_level="warning")


@handle_errors
def load(
    db: Path = DB_OPTION,
    pairs: Path | None = typer.Option(None, "--pairs", help="JSONL of {id?, prompt, response_a, response_b}."),
    generations: list[Path] | None = typer.Option(None, "--generations", help="One or two generations files."),
) -> None:
    """Load pairs into the database without serving (loading the same file twice adds nothing)."""
    if pairs is None and not generations:
        raise PreftuneError("nothing to load", field="pairs", hint="give --pairs FILE or --generations FILE")
    result = _read_sources(pairs, generations)
    _load_into(_open_store(db, must_exist=False), result)


@handle_errors
def export(
    db: Path = DB_EXISTING,
    output: Path = typer.Option(..., "--output", "-o", help="Preference JSONL to write."),
    ties: str = typer.Option("drop", "--ties", help="drop | keep (tie: true rows in the output) | separate."),
    ties_file: Path | None = typer.Option(None, "--ties-file", help="Where --ties separate writes ties "
                                          "(default: OUTPUT with .ties.jsonl)."),
    min_agreement: float | None = typer.Option(None, "--min-agreement", help="Keep pairs whose answers agree "
                                               "at least this much (share equal to the most common answer)."),
    min_labels: int = typer.Option(1, "--min-labels", help="Keep pairs with at least this many answers."),
) -> None:
    """Write one {prompt, chosen, rejected, annotator, group, pair_id} row per label (skips never)."""
    from preftune.annotate.export import preference_rows
    from preftune.data.jsonl import write_jsonl

    if ties_file is not None and ties != "separate":
        raise PreftuneError("--ties-file is only used with --ties separate", field="ties_file")
    store = _open_store(db, must_exist=True)
    result = preference_rows(store.labels(), ties=ties, min_agreement=min_agreement, min_labels=min_labels)
    write_jsonl(output, result.rows)
    c = result.counts
    console.print(f"wrote {_n(c['rows'], 'row')} to {output} from {_n(c['labels'], 'label')}: "
                  f"{_n(c.get('preferences', 0), 'preference')}, {_n(c.get('ties', 0), 'tie')} ({ties}), "
                  f"{_n(c.get('skips', 0), 'skip')} (never exported), "
                  f"{_n(c.get('left_out_by_agreement', 0), 'label')} on "
                  f"{_n(c['pairs_left_out_by_agreement'], 'pair')} left out by --min-agreement/--min-labels",
                  highlight=False)
    if c.get("empty_response"):
        console.print(f"note: {_n(c['empty_response'], 'label')} left out because the chosen or rejected text "
                      "is empty (the data loader rejects empty text)", highlight=False)
    if ties == "separate":
        path = ties_file or output.with_name(output.name.removesuffix(".jsonl") + ".ties.jsonl")
        write_jsonl(path, result.tie_rows)
        console.print(f"wrote {_n(len(result.tie_rows), 'tie')} to {path}", highlight=False)


@handle_errors
def stats(
    db: Path = DB_EXISTING,
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
) -> None:
    """Counts per annotator and group, percent agreement and Cohen's or Fleiss' kappa."""
    from rich.table import Table

    from preftune.annotate.stats import agreement, label_counts

    store = _open_store(db, must_exist=True)
    labels = store.labels()
    by_annotator, by_group = label_counts(labels, by="annotator"), label_counts(labels, by="group")
    report = agreement(labels)
    if as_json:
        print_json({"pairs": store.count_pairs(), "labels": len(labels), "by_annotator": by_annotator,
                    "by_group": by_group, "agreement": report})
        return
    console.print(f"{_n(store.count_pairs(), 'pair')}, {_n(len(labels), 'label')}, "
                  f"{_n(len(by_annotator), 'annotator')}", highlight=False)
    for title, counts in (("annotator", by_annotator), ("group", by_group)):
        table = Table(title=f"labels per {title}")
        for col in (title, "a", "b", "tie", "skip", "total"):
            table.add_column(col, justify="left" if col == title else "right")
        for key, c in counts.items():
            table.add_row(escape(str(key)), *(str(c.get(k, 0)) for k in ("a", "b", "tie", "skip")), str(sum(c.values())))
        console.print(table)
    if report.method is None:
        console.print(f"agreement: {report.note}", highlight=False, markup=False)
        return
    kappa = "undefined (chance agreement is 1)" if report.kappa is None else f"{report.kappa:.4f}"
    name = "Cohen's" if report.method == "cohen" else "Fleiss'"
    console.print(f"percent agreement {100 * report.agreement:.1f}%, {name} kappa {kappa} "
                  f"({report.note})",
                  highlight=False)
    if report.method == "fleiss" and report.pairwise:
        table = Table(title="Cohen's kappa for every two annotators")
        for col in ("first", "second", "pairs", "agreement", "kappa"):
            table.add_column(col, justify="left" if col in ("first", "second") else "right")
        for pw in report.pairwise:
            table.add_row(escape(pw.first), escape(pw.second), str(pw.n_pairs), f"{100 * pw.agreement:.1f}%",
                          "-" if pw.kappa is None else f"{pw.kappa:.4f}")
        console.print(table)


def register(app: typer.Typer) -> None:
    """Add `preftune annotate ...` to the root app."""
    annotate_app.command(name="serve")(serve)
    annotate_app.command(name="load")(load)
    annotate_app.command(name="export")(export)
    annotate_app.command(name="stats")(stats)
    app.add_typer(annotate_app, name="annotate")
