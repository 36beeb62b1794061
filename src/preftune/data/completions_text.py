"""Completions as readable text: the layout `preftune generate` writes beside its JSONL and the course
hands out (``output_*_{MODEL}.txt``), read back into generation records.

A file is a sequence of numbered blocks. A prompt block opens with ``PREFIX n``, ``POST n`` or
``PROMPT n``; each of its completions opens with ``COMPLETION n-X``, ``SUMMARY n-X`` or ``RESPONSE n-X``
(``X`` = A, B, ..., ``n`` = the prompt's number). A block's text starts after the header's colon (one
space after it is part of the layout, not of the text) and runs to the next header, so it may span
lines::

    PREFIX 1: O, what a noble mind is here o'erthrown!
    COMPLETION 1-A: The courtier's, soldier's, scholar's, eye, tongue, sword;
    COMPLETION 1-B: and I, of ladies most deject and wretched

    POST 2:
    SUBREDDIT: r/relationships
    TITLE: ...
    SUMMARY 2-A:
    I want to ...

Keywords are upper case (so a ``POST:`` or ``Post 2`` line inside a Reddit post stays text); ``#`` or
``=`` around a header (``### PREFIX 1``, ``=== POST 1 ===``) are allowed. Blank lines and separator
lines (``---``, ``===``) at the end of a block are not part of its text. `preftune generate` writes
a newline inside a completion as `` / `` (and drops carriage returns) to keep one line per completion;
it is read back as written, so its JSONL stays the exact record.

``read_completions_text(path)`` returns ``{prompt_id, prompt, completion_id, completion, line}`` records
(``line``: where the completion's header is); an error names the file, the line and the block.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from preftune.data.jsonl import read_text
from preftune.errors import PreftuneError

PROMPT_KEYWORDS = ("PREFIX", "POST", "PROMPT")
COMPLETION_KEYWORDS = ("COMPLETION", "SUMMARY", "RESPONSE")
_DECOR = r"[ \t#=]*"
_PROMPT = re.compile(rf"^{_DECOR}(?P<kind>{'|'.join(PROMPT_KEYWORDS)})[ \t]+(?P<n>\d+)"
                     rf"(?:[ \t]*:[ \t]?(?P<text>.*)|{_DECOR})$")
_COMPLETION = re.compile(rf"^{_DECOR}(?P<kind>{'|'.join(COMPLETION_KEYWORDS)})[ \t]+(?P<n>\d+)[ \t]*-[ \t]*"
                         rf"(?P<id>[A-Za-z]+)(?:[ \t]*:[ \t]?(?P<text>.*)|{_DECOR})$")
# a line that starts like a header (keyword, space, digit) but is not one: a block that does not parse
_ALMOST = re.compile(rf"^{_DECOR}(?P<kind>{'|'.join(PROMPT_KEYWORDS + COMPLETION_KEYWORDS)})[ \t]*\d")
_SEPARATOR = re.compile(r"^\s*([-=*_#])\1{2,}\s*$")
_FORMS = "PREFIX n: text (or POST n / PROMPT n), then COMPLETION n-A: text (or SUMMARY n-A / RESPONSE n-A)"


def looks_like_completions_text(path: str | Path) -> bool:
    """True when the file's first non-blank line is a prompt header (``PREFIX 1: ...``)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                return bool(_PROMPT.match(line.rstrip("\r\n")))
    return False


def _block_text(lines: list[str]) -> str:
    """The lines of a block without blank or separator lines at its start and end."""
    while lines and (not lines[-1].strip() or _SEPARATOR.match(lines[-1])):
        lines = lines[:-1]
    while lines and not lines[0].strip():
        lines = lines[1:]
    return "\n".join(lines)


def read_completions_text(path: str | Path) -> list[dict[str, Any]]:
    """Records ``{prompt_id, prompt, completion_id, completion, line}`` from a file in the text layout
    (module docstring), in file order; completion ids are paired across models as ``n-X``."""
    path = Path(path)
    # split on "\n" only: str.splitlines() would also split on \x0b, \x1c, \u2028, ... inside a completion
    lines = read_text(path, missing_hint="give a completions file (.jsonl or .txt)").split("\n")
    prompts: dict[int, tuple[str, int]] = {}          # n -> (prompt text, header line)
    records: list[dict[str, Any]] = []
    seen: dict[tuple[int, str], int] = {}             # (n, X) -> header line
    block: dict[str, Any] | None = None               # the open block: kind, n, id, line, lines

    def close() -> None:
        if block is None:
            return
        text = _block_text(block["lines"])
        if block["id"] is None:
            if not text.strip():
                raise PreftuneError(f"{block['kind']} {block['n']} has no text", path=str(path), line=block["line"],
                                    hint=f"write the prompt after the header: {block['kind']} {block['n']}: <text>")
            prompts[block["n"]] = (text, block["line"])
        else:
            records.append({"prompt_id": block["n"], "prompt": prompts[block["n"]][0], "completion_id": block["id"],
                            "completion": text, "line": block["line"]})

    current: int | None = None  # the number of the open prompt
    for lineno, line in enumerate(lines, start=1):
        prompt, completion = _PROMPT.match(line), _COMPLETION.match(line)
        if prompt:
            close()
            n = int(prompt["n"])
            if n in prompts:
                raise PreftuneError(f"{prompt['kind']} {n} appears twice (first on line {prompts[n][1]})", path=str(path),
                                    line=lineno, hint="number the prompts 1, 2, 3, ... once each")
            current = n
            block = {"kind": prompt["kind"], "n": n, "id": None, "line": lineno, "lines": [prompt["text"] or ""]}
        elif completion:
            close()
            n, cid = int(completion["n"]), completion["id"].upper()
            name = f"{completion['kind']} {n}-{cid}"
            if current is None:
                raise PreftuneError(f"{name} comes before any prompt block", path=str(path), line=lineno,
                                    hint=f"start with the prompt: {_FORMS}")
            if n != current:
                raise PreftuneError(f"{name} is inside the block of prompt {current}: its number must be {current}",
                                    path=str(path), line=lineno, hint=f"write {completion['kind']} {current}-{cid}, "
                                    f"or start prompt {n} with its own PREFIX / POST {n} block")
            if (n, cid) in seen:
                raise PreftuneError(f"{name} appears twice (first on line {seen[(n, cid)]})", path=str(path),
                                    line=lineno, hint="give each completion of a prompt its own letter: A, B, C, ...")
            seen[(n, cid)] = lineno
            block = {"kind": completion["kind"], "n": n, "id": cid, "line": lineno, "lines": [completion["text"] or ""]}
        elif _ALMOST.match(line):
            raise PreftuneError(f"cannot read the block header {line.strip()[:60]!r}", path=str(path), line=lineno,
                                hint=f"headers look like {_FORMS}")
        elif block is None:
            if line.strip():
                raise PreftuneError(f"text before the first block: {line.strip()[:60]!r}", path=str(path),
                                    line=lineno, hint=f"the file starts with a prompt block: {_FORMS}")
        else:
            block["lines"].append(line)
    close()
    if not records:
        raise PreftuneError("no completion blocks in the file", path=str(path), hint=f"blocks look like {_FORMS}")
    return records
