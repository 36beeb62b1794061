"""The shapes preference and SFT data take once loaded, and how a raw record's format is recognised.

Raw records (one JSON object, CSV row, Parquet row or dataset row) come in the formats that the
Hugging Face ecosystem uses (TRL's dataset formats, Anthropic HH, UltraFeedback, OpenAssistant rankings):

==========================  ================================================================
format                      fields
==========================  ================================================================
``standard``                ``prompt``, ``chosen``, ``rejected`` (plain strings)
``implicit_prompt``         ``chosen``, ``rejected`` hold whole transcripts sharing a prompt
``conversational``          ``chosen``, ``rejected`` (and optionally ``prompt``) as messages
``ranking``                 ``prompt``, ``responses`` and ``ranking`` / ``ranks`` / ``scores``
``unpaired``                ``prompt``, ``completion``, ``label`` (KTO-style thumbs up/down)
``sft_prompt_completion``   ``prompt``, ``completion``
``sft_messages``            ``messages``
``sft_text``                ``text``
==========================  ================================================================

Optional columns ``margin``, ``annotator``, ``group`` and ``id`` are kept on every preference format;
``user_id``, ``annotator_id`` and ``worker_id`` are read as ``annotator``, ``group_id`` as ``group``
(``preftune.data.records.ALIASES``).
Converting a raw record into these dataclasses is done by :mod:`preftune.data.records`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Union

from preftune.errors import PreftuneError

# Plain text, or conversational messages [{"role": ..., "content": ...}] rendered later with the
# tokenizer's chat template (by the trainer, not here).
Text = Union[str, list[dict]]

PREFERENCE_FORMATS = ("standard", "implicit_prompt", "conversational", "ranking", "unpaired")
SFT_FORMATS = ("sft_prompt_completion", "sft_messages", "sft_text")
FORMATS = PREFERENCE_FORMATS + SFT_FORMATS

# What each format needs; used for detection messages and "missing field" errors.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "standard": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
    "conversational": ("chosen", "rejected"),
    "ranking": ("prompt", "responses"),
    "unpaired": ("prompt", "completion", "label"),
    "sft_prompt_completion": ("prompt", "completion"),
    "sft_messages": ("messages",),
    "sft_text": ("text",),
}

FORMAT_EXAMPLES: dict[str, str] = {
    "standard": '{"prompt": "2+2?", "chosen": "4", "rejected": "5"}',
    "implicit_prompt": '{"chosen": "\\n\\nHuman: 2+2?\\n\\nAssistant: 4", '
                       '"rejected": "\\n\\nHuman: 2+2?\\n\\nAssistant: 5"}',
    "conversational": '{"prompt": [{"role": "user", "content": "2+2?"}], '
                      '"chosen": [{"role": "assistant", "content": "4"}], '
                      '"rejected": [{"role": "assistant", "content": "5"}]}',
    "ranking": '{"prompt": "2+2?", "responses": ["5", "4", "four"], "ranking": [1, 2, 0]}',
    "unpaired": '{"prompt": "2+2?", "completion": "4", "label": true}',
    "sft_prompt_completion": '{"prompt": "2+2?", "completion": "4"}',
    "sft_messages": '{"messages": [{"role": "user", "content": "2+2?"}, '
                    '{"role": "assistant", "content": "4"}]}',
    "sft_text": '{"text": "To be, or not to be"}',
}

# The tag that ends the prompt in Anthropic HH-style transcripts.
ASSISTANT_TAG = "\n\nAssistant:"


@dataclass
class PreferencePair:
    """One comparison: ``chosen`` was preferred over ``rejected`` as a reply to ``prompt``."""

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None       # how strongly chosen is preferred (e.g. a score difference)
    annotator: str | None = None
    group: str | None = None          # e.g. the annotator's population, for MaxMin-style analyses
    id: str | None = None
    source: str | None = None         # "file:line" the pair came from, for error messages


@dataclass
class Ranking:
    """K responses to one prompt, best first; ``scores`` (if given) are in the same order."""

    prompt: Text
    responses: list[Text]
    scores: list[float] | None = None
    id: str | None = None
    annotator: str | None = None
    group: str | None = None
    source: str | None = None

    def to_pairs(self, *, skip_ties: bool = True) -> list[PreferencePair]:
        """All K-choose-2 pairs (i, j) with i ranked above j: chosen = responses[i], rejected = responses[j].

        The margin is ``scores[i] - scores[j]`` when scores are given. A Plackett-Luce ranking implies
        exactly these pairwise preferences (the "rank breaking" used by InstructGPT, Ouyang et al. 2022,
        Sec. 3.5, which trains the reward model on all K-choose-2 comparisons of a K-way ranking).
        Pairs with equal scores carry no preference and are skipped unless ``skip_ties=False``.
        """
        pairs = []
        k = len(self.responses)
        for i in range(k):
            for j in range(i + 1, k):
                margin = None
                if self.scores is not None:
                    margin = float(self.scores[i]) - float(self.scores[j])
                    if skip_ties and margin == 0.0:
                        continue
                pair_id = None if self.id is None else f"{self.id}:{i}>{j}"
                pairs.append(PreferencePair(self.prompt, self.responses[i], self.responses[j], margin=margin,
                                            annotator=self.annotator, group=self.group, id=pair_id,
                                            source=self.source))
        return pairs

    def n_ties(self) -> int:
        """Number of pairs whose scores are equal (these carry no preference)."""
        if self.scores is None:
            return 0
        s = self.scores
        return sum(1 for i in range(len(s)) for j in range(i + 1, len(s)) if s[i] == s[j])


@dataclass
class UnpairedExample:
    """A single completion judged good (``label=True``) or bad, as KTO (Ethayarajh et al. 2024) uses."""

    prompt: Text
    completion: Text
    label: bool
    id: str | None = None
    annotator: str | None = None
    group: str | None = None
    source: str | None = None


@dataclass
class SFTExample:
    """A demonstration. ``prompt`` is None for plain-text language modelling (``{"text": ...}``).

    From ``{"messages": [...]}`` the prompt is every message before the last assistant turn and the
    completion is that last assistant turn (as a one-message list); ``messages`` keeps the whole
    conversation for trainers that learn on every assistant turn.
    """

    prompt: Text | None
    completion: Text
    messages: list[dict] | None = None
    id: str | None = None
    source: str | None = None


@dataclass
class Problem:
    """A non-fatal finding about one row (e.g. chosen == rejected, a duplicate)."""

    kind: str        # "chosen_equals_rejected", "duplicate", "invalid", "tied_scores", ...
    where: str       # "file:line"
    field: str | None
    message: str


@dataclass
class LoadReport:
    """What loading did: how many rows were read, kept and dropped, and every problem found."""

    source: str
    format: str
    n_rows: int
    n_loaded: int
    problems: list[Problem] = field(default_factory=list)
    n_dropped: int = 0
    format_from: str = ""                               # "detected from file:line" or "forced"
    files: list[str] = field(default_factory=list)      # the files (or dataset splits) actually read

    def count(self, kind: str) -> int:
        """Number of problems of one kind."""
        return sum(1 for p in self.problems if p.kind == kind)

    def summary(self) -> str:
        """One line for logs, e.g. ``data.jsonl: standard, 100 rows, 98 loaded, 2 dropped, 3 problems``."""
        n = len(self.problems)
        return (f"{self.source}: {self.format} ({self.format_from}), {self.n_rows} row{'' if self.n_rows == 1 else 's'}, "
                f"{self.n_loaded} loaded, {self.n_dropped} dropped, {n} problem{'' if n == 1 else 's'}")


Example = Union[PreferencePair, Ranking, UnpairedExample]


def _guess_format(record: dict[str, Any]) -> str | None:
    """The format a record's fields point to, or None. Null values count as absent."""
    keys = {k for k, v in record.items() if v is not None}
    if "responses" in keys and keys & {"ranking", "ranks", "scores"}:
        return "ranking"
    if {"chosen", "rejected"} <= keys:
        if any(isinstance(record.get(k), list) for k in ("prompt", "chosen", "rejected")):
            return "conversational"
        return "standard" if "prompt" in keys else "implicit_prompt"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    if {"prompt", "completion"} <= keys:
        return "sft_prompt_completion"
    if "messages" in keys:
        return "sft_messages"
    if "text" in keys:
        return "sft_text"
    return None


def detect_format(record: dict) -> str:
    """Name the format of one raw record from its fields (see the module docstring's table).

    Raises :class:`PreftuneError` naming the fields present when no format matches.
    """
    if not isinstance(record, dict):
        raise PreftuneError(f"a record must be an object with named fields, got {type(record).__name__}")
    fmt = _guess_format(record)
    if fmt is None:
        present = ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"
        known = "; ".join(f"{f}: {', '.join(REQUIRED_FIELDS[f])}" for f in FORMATS)
        raise PreftuneError(f"cannot tell the data format from the fields present ({present})",
                            hint=f"the known formats and their fields are {known}")
    return fmt


def check_format_name(fmt: str, *, allowed: tuple[str, ...] = FORMATS) -> str:
    """Return ``fmt`` if it is a known format name, else raise listing the allowed ones."""
    if fmt not in allowed:
        raise PreftuneError(f"unknown format '{fmt}'", field="format",
                            hint=f"use 'auto' or one of: {', '.join(allowed)}")
    return fmt


def text_key(text: Text | None) -> str:
    """A hashable, order-preserving key for a text or a list of messages (for duplicate checks)."""
    if isinstance(text, str) or text is None:
        return json.dumps(text)
    return json.dumps(text, sort_keys=True, ensure_ascii=False)


def text_length(text: Text | None) -> int:
    """Length in characters: of the string, or the sum of the messages' contents."""
    if text is None:
        return 0
    if isinstance(text, str):
        return len(text)
    return sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else 0 for m in text)


def split_implicit_prompt(chosen: str, rejected: str, *, tag: str = ASSISTANT_TAG) -> tuple[str, str, str] | None:
    """Split two HH-style transcripts into (prompt, chosen, rejected).

    The prompt is the longest shared prefix cut just after the last ``tag`` (``"\\n\\nAssistant:"``) that
    lies wholly inside it; chosen and rejected become the remainders. For Anthropic HH (Bai et al. 2022)
    ``"\\n\\nHuman: Hi\\n\\nAssistant: Hello!"`` vs ``"...Assistant: Go away."`` gives the prompt
    ``"\\n\\nHuman: Hi\\n\\nAssistant:"`` and replies ``" Hello!"`` and ``" Go away."``. Identical
    transcripts are cut at their last tag (so that chosen == rejected is reported, not hidden).
    Returns None when the shared prefix holds no tag.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    idx = chosen.rfind(tag, 0, n)
    if idx < 0:
        return None
    end = idx + len(tag)
    return chosen[:end], chosen[end:], rejected[end:]


def split_shared_messages(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Split two full conversations into (shared prefix, chosen rest, rest of rejected).

    The prefix is the longest run of equal leading messages, stopping before the last message of the
    shorter conversation so that both remainders are non-empty (identical conversations give
    chosen == rejected, which is then reported). The prefix is empty when the first messages differ.
    """
    n = 0
    limit = min(len(chosen), len(rejected)) - 1
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]
