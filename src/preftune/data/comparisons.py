"""Pairwise comparisons ``a, b, winner`` (a tie is ``winner: tie``) from CSV (with a header; extra columns
ignored) or JSONL, for the Bradley-Terry fit (``preftune.core.bt_fit``). Errors name the file, line and
field.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from preftune.core.bt_fit import check_comparison
from preftune.core.prefs import TIE
from preftune.data.jsonl import parse_jsonl, read_text
from preftune.errors import PreftuneError


def read_comparisons(path: str | Path) -> list[tuple[str, str, str]]:
    """Read ``a,b,winner`` comparisons from CSV (with a header; extra columns ignored) or JSONL."""
    path = Path(path)
    text = read_text(path, missing_hint="check the path to the comparisons file")
    if not text.strip():
        raise PreftuneError("the file is empty", path=str(path), line=1,
                            hint="write a header 'a,b,winner' and one comparison per row")
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        rows.extend(parse_jsonl(text, path=str(path)))
    else:
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip() for h in reader.fieldnames or []]
        for key in ("a", "b", "winner"):
            if key not in header:
                raise PreftuneError(f"missing column '{key}' in the header {header}", path=str(path), line=1,
                                    field=key, hint="the first row must be a header such as 'a,b,winner'")
        reader.fieldnames = header
        for row in reader:
            if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                rows.append((reader.line_num, row))
    out = []
    for line, row in rows:
        for key in ("a", "b", "winner"):
            if row.get(key) is None:
                raise PreftuneError(f"missing '{key}'", path=str(path), line=line, field=key)
        a, b, w = (row[k].strip() if isinstance(row[k], str) else row[k] for k in ("a", "b", "winner"))
        w = TIE if isinstance(w, str) and w.lower() == TIE and w not in (a, b) else w
        check_comparison(a, b, w, where="comparison", path=str(path), line=line)
        out.append((a, b, w))
    if not out:
        raise PreftuneError("no comparisons in the file", path=str(path), line=1)
    return out
