"""Read the pairs to annotate from files.

Two sources:

1. A pairs file (``--pairs FILE``): JSONL, one object per line,
   ``{"id"?: str, "prompt": str, "response_a": str, "response_b": str, "meta"?: object}``.
   ``a``/``b`` are accepted for ``response_a``/``response_b``. A file in the standard preference
   format (``chosen``/``rejected``) is refused: the file must not say which response is better.
   Without ``id`` the id is a hash of the text, so loading the same file again adds nothing.
2. Generations files written by ``preftune generate`` (``--generations FILE``, rows with
   ``prompt_id, prompt, completion_id, completion, model``):
   - one file: every two completions of the same prompt make a pair (1-A vs 1-B, 1-A vs 1-C, ...);
   - two files: completions with the same prompt and completion id are paired (file 1's 1-A vs
     file 2's 1-A), as ``preftune compare`` does; rows with no partner are counted and reported.
   Pairs whose two responses are the same text are not loaded (nothing to judge) and are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from preftune.core.winrate import count
from preftune.data.annotations import Pair, content_id
from preftune.data.jsonl import read_jsonl
from preftune.errors import PreftuneError


@dataclass
class LoadResult:
    pairs: list[Pair]
    notes: list[str] = field(default_factory=list)   # what was not loaded, and why (with counts)


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line; a file without rows is an error."""
    rows = read_jsonl(path)
    if not rows:
        raise PreftuneError("the file holds no rows", path=str(path))
    return rows


def _text(obj: dict[str, Any], names: tuple[str, ...], *, path: Path, line: int) -> str:
    for name in names:
        if name in obj:
            value = obj[name]
            if not isinstance(value, str) or not value.strip():
                raise PreftuneError("must be a non-empty string", path=str(path), line=line, field=name)
            return value
    raise PreftuneError(f"missing field (present: {', '.join(sorted(obj)) or 'none'})", path=str(path),
                        line=line, field=names[0])


def load_pairs_file(path: str | Path) -> LoadResult:
    """Read a JSONL pairs file (see the module docstring)."""
    path = Path(path)
    pairs: list[Pair] = []
    same = repeated = 0
    seen: dict[str, int] = {}
    for line, obj in _read_jsonl(path):
        if "chosen" in obj or "rejected" in obj:
            raise PreftuneError("a pairs file must not say which response is better", path=str(path),
                                line=line, field="chosen" if "chosen" in obj else "rejected",
                                hint="rename the fields to response_a / response_b")
        prompt = _text(obj, ("prompt",), path=path, line=line)
        a = _text(obj, ("response_a", "a"), path=path, line=line)
        b = _text(obj, ("response_b", "b"), path=path, line=line)
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            raise PreftuneError("must be a JSON object", path=str(path), line=line, field="meta")
        pid = obj.get("id")
        if pid is None:
            pid = content_id(prompt, a, b)
        elif not isinstance(pid, (str, int)) or isinstance(pid, bool) or not str(pid).strip():
            raise PreftuneError("must be a non-empty string or an integer", path=str(path), line=line, field="id")
        pid = str(pid)
        if a == b:
            same += 1
            continue
        if pid in seen:
            if obj.get("id") is None:       # the same text twice in one file: load it once
                repeated += 1
                continue
            raise PreftuneError(f"duplicate id {pid!r} (first on line {seen[pid]})", path=str(path),
                                line=line, field="id")
        seen[pid] = line
        pairs.append(Pair(id=pid, prompt=prompt, response_a=a, response_b=b,
                          meta={**meta, "source": f"{path.name}:{line}"}))
    notes = [f"not loaded: {count(same, 'row')} with response_a == response_b (nothing to judge)"] if same else []
    if repeated:
        notes.append(f"loaded once: {count(repeated, 'row')} repeating an earlier row's text")
    return LoadResult(pairs=pairs, notes=notes)


def _read_generations(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line, obj in _read_jsonl(path):
        prompt = _text(obj, ("prompt",), path=path, line=line)
        completion = obj.get("completion")
        if not isinstance(completion, str):
            raise PreftuneError(f"missing or non-string field (present: {', '.join(sorted(obj))})",
                                path=str(path), line=line, field="completion",
                                hint="generations files are written by `preftune generate`")
        rows.append({"prompt": prompt, "completion": completion, "line": line,
                     "prompt_id": obj.get("prompt_id"), "model": obj.get("model"),
                     "completion_id": str(obj.get("completion_id", line))})
    return rows


def load_generations(paths: list[str | Path]) -> LoadResult:
    """Pairs from one generations file (within each prompt) or two (paired by prompt and completion id)."""
    if len(paths) not in (1, 2):
        raise PreftuneError(f"give one or two generations files, got {len(paths)}", field="generations")
    files = [Path(p) for p in paths]
    tables = [_read_generations(p) for p in files]
    candidates: list[tuple[str, str, str, dict[str, Any]]] = []
    notes: list[str] = []
    if len(files) == 1:
        by_prompt: dict[str, list[dict[str, Any]]] = {}
        for row in tables[0]:
            by_prompt.setdefault(row["prompt"], []).append(row)
        for prompt, rows in by_prompt.items():
            for x, y in combinations(rows, 2):
                meta = {"prompt_id": x["prompt_id"], "completion_a": x["completion_id"],
                        "completion_b": y["completion_id"], "model": x["model"], "source": files[0].name}
                candidates.append((prompt, x["completion"], y["completion"], meta))
        single = sum(1 for rows in by_prompt.values() if len(rows) < 2)
        if single:
            notes.append(f"no pair from {count(single, 'prompt')} with a single completion")
    else:
        keyed = [{(r["prompt"], r["completion_id"]): r for r in t} for t in tables]
        for key, x in keyed[0].items():
            y = keyed[1].get(key)
            if y is None:
                continue
            meta = {"prompt_id": x["prompt_id"], "completion_id": key[1], "model_a": x["model"],
                    "model_b": y["model"], "source_a": files[0].name, "source_b": files[1].name}
            candidates.append((key[0], x["completion"], y["completion"], meta))
        for i, j in ((0, 1), (1, 0)):
            missing = len(set(keyed[i]) - set(keyed[j]))
            if missing:
                verb = "has" if missing == 1 else "have"
                notes.append(f"{count(missing, 'completion')} in {files[i].name} {verb} no partner "
                             f"(same prompt and completion id) in {files[j].name}")
    pairs, same = [], 0
    for prompt, a, b, meta in candidates:
        if a == b:
            same += 1
            continue
        pairs.append(Pair(id=content_id(prompt, a, b), prompt=prompt, response_a=a, response_b=b, meta=meta))
    if same:
        notes.append(f"not loaded: {count(same, 'pair')} with two identical completions (nothing to judge)")
    if not pairs:
        raise PreftuneError("no pairs could be made from the generations", path=", ".join(map(str, files)),
                            hint="; ".join(notes) or None)
    return LoadResult(pairs=pairs, notes=notes)
