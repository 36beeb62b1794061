"""The labelling step of ``preftune iterate``: a round's K completions per prompt -> preference pairs.

* a score judge (a reward model, or a ``module:function`` / ``file.py:function`` / Python callable):
  every completion is scored alone, and the best and the worst of each prompt make one pair (Xiong et al.
  2024 and Dong et al. 2024 take best-of-K vs worst-of-K); a prompt whose completions all score the same
  is dropped (counted);
* any other judge (an LLM judge, ``llm:PATH``, judges each pair in both orders, a disagreement being a
  tie): every two completions of a prompt are judged (K(K-1)/2 pairs), each completion scores 1 per win
  and 1/2 per tie, and the completion with the most points (the first on a tie) is chosen against the one
  with the fewest (the last on a tie) when the judge preferred it to that one directly; else the prompt is
  dropped (counted);
* ``human``: every two completions of a prompt are loaded into an annotation store
  (``annotate.sources.load_generations``, as ``preftune annotate load --generations`` does); once every
  pair has the store's ``per_pair`` answers (default 1; a skip counts, so that a pair everyone skips holds
  nothing up), each pair that the annotators' majority decided (``judges.majority_verdicts``, as the
  human judge of ``preftune compare`` reads them) is one preference pair; ties and skips are dropped
  (counted).

Empty completions (a model may end at once) are never paired: the data loader rejects empty text.
"""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from preftune.data.prompts import prompt_text
from preftune.errors import PreftuneError

HUMAN = "human"
NO_JUDGE = "none"


def judge_label(spec: Any) -> str:
    """How a judge given in memory is written in the config record (JSON)."""
    if isinstance(spec, str):
        return spec
    if hasattr(spec, "judge_pairs"):
        return f"<in memory: judge {getattr(spec, 'name', type(spec).__name__)}>"
    return f"<in memory: {getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', type(spec).__name__)}>"


def check_judge_spec(spec: str, *, field: str, human: bool) -> None:
    """Refuse a judge spec that cannot be read, before anything runs (a model directory is checked when it
    loads)."""
    kind, sep, target = spec.partition(":")
    if kind == HUMAN and not human:
        raise PreftuneError("people label the training pairs only (`judge: human`), not the evaluation",
                            field=field, hint="give a reward model, module:function, file.py:function or "
                                              "llm:PATH, or none (no win rate)")
    if kind == HUMAN and sep:
        raise PreftuneError(f"write `{field}: human`, without a database: each round's labels go to "
                            "OUTPUT_DIR/round_R/annotations.db", field=field)
    if sep and kind in ("llm", "reward", "function") and not target:
        raise PreftuneError(f"cannot read the judge spec {spec!r}", field=field,
                            hint="llm:PATH, reward:PATH, function:module:fn, a reward-model directory, "
                                 "module:function, file.py:function or human")


def make_judge(spec: Any, *, field: str, batch_size: int = 16) -> Any:
    """A judge from a spec: ``llm:PATH``, ``reward:PATH``, ``function:SPEC`` (as ``preftune compare``), a
    bare ``module:function`` / ``file.py:function`` or reward-model directory; or, in memory, a
    ``judges.Judge`` or a callable ``(prompt, completion) -> float``."""
    from preftune.judges import FunctionJudge, RewardModelJudge
    from preftune.judges import make_judge as judge_from_spec
    from preftune.models.rewards import is_function_spec

    if hasattr(spec, "judge") or hasattr(spec, "judge_pairs"):  # a judges.Judge, or any object with its interface
        return spec
    if callable(spec):
        return FunctionJudge(spec)
    kind = spec.partition(":")[0]
    try:
        if kind in ("reward", "function", "llm"):
            return judge_from_spec(spec, batch_size=batch_size) if kind != "function" else judge_from_spec(spec)
        if is_function_spec(spec):
            return FunctionJudge(spec)
        return RewardModelJudge(spec, batch_size=batch_size)
    except PreftuneError as exc:  # the loaders say `judge` or `model`: name the key that gave the spec
        raise PreftuneError(exc.message, path=exc.path, line=exc.line, field=field, hint=exc.hint) from None


@dataclass
class Labelled:
    rows: list[dict[str, Any]]      # {prompt, chosen, rejected, ...what the judge said}
    counts: dict[str, int]          # prompts, pairs and why prompts (or human pairs) were dropped


def group_completions(records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """generate's records (ordered by prompt, then completion) -> one list per prompt."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["prompt_id"], []).append(r)
    return list(groups.values())


def label_completions(records: Sequence[dict[str, Any]], judge: Any) -> Labelled:
    """Best vs worst per prompt (score judges) or by a round robin of pairwise verdicts (other judges)."""
    from preftune.judges import ScoreJudge

    groups, empty = [], 0
    for group in group_completions(records):
        kept = [r for r in group if r["completion"].strip()]
        empty += len(group) - len(kept)
        groups.append(kept)
    short = sum(len(g) < 2 for g in groups)
    groups = [g for g in groups if len(g) >= 2]
    label = _best_vs_worst if isinstance(judge, ScoreJudge) else _round_robin
    rows, undecided = label(groups, judge)
    counts = {"prompts": len(groups) + short, "pairs": len(rows), "empty_completions": empty,
              "prompts_under_two_completions": short, "prompts_undecided": undecided}
    return Labelled(rows, counts)


def _best_vs_worst(groups: list[list[dict[str, Any]]], judge: Any) -> tuple[list[dict[str, Any]], int]:
    flat = [r for g in groups for r in g]
    scores = iter(judge.scores([prompt_text(r["prompt"]) for r in flat], [r["completion"] for r in flat]))
    rows, ties = [], 0
    for group in groups:
        scored = [(float(next(scores)), r) for r in group]
        best = max(scored, key=lambda s: s[0])          # the first of equal scores
        worst = min(reversed(scored), key=lambda s: s[0])  # the last of equal scores
        if best[0] == worst[0]:
            ties += 1
            continue
        rows.append({"prompt": best[1]["prompt"], "chosen": best[1]["completion"],
                     "rejected": worst[1]["completion"], "score_chosen": best[0], "score_rejected": worst[0],
                     "completion_ids": [best[1]["completion_id"], worst[1]["completion_id"]]})
    return rows, ties


def _round_robin(groups: list[list[dict[str, Any]]], judge: Any) -> tuple[list[dict[str, Any]], int]:
    matches = [(g, i, j) for g, group in enumerate(groups) for i, j in combinations(range(len(group)), 2)]
    verdicts = judge.judge([prompt_text(groups[g][0]["prompt"]) for g, _, _ in matches],
                           [(groups[g][i]["completion"], groups[g][j]["completion"]) for g, i, j in matches])
    points = [[0.0] * len(group) for group in groups]
    beat: dict[tuple[int, int, int], bool] = {}
    for (g, i, j), choice in zip(matches, verdicts, strict=True):
        if choice is None:
            points[g][i] += 0.5
            points[g][j] += 0.5
            continue
        winner, loser = (i, j) if choice == 0 else (j, i)
        points[g][winner] += 1.0
        beat[(g, winner, loser)] = True
    rows, undecided = [], 0
    for g, group in enumerate(groups):
        p = points[g]
        best = max(range(len(p)), key=lambda k: (p[k], -k))
        worst = min(range(len(p)), key=lambda k: (p[k], -k))
        if not beat.get((g, best, worst)):
            undecided += 1
            continue
        rows.append({"prompt": group[best]["prompt"], "chosen": group[best]["completion"],
                     "rejected": group[worst]["completion"], "points_chosen": p[best], "points_rejected": p[worst],
                     "completion_ids": [group[best]["completion_id"], group[worst]["completion_id"]]})
    return rows, undecided


# ------------------------------------------------------------------------------------------------ people


@dataclass
class LabelsNeeded:
    """The round's pairs wait in an annotation store: ``left`` of ``total`` have no label yet."""

    round: int
    db: str
    total: int
    left: int
    loaded: list[str]               # notes from loading (pairs not loaded, and why)

    @property
    def command(self) -> str:
        return f"preftune annotate serve --db {shlex.quote(self.db)}"

    def message(self) -> str:
        return (f"round {self.round}: {self.left} of {self.total} pairs still need a label in {self.db}. Label "
                f"them in the browser with\n\n    {self.command}\n\nthen run the same `preftune iterate` (or "
                "iterate() call) again to go on.")

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "db": self.db, "pairs": self.total, "left": self.left, "command": self.command,
                "notes": self.loaded}


def human_labels(completions: Path, db: Path, round_number: int,
                 log: Callable[[str], None]) -> Labelled | LabelsNeeded:
    """Load the round's pairs into ``db`` (loading again adds nothing) and read the labels back once every
    pair has one; until then say how many are left."""
    from preftune.annotate.sources import load_generations
    from preftune.data.annotations import AnnotationStore
    from preftune.judges import majority_verdicts

    loaded = load_generations([completions])
    store = AnnotationStore(db)
    added, _ = store.add_pairs(loaded.pairs)
    if added:
        log(f"loaded {added} pairs into {db}" + "".join(f"; {note}" for note in loaded.notes))
    pairs, labels = store.pairs(), store.labels()
    answers = Counter(lab.pair_id for lab in labels)  # skips included: a pair everyone skips holds nothing up
    left = sum(answers[p.id] < max(store.per_pair, 1) for p in pairs)
    if left:
        return LabelsNeeded(round_number, str(db), len(pairs), left, loaded.notes)
    verdicts = majority_verdicts(labels, [p.prompt for p in pairs], [(p.response_a, p.response_b) for p in pairs])
    rows = []
    for p, choice, detail in zip(pairs, verdicts.choices, verdicts.details, strict=True):
        if choice is None:
            continue
        chosen, rejected = (p.response_a, p.response_b) if choice == 0 else (p.response_b, p.response_a)
        if not (chosen.strip() and rejected.strip()):
            continue
        rows.append({"prompt": p.prompt, "chosen": chosen, "rejected": rejected, "pair_id": p.id,
                     "votes": [detail["votes_first"], detail["votes_second"], detail["votes_tie"]]})
    skipped = len(verdicts.missing)
    counts = {"prompts": len({p.prompt for p in pairs}), "pairs": len(rows), "labelled_pairs": len(pairs),
              "labels": len(labels), "pairs_only_skipped": skipped,
              "pairs_tied_or_empty": len(pairs) - skipped - len(rows)}
    return Labelled(rows, counts)
