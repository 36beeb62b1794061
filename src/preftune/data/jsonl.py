"""JSON Lines, the one reader and writer: every JSONL file preftune reads or writes goes through here.

Reading: UTF-8 (a byte-order mark is allowed), one JSON object per line, blank lines skipped. Errors
name the file and line and say what to do, in the same words wherever the file comes from::

    data.jsonl:2: malformed JSON: Expecting value (column 27)
    data.jsonl:3: expected a JSON object, got list
    data.jsonl:5: not UTF-8 text: byte 0xe9 at column 16

Writing: one object per line, UTF-8 (not ASCII-escaped); ``write_jsonl`` writes to a temporary file,
fsyncs it and renames it (then fsyncs the folder), so a reader never sees a half-written file, even after
a power cut. ``append_jsonl`` adds records to a log that grows during a run (metrics.jsonl,
samples.jsonl; ``sync_file`` makes what it wrote durable) and ``truncate_jsonl`` drops the records a
resumed run writes again, and, when asked, a torn last line (an append cut off by a crash).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

JSONL_HINT = "each line of a JSONL file must hold one complete JSON object"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


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
    return _decode(raw, path)


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PreftuneError(f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {column}", path=str(path),
                            line=line, hint="save the file as UTF-8") from None


def split_lines(text: str) -> list[str]:
    """The lines of ``text``, split at ``\\n`` and ``\\r`` only: U+2028, U+0085 and the other characters that
    ``str.splitlines`` also breaks at may stand unescaped inside a JSON string (and do in what
    ``write_jsonl`` writes), so they are part of a line here."""
    return _LINE_BREAK.split(text)


def decode_json(text: str, *, path: str, line: int | None = None, hint: str = JSONL_HINT, **kwargs: Any) -> Any:
    """``json.loads(text)``, every failure a PreftuneError naming the file and line: malformed JSON, nesting
    deeper than Python's JSON reader can follow, an integer too long to convert. ``line`` is the line that
    ``text`` is (one JSONL line); without it, lines are counted in ``text`` (a whole JSON file)."""
    try:
        return json.loads(text, **kwargs)
    except json.JSONDecodeError as exc:
        raise PreftuneError(f"malformed JSON: {exc.msg} (column {exc.colno})", path=path,
                            line=line if line is not None else exc.lineno, hint=hint) from None
    except RecursionError:
        depth, deepest = _nesting(text)
        raise PreftuneError(f"JSON nested {depth:,} levels deep, too deep to read", path=path,
                            line=line if line is not None else deepest,
                            hint="no record needs this many levels of [ ] or { }: write the data flat") from None
    except ValueError as exc:  # an integer longer than sys.get_int_max_str_digits() digits
        raise PreftuneError(f"unreadable JSON value: {str(exc).split(';')[0]}", path=path, line=line,
                            hint="write such a number as a string, or with fewer digits") from None


def _nesting(text: str) -> tuple[int, int]:
    """(deepest nesting of [ ] and { } outside strings, the 1-based line where it is reached)."""
    depth = deepest = 0
    line = where = 1
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, line
        elif ch in "]}":
            depth -= 1
        if ch == "\n":
            line += 1
    return deepest, where


def parse_jsonl(text: str, *, path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, object)`` for each non-blank line of ``text`` (``path`` names the file in errors)."""
    for line, raw in enumerate(split_lines(text), start=1):
        if not raw.strip():
            continue
        record = decode_json(raw, path=path, line=line)
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
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    sync_dir(path.parent)
    return path


def append_jsonl(path: str | Path, records: Iterable[Any], *, sync: bool = False) -> None:
    """Add ``records`` at the end of ``path`` (created if missing) and flush; ``sync``: also fsync."""
    with Path(path).open("a", encoding="utf-8") as f:
        for record in records:
            f.write(_line(record))
        f.flush()
        if sync:
            os.fsync(f.fileno())


def sync_file(path: str | Path) -> None:
    """fsync ``path`` if it exists: what was appended to it survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in directory ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform where folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def truncate_jsonl(path: str | Path, keep: Callable[[dict[str, Any]], bool], *,
                   on_torn_tail: Callable[[str], None] | None = None) -> None:
    """Rewrite ``path`` with only the records for which ``keep`` is true (an empty file when it is missing):
    a resumed run drops what the interrupted one wrote after its last checkpoint.

    With ``on_torn_tail``, a last line that is not a complete JSON object (an append cut off by a crash or
    a power cut) is dropped and ``on_torn_tail`` is called with a message saying so; a bad line before the
    last one is still an error. Without it, a torn last line is an error like any other."""
    path = Path(path)
    if not path.is_file():
        write_jsonl(path, [])
        return
    if on_torn_tail is not None:
        raw = path.read_bytes()
        body, torn, line = _split_torn_tail(raw)
        if torn:
            kept = [record for _, record in parse_jsonl(_decode(body, path), path=str(path)) if keep(record)]
            write_jsonl(path, kept)
            on_torn_tail(f"{path}:{line}: dropped a torn last line ({len(torn)} bytes, not a complete JSON "
                         "object: the previous run stopped while writing it)")
            return
    write_jsonl(path, [record for _, record in read_jsonl(path) if keep(record)])


def _split_torn_tail(raw: bytes) -> tuple[bytes, bytes, int]:
    """(the bytes before the last non-blank line, that line if it is not one complete JSON object else b"",
    its line number)."""
    end = len(raw.rstrip(b" \t\r\n"))
    start = raw.rfind(b"\n", 0, end) + 1
    last = raw[start:end]
    if not last:
        return raw, b"", 0
    try:
        complete = isinstance(json.loads(last.decode("utf-8-sig")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        complete = False
    return (raw, b"", 0) if complete else (raw[:start], raw[start:], raw.count(b"\n", 0, start) + 1)
