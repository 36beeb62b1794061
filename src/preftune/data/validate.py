"""Checks across loaded examples (chosen == rejected, duplicates) and the statistics `data inspect` prints.

Nothing here drops anything: checks return :class:`Problem` s, and the loader decides (with
``drop_invalid``) what to drop and counts it.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from preftune.data.formats import (
    LoadReport,
    PreferencePair,
    Problem,
    Ranking,
    SFTExample,
    Text,
    UnpairedExample,
    text_key,
    text_length,
)

# Problem kinds that make a row unusable for training; dropped with drop_invalid=True.
DROPPABLE = ("chosen_equals_rejected",)


def check_example(ex: Any) -> list[Problem]:
    """Problems of one example on its own: identical chosen and rejected (or identical ranked responses)."""
    where = ex.source or "?"
    if isinstance(ex, PreferencePair) and text_key(ex.chosen) == text_key(ex.rejected):
        return [Problem("chosen_equals_rejected", where, "rejected", "chosen and rejected are identical")]
    if isinstance(ex, Ranking):
        seen: dict[str, int] = {}
        for i, r in enumerate(ex.responses):
            j = seen.setdefault(text_key(r), i)
            if j != i:
                return [Problem("chosen_equals_rejected", where, "responses",
                                f"responses ranked {j + 1} and {i + 1} are identical")]
    return []


def example_key(ex: Any) -> tuple[str, ...]:
    """What makes two rows the same example: prompt + chosen + rejected for a pair, and so on."""
    if isinstance(ex, PreferencePair):
        return ("pair", text_key(ex.prompt), text_key(ex.chosen), text_key(ex.rejected))
    if isinstance(ex, Ranking):
        return ("ranking", text_key(ex.prompt), *map(text_key, ex.responses))
    if isinstance(ex, UnpairedExample):
        return ("unpaired", text_key(ex.prompt), text_key(ex.completion), str(ex.label))
    return ("sft", text_key(ex.prompt), text_key(ex.completion))


def find_duplicates(examples: Iterable[Any]) -> list[Problem]:
    """One ``duplicate`` problem for every example equal to an earlier one (the earlier is named)."""
    first: dict[tuple[str, ...], str] = {}
    problems = []
    for ex in examples:
        key = example_key(ex)
        if key in first:
            problems.append(Problem("duplicate", ex.source or "?", None, f"same example as {first[key]}"))
        else:
            first[key] = ex.source or "?"
    return problems


def length_stats(values: Sequence[float]) -> dict[str, float]:
    """min, mean, median, 95th percentile (nearest rank) and max of a list of lengths; {} when empty."""
    if not values:
        return {}
    ordered = sorted(values)
    p95 = ordered[max(0, -(-95 * len(ordered) // 100) - 1)]    # nearest-rank: ceil(0.95 n)-th value
    return {"min": ordered[0], "mean": statistics.fmean(ordered), "median": statistics.median(ordered),
            "p95": p95, "max": ordered[-1]}


def _pairs(examples: Iterable[Any]) -> list[PreferencePair]:
    out: list[PreferencePair] = []
    for ex in examples:
        if isinstance(ex, PreferencePair):
            out.append(ex)
        elif isinstance(ex, Ranking):
            out.extend(ex.to_pairs())
    return out


def _columns(examples: Sequence[Any]) -> dict[str, list[Text | None]]:
    """The texts to measure, by column name."""
    pairs = _pairs(examples)
    cols: dict[str, list[Text | None]] = {}
    if pairs:
        cols["prompt"] = [p.prompt for p in pairs]
        cols["chosen"] = [p.chosen for p in pairs]
        cols["rejected"] = [p.rejected for p in pairs]
    singles = [ex for ex in examples if isinstance(ex, (UnpairedExample, SFTExample))]
    if singles:
        prompts = [ex.prompt for ex in singles if ex.prompt is not None]
        if prompts:
            cols["prompt"] = prompts
        cols["completion"] = [ex.completion for ex in singles]
    return cols


def _bias(chosen: Sequence[int], rejected: Sequence[int]) -> dict[str, float]:
    """Mean of len(chosen) - len(rejected), and how often chosen is the longer / shorter one.

    A reward model or DPO policy trained on data whose chosen replies are systematically longer learns
    to prefer length (Singhal et al. 2023, "A Long Way to Go"); a mean far from 0 warns of it.
    """
    diffs = [c - r for c, r in zip(chosen, rejected, strict=True)]
    n = len(diffs)
    return {"mean_chosen_minus_rejected": statistics.fmean(diffs), "frac_chosen_longer": sum(d > 0 for d in diffs) / n,
            "frac_chosen_shorter": sum(d < 0 for d in diffs) / n, "frac_equal": sum(d == 0 for d in diffs) / n}


def count_tokens(tokenizer: Any, texts: Sequence[Text | None], *, batch_size: int = 256,
                 progress: Any = None) -> list[int]:
    """Token counts without special tokens. Messages are rendered with the tokenizer's chat template when it
    has one, else their contents are joined with newlines. ``progress(n)`` is called after each batch."""
    rendered: list[str] = []
    for t in texts:
        if t is None:
            rendered.append("")
        elif isinstance(t, str):
            rendered.append(t)
        elif getattr(tokenizer, "chat_template", None):
            rendered.append(tokenizer.apply_chat_template(t, tokenize=False))
        else:
            rendered.append("\n".join(m["content"] for m in t))
    counts: list[int] = []
    for start in range(0, len(rendered), batch_size):
        batch = rendered[start:start + batch_size]
        counts.extend(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
        if progress is not None:
            progress(len(batch))
    return counts


def describe(examples: Sequence[Any], report: LoadReport, *, tokenizer: Any = None,
             progress: Any = None) -> dict[str, Any]:
    """Everything `preftune data inspect` shows, as plain data (JSON-ready).

    Keys: source, files, format, format_from, counts, chars (length stats per column), tokens (with a
    tokenizer), length_bias (chars, and tokens), duplicates, annotators and groups (when the data names
    them: :func:`labellers`), problem_counts, problems.
    """
    counts: dict[str, Any] = {"rows": report.n_rows, "loaded": report.n_loaded, "dropped": report.n_dropped}
    kinds = Counter(type(ex).__name__ for ex in examples)
    counts.update({k: v for k, v in sorted(kinds.items())})
    rankings = [ex for ex in examples if isinstance(ex, Ranking)]
    if rankings:
        counts["pairs_from_rankings"] = sum(len(r.to_pairs()) for r in rankings)
        counts["responses_per_ranking"] = length_stats([len(r.responses) for r in rankings])
    labels = [ex.label for ex in examples if isinstance(ex, UnpairedExample)]
    if labels:
        counts["label_true"], counts["label_false"] = sum(labels), len(labels) - sum(labels)

    cols = _columns(examples)
    chars = {name: [text_length(t) for t in texts] for name, texts in cols.items()}
    out: dict[str, Any] = {
        "source": report.source, "files": report.files, "format": report.format, "format_from": report.format_from,
        "counts": counts, "chars": {k: length_stats(v) for k, v in chars.items()},
    }
    bias: dict[str, Any] = {}
    if "chosen" in chars:
        bias["chars"] = _bias(chars["chosen"], chars["rejected"])
    if tokenizer is not None:
        toks = {name: count_tokens(tokenizer, texts, progress=progress) for name, texts in cols.items()}
        out["tokens"] = {k: length_stats(v) for k, v in toks.items()}
        if "chosen" in toks:
            bias["tokens"] = _bias(toks["chosen"], toks["rejected"])
    if bias:
        out["length_bias"] = bias
    prompts = Counter(text_key(ex.prompt) for ex in examples if getattr(ex, "prompt", None) is not None)
    out["duplicates"] = {
        "duplicate_rows": report.count("duplicate"),
        "distinct_prompts": len(prompts),
        "repeated_prompts": sum(1 for c in prompts.values() if c > 1),
        "max_rows_per_prompt": max(prompts.values(), default=0),
    }
    out.update(labellers(examples))
    out["problem_counts"] = dict(sorted(Counter(p.kind for p in report.problems).items()))
    out["problems"] = [{"kind": p.kind, "where": p.where, "field": p.field, "message": p.message}
                       for p in report.problems]
    return out


# ------------------------------------------------------------------------------------------ who labelled what


def _labels(ex: Any) -> int:
    """Pairwise labels an example holds: 1 for a pair, K-choose-2 (ties skipped) for a ranking, else 0."""
    if isinstance(ex, PreferencePair):
        return 1
    return len(ex.to_pairs()) if isinstance(ex, Ranking) else 0


def _mean_agreement(shared: list[float]) -> dict[str, Any]:
    return {"pairs": len(shared), "agreement": statistics.fmean(shared) if shared else None}


def group_agreement(examples: Iterable[Any]) -> dict[str, Any]:
    """How often two groups prefer the same response of a pair that both labelled.

    A pair is the same pair when the prompt and the two responses are the same, in either order; a label
    is the response preferred. For groups g and h and a pair both labelled, the agreement is the share of
    (label of g, label of h) combinations that prefer the same response (1 or 0 when each group gave one
    label); ``between`` averages it over the pairs both labelled. ``within`` g does the same for the
    pairs g labelled more than once (every two labels of g), a yardstick for ``between``.
    """
    votes: dict[tuple[str, frozenset[str]], dict[str, Counter[str]]] = {}   # pair -> group -> preferred: count
    for pair in _pairs(ex for ex in examples if getattr(ex, "group", None) is not None):
        chosen, rejected = text_key(pair.chosen), text_key(pair.rejected)
        if chosen != rejected:  # chosen == rejected carries no preference (reported as a problem)
            key = (text_key(pair.prompt), frozenset((chosen, rejected)))
            votes.setdefault(key, {}).setdefault(pair.group, Counter())[chosen] += 1   # type: ignore[arg-type]
    shares: dict[tuple[str, str], list[float]] = {}      # (g, h), g <= h -> one share per pair both labelled
    for by_group in votes.values():
        present = sorted(by_group)
        for i, g in enumerate(present):
            mine, n = by_group[g], sum(by_group[g].values())
            if n > 1:   # agreeing pairs of labels within g / all pairs of labels within g
                shares.setdefault((g, g), []).append(sum(c * (c - 1) for c in mine.values()) / (n * (n - 1)))
            for h in present[i + 1:]:
                theirs = by_group[h]
                agree = sum(c * theirs[r] for r, c in mine.items())
                shares.setdefault((g, h), []).append(agree / (n * sum(theirs.values())))
    groups = sorted({g for by_group in votes.values() for g in by_group})
    return {"between": [{"groups": [g, h], **_mean_agreement(shares.get((g, h), []))}
                        for i, g in enumerate(groups) for h in groups[i + 1:]],
            "within": {g: _mean_agreement(shares.get((g, g), [])) for g in groups}}


def labellers(examples: Sequence[Any]) -> dict[str, Any]:
    """Per annotator and per group: how many rows (``labels``) and pairwise labels (``pairs``: a ranking
    gives K-choose-2) each gave, and the groups' agreement (:func:`group_agreement`). Empty sections are
    left out: ``{}`` when no example names an annotator or a group."""
    labelled = [ex for ex in examples if isinstance(ex, (PreferencePair, Ranking, UnpairedExample))]
    out: dict[str, Any] = {}
    for who in ("annotator", "group"):
        named = [ex for ex in labelled if getattr(ex, who) is not None]
        if not named:
            continue
        by: dict[str, dict[str, Any]] = {}
        for ex in named:
            entry = by.setdefault(getattr(ex, who), {"labels": 0, "pairs": 0, "others": set()})
            entry["labels"] += 1
            entry["pairs"] += _labels(ex)
            other = ex.group if who == "annotator" else ex.annotator
            if other is not None:
                entry["others"].add(other)
        for entry in by.values():   # an annotator's groups; a group's number of annotators
            others = entry.pop("others")
            entry.update({"groups": sorted(others)} if who == "annotator" else {"annotators": len(others)})
        out[who + "s"] = {"count": len(by), f"without_{who}": len(labelled) - len(named),
                          "labels_per_" + who: length_stats([e["labels"] for e in by.values()]),
                          "by_" + who: dict(sorted(by.items()))}
    if "groups" in out:
        out["groups"]["agreement"] = group_agreement(labelled)
    return out


def n_texts(examples: Sequence[Any]) -> int:
    """How many texts :func:`describe` tokenizes (for a progress bar's total)."""
    return sum(len(v) for v in _columns(examples).values())
