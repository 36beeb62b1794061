"""Format detection, the implicit-prompt and shared-message splits, and ranking expansion."""

from __future__ import annotations

import pytest

from preftune.data import (
    PreferencePair,
    Ranking,
    detect_format,
    length_stats,
    split_implicit_prompt,
    split_shared_messages,
    text_length,
)
from preftune.errors import PreftuneError

U = {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(("record", "expected"), [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "standard"),
    ({"chosen": "a", "rejected": "b"}, "implicit_prompt"),
    ({"prompt": [U], "chosen": [U], "rejected": [U]}, "conversational"),
    ({"chosen": [U], "rejected": [U]}, "conversational"),
    ({"prompt": "p", "chosen": [U], "rejected": [U]}, "conversational"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}, "ranking"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}, "ranking"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2]}, "ranking"),
    ({"prompt": "p", "completion": "c", "label": True}, "unpaired"),
    ({"prompt": "p", "completion": "c"}, "sft_prompt_completion"),
    ({"messages": [U]}, "sft_messages"),
    ({"text": "t"}, "sft_text"),
    ({"prompt": "p", "completion": "c", "label": None}, "sft_prompt_completion"),   # null counts as absent
])
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_detect_format_unknown_names_the_fields_present():
    with pytest.raises(PreftuneError) as err:
        detect_format({"question": "q", "answer": "a", "chosen": "c"})
    msg = str(err.value)
    assert "answer, chosen, question" in msg
    assert "standard: prompt, chosen, rejected" in msg           # the hint lists the known formats


def test_implicit_prompt_split_hh_single_turn():
    """Shared prefix = '\\n\\nHuman: Hi\\n\\nAssistant: ' (incl. the space); the last tag inside it ends
    at 'Assistant:', so the prompt is '\\n\\nHuman: Hi\\n\\nAssistant:' and the replies keep their space."""
    prompt, chosen, rejected = split_implicit_prompt("\n\nHuman: Hi\n\nAssistant: Hello!",
                                                     "\n\nHuman: Hi\n\nAssistant: Go away.")
    assert prompt == "\n\nHuman: Hi\n\nAssistant:"
    assert (chosen, rejected) == (" Hello!", " Go away.")


def test_implicit_prompt_split_multi_turn_and_shared_reply_start():
    """Two turns; the replies share ' Ye' ('Yes' vs 'Yeah'), which stays in the replies because the prompt
    is cut at the last tag, not at the end of the shared prefix."""
    a = "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: Sure?\n\nAssistant: Yes"
    b = "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: Sure?\n\nAssistant: Yeah"
    prompt, chosen, rejected = split_implicit_prompt(a, b)
    assert prompt == "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: Sure?\n\nAssistant:"
    assert (chosen, rejected) == (" Yes", " Yeah")
    assert prompt + chosen == a and prompt + rejected == b


def test_implicit_prompt_split_identical_and_missing_tag():
    t = "\n\nHuman: Hi\n\nAssistant: Hello"
    assert split_implicit_prompt(t, t) == ("\n\nHuman: Hi\n\nAssistant:", " Hello", " Hello")
    assert split_implicit_prompt("User: hi\nBot: a", "User: hi\nBot: b") is None
    assert split_implicit_prompt("User: hi A: a", "User: hi A: b", tag=" A:") == ("User: hi A:", " a", " b")


def test_split_shared_messages():
    a1, a2 = {"role": "assistant", "content": "Hello!"}, {"role": "assistant", "content": "Go away."}
    assert split_shared_messages([U, a1], [U, a2]) == ([U], [a1], [a2])
    assert split_shared_messages([U, a1], [U, a1]) == ([U], [a1], [a1])      # identical: last message kept
    assert split_shared_messages([a1], [a2]) == ([], [a1], [a2])


def test_ranking_to_pairs_k3_with_margins():
    """Best first [A, B, C] with scores [3, 1, 0.5]: pairs (A>B, 2.0), (A>C, 2.5), (B>C, 0.5)."""
    r = Ranking("p", ["A", "B", "C"], scores=[3.0, 1.0, 0.5], id="r", source="f:1")
    pairs = r.to_pairs()
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [("A", "B", 2.0), ("A", "C", 2.5), ("B", "C", 0.5)]
    assert all(isinstance(p, PreferencePair) and p.prompt == "p" and p.source == "f:1" for p in pairs)
    assert [p.id for p in pairs] == ["r:0>1", "r:0>2", "r:1>2"]


def test_ranking_to_pairs_without_scores_and_ties():
    """K=4 without scores: 4*3/2 = 6 pairs, margins None. Scores [2, 2, 1]: the tied pair (0, 1) is skipped."""
    assert [p.margin for p in Ranking("p", list("ABCD")).to_pairs()] == [None] * 6
    tied = Ranking("p", ["A", "B", "C"], scores=[2.0, 2.0, 1.0])
    assert tied.n_ties() == 1
    assert [(p.chosen, p.rejected) for p in tied.to_pairs()] == [("A", "C"), ("B", "C")]
    assert len(tied.to_pairs(skip_ties=False)) == 3


def test_text_length_and_length_stats():
    """Messages count their contents: 'Hi' + 'Hello!' = 2 + 6 = 8 characters.
    Lengths [1, 2, 3, 4, 10]: mean 4, median 3, p95 = ceil(0.95*5) = 5th value = 10."""
    assert text_length("abc") == 3
    assert text_length([U, {"role": "assistant", "content": "Hello!"}]) == 8
    assert length_stats([3, 1, 10, 2, 4]) == {"min": 1, "mean": 4.0, "median": 3, "p95": 10, "max": 10}
    assert length_stats([]) == {}
