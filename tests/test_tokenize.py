"""Tokenisation of pairs, rankings and SFT examples; truncation counts; collation; length grouping."""

from __future__ import annotations

import pytest
import torch

from preftune.data.collate import (
    collate_pairs,
    collate_responses,
    collate_sft,
    length_grouped_order,
    pad_sequences,
)
from preftune.data.formats import PreferencePair, Ranking, SFTExample
from preftune.data.tokenize import (
    IGNORE_INDEX,
    TokenizedPair,
    tokenize_pair,
    tokenize_preferences,
    tokenize_prompt_response,
    tokenize_sft,
)
from preftune.errors import PreftuneError


@pytest.fixture(scope="module")
def words():
    """A word-level tokenizer: one token per whitespace-separated word, so lengths are countable by eye.

    Ids: <pad>=0, </s>=1, then a..z = 2..27. No BOS.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{chr(97 + i): 2 + i for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def test_prompt_and_response_ids_are_concatenated_with_exact_boundary(words):
    """prompt 'a b c' -> [2, 3, 4]; response 'd e' -> [5, 6] + EOS [1].

    input_ids = [2, 3, 4, 5, 6, 1]; labels mask the 3 prompt tokens: [-100, -100, -100, 5, 6, 1].
    """
    seq = tokenize_prompt_response(words, "a b c", "d e", max_length=16)
    assert seq.input_ids == [2, 3, 4, 5, 6, 1]
    assert seq.labels == [IGNORE_INDEX] * 3 + [5, 6, 1]
    assert not seq.prompt_truncated and not seq.response_truncated


def test_boundary_with_bpe_tokenizer_matches_separate_tokenisation(tiny_tokenizer):
    """With the byte-level BPE tokenizer (which prepends <s>): ids = tok(prompt) + tok(response, no
    specials) + [</s>], and the labels are -100 exactly on the prompt ids."""
    prompt, response = "Question: what is two plus two?", " Answer: four."
    seq = tokenize_prompt_response(tiny_tokenizer, prompt, response, max_length=128)
    p = tiny_tokenizer(prompt)["input_ids"]
    r = tiny_tokenizer(response, add_special_tokens=False)["input_ids"]
    assert p[0] == tiny_tokenizer.bos_token_id
    assert seq.input_ids == p + r + [tiny_tokenizer.eos_token_id]
    assert seq.labels == [IGNORE_INDEX] * len(p) + r + [tiny_tokenizer.eos_token_id]


def test_keep_end_truncation_cuts_prompt_left_and_response_right(words):
    """max_length 6, max_prompt_length 3. Prompt 'a b c d e' (5) -> keep its end 'c d e' = [4, 5, 6].
    Chosen 'f g' + EOS = 3 tokens fits (3 + 3 = 6). Rejected 'h i j k' + EOS = 5 tokens -> cut to 3:
    [9, 10, 11] (the EOS is gone, as it must be for a cut response). Both cuts are counted once."""
    pair = PreferencePair("a b c d e", "f g", "h i j k")
    items, stats = tokenize_preferences(words, [pair], max_length=6, max_prompt_length=3)
    (item,) = items
    assert item.chosen_input_ids == [4, 5, 6, 7, 8, 1]
    assert item.rejected_input_ids == [4, 5, 6, 9, 10, 11]
    assert item.rejected_labels == [IGNORE_INDEX] * 3 + [9, 10, 11]
    assert (stats.total, stats.kept, stats.prompt_truncated, stats.response_truncated, stats.dropped) == (
        1, 1, 1, 1, 0)


def test_drop_and_error_truncation(words):
    """Three pairs, max_length 5, max_prompt_length 2: pair 0 fits (2 + 2 = 4 <= 5), pair 1 has a 3-token
    prompt, pair 2 a 5-token response. 'drop' keeps 1 and counts 2 dropped; 'error' stops at pair 1,
    naming where it came from."""
    pairs = [PreferencePair("a b", "c", "d"), PreferencePair("a b c", "d", "e", source="prefs.jsonl:2"),
             PreferencePair("a", "b c d e", "f")]
    items, stats = tokenize_preferences(words, pairs, max_length=5, max_prompt_length=2, truncation="drop")
    assert len(items) == 1 and items[0].chosen_input_ids == [2, 3, 4, 1]
    assert (stats.total, stats.kept, stats.dropped, stats.prompt_truncated, stats.response_truncated) == (
        3, 1, 2, 0, 0)
    with pytest.raises(PreftuneError, match=r"prefs\.jsonl:2.*over max_length 5"):
        tokenize_preferences(words, pairs, max_length=5, max_prompt_length=2, truncation="error")
    with pytest.raises(PreftuneError, match="max_prompt_length"):
        tokenize_pair(words, pairs[0], max_length=4, max_prompt_length=4)


def test_pair_margin_and_ranking_order_are_kept(words):
    """A Ranking is already best first: responses 'c', 'd e', 'f' -> [[2,4,1], [2,5,6,1], [2,7,1]]."""
    items, _ = tokenize_preferences(words, [PreferencePair("a", "b", "c", margin=2.5),
                                            Ranking("a", ["c", "d e", "f"], scores=[3.0, 2.0, 1.0])],
                                    max_length=16)
    assert items[0].margin == 2.5
    assert items[1].input_ids == [[2, 4, 1], [2, 5, 6, 1], [2, 7, 1]]
    assert items[1].labels[1] == [IGNORE_INDEX, 5, 6, 1]
    assert items[1].scores == [3.0, 2.0, 1.0]


def test_chat_messages_render_with_template_and_end_with_one_eos(tiny_tokenizer):
    """Template: '<s><|user|>\\n{q}</s>\\n' + generation prompt '<|assistant|>\\n'; the response is
    'four</s>' (the '\\n' after the final </s> dropped), so labels cover 'four' and exactly one </s>."""
    prompt = [{"role": "user", "content": "what is two plus two?"}]
    seq = tokenize_prompt_response(tiny_tokenizer, prompt, "four", max_length=128)
    head = tiny_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    head_ids = tiny_tokenizer(head, add_special_tokens=False)["input_ids"]
    four = tiny_tokenizer("four", add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    assert seq.input_ids == head_ids + four + [eos]
    assert [t for t in seq.labels if t != IGNORE_INDEX] == four + [eos]
    assert head.endswith("<|assistant|>\n")


def test_sft_formats(tiny_tokenizer, words):
    """text: BOS-free word tokenizer 'a b' -> [2, 3, 1], all trained. prompt/completion 'a'/'b c' ->
    [2, 3, 4, 1] with the prompt masked, or not (completion_only_loss=False). Truncation from the right."""
    text = tokenize_sft(words, {"text": "a b"}, max_length=8)
    assert (text.input_ids, text.labels) == ([2, 3, 1], [2, 3, 1])
    from_example = tokenize_sft(words, SFTExample(None, "a b"), max_length=8)
    assert from_example.input_ids == [2, 3, 1] and from_example.labels == [2, 3, 1]
    pc = tokenize_sft(words, {"prompt": "a", "completion": "b c"}, max_length=8)
    assert (pc.input_ids, pc.labels) == ([2, 3, 4, 1], [IGNORE_INDEX, 3, 4, 1])
    full = tokenize_sft(words, {"prompt": "a", "completion": "b c"}, max_length=8, completion_only_loss=False)
    assert full.labels == [2, 3, 4, 1]
    cut = tokenize_sft(words, {"prompt": "a", "completion": "b c"}, max_length=3)
    assert cut.input_ids == [2, 3, 4] and cut.response_truncated


def test_sft_messages_train_on_every_assistant_turn_only(tiny_tokenizer):
    """Two assistant turns 'hello' and 'four': the trained tokens are exactly tok('hello') + </s> +
    tok('four') + </s>; the user turns, role tags and newlines are masked; the sequence ends with </s>."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]
    seq = tokenize_sft(tiny_tokenizer, {"messages": messages}, max_length=256)
    eos = tiny_tokenizer.eos_token_id
    enc = lambda s: tiny_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert [t for t in seq.labels if t != IGNORE_INDEX] == enc("hello") + [eos] + enc("four") + [eos]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert seq.input_ids == enc(rendered.rstrip())
    assert seq.input_ids[-1] == eos


def test_missing_chat_template_is_a_clear_error(words):
    with pytest.raises(PreftuneError, match="chat template"):
        tokenize_prompt_response(words, [{"role": "user", "content": "a"}], "b", max_length=8)


def test_pad_sequences_to_longest_left_and_right():
    """[[5, 6, 7], [8]] pads to length 3 (the longest, not a max_length)."""
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_value=0, padding_side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_value=0, padding_side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collate_pairs_stacks_chosen_then_rejected():
    """Pairs (chosen [1,2], rejected [1,3,4]) and (chosen [5], rejected [6]): 4 rows of width 3, chosen
    rows first; labels padded with -100; margin NaN where absent; cached ref log-probs only when all
    pairs have them."""
    items = [TokenizedPair([1, 2], [-100, 2], [1, 3, 4], [-100, 3, 4], margin=1.0),
             TokenizedPair([5], [5], [6], [6])]
    batch = collate_pairs(items, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [5, 0, 0], [1, 3, 4], [6, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, -100], [5, -100, -100], [-100, 3, 4], [6, -100, -100]]
    assert batch["margin"][0] == 1.0 and torch.isnan(batch["margin"][1])
    assert "ref_chosen_logps" not in batch
    for it in items:
        it.ref_chosen_logps, it.ref_rejected_logps = -1.0, -2.0
    assert collate_pairs(items, pad_token_id=0)["ref_rejected_logps"].tolist() == [-2.0, -2.0]


def test_collate_responses_indexes_pairs_and_rankings():
    """A pair (2 rows) then a 3-way ranking (3 rows): response_index [[0, 1, 0], [2, 3, 4]] with the
    pair's third slot masked."""
    from preftune.data.tokenize import TokenizedRanking

    items = [TokenizedPair([1, 2], [-100, 2], [1, 3], [-100, 3]),
             TokenizedRanking([[1, 4], [1, 5, 6], [1, 7]], [[-100, 4], [-100, 5, 6], [-100, 7]])]
    batch = collate_responses(items, pad_token_id=0)
    assert batch["input_ids"].shape == (5, 3)
    assert batch["response_index"].tolist() == [[0, 1, 0], [2, 3, 4]]
    assert batch["response_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["is_ranking"].tolist() == [False, True]
    sft = collate_sft([tokenize_sft_like([1, 2, 3]), tokenize_sft_like([4])], pad_token_id=0, padding_side="left")
    assert sft["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]


def tokenize_sft_like(ids):
    from preftune.data.tokenize import TokenizedSequence

    return TokenizedSequence(list(ids), list(ids))


def test_length_grouped_order_is_a_seeded_permutation_of_similar_length_batches():
    """100 lengths 0..99 shuffled, batch 4, mega-batch factor 5 (20 examples): each batch's lengths come
    from one sorted mega-batch, so they span less than a random batch would; the first batch holds the
    longest example (99); the same seed gives the same order, another seed another."""
    lengths = list(range(100))
    order = length_grouped_order(lengths, 4, seed=1, mega_batch_factor=5)
    assert sorted(order) == list(range(100))
    assert 99 in order[:4]
    batches = [order[i:i + 4] for i in range(0, 100, 4)]
    spread = sum(max(b) - min(b) for b in batches) / len(batches)
    g = torch.Generator().manual_seed(0)
    random_spread = sum(float(b.max() - b.min()) for b in torch.randperm(100, generator=g).view(25, 4)) / 25
    assert spread < random_spread / 2
    assert order == length_grouped_order(lengths, 4, seed=1, mega_batch_factor=5)
    assert order != length_grouped_order(lengths, 4, seed=2, mega_batch_factor=5)
    # 10 examples fit one mega-batch: sorted longest first -> [9..6], [5..2] and the short [1, 0], which
    # stays last; [9..6] holds the longest so it comes first.
    assert length_grouped_order(list(range(10)), 4, seed=0) == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]

