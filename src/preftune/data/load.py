"""Load preference or SFT data from any source into dataclasses, with a report of what happened.

Nothing is silently dropped: every row is either loaded, or dropped and counted (only with
``drop_invalid=True``), and every finding is a :class:`Problem` in the :class:`LoadReport`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.data.formats import (
    ASSISTANT_TAG,
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    LoadReport,
    PreferencePair,
    Problem,
    Ranking,
    SFTExample,
    UnpairedExample,
    check_format_name,
    detect_format,
)
from preftune.data.records import RecordContext, parse_record
from preftune.data.sources import read_records
from preftune.data.validate import DROPPABLE, check_example, find_duplicates
from preftune.errors import PreftuneError

RANKING_MODES = ("keep", "pairs")


def load_preferences(source: str | Path, *, split: str = "train", format: str = "auto",
                     drop_invalid: bool = False, rankings: str = "keep",
                     assistant_tag: str = ASSISTANT_TAG) -> tuple[list[PreferencePair | Ranking | UnpairedExample],
                                                                  LoadReport]:
    """Read preference data (pairs, rankings or unpaired labels) from a file, directory or dataset.

    ``format="auto"`` detects the format from the first record; every later record must match it.
    ``rankings="pairs"`` expands each K-way ranking into its K-choose-2 pairs (tied scores skipped and
    counted). With ``drop_invalid=True``, rows whose chosen equals rejected and rows that fail a
    per-record check (missing field, empty text, ...) are dropped and counted; otherwise the first such
    check raises :class:`PreftuneError` and chosen == rejected rows are kept and reported.
    """
    if rankings not in RANKING_MODES:
        raise PreftuneError(f"unknown rankings mode '{rankings}'", field="rankings",
                            hint=f"use one of: {', '.join(RANKING_MODES)}")
    return _load(source, split=split, format=format, drop_invalid=drop_invalid, allowed=PREFERENCE_FORMATS,
                 rankings=rankings, assistant_tag=assistant_tag)


def load_sft(source: str | Path, *, split: str = "train", format: str = "auto",
             drop_invalid: bool = False) -> tuple[list[SFTExample], LoadReport]:
    """Read SFT data (``{prompt, completion}``, ``{messages}`` or ``{text}``) from a file, directory or dataset."""
    return _load(source, split=split, format=format, drop_invalid=drop_invalid, allowed=SFT_FORMATS,
                 rankings="keep", assistant_tag=ASSISTANT_TAG)


def load_any(source: str | Path, *, split: str = "train", format: str = "auto", drop_invalid: bool = False,
             rankings: str = "keep", assistant_tag: str = ASSISTANT_TAG) -> tuple[list[Any], LoadReport]:
    """Load preference or SFT data, whichever the source holds (used by `preftune data inspect`)."""
    return _load(source, split=split, format=format, drop_invalid=drop_invalid,
                 allowed=PREFERENCE_FORMATS + SFT_FORMATS, rankings=rankings, assistant_tag=assistant_tag)


def _load(source: str | Path, *, split: str, format: str, drop_invalid: bool, allowed: tuple[str, ...],
          rankings: str, assistant_tag: str) -> tuple[list[Any], LoadReport]:
    if format != "auto":
        check_format_name(format)
        _check_allowed(format, allowed, where=None)
    examples: list[Any] = []
    problems: list[Problem] = []
    files: list[str] = []
    n_rows = n_dropped = 0
    ctx: RecordContext | None = None
    for path, line, record in read_records(source, split=split):
        n_rows += 1
        if not files or files[-1] != path:
            files.append(path)
        if ctx is None:
            if format == "auto":
                try:
                    fmt = detect_format(record)
                except PreftuneError as exc:
                    raise PreftuneError(exc.message, path=path, line=line, hint=exc.hint) from None
                _check_allowed(fmt, allowed, where=(path, line))
                ctx = RecordContext(path, line, fmt, f"detected from {path}:{line}", auto=True,
                                    assistant_tag=assistant_tag)
            else:
                ctx = RecordContext(path, line, format, "forced", auto=False, assistant_tag=assistant_tag)
        ctx.path, ctx.line = path, line
        try:
            example, found = parse_record(record, ctx)
        except PreftuneError as exc:
            if not drop_invalid:
                raise
            problems.append(Problem("invalid", f"{path}:{line}", exc.field, exc.message))
            n_dropped += 1
            continue
        problems.extend(found)
        items = [example]
        if isinstance(example, Ranking) and rankings == "pairs":
            items = example.to_pairs()
            ties = example.n_ties()
            if ties:
                problems.append(Problem("tied_scores", example.source or "?", "scores",
                                        f"{ties} pair(s) with equal scores carry no preference and were skipped"))
        for item in items:
            item_problems = check_example(item)
            problems.extend(item_problems)
            if drop_invalid and any(p.kind in DROPPABLE for p in item_problems):
                n_dropped += 1
                continue
            examples.append(item)
    if ctx is None:
        raise PreftuneError("no records found", path=str(source), hint="the source is empty; check the path and split")
    problems.extend(find_duplicates(examples))
    report = LoadReport(source=str(source), format=ctx.format, n_rows=n_rows, n_loaded=len(examples),
                        problems=problems, n_dropped=n_dropped, format_from=ctx.format_from, files=files)
    return examples, report


def _check_allowed(fmt: str, allowed: tuple[str, ...], *, where: tuple[str, int] | None) -> None:
    if fmt in allowed:
        return
    path, line = where if where else (None, None)
    if fmt in SFT_FORMATS:
        msg, hint = (f"this is SFT data (format '{fmt}'), not preference data",
                     "load it with load_sft, or give records with chosen and rejected")
    else:
        msg, hint = (f"this is preference data (format '{fmt}'), not SFT data",
                     "load it with load_preferences, or give records with prompt/completion, messages or text")
    raise PreftuneError(msg, path=path, line=line, hint=hint)
