"""The demo's ground-truth reward and its panel of simulated annotators.

The course exercise prefers completions of a Shakespeare prefix that are *concise, focused and in
style*, and rejects those that *ramble into long multi-speaker dialogue*. ``shakespeare_reward`` writes
that preference down as a function of the completion's text, term by term::

    r(x, y) =  1.0 * finished        1 if y ends a sentence: its last line is verse (not a speaker or
                                     a stage direction) ending with . ! or ?
             + 0.5 * metre           mean over y's lines of max(0, 1 - |syllables - 10| / 5):
                                     lines near the ten syllables of iambic pentameter
             - 1.0 * interruptions   speaker names, stage directions and headings in y: other
                                     voices breaking in (the multi-speaker ramble)
             - 0.1 * excess_words    words beyond 24 (about two lines of verse)
             - 0.25 * missing_words  words short of 8 (a line of verse): a completion that
                                     hardly says anything (an empty one costs 2)

The best completions score about 1.5 (one or two lines of pentameter that finish the sentence); a
ramble across three speeches scores -3 or less; four words and a full stop score about 0. ``preftune compare --judge
function:preftune.experiments.demo.reward:shakespeare_reward`` uses it as the ground-truth judge.

Annotators. Each simulated annotator weighs the same terms with weights of their own (one cares
more about metre, one more about brevity, one tolerates dialogue) and answers through the
Bradley-Terry model with noise: annotator ``a`` prefers ``y1`` over ``y2`` with probability
``sigmoid((r_a(x, y1) - r_a(x, y2)) / temperature_a)``, so their labels disagree with each other and
with the ground truth as people's do, more often the closer the two completions are.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from preftune.experiments.demo.corpus import is_speaker, is_stage_direction

WEIGHTS = {"finished": 1.0, "metre": 0.5, "interruptions": -1.0, "excess_words": -0.1, "missing_words": -0.25}
LINE_WORDS = 8        # words of a line of verse: shorter completions lose 0.25 per missing word
CONCISE_WORDS = 24    # words allowed before the length penalty starts (about two lines of verse)
PENTAMETER = 10       # syllables of a line of iambic pentameter
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*")


def syllables(word: str) -> int:
    """A rough syllable count: vowel groups, less a silent final -e (``time`` 1, ``noble`` 2), at least 1.
    Apostrophes are elisions and join their neighbours (``o'erthrown`` 2, ``lov'd`` 1)."""
    w = word.lower().replace("'", "").replace("’", "").strip("-")
    groups = len(re.findall(r"[aeiouy]+", w))
    if w.endswith("e") and not w.endswith(("le", "ee")) and groups > 1:
        groups -= 1
    return max(1, groups)


def terms(completion: str) -> dict[str, float]:
    """The reward's terms for one completion (see the module docstring)."""
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    voices = [line for line in lines if is_speaker(line) or is_stage_direction(line) or _HEADING.match(line)]
    verse = [line for line in lines if line not in voices]
    words = [w for line in verse for w in _WORD.findall(line)]
    metre = [max(0.0, 1.0 - abs(sum(syllables(w) for w in _WORD.findall(line)) - PENTAMETER) / 5)
             for line in verse if _WORD.findall(line)]
    return {
        "finished": float(bool(words) and lines[-1] not in voices and lines[-1].endswith((".", "!", "?"))),
        "metre": sum(metre) / len(metre) if metre else 0.0,
        "interruptions": float(len(voices)),
        "excess_words": float(max(0, len(words) - CONCISE_WORDS)),
        "missing_words": float(max(0, LINE_WORDS - len(words))),
    }


def shakespeare_reward(prompt: str, completion: str) -> float:
    """The demo's ground-truth reward r(x, y) of a completion ``y`` of a prefix ``x`` (module docstring)."""
    return sum(WEIGHTS[name] * value for name, value in terms(completion).items())


@dataclass(frozen=True)
class Annotator:
    """A simulated annotator: their own weights on the reward's terms and their Bradley-Terry noise."""

    name: str
    group: str
    temperature: float                                    # larger = noisier answers
    emphasis: dict[str, float] = field(default_factory=dict)  # term -> multiplier of its weight (default 1)

    def reward(self, prompt: str, completion: str) -> float:
        return sum(WEIGHTS[name] * self.emphasis.get(name, 1.0) * value
                   for name, value in terms(completion).items())

    def p_first(self, prompt: str, first: str, second: str) -> float:
        """P(this annotator prefers ``first``) = sigmoid((r_a(first) - r_a(second)) / temperature)."""
        diff = (self.reward(prompt, first) - self.reward(prompt, second)) / self.temperature
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, diff))))


PANEL = (
    Annotator("ada", "verse", 0.5, {"metre": 2.0}),                 # hears the metre
    Annotator("ben", "stage", 0.8, {"interruptions": 0.5}),         # a playgoer: dialogue is fine
    Annotator("cal", "verse", 0.4, {"excess_words": 1.5}),          # brevity above all
    Annotator("dee", "stage", 1.5, {}),                             # hurried and noisy
    Annotator("eli", "verse", 0.7, {"finished": 1.5}),              # wants the sentence finished
)


def label(annotator: Annotator, prompt: str, first: str, second: str, rng: random.Random) -> int:
    """One Bradley-Terry draw: 0 if the annotator prefers ``first``, 1 if ``second``."""
    return 0 if rng.random() < annotator.p_first(prompt, first, second) else 1


def annotate_pairs(pairs: Sequence[tuple[str, str, str]], *, panel: Sequence[Annotator] = PANEL,
                   second_opinion: float = 0.2, seed: int = 0) -> list[dict]:
    """Label ``(prompt, first, second)`` pairs: each by one annotator of the panel (drawn at random), a
    ``second_opinion`` fraction also by a second one (for the agreement statistics).

    Returns one row per judgement: ``{pair, prompt, first, second, annotator, group, choice}`` with
    ``choice`` 0 (first preferred) or 1.
    """
    rng = random.Random(seed)
    rows = []
    for index, (prompt, first, second) in enumerate(pairs):
        judges = rng.sample(list(panel), 2 if rng.random() < second_opinion else 1)
        for who in judges:
            rows.append({"pair": index, "prompt": prompt, "first": first, "second": second,
                         "annotator": who.name, "group": who.group, "choice": label(who, prompt, first, second, rng)})
    return rows


def preference_rows(judgements: Sequence[dict]) -> list[dict]:
    """Judgements -> preference data rows ``{prompt, chosen, rejected, annotator, group}``."""
    out = []
    for j in judgements:
        chosen, rejected = (j["first"], j["second"]) if j["choice"] == 0 else (j["second"], j["first"])
        out.append({"prompt": j["prompt"], "chosen": chosen, "rejected": rejected,
                    "annotator": j["annotator"], "group": j["group"]})
    return out
