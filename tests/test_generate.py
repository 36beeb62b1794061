"""preftune.generate and `preftune generate`: prompts in, N seeded completions per prompt out."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from preftune.cli import app
from preftune.data.prompts import format_prompt, load_prompts
from preftune.errors import PreftuneError
from preftune.generate import (
    completion_name,
    cut_at_stop,
    generate_completions,
    generate_with_vllm,
    readable_text,
    write_generations,
)
from preftune.models.sampling import GenerationSettings, row_seed, sample_next_tokens

PROMPTS = ["To be, or not to be", "Shall I compare thee", "The quick brown fox"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_completion_names_are_spreadsheet_columns():
    """A..Z, then AA (26 = 1*26 + 0), AB, ..., ZZ (701 = 26*26 + 25), AAA (702)."""
    assert [completion_name(i) for i in (0, 1, 25, 26, 27, 701, 702)] == ["A", "B", "Z", "AA", "AB", "ZZ", "AAA"]


def test_templates(tiny_tokenizer):
    """raw is the prompt; tldr appends the TL;DR cue; a format string replaces {prompt}; chat uses the
    tokenizer's template: '<s>' + '<|user|>\\n' + content + '</s>\\n' + '<|assistant|>\\n'."""
    assert format_prompt("Hi", "raw") == "Hi"
    assert format_prompt("A long post", "tldr") == "A long post\n\nTL;DR:"
    assert format_prompt("2+2?", "Q: {prompt}\nA:") == "Q: 2+2?\nA:"
    assert format_prompt("hello", "chat", tiny_tokenizer) == "<s><|user|>\nhello</s>\n<|assistant|>\n"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert format_prompt(messages, "chat", tiny_tokenizer) == (
        "<s><|system|>\nbe brief</s>\n<|user|>\nhello</s>\n<|assistant|>\n")
    assert format_prompt([{"role": "user", "content": "hello"}], "tldr") == "hello\n\nTL;DR:"
    with pytest.raises(PreftuneError, match="no chat template"):
        format_prompt("hello", "chat", None)
    with pytest.raises(PreftuneError, match="unknown template"):
        GenerationSettings(template="qa").check()


def test_cut_at_stop_drops_the_first_stop_string_and_what_follows():
    assert cut_at_stop("one. two\nthree", [".", "\n"]) == "one"
    assert cut_at_stop("one two\nthree. four", [".", "\n"]) == "one two"
    assert cut_at_stop("no stop here", ["."]) == "no stop here"
    assert cut_at_stop("abc", []) == "abc"


def test_row_seeds_are_deterministic_and_order_sensitive():
    assert row_seed(0, 1, 2) == row_seed(0, 1, 2)
    seeds = {row_seed(0, 1, 2), row_seed(0, 2, 1), row_seed(1, 1, 2), row_seed(0, 1, 0)}
    assert len(seeds) == 4
    assert all(0 <= s < 2**63 for s in seeds)


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + r) for r in range(n)]


def test_sampling_greedy_topk_topp_and_banned_tokens():
    """logits log([0.4, 0.35, 0.25, 0]): temperature 0 and top-k 1 give argmax 0; top-p 0.5 keeps
    {0, 1} (mass before token 1 is 0.4 < 0.5, before token 2 is 0.75 >= 0.5), renormalised to
    (0.4, 0.35) / 0.75 = (0.5333, 0.4667); the -inf token is never drawn."""
    logits = torch.log(torch.tensor([0.4, 0.35, 0.25, 0.0])).repeat(4000, 1)
    assert sample_next_tokens(logits[:3], generators=_gens(3), temperature=0).tolist() == [0, 0, 0]
    assert sample_next_tokens(logits[:50], generators=_gens(50), temperature=1.0, top_k=1).eq(0).all()
    draws = sample_next_tokens(logits, generators=_gens(4000), temperature=1.0, top_p=0.5)
    assert set(draws.tolist()) == {0, 1}
    # 4000 draws: the standard error of a frequency near 0.5 is 0.0079; 0.03 is about 4 of them.
    assert abs(draws.eq(0).float().mean().item() - 0.4 / 0.75) < 0.03
    free = sample_next_tokens(logits, generators=_gens(4000), temperature=1.0)
    assert not free.eq(3).any()
    assert abs(free.eq(2).float().mean().item() - 0.25) < 0.03


def test_same_seed_same_completions_whatever_the_batch_size(lm):
    model, tok = lm
    settings = GenerationSettings(max_new_tokens=8, seed=7)
    one = generate_completions(model, tok, PROMPTS, num=3, settings=settings, batch_size=1, progress=False)
    many = generate_completions(model, tok, PROMPTS, num=3, settings=settings, batch_size=5, progress=False)
    assert [r["completion"] for r in one] == [r["completion"] for r in many]
    other = generate_completions(model, tok, PROMPTS, num=3,
                                 settings=GenerationSettings(max_new_tokens=8, seed=8), progress=False)
    assert [r["completion"] for r in other] != [r["completion"] for r in one]
    assert [(r["prompt_id"], r["completion_id"]) for r in one] == [
        (i, c) for i in (1, 2, 3) for c in ("A", "B", "C")]
    assert one[4]["prompt"] == PROMPTS[1]
    assert one[0]["settings"]["seed"] == 7 and one[0]["settings"]["template"] == "raw"
    assert tok.padding_side == "right"  # restored after generating with left padding


def test_greedy_completion_is_the_argmax_continuation_without_the_prompt(lm):
    """temperature 0 must reproduce a hand-written greedy loop (argmax of the last logits, 6 steps,
    no padding), decoded from the first new token on: the prompt is stripped."""
    model, tok = lm
    recs = generate_completions(model, tok, PROMPTS, num=1, progress=False, batch_size=3,
                                settings=GenerationSettings(temperature=0, max_new_tokens=6))
    for prompt, rec in zip(PROMPTS, recs, strict=True):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                new.append(nxt)
                if nxt == tok.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert rec["completion"] == tok.decode(new, skip_special_tokens=True)


def test_min_new_tokens_keeps_eos_away_until_then(lm):
    """A model pushed to end at once (+100 on the EOS logit) writes nothing; with min_new_tokens=3 every
    completion has at least 3 tokens."""
    model, tok = lm
    hook = model.lm_head.register_forward_hook(lambda m, i, out: out.index_add(
        -1, torch.tensor([tok.eos_token_id]), torch.full((*out.shape[:-1], 1), 100.0)))
    try:
        plain = generate_completions(model, tok, PROMPTS, num=2, progress=False,
                                     settings=GenerationSettings(max_new_tokens=8, seed=1))
        held = generate_completions(model, tok, PROMPTS, num=2, progress=False,
                                    settings=GenerationSettings(max_new_tokens=8, seed=1, min_new_tokens=3))
    finally:
        hook.remove()
    assert all(r["completion"] == "" for r in plain)
    assert all(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) >= 3 for r in held)
    with pytest.raises(PreftuneError, match="min_new_tokens"):
        GenerationSettings(max_new_tokens=4, min_new_tokens=5).check()


def test_stop_strings_cut_exactly_where_the_unstopped_completion_has_them(lm):
    model, tok = lm
    base = GenerationSettings(max_new_tokens=12, seed=3)
    free = generate_completions(model, tok, PROMPTS, num=2, settings=base, progress=False)
    letters = [ch for r in free for ch in r["completion"][1:] if ch.isascii() and ch.isalpha()]
    assert letters, "the tiny model produced no ASCII letter to stop on"
    stop = letters[0]
    stopped = generate_completions(model, tok, PROMPTS, num=2, progress=False,
                                   settings=GenerationSettings(max_new_tokens=12, seed=3, stop=[stop]))
    for f, s in zip(free, stopped, strict=True):
        assert stop not in s["completion"]
        assert s["completion"] == cut_at_stop(f["completion"], [stop])
    assert any(stop in f["completion"] for f in free)


def test_chat_template_and_messages_prompts(lm):
    model, tok = lm
    prompts = [[{"role": "user", "content": "hello"}], "Shall I compare thee"]
    recs = generate_completions(model, tok, prompts, num=2, progress=False,
                                settings=GenerationSettings(max_new_tokens=4, template="chat"))
    assert len(recs) == 4 and recs[0]["prompt"] == prompts[0]


def test_output_files_layout(tmp_path):
    recs = [{"prompt_id": 1, "prompt": "O, what", "completion_id": "A", "completion": "a noble\nmind"},
            {"prompt_id": 1, "prompt": "O, what", "completion_id": "B", "completion": "fall"},
            {"prompt_id": 2, "prompt": "Look", "completion_id": "A", "completion": "in thy glass"}]
    assert readable_text(recs) == ("PREFIX 1: O, what\nCOMPLETION 1-A: a noble / mind\nCOMPLETION 1-B: fall\n\n"
                                   "PREFIX 2: Look\nCOMPLETION 2-A: in thy glass\n")
    jsonl, txt = write_generations(recs, tmp_path / "out" / "gen.jsonl")
    assert txt == tmp_path / "out" / "gen.txt" and txt.read_text() == readable_text(recs)
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == recs
    with pytest.raises(PreftuneError, match="must be a .jsonl"):
        write_generations(recs, tmp_path / "gen.txt")


def test_load_prompts_from_text_jsonl_and_preferences(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(txt) == ["first prompt", "second prompt"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n')
    assert load_prompts(jl) == ["a", [{"role": "user", "content": "b"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(PreftuneError, match=r"bad.jsonl:2 field 'prompt'"):
        load_prompts(bad)
    prefs = tmp_path / "prefs.jsonl"
    rows = [("p1", "x", "y"), ("p2", "x", "y"), ("p1", "z", "w"), ("p3", "x", "y")]
    prefs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    assert load_prompts(prefs) == ["p1", "p2", "p3"]
    with pytest.raises(PreftuneError, match="file not found"):
        load_prompts(tmp_path / "missing.txt")


def test_vllm_backend_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(PreftuneError, match="pip install vllm"):
        generate_with_vllm("m", ["p"], num=2, settings=GenerationSettings(backend="vllm"))


def test_vllm_backend_glue_with_a_stand_in_module(monkeypatch):
    """A stand-in for vllm records what it was asked; outputs become the same records as transformers'."""
    seen: dict = {}

    class LLM:
        def __init__(self, model, seed):
            seen["model"], seen["seed"] = model, seed

        def get_tokenizer(self):
            return None

        def generate(self, texts, params):
            seen["texts"], seen["params"] = texts, params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"{t}-{k} END more")
                                                   for k in range(p["n"])]) for t, p in zip(texts, params, strict=True)]

    fake = types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    settings = GenerationSettings(backend="vllm", template="tldr", stop=[" END"], seed=5)
    recs = generate_with_vllm("m", ["x", "y"], num=2, settings=settings)
    assert seen["texts"] == ["x\n\nTL;DR:", "y\n\nTL;DR:"]
    assert seen["params"][0]["n"] == 2 and seen["params"][0]["top_k"] == -1
    assert seen["params"][0]["seed"] != seen["params"][1]["seed"]
    assert [(r["prompt_id"], r["completion_id"], r["completion"]) for r in recs] == [
        (1, "A", "x\n\nTL;DR:-0"), (1, "B", "x\n\nTL;DR:-1"), (2, "A", "y\n\nTL;DR:-0"), (2, "B", "y\n\nTL;DR:-1")]


def test_cli_generate_writes_jsonl_and_text(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prefixes.txt"
    prompts.write_text("O, what a noble mind\nLook in thy glass\n")
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--num", "2",
            "--output", str(out), "--max-new-tokens", "5", "--seed", "1", "--template", "Q: {prompt}\\nA:"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_id"], r["completion_id"]) for r in recs] == [(1, "A"), (1, "B"), (2, "A"), (2, "B")]
    assert recs[0]["settings"]["template"] == "Q: {prompt}\nA:"
    text = out.with_suffix(".txt").read_text()
    assert text.startswith("PREFIX 1: O, what a noble mind\nCOMPLETION 1-A: ")
    again = tmp_path / "again.jsonl"
    assert CliRunner().invoke(app, args[:-7] + [str(again), *args[-6:]]).exit_code == 0
    assert again.read_text() == out.read_text()


def test_cli_generate_errors_are_one_line(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                                      "--output", str(tmp_path / "o.jsonl"), "--top-p", "0"])
    assert result.exit_code == 1
    assert "top_p must be in (0, 1]" in result.output and "Traceback" not in result.output


def test_progress_bar_writes_nothing_when_not_a_terminal(capfd):
    """Under pytest stdout and stderr are pipes: the bar must not draw, nor leave the blank line that a
    transient rich bar printed into logs."""
    from preftune.generate import progress_bar

    with progress_bar(3, "generating", enabled=True) as advance:
        advance(3)
    assert capfd.readouterr() == ("", "")


def test_line_separators_inside_a_completion_survive_the_round_trip(tmp_path):
    """U+2028, U+2029 and U+0085 are line breaks to str.splitlines but may stand unescaped in a JSON string
    (json.dumps(ensure_ascii=False) writes them so): a completion holding one is read back whole."""
    from preftune.data.jsonl import read_records

    recs = [{"prompt_id": 1, "prompt": "p", "completion_id": "A", "completion": "one\u2028two\u2029three\x85four"}]
    jsonl, _ = write_generations(recs, tmp_path / "gen.jsonl")
    assert read_records(jsonl) == recs
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\u2028b\nc\r\nd\n", encoding="utf-8")
    assert load_prompts(prompts) == ["a\u2028b", "c", "d"]


def test_cli_generate_checks_counts_and_output_before_loading_the_model(tmp_path):
    """The model path does not exist: each error comes from the checks that run before it would load."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    base = ["generate", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts)]
    for extra, expected in ((["--num", "0"], "field 'num': num must be >= 1, got 0"),
                            (["--batch_size", "0"], "field 'batch_size': batch_size must be >= 1, got 0"),
                            (["--output", str(tmp_path)], "field 'output': the output is a directory")):
        args = [*base, *(["--output", str(tmp_path / "o.jsonl")] if "--output" not in extra else []), *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and expected in " ".join(result.output.split()), result.output
        assert "prompts from" not in result.output  # nothing was loaded, not even the prompts
