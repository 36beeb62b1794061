"""Ratings tables: several groups rate the same responses (the course exercise's table), from CSV
(``group,y1,y2,...``, one row per group) or JSON (``{"group": {"y1": 1.0, ...}}``, or the course file's
``{"responses": [...], "ratings": {group: [...]}}``). Every error names the file, the line and the field.
The models computed from a table (Bradley-Terry, MaxMin) are ``preftune.core.prefs``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from preftune.core.prefs import Ratings, rating_value, ratings_from_mapping
from preftune.data.jsonl import decode_json, read_text
from preftune.errors import PreftuneError


def read_ratings(path: str | Path) -> Ratings:
    """Read a ratings table from CSV (``group,y1,y2,...``) or JSON (``{"group": {"y1": 1.0}}``)."""
    path = Path(path)
    text = read_text(path, missing_hint="check the path to the ratings file")
    looks_json = path.suffix.lower() == ".json" or text.lstrip().startswith("{")
    return parse_ratings_json(text, path=str(path)) if looks_json else parse_ratings_csv(text, path=str(path))


def parse_ratings_csv(text: str, *, path: str = "<ratings>") -> Ratings:
    """Parse ``group,<response>,...`` with one row per group; every error names file, line, field."""
    if not text.strip():
        raise PreftuneError("the file is empty", path=path, line=1,
                            hint="write a header 'group,y1,y2,...' and one row of ratings per group")
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    values: dict[str, dict[str, float]] = {}
    lines: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if header is None:
            header = _check_header(cells, path=path, line=line)
            continue
        if len(cells) != len(header):
            raise PreftuneError(
                f"row has {len(cells) - 1} rating{'' if len(cells) == 2 else 's'} but the header names "
                f"{len(header) - 1} responses",
                path=path, line=line, field=header[0], hint="give every group one rating per response")
        group = cells[0]
        if not group:
            raise PreftuneError("empty group name", path=path, line=line, field=header[0])
        if group in values:
            raise PreftuneError(f"duplicate group '{group}' (first on line {lines[group]})",
                                path=path, line=line, field=header[0], hint="give each group one row")
        values[group] = {resp: rating_value(cell, path=path, line=line, field=resp)
                         for resp, cell in zip(header[1:], cells[1:], strict=True)}
        lines[group] = line
    if header is None or not values:
        raise PreftuneError("no rating rows after the header", path=path, line=1,
                            hint="add one row per group: name, then one rating per response")
    return Ratings(tuple(header[1:]), values, path, lines)


def _check_header(cells: list[str], *, path: str, line: int) -> list[str]:
    if len(cells) < 3 or all(_is_number(c) for c in cells[1:]):
        raise PreftuneError("missing header: expected 'group,<response>,<response>,...'", path=path,
                            line=line, hint="the first row names the responses (at least two)")
    seen: set[str] = set()
    for cell in cells:
        if not cell:
            raise PreftuneError("empty column name in the header", path=path, line=line)
        if cell in seen:
            raise PreftuneError(f"duplicate response name '{cell}' in the header", path=path, line=line,
                                field=cell, hint="give every response column a distinct name")
        seen.add(cell)
    return cells


def parse_ratings_json(text: str, *, path: str = "<ratings>") -> Ratings:
    """Parse ``{"group": {"response": rating}}`` (or the course file's ``{"responses", "ratings"}``)."""
    if not text.strip():
        raise PreftuneError("the file is empty", path=path, line=1,
                            hint='write {"group": {"y1": 1, "y2": 0}, ...}')
    obj = decode_json(text, path=path, hint='a ratings file holds one JSON object {"group": {"response": rating}}',
                      object_pairs_hook=lambda pairs: _no_duplicates(pairs, text, path))
    if isinstance(obj, dict) and isinstance(obj.get("responses"), list) and isinstance(obj.get("ratings"), dict):
        obj = _from_course_layout(obj, text=text, path=path)
    if not isinstance(obj, dict) or not obj:
        raise PreftuneError('expected a non-empty object {"group": {"response": rating}}', path=path, line=1)
    return ratings_from_mapping(obj, path=path, line_of=lambda key, after=None: _json_line(text, key, after=after))


def _no_duplicates(pairs: list[tuple[str, Any]], text: str, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PreftuneError(f"duplicate name '{key}'", path=path, line=_json_line(text, key, last=True),
                                field=key, hint="every group and every response must be named once")
        out[key] = value
    return out


def _from_course_layout(obj: dict[str, Any], *, text: str, path: str) -> dict[str, Any]:
    responses = obj["responses"]
    out = {}
    for group, row in obj["ratings"].items():
        if not isinstance(row, list) or len(row) != len(responses):
            raise PreftuneError(f"expected a list of {len(responses)} ratings", path=path,
                                line=_json_line(text, group), field=group)
        out[group] = dict(zip(responses, row, strict=True))
    return out


def _json_line(text: str | None, key: str, *, last: bool = False, after: str | None = None) -> int | None:
    """Line of the first (or last) ``"key":`` in a JSON text, searching after ``"after":`` if given."""
    if text is None:
        return None
    start = 0
    if after is not None:
        found = re.search(re.escape(json.dumps(after)) + r"\s*:", text)
        start = found.end() if found else 0
    hits = list(re.compile(re.escape(json.dumps(key)) + r"\s*:").finditer(text, start))
    if not hits:
        return None
    return text.count("\n", 0, hits[-1 if last else 0].start()) + 1


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


