"""Judges decide which of two completions of a prompt is better: one interface, four kinds.

``judge(prompts, pairs)`` returns, per pair ``(first, second)``: 0 if the first is preferred, 1 if the
second is, None for a tie. ``judge_pairs`` returns the same choices together with per-pair details and
the indices of pairs the judge could not decide at all (``missing``: a human judge with no label for
that pair), so that nothing is silently counted as a tie.

* ``RewardModelJudge``: a reward model scores both completions; a tie when |r_2 - r_1| <= margin.
* ``FunctionJudge``: a Python function ``score(prompt, completion) -> float`` (rules, simulated
  annotators, ground-truth rewards); same margin rule.
* ``LLMJudge``: a local causal LM reads a prompt asking which response is better and we compare the
  log-probabilities of the two answer labels. LLM judges favour a position (Zheng et al. 2023,
  "Judging LLM-as-a-Judge", sec. 3.3), so every pair is judged in both orders and a disagreement
  between the orders is a tie (their "conservative" swap rule).
* ``HumanJudge``: the labels people gave in the annotation app (``preftune annotate``).

``make_judge("reward:PATH" | "function:module:fn" | "function:file.py:fn" | "llm:PATH" | "human:DB")``
builds one from a CLI spec.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.models.llm_judge import LLM_LABELS, LLM_TEMPLATE, PairwiseLLM, decide
from preftune.models.llm_judge import continuation_logprobs as _continuation_logprobs  # noqa: F401 (its old home)

Pair = tuple[str, str]


@dataclass
class Judgements:
    """What a judge said about a list of pairs (same order as the pairs)."""

    choices: list[int | None]                                # 0 first preferred, 1 second, None tie
    missing: list[int] = field(default_factory=list)         # indices of pairs with no judgement at all
    details: list[dict[str, Any]] = field(default_factory=list)  # per pair: scores, votes, ...


class Judge:
    """Base class: subclasses implement ``judge`` or ``judge_pairs``."""

    name = "judge"

    def judge(self, prompts: Sequence[str], pairs: Sequence[Pair]) -> list[int | None]:
        """0 = first preferred, 1 = second, None = tie; one per pair."""
        result = self.judge_pairs(prompts, pairs)
        if result.missing:
            raise PreftuneError(f"{len(result.missing)} of {len(pairs)} {'pair' if len(pairs) == 1 else 'pairs'} "
                                f"could not be judged by {self.name}",
                                hint="call judge_pairs(), which reports them, or label the missing pairs")
        return result.choices

    def judge_pairs(self, prompts: Sequence[str], pairs: Sequence[Pair]) -> Judgements:
        return Judgements(choices=self.judge(prompts, pairs))


def _check_lengths(prompts: Sequence[str], pairs: Sequence[Pair]) -> None:
    if len(prompts) != len(pairs):
        raise PreftuneError(f"got {len(prompts)} prompt{'' if len(prompts) == 1 else 's'} for {len(pairs)} "
                            f"pair{'' if len(pairs) == 1 else 's'}; give one prompt per pair")


class ScoreJudge(Judge):
    """A judge that scores each (prompt, completion) alone and prefers the higher score."""

    margin: float = 0.0

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def judge_pairs(self, prompts: Sequence[str], pairs: Sequence[Pair]) -> Judgements:
        _check_lengths(prompts, pairs)
        if not pairs:
            return Judgements(choices=[])
        from preftune.models.rewards import check_finite

        completions = [a for a, _ in pairs] + [b for _, b in pairs]
        both = check_finite([float(v) for v in self.scores(list(prompts) * 2, completions)], list(prompts) * 2,
                            completions, source=f"the judge {self.name}")  # a NaN would be a silent tie
        first, second = both[: len(pairs)], both[len(pairs):]
        return Judgements(choices=[decide(s1, s2, margin=self.margin) for s1, s2 in zip(first, second, strict=True)],
                          details=[{"score_first": s1, "score_second": s2}
                                   for s1, s2 in zip(first, second, strict=True)])


# ----------------------------------------------------------------------------- function judge


class FunctionJudge(ScoreJudge):
    """Prefers the completion with the higher ``fn(prompt, completion)``; a tie within ``margin``.
    ``fn`` is a callable or a ``module:function`` / ``file.py:function`` spec
    (``preftune.models.rewards.load_function``)."""

    def __init__(self, fn: str | Callable[[str, str], float], *, margin: float = 0.0) -> None:
        from preftune.models.rewards import load_function

        self.fn = load_function(fn) if isinstance(fn, str) else fn
        self.margin = float(margin)
        self.name = fn if isinstance(fn, str) else getattr(fn, "__name__", "function")

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        from preftune.models.rewards import function_scores

        return function_scores(self.fn, prompts, completions, name=self.name)


# ----------------------------------------------------------------------------- reward-model judge


class RewardModelJudge(ScoreJudge):
    """Scores both completions with a reward model r(prompt, completion); prefers the higher score and
    calls a tie when |r_2 - r_1| <= margin. ``model_path`` is a directory or hub id, or pass a loaded
    ``model`` and ``tokenizer``."""

    def __init__(self, model_path: str | None = None, *, margin: float = 0.0, batch_size: int = 16,
                 model: Any = None, tokenizer: Any = None, device: str | None = None) -> None:
        from preftune.models.rewards import RewardModel

        self.reward_model = RewardModel(model_path, model=model, tokenizer=tokenizer, batch_size=batch_size,
                                        device=device)
        self.model, self.tokenizer = self.reward_model.model, self.reward_model.tokenizer
        self.margin, self.batch_size = float(margin), batch_size
        self.name = f"reward:{model_path}" if model_path else "reward"

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return self.reward_model.scores(prompts, completions)


# ----------------------------------------------------------------------------- LLM judge

class LLMJudge(PairwiseLLM, Judge):
    """A local causal LM as judge. For each order (a, b) and (b, a) it fills ``template`` ({prompt},
    {response_1}, {response_2}) and compares log p(labels[0] | text) with log p(labels[1] | text), each
    the sum of the label's token log-probs. A pair's verdict stands only when both orders agree;
    otherwise (or when an order is an exact tie) it is a tie.

    ``scorer`` (texts -> [(logp_label_1, logp_label_2)]) replaces the model, for tests or other backends.
    The template, the label log-probs and the two orders are ``preftune.models.llm_judge.PairwiseLLM``'s
    (online DPO's judge uses the same).
    """

    def __init__(self, model_path: str | None = None, *, template: str = LLM_TEMPLATE,
                 labels: tuple[str, str] = LLM_LABELS, batch_size: int = 8, model: Any = None,
                 tokenizer: Any = None, device: str | None = None,
                 scorer: Callable[[list[str]], Sequence[tuple[float, float]]] | None = None) -> None:
        super().__init__(model_path, template=template, labels=labels, batch_size=batch_size, model=model,
                         tokenizer=tokenizer, device=device, scorer=scorer)

    def judge_pairs(self, prompts: Sequence[str], pairs: Sequence[Pair]) -> Judgements:
        _check_lengths(prompts, pairs)
        choices, details = self.verdicts(prompts, pairs)
        return Judgements(choices=choices, details=details)


# ----------------------------------------------------------------------------- human judge


def majority_verdicts(labels: Iterable[Any], prompts: Sequence[str], pairs: Sequence[Pair]) -> Judgements:
    """Verdicts from annotators' labels, matched by text (prompt, response_a, response_b) in either order.

    Labels are objects or dicts with ``prompt, response_a, response_b, annotator, choice`` (choice a, b,
    tie or skip). Skips are not votes; an annotator's later label of the same pair replaces the earlier.
    A completion wins when it has a strict majority (> half) of the votes; otherwise it is a tie; a pair
    with no vote is ``missing``.
    """
    votes: dict[tuple[str, str, str], dict[str, str]] = {}  # (prompt, x, y) -> annotator -> x | y | tie
    for lab in labels:
        get = lab.get if isinstance(lab, dict) else lambda k, _lab=lab: getattr(_lab, k)
        choice = get("choice")
        if choice == "skip":
            continue
        a, b = get("response_a"), get("response_b")
        winner = {"a": a, "b": b, "tie": "tie"}.get(choice)
        if winner is None:
            raise PreftuneError(f"unknown label choice {choice!r}", field="choice", hint="expected a, b, tie or skip")
        key = (get("prompt"), *sorted((a, b)))
        votes.setdefault(key, {})[str(get("annotator"))] = winner
    choices: list[int | None] = []
    missing: list[int] = []
    details: list[dict[str, Any]] = []
    for k, (prompt, (x, y)) in enumerate(zip(prompts, pairs, strict=True)):
        ballot = list(votes.get((prompt, *sorted((x, y))), {}).values())
        n_x, n_y = ballot.count(x), ballot.count(y)
        if x == y:  # identical texts: every vote names both; call it a tie
            n_x = n_y = 0
        details.append({"votes_first": n_x, "votes_second": n_y, "votes_tie": len(ballot) - n_x - n_y})
        if not ballot:
            missing.append(k)
            choices.append(None)
        elif 2 * n_x > len(ballot):
            choices.append(0)
        elif 2 * n_y > len(ballot):
            choices.append(1)
        else:
            choices.append(None)
    return Judgements(choices=choices, missing=missing, details=details)


class HumanJudge(Judge):
    """Majority of the annotators' labels in an annotation database (see ``majority_verdicts``)."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        if not self.db_path.is_file():
            raise PreftuneError("annotation database not found", path=str(self.db_path), field="judge",
                                hint="give the .db file that `preftune annotate` writes")
        self.name = f"human:{db_path}"

    def judge_pairs(self, prompts: Sequence[str], pairs: Sequence[Pair]) -> Judgements:
        from preftune.data.annotations import AnnotationStore

        _check_lengths(prompts, pairs)
        return majority_verdicts(AnnotationStore(self.db_path, create=False).labels(), prompts, pairs)


# ----------------------------------------------------------------------------- from a CLI spec

JUDGE_KINDS = {"reward": RewardModelJudge, "function": FunctionJudge, "llm": LLMJudge, "human": HumanJudge}


def make_judge(spec: str, **opts: Any) -> Judge:
    """Build a judge from ``reward:PATH``, ``function:module:fn`` (or ``function:file.py:fn``),
    ``llm:PATH`` or ``human:DB``; ``opts`` go to the judge's constructor (e.g. ``margin``)."""
    kind, sep, target = spec.partition(":")
    if kind not in JUDGE_KINDS or not sep or not target:
        raise PreftuneError(f"cannot read the judge spec {spec!r}", field="judge",
                            hint="use reward:PATH, function:module:fn, function:file.py:fn, llm:PATH or human:DB")
    cls = JUDGE_KINDS[kind]
    try:
        judge = cls(target, **opts)
    except TypeError as exc:
        raise PreftuneError(f"option not understood by the {kind} judge ({exc})", field="judge") from None
    judge.name = spec
    return judge
