"""Turn human labels into preference data that `preftune train reward` / `train dpo` read.

One row per label (not per pair), so each annotator's answer and group stay visible:
``{"prompt", "chosen", "rejected", "annotator", "group", "pair_id"}``; an answer "a" makes
response_a the chosen one, "b" response_b. Skips are never exported. Ties:

- ``drop`` (default): not exported, counted;
- ``keep``: written to the main file as ``chosen=response_a, rejected=response_b, "tie": true``
  (a trainer that ignores the ``tie`` field would read them as preferences -- use with care);
- ``separate``: written to another file as ``{prompt, response_a, response_b, choice: "tie", ...}``.

``min_agreement`` keeps only pairs whose answers agree enough: the share of a pair's answers (skips
left out) that equal its most common answer, e.g. 2 of 3 -> 0.667. ``min_labels`` asks for at least
that many answers per pair. Pairs that fail either test are left out whole, and counted.

A preference (or kept tie) whose chosen or rejected text is empty -- a generated completion can be
empty when the model ends at once -- is left out and counted as ``empty_response``: the data loader
rejects empty text, so such a row would stop `preftune train` on the exported file.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune.data.annotations import Label
from preftune.errors import PreftuneError

TIES = ("drop", "keep", "separate")


@dataclass
class ExportResult:
    rows: list[dict[str, Any]]
    tie_rows: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)


def pair_agreement(answers: Sequence[str]) -> float:
    """Share of the answers equal to the most common one (1.0 for a single answer)."""
    return Counter(answers).most_common(1)[0][1] / len(answers)


def preference_rows(labels: Sequence[Label], *, ties: str = "drop", min_agreement: float | None = None,
                    min_labels: int = 1) -> ExportResult:
    """Labels -> preference rows (see the module docstring); counts say where every label went."""
    if ties not in TIES:
        raise PreftuneError(f"unknown ties mode {ties!r}", field="ties", hint=f"use one of: {', '.join(TIES)}")
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise PreftuneError("must be between 0 and 1", field="min_agreement")
    answers: dict[str, list[str]] = defaultdict(list)
    for lab in labels:
        if lab.choice != "skip":
            answers[lab.pair_id].append(lab.choice)
    failing = {pid for pid, ans in answers.items()
               if len(ans) < min_labels or (min_agreement is not None and pair_agreement(ans) < min_agreement)}
    counts = Counter(labels=len(labels))
    rows, tie_rows = [], []
    for lab in labels:
        base = {"annotator": lab.annotator, "group": lab.group, "pair_id": lab.pair_id}
        if lab.choice == "skip":
            counts["skips"] += 1
        elif lab.pair_id in failing:
            counts["left_out_by_agreement"] += 1
        elif lab.choice == "tie":
            counts["ties"] += 1
            if ties == "keep" and not (lab.response_a.strip() and lab.response_b.strip()):
                counts["empty_response"] += 1
            elif ties == "keep":
                rows.append({"prompt": lab.prompt, "chosen": lab.response_a, "rejected": lab.response_b,
                             "tie": True, **base})
            elif ties == "separate":
                tie_rows.append({"prompt": lab.prompt, "response_a": lab.response_a,
                                 "response_b": lab.response_b, "choice": "tie", **base})
        else:
            chosen, rejected = ((lab.response_a, lab.response_b) if lab.choice == "a"
                                else (lab.response_b, lab.response_a))
            counts["preferences"] += 1
            if not (chosen.strip() and rejected.strip()):
                counts["empty_response"] += 1
                continue
            rows.append({"prompt": lab.prompt, "chosen": chosen, "rejected": rejected, **base})
    counts["pairs_left_out_by_agreement"] = len(failing)
    counts["rows"] = len(rows)
    counts["tie_rows"] = len(tie_rows)
    return ExportResult(rows=rows, tie_rows=tie_rows, counts=dict(counts))
