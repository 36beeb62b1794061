"""The records of the annotation store and the pure rules it applies: pairs, assignments, labels,
the errors the web app turns into HTTP statuses, content ids and the seeded left/right order."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from preftune.errors import PreftuneError

SIDES = ("left", "right", "tie", "skip")
CHOICES = ("a", "b", "tie", "skip")
MAX_NAME_LENGTH = 64


# --- errors the web app turns into HTTP statuses (store code knows nothing of HTTP) ---------------

class UnknownPairError(PreftuneError):
    """No pair with this id (HTTP 404)."""


class InvalidLabelError(PreftuneError):
    """A malformed answer: unknown choice, order token or annotator name (HTTP 422)."""


class OrderMismatchError(PreftuneError):
    """The left/right order token does not match the order stored for this annotator (HTTP 400)."""


class DuplicateLabelError(PreftuneError):
    """This annotator already labelled this pair (HTTP 409)."""


class NothingToUndoError(PreftuneError):
    """The annotator has no label to undo (HTTP 409)."""


# --- records ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    id: str
    prompt: str
    response_a: str
    response_b: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Assignment:
    """A pair as one annotator sees it: ``left_is_a`` says which response is on the left."""

    pair: Pair
    annotator: str
    left_is_a: bool

    @property
    def left(self) -> str:
        return self.pair.response_a if self.left_is_a else self.pair.response_b

    @property
    def right(self) -> str:
        return self.pair.response_b if self.left_is_a else self.pair.response_a

    @property
    def order_token(self) -> str:
        """"ab" when response_a is on the left, "ba" otherwise; sent back with the answer."""
        return order_token(self.left_is_a)


@dataclass(frozen=True)
class Label:
    pair_id: str
    prompt: str
    response_a: str
    response_b: str
    annotator: str
    group: str | None
    choice: str          # "a" | "b" | "tie" | "skip"
    left_is_a: bool
    created_at: str      # ISO 8601, UTC


@dataclass(frozen=True)
class Progress:
    done: int            # labels this annotator gave (skips included)
    left: int            # pairs still open to them (not labelled by them, fewer than K labels)

    @property
    def total(self) -> int:
        return self.done + self.left


# --- pure helpers -------------------------------------------------------------------------------

def content_id(prompt: str, response_a: str, response_b: str) -> str:
    """Default pair id: the first 16 hex digits of sha256 over the JSON list [prompt, a, b]."""
    blob = json.dumps([prompt, response_a, response_b], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def seeded_left_is_a(seed: int, pair_id: str, annotator: str) -> bool:
    """A fair coin for the left/right order, fixed by (seed, pair id, annotator)."""
    digest = hashlib.sha256(f"{seed}\x00{pair_id}\x00{annotator}".encode()).digest()
    return digest[0] % 2 == 0


def order_token(left_is_a: bool) -> str:
    return "ab" if left_is_a else "ba"


def side_to_choice(side: str, *, left_is_a: bool) -> str:
    """Map the annotator's answer about positions to one about responses.

    left -> a when response_a was shown on the left, else b; right -> the other; tie and skip stay.
    """
    if side not in SIDES:
        raise InvalidLabelError(f"unknown choice {side!r}", field="choice",
                                hint=f"use one of: {', '.join(SIDES)}")
    if side == "left":
        return "a" if left_is_a else "b"
    if side == "right":
        return "b" if left_is_a else "a"
    return side


def check_name(name: str | None, *, what: str = "annotator") -> str:
    """Strip and validate a name (1-64 printable characters)."""
    name = (name or "").strip()
    if not name:
        raise InvalidLabelError(f"no {what} name given", field=what, hint="enter a name on the start page")
    if len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidLabelError(f"{what} name must be 1-{MAX_NAME_LENGTH} printable characters",
                                field=what)
    return name
