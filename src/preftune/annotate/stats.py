"""Counts and inter-annotator agreement for the labels in an annotation store.

Agreement is measured on real answers only (a, b, tie; skips are left out):

- percent agreement: for two annotators, the share of pairs both labelled where they gave the same
  answer; for more, Fleiss' mean per-pair agreement P-bar (the share of agreeing rater pairs).
- Cohen's kappa (Cohen 1960, eq. 1) when exactly two annotators labelled: on the pairs both labelled,
  kappa = (p_o - p_e) / (1 - p_e), p_o the observed agreement, p_e = sum_k p1_k p2_k from each
  annotator's own answer frequencies.
- Fleiss' kappa (Fleiss 1971, eqs. 2-9) when more than two did: it needs the same number n of raters
  on every pair, so it is computed on the pairs with the most common rater count (n >= 2; a tie goes to
  the larger n) and the report says which n and how many pairs. P_i = (sum_j n_ij^2 - n) / (n (n - 1)),
  P-bar = mean P_i, p_j = sum_i n_ij / (N n), P_e = sum_j p_j^2, kappa = (P-bar - P_e) / (1 - P_e).
  Cohen's kappa for every two annotators is given as well.
Kappa is undefined (None) when chance agreement is 1 (everyone always gave one and the same answer).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

from preftune.core.winrate import count
from preftune.data.annotations import Label

CATEGORIES = ("a", "b", "tie")


def percent_agreement(x: Sequence[str], y: Sequence[str]) -> float:
    """Share of positions where the two answer lists agree."""
    if len(x) != len(y) or not x:
        raise ValueError("need two non-empty answer lists of the same length")
    return sum(u == v for u, v in zip(x, y, strict=True)) / len(x)


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' answers on the same items (None when p_e = 1)."""
    p_o = percent_agreement(x, y)
    n = len(x)
    cx, cy = Counter(x), Counter(y)
    p_e = sum(cx[k] * cy[k] for k in set(cx) | set(cy)) / (n * n)
    if p_e >= 1.0:
        return None
    return (p_o - p_e) / (1.0 - p_e)


def fleiss_observed(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' P-bar: the mean over items of the share of agreeing rater pairs."""
    n = _raters(counts)
    return sum((sum(c * c for c in row) - n) / (n * (n - 1)) for row in counts) / len(counts)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa from an items x categories count table with the same row sum n >= 2."""
    n = _raters(counts)
    p_bar = fleiss_observed(counts)
    total = len(counts) * n
    p_e = sum((sum(row[j] for row in counts) / total) ** 2 for j in range(len(counts[0])))
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1.0 - p_e)


def _raters(counts: Sequence[Sequence[int]]) -> int:
    if not counts:
        raise ValueError("need at least one item")
    sums = {sum(row) for row in counts}
    if len(sums) != 1 or min(sums) < 2:
        raise ValueError(f"every item needs the same number (>= 2) of raters, got {sorted(sums)}")
    return sums.pop()


@dataclass
class PairwiseAgreement:
    first: str
    second: str
    n_pairs: int                  # pairs both labelled (skips left out)
    agreement: float
    kappa: float | None


@dataclass
class AgreementReport:
    method: str | None            # "cohen", "fleiss", or None when no pair has two real answers
    n_annotators: int             # annotators with at least one answer that is not a skip
    n_pairs: int                  # pairs the kappa is computed on
    raters_per_pair: int | None   # n for Fleiss' kappa (2 for Cohen's)
    agreement: float | None
    kappa: float | None
    note: str
    pairwise: list[PairwiseAgreement] = field(default_factory=list)


def answers_by_pair(labels: Sequence[Label]) -> dict[str, dict[str, str]]:
    """pair id -> {annotator: answer} for the answers that are not skips."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for lab in labels:
        if lab.choice in CATEGORIES:
            out[lab.pair_id][lab.annotator] = lab.choice
    return dict(out)


def _pairwise(by_pair: dict[str, dict[str, str]], names: list[str]) -> list[PairwiseAgreement]:
    result = []
    for u, v in combinations(names, 2):
        both = [(ans[u], ans[v]) for ans in by_pair.values() if u in ans and v in ans]
        if both:
            x, y = [p[0] for p in both], [p[1] for p in both]
            result.append(PairwiseAgreement(u, v, len(both), percent_agreement(x, y), cohen_kappa(x, y)))
    return result


def agreement(labels: Sequence[Label]) -> AgreementReport:
    """Percent agreement and Cohen's (two annotators) or Fleiss' (more) kappa; see the module docstring."""
    by_pair = answers_by_pair(labels)
    names = sorted({a for ans in by_pair.values() for a in ans})
    pairwise = _pairwise(by_pair, names)
    if len(names) == 2:
        pw = pairwise[0] if pairwise else None
        if pw is None:
            return AgreementReport(None, 2, 0, None, None, None, "the two annotators labelled no pair in common")
        return AgreementReport("cohen", 2, pw.n_pairs, 2, pw.agreement, pw.kappa,
                               f"Cohen's kappa on the {pw.n_pairs} pairs both annotators labelled", pairwise)
    rater_counts = Counter(len(ans) for ans in by_pair.values() if len(ans) >= 2)
    if len(names) < 2 or not rater_counts:
        return AgreementReport(None, len(names), 0, None, None, None,
                               "no pair has answers from two annotators; serve with --per-pair 2 or more")
    n = max(rater_counts, key=lambda r: (rater_counts[r], r))
    table = [[Counter(ans.values())[c] for c in CATEGORIES] for ans in by_pair.values() if len(ans) == n]
    left_out = sum(rater_counts.values()) - len(table)
    note = f"Fleiss' kappa on the {len(table)} pairs with {n} raters each"
    if left_out:
        note += f" ({count(left_out, 'pair')} with another number of raters left out)"
    return AgreementReport("fleiss", len(names), len(table), n, fleiss_observed(table), fleiss_kappa(table),
                           note, pairwise)


def label_counts(labels: Sequence[Label], *, by: str = "annotator") -> dict[str, Counter]:
    """Answers per annotator (``by="annotator"``) or per group (``by="group"``; no group -> "-")."""
    out: dict[str, Counter] = defaultdict(Counter)
    for lab in labels:
        key = lab.annotator if by == "annotator" else (lab.group or "-")
        out[key][lab.choice] += 1
    return dict(out)
