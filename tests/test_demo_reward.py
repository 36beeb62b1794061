"""The demo's ground-truth reward, its simulated annotators and its corpus helpers, by hand."""

from __future__ import annotations

import math
import random

import pytest

from preftune.experiments.demo import corpus
from preftune.experiments.demo.reward import (
    PANEL,
    Annotator,
    annotate_pairs,
    preference_rows,
    shakespeare_reward,
    syllables,
    terms,
)

PREFIX = "O, what a noble mind is here o'erthrown!"


def test_syllables_of_common_words():
    # vowel groups, less a silent final e: noble = no-ble (2), time (1), o'erthrown (2), beauty (2)
    assert [syllables(w) for w in ("noble", "time", "o'erthrown", "beauty", "the", "I")] == [2, 1, 2, 2, 1, 1]


def test_a_finished_line_of_pentameter_scores_one_and_a_half():
    """Hamlet III.1, by the counter: 'The courtier's, soldier's, scholar's, eye, tongue, sword;' is
    the 1 + cour-tier's 2 + sol-dier's 2 + scho-lar's 2 + eye 1 + tongue 1 (silent -e) + sword 1 = 10
    syllables; 'The glass of fashion and the mould of form.' is 1+1+1+2+1+1+1+1+1 = 10. Metre 1.0 on
    both, the sentence is finished, no other voice, 19 words: r = 1 + 0.5 * 1.0 = 1.5."""
    completion = "\nThe courtier's, soldier's, scholar's, eye, tongue, sword;\nThe glass of fashion and the mould of form."
    t = terms(completion)
    assert t["finished"] == 1.0 and t["interruptions"] == 0.0 and t["excess_words"] == 0.0
    assert t["missing_words"] == 0.0
    assert t["metre"] == pytest.approx(1.0)
    assert shakespeare_reward(PREFIX, completion) == pytest.approx(1.5)
    # two syllables short on the first line (sol-dier's): its metre is 1 - 2/5
    short = completion.replace("soldier's, ", "")
    assert terms(short)["metre"] == pytest.approx((1.0 - 2 / 5 + 1.0) / 2)


def test_other_voices_and_rambling_are_penalised():
    ramble = ("\nAnd so I go.\n\nHORATIO.\nMy lord, I came to see your father's funeral,\n"
              "And stay'd to hear the news of all the court,\nAnd all the while the king did sit and weep,\n"
              "And all the while the queen did laugh and play\n\n[Exit.]")
    t = terms(ramble)
    assert t["interruptions"] == 2.0                      # HORATIO. and [Exit.]
    assert t["finished"] == 0.0                           # it ends on a stage direction
    words = 4 + 9 + 10 + 10 + 10                          # the verse lines' words
    assert t["excess_words"] == words - 24
    assert shakespeare_reward(PREFIX, ramble) < shakespeare_reward(PREFIX, "\nAnd so I go, and so I go.") - 3


def test_short_and_empty_completions():
    assert terms("")["missing_words"] == 8.0
    assert shakespeare_reward(PREFIX, "") == -2.0
    assert terms(".") == {"finished": 0.0, "metre": 0.0, "interruptions": 0.0, "excess_words": 0.0,
                          "missing_words": 8.0}
    # three words ending a sentence: finished (+1), 5 words short (-1.25); 'and so fa-re-well' is 5
    # syllables by the counter, so its metre is max(0, 1 - 5/5) = 0
    assert shakespeare_reward(PREFIX, "\nAnd so farewell.") == pytest.approx(1.0 - 1.25)
    # every word up to a line of 8 counts
    assert terms("\nAnd so I bid farewell to all.")["missing_words"] == 1.0


def test_annotator_bradley_terry_probability():
    """A noiseless-ish annotator with temperature 0.5: P(first) = sigmoid((r1 - r2) / 0.5)."""
    a = Annotator("x", "g", 0.5)
    good, bad = "\nThe glass of fashion and the mould of form.", "\nthe"
    diff = shakespeare_reward("", good) - shakespeare_reward("", bad)
    assert a.p_first("", good, bad) == pytest.approx(1 / (1 + math.exp(-diff / 0.5)))
    assert a.p_first("", bad, good) == pytest.approx(1 - a.p_first("", good, bad))


def test_emphasis_changes_an_annotators_reward():
    text = "\nThe glass of fashion and the mould of form"       # unfinished, metre 1.0
    plain, metrist = Annotator("p", "g", 1.0), Annotator("m", "g", 1.0, {"metre": 2.0})
    assert metrist.reward("", text) - plain.reward("", text) == pytest.approx(0.5 * 1.0)


def test_panel_labels_disagree_like_people_but_follow_the_reward():
    good, bad = "\nThe glass of fashion and the mould of form.", "\nAnd so\n\nKING.\nand so and so"
    pairs = [("p", good, bad), ("p", bad, good)] * 200
    rows = annotate_pairs(pairs, second_opinion=0.5, seed=1)
    assert {r["annotator"] for r in rows} == {a.name for a in PANEL}
    assert len(rows) > len(pairs)  # some pairs got a second opinion
    prefers_good = [r["choice"] == (0 if r["first"] == good else 1) for r in rows]
    share = sum(prefers_good) / len(rows)
    assert 0.85 < share < 1.0  # mostly right, but noisy annotators do err
    prefs = preference_rows(rows)
    assert all(p["chosen"] in (good, bad) and p["rejected"] != p["chosen"] for p in prefs)
    assert sum(p["chosen"] == good for p in prefs) == sum(prefers_good)


def test_labels_are_reproducible_from_the_seed():
    pairs = [("p", "\nA b c d.", "\nA b c d e f g"), ("q", "\nx y z w.", "\nHAMLET.\nno")] * 5
    assert annotate_pairs(pairs, seed=3) == annotate_pairs(pairs, seed=3)
    rng = random.Random(0)
    assert annotate_pairs(pairs, seed=rng.randint(0, 9)) is not None


def test_speaker_and_stage_lines():
    for line in ("HAMLET.", "First Witch.", "Ber.", "GLOSTER", "2 KEEPER.", "QUEEN MARGARET."):
        assert corpus.is_speaker(line), line
    for line in ("And so I go.", "O, what a noble mind is here o'erthrown!", "I."):
        assert not corpus.is_speaker(line), line
    assert corpus.is_stage_direction("[Exit.]") and corpus.is_stage_direction("Enter Ghost")
    assert corpus.is_verse("The glass of fashion and the mould of form,")
    assert not corpus.is_verse("[Exeunt.]")


def test_continuation_counts_non_blank_lines():
    lines = ["To be, or not to be,", "that is the question:", "", "OPHELIA.", "Good my lord,", "How does your honour?"]
    assert corpus.continuation(lines, 0, n_lines=1) == "\nthat is the question:"
    assert corpus.continuation(lines, 0, n_lines=3) == "\nthat is the question:\n\nOPHELIA.\nGood my lord,"


def test_heldout_prefixes_start_with_the_course_five_and_stay_out_of_training():
    held = corpus.heldout_prefixes()
    assert held[:5] == ["O, what a noble mind is here o'erthrown!", "look in thy glass and tell the face thou viewest",
                        "Then let not winter's ragged hand deface", "Thou canst not see one wrinkle in my brow,",
                        "Great lords, wise men ne'er sit and wail their loss,"]
    c = corpus.load_corpus(("hamlet",))
    lines = corpus.prefix_lines(c, exclude=held, seed=0)
    hamlet = c.lines("hamlet")
    noble = next(i for i, line in enumerate(hamlet) if line.startswith("O, what a noble mind"))
    assert all(abs(line.index - noble) > corpus.GAP for line in lines)
    assert len(lines) > 1000
