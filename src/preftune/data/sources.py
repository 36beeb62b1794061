"""Read raw records from wherever the data lives: JSONL, JSON, CSV, Parquet, a directory, or a dataset.

:func:`read_records` yields ``(file, line, record)``. ``line`` is the 1-based line in a JSONL, JSON or
CSV file (where the record starts) and the 1-based row number in a Parquet file or a Hugging Face
dataset, so every later error can point at the exact place.

A source is tried in this order: an existing file; an existing directory (a dataset saved with
``save_to_disk``, else every data file in it, sorted); ``hf:NAME`` or any other name, given to
``datasets.load_dataset(NAME, split=split)``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from preftune.data.jsonl import decode_json, parse_jsonl, read_text
from preftune.errors import PreftuneError

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")
_SPLIT_RE = re.compile(rf"^({'|'.join(SPLIT_NAMES)})(?:$|[-_.])")
_WS = re.compile(r"\s*")

Record = tuple[str, int, dict[str, Any]]


def read_records(source: str | Path, *, split: str = "train") -> Iterator[Record]:
    """Yield ``(file, line or row number, record)`` for every record in ``source`` (see module docstring)."""
    text = str(source)
    if text.startswith("hf:"):
        yield from _read_dataset(text[3:], split, explicit=True)
        return
    path = Path(text).expanduser()
    if path.is_file():
        yield from read_file(path, split=split)
    elif path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            yield from _read_saved_dataset(path, split)
        else:
            for file in data_files(path, split=split):
                yield from read_file(file, split=split)
    elif text.endswith(DATA_SUFFIXES) or text.startswith((".", "/", "~")) or "\\" in text:
        raise PreftuneError("no such file or directory", path=text,
                            hint="check the path (it is read relative to the current directory)")
    else:
        yield from _read_dataset(text, split, explicit=False)


def data_files(directory: Path, *, split: str = "train") -> list[Path]:
    """The data files under ``directory`` (recursively, sorted, hidden ones skipped).

    When files are named by split (``train.jsonl``, ``test-00000.parquet``, ``validation/part.json``),
    only those of ``split`` are returned; otherwise all of them.
    """
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES)
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if not files:
        raise PreftuneError(f"no data files ({', '.join(DATA_SUFFIXES)}) in this directory", path=str(directory))
    labels = {f: _split_of(f.relative_to(directory)) for f in files}
    if any(labels.values()):
        chosen = [f for f in files if labels[f] == split]
        if not chosen:
            found = sorted({s for s in labels.values() if s})
            raise PreftuneError(f"no files for split '{split}'; the file names name the splits: {', '.join(found)}",
                                path=str(directory), hint=f"pass one of them as split (--split {found[0]})")
        return chosen
    return files


def _split_of(rel: Path) -> str | None:
    for part in (*rel.parts[:-1], rel.name):
        m = _SPLIT_RE.match(part)
        if m:
            return m.group(1)
    return None


def read_file(path: Path, *, split: str = "train") -> Iterator[Record]:
    """Yield the records of one JSONL, JSON, CSV or Parquet file (``split`` picks a JSON object's list)."""
    name = str(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    if suffix not in DATA_SUFFIXES:
        raise PreftuneError(f"unsupported file type '{suffix or path.name}'", path=name,
                            hint=f"use one of {', '.join(DATA_SUFFIXES)}")
    text = read_text(path)
    if suffix == ".csv":
        yield from _read_csv(name, text)
    elif suffix == ".json":
        yield from _read_json(name, text, split)
    else:
        yield from _read_jsonl(name, text)


def _read_jsonl(name: str, text: str) -> Iterator[Record]:
    for line, record in parse_jsonl(text, path=name):
        yield name, line, record


def _read_json(name: str, text: str, split: str) -> Iterator[Record]:
    """A JSON list of objects, or an object holding one: {"<split>": [...]} or {"data": [...]}."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _read_jsonl(name, text)                # JSON Lines saved as .json
            return
        raise PreftuneError(f"malformed JSON: {exc.msg} (column {exc.colno})", path=name, line=exc.lineno,
                            hint="the file must hold one JSON value: a list of objects") from None
    except (RecursionError, ValueError):  # nested too deeply, an integer too long: say so as for a JSONL line
        data = decode_json(text, path=name)  # raises the PreftuneError that names the file and line
    key = None
    if isinstance(data, dict):
        key = next((k for k in (split, "data") if isinstance(data.get(k), list)), None)
        if key is None:
            raise PreftuneError(f"expected a list of records, or an object holding a '{split}' or 'data' list; "
                                f"found keys: {', '.join(map(str, data)) or 'none'}", path=name,
                                hint='write [{"prompt": ...}, ...] or {"data": [...]}, or pick the split')
        items = data[key]
    elif isinstance(data, list):
        items = data
    else:
        raise PreftuneError(f"expected a list of records, got {type(data).__name__}", path=name)
    lines = _element_lines(text, key)
    for i, record in enumerate(items):
        line = lines[i] if i < len(lines) else i + 1
        if not isinstance(record, dict):
            raise PreftuneError(f"expected a JSON object, got {type(record).__name__}", path=name, line=line,
                                hint="the list must hold objects with named fields")
        yield name, line, record


def _element_lines(text: str, key: str | None) -> list[int]:
    """The 1-based line where each element of the top-level list (or of ``data[key]``) starts."""
    dec = json.JSONDecoder()
    lines: list[int] = []
    try:
        i = _WS.match(text, 0).end()
        if key is not None:
            i += 1                                               # past '{'
            while True:
                i = _WS.match(text, i).end()
                k, i = dec.raw_decode(text, i)
                i = _WS.match(text, i).end() + 1                 # past ':'
                i = _WS.match(text, i).end()
                if k == key:
                    break
                _, i = dec.raw_decode(text, i)
                i = _WS.match(text, i).end() + 1                 # past ','
        i += 1                                                   # past '['
        line, pos = 1, 0
        while True:
            i = _WS.match(text, i).end()
            if text[i] == "]":
                return lines
            line += text.count("\n", pos, i)
            pos = i
            lines.append(line)
            _, i = dec.raw_decode(text, i)
            i = _WS.match(text, i).end()
            if text[i] == ",":
                i += 1
    except (ValueError, IndexError, RecursionError):
        return lines                                             # fall back to element numbers


def _read_csv(name: str, text: str) -> Iterator[Record]:
    """CSV with a header row; every value is a string (list fields may hold JSON arrays)."""
    import io

    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise PreftuneError(f"malformed CSV: {exc}", path=name, line=1) from None
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise PreftuneError(f"malformed CSV: {exc}", path=name, line=start) from None
        if row:
            if len(row) > len(header):
                raise PreftuneError(f"the row has {len(row)} cells but the header names {len(header)} columns",
                                    path=name, line=start, hint="quote cells that contain commas")
            yield name, start, {h: v for h, v in zip(header, row, strict=False)}
        start = reader.line_num + 1


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = str(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise PreftuneError(f"cannot read the Parquet file: {exc}", path=name) from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield name, row, record


def _rows(ds: Any, name: str) -> Iterator[Record]:
    for row, record in enumerate(ds, start=1):
        yield name, row, dict(record)


def _read_saved_dataset(path: Path, split: str) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure here is the user's directory
        raise PreftuneError(f"cannot load the saved dataset: {type(exc).__name__}: {exc}", path=str(path)) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PreftuneError(f"no split '{split}'; the dataset has: {', '.join(ds)}", path=str(path),
                                hint=f"pass one of them as split (--split {next(iter(ds))})")
        yield from _rows(ds[split], f"{path}[{split}]")
    else:
        yield from _rows(ds, str(path))


def _read_dataset(name: str, split: str, *, explicit: bool) -> Iterator[Record]:
    """``datasets.load_dataset(name, split=split)``: a Hub dataset name, or a local dataset folder."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - report what was tried, whatever went wrong
        tried = "" if explicit else "it is not a file or a directory, and "
        raise PreftuneError(f"{tried}datasets.load_dataset({name!r}, split={split!r}) failed: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", path=name,
                            hint="check the path, or the dataset name and split (a Hub dataset needs the "
                                 "network or a local cache)") from None
    yield from _rows(ds, f"{name}[{split}]")
