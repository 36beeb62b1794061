"""preftune.judges: reward-model, function, LLM (both orders) and human judges behind one interface."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.judges import (
    FunctionJudge,
    HumanJudge,
    LLMJudge,
    RewardModelJudge,
    _continuation_logprobs,
    decide,
    majority_verdicts,
    make_judge,
)
from preftune.models.rewards import load_function


def test_decide_with_margin():
    """second - first > margin -> 1; first - second > margin -> 0; otherwise a tie (None)."""
    assert decide(1.0, 2.0) == 1 and decide(2.0, 1.0) == 0 and decide(1.0, 1.0) is None
    assert decide(1.0, 1.4, margin=0.5) is None and decide(1.0, 1.6, margin=0.5) == 1
    assert decide(1.6, 1.0, margin=0.5) == 0


def test_function_judge_on_known_texts():
    """score = number of words: ("a b", "a") -> first (2 > 1); ("a", "a b c") -> second;
    ("a b", "c d") -> tie (2 = 2); with margin 1, ("a", "a b") is a tie (|2 - 1| <= 1)."""
    judge = FunctionJudge(lambda prompt, completion: len(completion.split()))
    pairs = [("a b", "a"), ("a", "a b c"), ("a b", "c d")]
    assert judge.judge(["p"] * 3, pairs) == [0, 1, None]
    out = judge.judge_pairs(["p"] * 3, pairs)
    assert out.details[0] == {"score_first": 2.0, "score_second": 1.0} and out.missing == []
    assert FunctionJudge(lambda p, c: len(c.split()), margin=1).judge(["p"], [("a", "a b")]) == [None]
    with pytest.raises(PreftuneError, match="one prompt per pair"):
        judge.judge(["p"], pairs)


def test_function_specs_from_module_and_file(tmp_path, monkeypatch):
    code = textwrap.dedent("""
        def score(prompt, completion):
            return completion.count("love")

        def broken(prompt, completion):
            return "high"
    """)
    (tmp_path / "my_rules.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = make_judge("function:my_rules:score")
    by_file = make_judge(f"function:{tmp_path / 'my_rules.py'}:score", margin=0.0)
    pairs = [("love love", "love"), ("war", "love")]
    assert by_module.judge(["p", "p"], pairs) == [0, 1] == by_file.judge(["p", "p"], pairs)
    assert by_file.name == f"function:{tmp_path / 'my_rules.py'}:score"
    with pytest.raises(PreftuneError, match="not a number"):
        FunctionJudge("my_rules:broken").judge(["p"], [("a", "b")])
    with pytest.raises(PreftuneError, match="has no function 'nope'"):
        load_function("my_rules:nope")
    with pytest.raises(PreftuneError, match="cannot import module"):
        load_function("no_such_module_here:score")
    with pytest.raises(PreftuneError, match="file not found"):
        load_function(str(tmp_path / "missing.py") + ":score")


def nan_rule(prompt: str, completion: str) -> float:
    return float("nan") if "x" in completion else 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_function_judge_nan_or_inf_is_an_error_naming_the_prompt(bad):
    """Issue 11: a NaN score made every comparison a tie (NaN > x is False both ways), silently. NaN
    and +-inf are errors naming the function and the prompt, for the judge and for `reward:` of the
    online methods (load_scorer)."""
    from preftune.models.rewards import load_scorer

    judge = FunctionJudge(lambda prompt, completion: bad if completion == "b" else 0.0)
    judge.name = "function:rules.py:score"
    with pytest.raises(PreftuneError) as info:
        judge.judge(["Shall I compare thee", "To be or\nnot to be"], [("a", "a"), ("a", "b")])
    first = str(info.value).splitlines()[0]
    assert first == (f"field 'judge': the scoring function function:rules.py:score gave the score {bad} for the "
                     "prompt 'To be or not to be' (completion 'b')")
    with pytest.raises(PreftuneError, match=r"the scoring function nan_rule gave the score nan for the prompt 'p'"):
        load_scorer(nan_rule)(["p", "p"], ["ok", "x"])


def test_score_judge_subclass_and_llm_judge_nan_are_errors():
    """Any ScoreJudge is checked (not only functions and reward models); an LLM judge's NaN
    log-probability would make both orders a tie."""
    from preftune.judges import ScoreJudge

    class Broken(ScoreJudge):
        name = "broken"

        def scores(self, prompts, completions):
            return [float("nan")] * len(completions)

    with pytest.raises(PreftuneError, match="the judge broken gave the score nan for the prompt 'p'"):
        Broken().judge(["p"], [("a", "b")])
    llm = LLMJudge(scorer=lambda texts: [(float("nan"), -1.0)] * len(texts))
    with pytest.raises(PreftuneError, match="NaN log-probability for the prompt 'q'"):
        llm.judge(["q"], [("a", "b")])


def test_make_judge_rejects_unknown_specs():
    for spec in ("reward", "gpt4:foo", "function:", "rule:x"):
        with pytest.raises(PreftuneError, match="cannot read the judge spec"):
            make_judge(spec)
    with pytest.raises(PreftuneError, match="not understood"):
        make_judge("function:os.path:join", temperature=0.3)


# --- LLM judge -------------------------------------------------------------------------------


def test_llm_judge_position_bias_gives_ties():
    """A scorer that always prefers position 1 prefers a in order (a, b) and b in order (b, a): the
    orders disagree, so every pair is a tie."""
    judge = LLMJudge(scorer=lambda texts: [(-0.1, -2.3)] * len(texts))
    out = judge.judge_pairs(["p", "q"], [("x", "y"), ("u", "v")])
    assert out.choices == [None, None]
    assert out.details[0]["order_ab"] == 0 and out.details[0]["order_ba"] == 1


def test_llm_judge_consistent_preference_survives_both_orders():
    """A scorer that prefers whichever response contains 'good': order (a, b) and order (b, a) agree."""

    def scorer(texts):
        out = []
        for t in texts:
            first = t.split("Response 1: ")[1].split("\n\nResponse 2:")[0]
            out.append((-0.2, -1.5) if "good" in first else (-1.5, -0.2))
        return out

    judge = LLMJudge(scorer=scorer)
    assert judge.judge(["p", "p"], [("good one", "bad"), ("bad", "a good one")]) == [0, 1]
    with pytest.raises(PreftuneError, match="lacks \\{response_2\\}"):
        LLMJudge(scorer=scorer, template="{prompt} {response_1}")


def test_llm_judge_label_logprobs_match_an_unpadded_forward(tiny_model_dir):
    """Batched, right-padded log p(label | text) equals the sum over the label's tokens of the
    log-softmax of one unpadded forward of text + label (shifted by one position)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["Which is better? The better response is Response", "Short?"]
    got = _continuation_logprobs(model, tok, texts, (" 1", " 2"), batch_size=2)
    for text, pair in zip(texts, got, strict=True):
        for label, value in zip((" 1", " 2"), pair, strict=True):
            ids = tok(text)["input_ids"]
            lab = tok(label, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids + lab])).logits[0], dim=-1)
            want = sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(lab))
            assert value == pytest.approx(want, abs=1e-4)
    judge = LLMJudge(model=model, tokenizer=tok)
    choices = judge.judge(["To be"], [("or not to be", "that is the question")])
    assert choices[0] in (0, 1, None)


# --- reward-model judge ----------------------------------------------------------------------


def test_reward_model_judge_is_antisymmetric_and_ties_identical_texts(tiny_model_dir):
    """Swapping a pair swaps the verdict (0 <-> 1); identical completions score the same and tie;
    a margin larger than every score gap makes every pair a tie."""
    from preftune.models import load_reward_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_reward_model(str(tiny_model_dir), dtype="float32", tokenizer=tok)
    judge = RewardModelJudge(model=model, tokenizer=tok)
    prompts = ["To be", "Shall I", "The fox"]
    pairs = [("or not to be", "that is"), ("compare thee", "to a summer's day"), ("jumps", "jumps")]
    out = judge.judge_pairs(prompts, pairs)
    swapped = judge.judge(prompts, [(b, a) for a, b in pairs])
    assert out.choices[2] is None and swapped[2] is None
    for c, s in zip(out.choices[:2], swapped[:2], strict=True):
        assert c in (0, 1) and s == 1 - c
    gap = max(abs(d["score_first"] - d["score_second"]) for d in out.details)
    wide = RewardModelJudge(model=model, tokenizer=tok, margin=gap + 1.0)
    assert wide.judge(prompts, pairs) == [None, None, None]


def test_reward_model_nan_scores_are_an_error(tiny_model_dir):
    """A reward model whose score head holds NaN (broken weights, fp16 overflow) gave NaN rewards and
    every pair tied; now the first NaN names the model and the prompt."""
    from preftune.models import load_reward_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_reward_model(str(tiny_model_dir), dtype="float32", tokenizer=tok)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    with pytest.raises(PreftuneError, match="the reward model LlamaForSequenceClassification gave the score nan "
                                            "for the prompt 'To be'"):
        RewardModelJudge(model=model, tokenizer=tok).judge(["To be"], [("or not", "that is")])


# --- human judge -----------------------------------------------------------------------------


def _label(store, pair_id: str, annotator: str, answer: str) -> None:
    """Record that ``annotator`` chose response a, b, tie or skip, whichever side it was shown on."""
    a = store.assignment(pair_id, annotator)
    side = {"a": "left" if a.left_is_a else "right", "b": "right" if a.left_is_a else "left"}.get(answer, answer)
    store.record(pair_id=pair_id, annotator=annotator, side=side, order=a.order_token)


@pytest.fixture
def annotation_db(tmp_path: Path) -> Path:
    """Pairs (prompt, response_a, response_b) and labels:
    p1: x vs y   ann1 a, ann2 a, ann3 b     -> x has 2 of 3 votes: x wins
    p2: u vs v   ann1 a, ann2 b             -> 1 of 2 each: tie
    p3: m vs n   ann1 tie, ann2 b, ann3 b   -> n has 2 of 3: n wins
    p4: s vs t   ann1 skip                  -> no vote: missing
    p5: g vs h   ann1 a, ann2 tie           -> g has 1 of 2, not more than half: tie
    """
    from preftune.data.annotations import AnnotationStore, Pair

    path = tmp_path / "labels.db"
    store = AnnotationStore(path)
    rows = {"1": ("p1", "x", "y"), "2": ("p2", "u", "v"), "3": ("p3", "m", "n"), "4": ("p4", "s", "t"),
            "5": ("p5", "g", "h")}
    store.add_pairs([Pair(id=k, prompt=p, response_a=a, response_b=b) for k, (p, a, b) in rows.items()])
    votes = {"1": ["a", "a", "b"], "2": ["a", "b"], "3": ["tie", "b", "b"], "4": ["skip"], "5": ["a", "tie"]}
    for pair_id, answers in votes.items():
        for k, answer in enumerate(answers):
            _label(store, pair_id, f"ann{k + 1}", answer)
    return path


def test_human_judge_majority_either_order_and_missing(annotation_db):
    judge = make_judge(f"human:{annotation_db}")
    prompts = ["p1", "p1", "p2", "p3", "p4", "p5", "p6"]
    pairs = [("x", "y"), ("y", "x"), ("u", "v"), ("m", "n"), ("s", "t"), ("g", "h"), ("a", "b")]
    out = judge.judge_pairs(prompts, pairs)
    assert out.choices[:4] == [0, 1, None, 1]
    assert out.choices[5] is None
    assert out.missing == [4, 6]
    assert out.details[0] == {"votes_first": 2, "votes_second": 1, "votes_tie": 0}
    assert out.details[3] == {"votes_first": 0, "votes_second": 2, "votes_tie": 1}
    with pytest.raises(PreftuneError, match="2 of 7 pairs could not be judged"):
        judge.judge(prompts, pairs)
    assert judge.judge(["p1"], [("x", "y")]) == [0]


def test_majority_uses_each_annotators_latest_label_and_rejects_unknown_choices():
    labels = [{"prompt": "p", "response_a": "x", "response_b": "y", "annotator": "ann", "choice": "a"},
              {"prompt": "p", "response_a": "y", "response_b": "x", "annotator": "ann", "choice": "a"}]
    assert majority_verdicts(labels, ["p"], [("x", "y")]).choices == [1]  # the later label: y preferred
    with pytest.raises(PreftuneError, match="unknown label choice"):
        majority_verdicts([{**labels[0], "choice": "left"}], ["p"], [("x", "y")])
    with pytest.raises(PreftuneError, match="annotation database not found"):
        HumanJudge("no/such/file.db")


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny causal LM saved as a reward model (LlamaForSequenceClassification with its score head)."""
    from preftune.models import load_reward_model, load_tokenizer

    out = tmp_path_factory.mktemp("judge-rm") / "rm"
    tok = load_tokenizer(str(tiny_model_dir))
    load_reward_model(str(tiny_model_dir), dtype="float32", tokenizer=tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_reward_judge_refuses_a_language_model_without_reward_head(tiny_model_dir):
    """Issue 11: `reward:DIR` with a causal LM loaded a random score head (its warning suppressed) and
    printed a confident win rate. The checkpoint's config names LlamaForCausalLM only: refused before
    the weights load, naming the directory, for the judge and for `reward:` of the online methods."""
    from preftune.models.rewards import load_scorer

    with pytest.raises(PreftuneError, match="without a trained reward head") as info:
        make_judge(f"reward:{tiny_model_dir}")
    text = str(info.value)
    assert text.startswith(f"{tiny_model_dir} field 'judge': a language model (LlamaForCausalLM)")
    assert "preftune train reward" in text and len(text.splitlines()) == 2  # one line + the hint
    with pytest.raises(PreftuneError, match="without a trained reward head") as info:
        load_scorer(str(tiny_model_dir))
    assert info.value.field == "reward"


@pytest.mark.parametrize(("architectures", "refused"), [
    (["GPT2LMHeadModel"], "a language model (GPT2LMHeadModel) without a trained reward head"),
    (["GPT2Model"], "a model (GPT2Model) without a trained reward head"),
    (["GPT2ForSequenceClassification"], None),
    (["LlamaForRewardModelWithGating"], None),  # a custom reward class (trust_remote_code models)
    (None, None),  # no architecture named: left to the loader
])
def test_reward_checkpoint_check_reads_the_config_only(tmp_path, architectures, refused):
    """The check needs config.json alone (no weights are read): it runs before the model loads."""
    import json

    from preftune.models.rewards import check_reward_checkpoint

    config = {"model_type": "gpt2", **({"architectures": architectures} if architectures else {})}
    (tmp_path / "config.json").write_text(json.dumps(config))
    if refused is None:
        check_reward_checkpoint(str(tmp_path))
    else:
        with pytest.raises(PreftuneError, match=re.escape(refused)):
            check_reward_checkpoint(str(tmp_path))
    check_reward_checkpoint(str(tmp_path / "no-such-dir"))  # the loader reports a bad path in its words


def test_reward_and_llm_judges_load_from_a_directory(tiny_model_dir, reward_model_dir):
    """`reward:DIR` (a reward model) and `llm:DIR` (a causal LM) load the model the normal way
    (from_pretrained) and judge every pair."""
    prompts, pairs = ["To be", "Shall I"], [("or not", "that is"), ("compare", "compare")]
    for spec in (f"reward:{reward_model_dir}", f"llm:{tiny_model_dir}"):
        judge = make_judge(spec, batch_size=2)
        out = judge.judge_pairs(prompts, pairs)
        assert judge.name == spec and len(out.choices) == 2 and out.missing == []
        assert out.choices[1] is None  # identical completions: same score / both orders disagree or tie
