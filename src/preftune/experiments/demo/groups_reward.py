"""The groups scenario's two ground truths and its panel of simulated annotators in two groups.

``preftune demo --scenario groups`` asks whose preferences a model should follow when the annotators
are two populations that want different things (the course's exercise E.1/E.2; Chakraborty et al. 2024,
MaxMin-RLHF). Both groups read the same completions of a Shakespeare prefix:

* **concise** (the majority, 80% of the annotators): the default scenario's ground truth, the course's
  preference, unchanged (``preftune.experiments.demo.reward:shakespeare_reward``)::

      r_concise(x, y) = 1.0 * finished + 0.5 * metre - 1.0 * interruptions
                        - 0.1 * max(0, words - 24) - 0.25 * max(0, 8 - words)

  one or two lines of verse that finish the sentence, no other voices breaking in.

* **expansive** (the minority, 20%): playgoers who want a full speech, as many words of verse as the
  completion can hold, up to 40 (about four lines); other voices, unfinished sentences and metre do not
  matter to them::

      r_expansive(x, y) = 0.1 * min(words, 40)

``words`` counts the words of the verse lines of ``y`` (speaker names, stage directions and headings are
not verse, the speech that follows them is), as ``reward.terms`` does.

Do they conflict? On the completions the SFT model samples, mostly: the longer completions are the
rambles the majority dislikes (Pearson correlation of the two rewards about -0.3; the two rewards order
more than half of the pairs of completions of a prefix oppositely; the preferences stage measures both
on the run's own SFT samples). But both can be satisfied at once: 20 to 24 words of verse that finish
the sentence with no other voice score 1.0 to 1.5 (the majority's best is 1.5) and 2.0 to 2.4 for the
minority, more than either group gives the median SFT completion (about -0.3 and 1.6). A reward model fitted to the pooled
labels follows the 80%: it learns "short and finished", the opposite of what the minority asks for.

Annotators. Annotator ``a`` of group ``g`` prefers ``y1`` over ``y2`` with probability
``sigmoid((r_g(x, y1) - r_g(x, y2)) / T_a)`` (the Bradley-Terry model with noise, ``T_a`` from
``GroupsSettings.annotator_temperatures``), so labels disagree within a group too, as people's do.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from preftune.experiments.demo.corpus import is_speaker, is_stage_direction
from preftune.experiments.demo.reward import shakespeare_reward

EXPANSIVE_WORD = 0.1      # the minority's reward per word of verse
EXPANSIVE_CAP = 40        # ... up to this many words (about four lines of verse)
# the constants of the two ground truths (part of the scenario's fingerprint, with the settings)
RECIPE = {"concise": "preftune.experiments.demo.reward:shakespeare_reward",
          "expansive": {"word": EXPANSIVE_WORD, "cap": EXPANSIVE_CAP}}
# group name -> its ground truth as a `compare --judge function:...` spec
GROUND_TRUTHS = {"concise": "preftune.experiments.demo.groups_reward:concise_reward",
                 "expansive": "preftune.experiments.demo.groups_reward:expansive_reward"}
MAJORITY, MINORITY = "concise", "expansive"

_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*")


def verse_words(completion: str) -> int:
    """Words of the verse lines of a completion (speaker names, stage directions and headings excluded)."""
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return sum(len(_WORD.findall(line)) for line in lines
               if not (is_speaker(line) or is_stage_direction(line) or _HEADING.match(line)))


def concise_reward(prompt: str, completion: str) -> float:
    """The majority's ground truth: the course's preference (``reward.shakespeare_reward``)."""
    return shakespeare_reward(prompt, completion)


def expansive_reward(prompt: str, completion: str) -> float:
    """The minority's ground truth: 0.1 per word of verse, up to 40 words (module docstring)."""
    return EXPANSIVE_WORD * min(verse_words(completion), EXPANSIVE_CAP)


REWARDS = {"concise": concise_reward, "expansive": expansive_reward}


@dataclass(frozen=True)
class GroupAnnotator:
    """A simulated annotator: an id, the group whose ground truth they follow, their Bradley-Terry noise."""

    name: str
    group: str
    temperature: float

    def p_first(self, prompt: str, first: str, second: str) -> float:
        """P(this annotator prefers ``first``) = sigmoid((r_g(first) - r_g(second)) / temperature)."""
        reward = REWARDS[self.group]
        diff = (reward(prompt, first) - reward(prompt, second)) / self.temperature
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, diff))))


def make_panel(sizes: Sequence[int], temperatures: Sequence[float], *, seed: int) -> tuple[GroupAnnotator, ...]:
    """``sizes[0]`` concise and ``sizes[1]`` expansive annotators with ids ``a01``, ``a02``, ... in a seeded
    random order (an id says nothing about its group); the temperatures cycle within each group."""
    groups = [g for g, n in zip((MAJORITY, MINORITY), sizes, strict=True) for _ in range(n)]
    temps = [temperatures[i % len(temperatures)] for n in sizes for i in range(n)]
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    width = max(2, len(str(len(groups))))
    return tuple(GroupAnnotator(f"a{k + 1:0{width}d}", groups[i], temps[i]) for k, i in enumerate(order))


def annotate_pairs(pairs: Sequence[tuple[str, str, str]], panel: Sequence[GroupAnnotator], *,
                   second_opinion: float, seed: int) -> list[dict[str, Any]]:
    """Label ``(prompt, first, second)`` pairs: each by one annotator of the panel drawn at random (so each
    group gives labels in proportion to its size), a ``second_opinion`` fraction also by a second one.

    One row per judgement: ``{pair, prompt, first, second, annotator, group, choice}`` (choice 0: first
    preferred), with ``true_choice.<group>`` for both groups' ground truths (1 when the second is better, 0
    when the first is, None when they are equal).
    """
    rng = random.Random(seed)
    rows = []
    for index, (prompt, first, second) in enumerate(pairs):
        truth = {g: _order(REWARDS[g](prompt, first), REWARDS[g](prompt, second)) for g in REWARDS}
        for who in rng.sample(list(panel), 2 if rng.random() < second_opinion else 1):
            choice = 0 if rng.random() < who.p_first(prompt, first, second) else 1
            rows.append({"pair": index, "prompt": prompt, "first": first, "second": second,
                         "annotator": who.name, "group": who.group, "choice": choice, "true_choice": truth})
    return rows


def _order(first: float, second: float) -> int | None:
    return None if first == second else int(second > first)


def reward_agreement(prompts: Sequence[str], completions: Sequence[str],
                     pairs: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Do the two ground truths conflict on these completions? Their Pearson correlation, the share of
    ``pairs`` (index pairs) that they order oppositely (ties left out), and the share of completions
    that both groups rate above their own median."""
    a = [concise_reward(p, c) for p, c in zip(prompts, completions, strict=True)]
    b = [expansive_reward(p, c) for p, c in zip(prompts, completions, strict=True)]
    ordered = [(a[i] - a[j]) * (b[i] - b[j]) for i, j in pairs]
    decided = [v for v in ordered if v != 0]
    med_a, med_b = _median(a), _median(b)
    return {"completions": len(a), "correlation": _pearson(a, b),
            "pairs": len(pairs), "opposite_order": sum(v < 0 for v in decided) / len(decided) if decided else None,
            "both_above_median": sum(x > med_a and y > med_b for x, y in zip(a, b, strict=True)) / len(a),
            "mean": {MAJORITY: sum(a) / len(a), MINORITY: sum(b) / len(b)}}


def _pearson(a: Sequence[float], b: Sequence[float]) -> float | None:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    if va == 0 or vb == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True)) / math.sqrt(va * vb)


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
