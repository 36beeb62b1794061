"""JSON Lines, the one reader and writer: every JSONL file preftune reads or writes goes through here.

Reading: UTF-8 (a byte-order mark is allowed), one JSON object per line, blank lines skipped. Errors
name the file and line and say what to do, in the same words wherever the file comes from::

    data.jsonl:2: malformed JSON: Expecting value (column 27)
    data.jsonl:3: expected a JSON object, got list
    data.jsonl:5: not UTF-8 text: byte 0xe9 at column 16

Writing: one object per line, UTF-8 (not ASCII-escaped); ``write_jsonl`` writes to a temporary file and
renames it, so a reader never sees a half-written file. ``append_jsonl`` adds records to a log that
grows during a run (metrics.jsonl, samples.jsonl) and ``truncate_jsonl`` drops the records a resumed run
writes again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

JSONL_HINT = "each line of a JSONL file must hold one complete JSON object"


def read_text(path: str | Path, *, missing_hint: str | None = None) -> str:
    """The file's text: UTF-8 with an optional byte-order mark, line ends as ``\\n``. A missing file, an
    unreadable one and bytes that are not UTF-8 (named by line and column) are errors."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PreftuneError("file not found", path=str(path), hint=missing_hint or "check the path") from None
    except OSError as exc:
        raise PreftuneError(f"cannot read the file: {exc.strerror or exc}", path=str(path)) from None
    try:
        return raw.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PreftuneError(f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {column}", path=str(path),
                            line=line, hint="save the file as UTF-8") from None


def parse_jsonl(text: str, *, path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, object)`` for each non-blank line of ``text`` (``path`` names the file in errors)."""
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PreftuneError(f"malformed JSON: {exc.msg} (column {exc.colno})", path=path, line=line,
                                hint=JSONL_HINT) from None
        if not isinstance(record, dict):
            raise PreftuneError(f"expected a JSON object, got {type(record).__name__}", path=path, line=line,
                                hint="each line of a JSONL file must hold one JSON object with named fields")
        yield line, record


def read_jsonl(path: str | Path, *, missing_hint: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(line, object)`` for every record of a JSONL file (see ``read_text`` and ``parse_jsonl``)."""
    return list(parse_jsonl(read_text(path, missing_hint=missing_hint), path=str(path)))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file, without their line numbers."""
    return [record for _, record in read_jsonl(path)]


def _line(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    """Write ``records`` one per line (parents created), atomically: a temporary file renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(_line(record))
    tmp.replace(path)
    return path


def append_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """Add ``records`` at the end of ``path`` (created if missing) and flush."""
    with Path(path).open("a", encoding="utf-8") as f:
        for record in records:
            f.write(_line(record))
        f.flush()


def truncate_jsonl(path: str | Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite ``path`` with only the records for which ``keep`` is true (an empty file when it is missing):
    a resumed run drops what the interrupted one wrote after its last checkpoint."""
    path = Path(path)
    kept = [record for _, record in read_jsonl(path) if keep(record)] if path.is_file() else []
    write_jsonl(path, kept)
