"""The demo's corpus: public-domain Shakespeare (Project Gutenberg editions) shipped in the package.

``corpus/*.txt`` are the plays and poems as Gutenberg prints them, trimmed of the front matter (title,
list of persons, dedications). ``corpus/heldout_prefixes.txt`` holds the prefixes the preference-tuned
models are evaluated on; the first five are the course exercise's. The prefixes of the SFT and preference
stages are drawn from the rest of the corpus, at least ``GAP`` lines away from any held-out prefix, so
the tuned models are compared on prefixes they never saw in SFT or preference training (the base
language model has read the whole corpus, held-out lines included, as a pretrained model would).

A *block* is what lies between blank lines: a speaker's name and speech (``HAMLET.`` / lines), a stage
direction (``[Exit.]``), a scene heading, or a stanza of a poem.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

GAP = 20  # lines kept between a held-out prefix and any training prefix

# the files of corpus/, in a fixed order (the order of the language-modelling text)
WORKS = (
    "sonnets", "hamlet", "henry_vi_part_3", "macbeth", "romeo_and_juliet", "richard_iii", "lear",
    "othello", "julius_caesar", "tempest", "midsummer_nights_dream", "rape_of_lucrece", "lovers_complaint",
)

_SPEAKER = re.compile(r"^[A-Z0-9][A-Za-z0-9'’\- ]{0,30}\.$")           # "HAMLET.", "First Lord.", "Ber."
_STAGE = re.compile(r"^\[.*\]?$|^(Enter|Exit|Exeunt|Re-enter)\b")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|EPILOGUE|[IVXLC]+\.?$)\b")


def corpus_dir() -> Path:
    return Path(str(resources.files("preftune.experiments.demo") / "corpus"))


def read_work(name: str) -> str:
    return (corpus_dir() / f"{name}.txt").read_text(encoding="utf-8")


def clean(text: str) -> str:
    """Gutenberg text -> the demo's text: no front matter, no leading indentation, single blank lines."""
    lines = [line.strip() for line in text.replace("\r", "").splitlines()]
    start = next((i for i, line in enumerate(lines) if re.match(r"^(ACT|Act|ACTUS)\s+(I|1)\b", line)), None)
    if start is None:  # a poem: after the title lines
        start = next((i for i, line in enumerate(lines) if i > 3 and line and not line.isupper()), 0)
    out = "\n".join(lines[start:])
    return re.sub(r"\n{3,}", "\n\n", out).strip() + "\n"


def is_speaker(line: str) -> bool:
    """A speaker's name line (``HAMLET.``, ``First Witch.``, ``Ber.``, ``GLOSTER``): short and capitalised,
    ending with '.' or all in capitals."""
    words = line.split()
    if len(line) < 3 or len(words) > 4 or not all(w[0].isupper() or w[0].isdigit() for w in words):
        return False
    return bool(_SPEAKER.match(line)) or (line.isupper() and len(line) > 2 and bool(re.fullmatch(r"[A-Z' \-]+", line)))


def is_stage_direction(line: str) -> bool:
    return bool(_STAGE.match(line))


def is_verse(line: str) -> bool:
    """A line of the text proper: not a speaker, stage direction or heading, and at least three words."""
    return bool(line) and not (is_speaker(line) or is_stage_direction(line) or _HEADING.match(line)) \
        and len(line.split()) >= 3


@dataclass(frozen=True)
class Line:
    work: str
    index: int        # line number in the cleaned text (0-based)
    text: str


@dataclass
class Corpus:
    texts: dict[str, str]       # work -> cleaned text

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, text in self.texts.items():
            h.update(name.encode() + b"\0" + text.encode() + b"\0")
        return h.hexdigest()[:16]

    def language_modelling_text(self) -> str:
        return "\n\n".join(self.texts.values())

    def blocks(self) -> list[str]:
        """Every block (speech, stanza, direction) of every work, in order."""
        return [b.strip() for text in self.texts.values() for b in text.split("\n\n") if b.strip()]

    def lines(self, work: str) -> list[str]:
        return self.texts[work].splitlines()


def load_corpus(works: tuple[str, ...] = WORKS) -> Corpus:
    return Corpus({name: clean(read_work(name)) for name in works})


def heldout_prefixes() -> list[str]:
    path = corpus_dir() / "heldout_prefixes.txt"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def continuation(lines: list[str], index: int, *, n_lines: int) -> str:
    """The text after line ``index``: the next ``n_lines`` non-blank lines (speakers and directions count),
    with the blank lines between them, starting with the newline that ends line ``index``."""
    out, taken = [], 0
    for line in lines[index + 1:]:
        if taken == n_lines:
            break
        out.append(line)
        taken += bool(line.strip())
    return "\n" + "\n".join(out).rstrip()


def prefix_lines(corpus: Corpus, *, exclude: list[str], gap: int = GAP, seed: int = 0) -> list[Line]:
    """Candidate prefixes: verse lines that follow on with more text, at least ``gap`` lines from any
    line that starts one of ``exclude`` (the held-out prefixes), in a seeded random order."""
    keys = [k for k in (_key(p) for p in exclude) if k]
    found: list[Line] = []
    for work, text in corpus.texts.items():
        lines = text.splitlines()
        line_keys = [_key(line) for line in lines]
        banned: set[int] = set()
        for i, lk in enumerate(line_keys):
            # a held-out prefix is this line, or starts with it (a prefix may run on past a line break)
            if lk and any(lk.startswith(k) or k.startswith(lk) for k in keys if k[0] == lk[0]):
                banned.update(range(i - gap, i + gap + 1))
        for i, line in enumerate(lines[:-1]):
            if i not in banned and is_verse(line) and lines[i + 1].strip():
                found.append(Line(work, i, line))
    random.Random(seed).shuffle(found)
    return found


def _key(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())
