"""`preftune data inspect` through typer's runner, with a tiny word-level tokenizer built in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app

DATA = Path(__file__).parent / "data"
runner = CliRunner()


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> Path:
    """A WordLevel tokenizer whose pre-tokenizer splits on \\w+ and [^\\w\\s]+ (unknown words -> [UNK]),
    so every word and every run of punctuation is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "[PAD]": 1, "4": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    return path


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, ["data", "inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_inspect_json_standard():
    """prefs_standard.jsonl, rows on lines 1, 2, 4, 5. Chosen lengths 1, 5, 1, 20 and rejected 1, 5, 1, 3
    characters: differences 0, 0, 0, 17 -> mean 4.25, chosen longer in 1 of 4. Prompts: 'What is 2+2?' twice
    (12 chars), 'Name a colour.' (14), 'Say hello.' (10) -> 3 distinct, 1 repeated, at most 2 rows."""
    info = _json([str(DATA / "prefs_standard.jsonl")])
    assert info["format"] == "standard"
    assert info["counts"] == {"rows": 4, "loaded": 4, "dropped": 0, "PreferencePair": 4}
    assert info["chars"]["chosen"] == {"min": 1, "mean": 6.75, "median": 3.0, "p95": 20, "max": 20}
    assert info["chars"]["prompt"]["mean"] == 12.0
    assert info["length_bias"]["chars"] == {"mean_chosen_minus_rejected": 4.25, "frac_chosen_longer": 0.25,
                                            "frac_chosen_shorter": 0.0, "frac_equal": 0.75}
    assert info["duplicates"] == {"duplicate_rows": 1, "distinct_prompts": 3, "repeated_prompts": 1,
                                  "max_rows_per_prompt": 2}
    assert info["problem_counts"] == {"chosen_equals_rejected": 1, "duplicate": 1}
    assert "tokens" not in info


def test_inspect_drop_invalid():
    info = _json([str(DATA / "prefs_standard.jsonl"), "--drop-invalid"])
    assert info["counts"]["loaded"] == 3 and info["counts"]["dropped"] == 1


def test_inspect_with_tokenizer(word_tokenizer):
    """Token counts: chosen '4' (1), 'Blue.' (2), '4' (1), 'Hello there, friend!' (5: Hello|there|,|friend|!);
    rejected '5', 'Blue.', '5', 'Hi.' -> 1, 2, 1, 2. Differences 0, 0, 0, 3 -> mean 0.75.
    Prompt 'What is 2+2?' = What|is|2|+|2|? = 6 tokens; 'Name a colour.' 4; 'Say hello.' 3 -> max 6, min 3."""
    info = _json([str(DATA / "prefs_standard.jsonl"), "--tokenizer", str(word_tokenizer)])
    assert info["tokens"]["chosen"] == {"min": 1, "mean": 2.25, "median": 1.5, "p95": 5, "max": 5}
    assert (info["tokens"]["prompt"]["min"], info["tokens"]["prompt"]["max"]) == (3, 6)
    assert info["length_bias"]["tokens"]["mean_chosen_minus_rejected"] == 0.75


def test_inspect_text_output(word_tokenizer):
    result = runner.invoke(app, ["data", "inspect", str(DATA / "prefs_ranking.jsonl"), "--tokenizer",
                                 str(word_tokenizer)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())                    # undo rich's line wrapping
    assert "format ranking (detected from" in out
    assert "rows 3 read, 3 loaded (3 Ranking), 0 dropped" in out
    assert "rankings 3 responses each, 9 pairs when expanded" in out
    assert "length (tokens)" in out and "length bias (chars)" in out
    assert "no problems found" in out


def test_inspect_lists_first_20_problems_in_text_and_all_in_json(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "same", "rejected": "same"} for i in range(25)]
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["data", "inspect", str(path)])
    out = " ".join(result.stdout.split())
    assert "25 problems (25 chosen_equals_rejected)" in out
    assert f"{path}:20 field 'rejected': chosen and rejected are identical" in out
    assert f"{path}:21 " not in out and "... and 5 more (use --json to see them all)" in out
    assert len(_json([str(path)])["problems"]) == 25


def test_inspect_sft_and_unpaired():
    info = _json([str(DATA / "sft_messages.jsonl")])
    assert info["format"] == "sft_messages" and info["chars"]["completion"]["max"] == len("Welcome.")
    info = _json([str(DATA / "prefs_unpaired.jsonl")])
    assert (info["counts"]["label_true"], info["counts"]["label_false"]) == (1, 2)


def test_inspect_fatal_error_exits_1_with_the_message_only(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "bad.jsonl")])
    assert result.exit_code == 1
    assert "bad.jsonl:2: malformed JSON: Expecting value (column 12)" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["data", "inspect", str(DATA / "prefs_standard.jsonl"), "--tokenizer",
                                 str(tmp_path / "no_tokenizer_here")])
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and f"{tmp_path / 'no_tokenizer_here'} field '--tokenizer': no such tokenizer" in out
    # a directory that exists but holds no tokenizer: what transformers said, in one line
    result = runner.invoke(app, ["data", "inspect", str(DATA / "prefs_standard.jsonl"), "--tokenizer", str(tmp_path)])
    assert result.exit_code == 1 and "cannot load a tokenizer" in result.output
    assert "Traceback" not in result.output


def test_inspect_counts_read_in_the_singular_and_plural():
    """prefs_ranking.jsonl: 3 prompts, each once -> 'max 1 row per prompt'; prefs_standard.jsonl repeats
    'What is 2+2?' -> 'max 2 rows per prompt'."""
    out = " ".join(runner.invoke(app, ["data", "inspect", str(DATA / "prefs_ranking.jsonl")]).stdout.split())
    assert "0 duplicate rows; 3 distinct prompts, 0 repeated (max 1 row per prompt)" in out
    out = " ".join(runner.invoke(app, ["data", "inspect", str(DATA / "prefs_standard.jsonl")]).stdout.split())
    assert "1 duplicate row; 3 distinct prompts, 1 repeated (max 2 rows per prompt)" in out


def test_inspect_assistant_tag_option(tmp_path):
    """Without the tag the prompt cannot be found (exit 1); with '\\nBot:' the prompt is 'User: hi\\nBot:'
    (5+1+2+1+4 = 13 characters) and the replies ' yes' / ' no' (4 and 3 characters)."""
    path = tmp_path / "bot.jsonl"
    path.write_text(json.dumps({"chosen": "User: hi\nBot: yes", "rejected": "User: hi\nBot: no"}) + "\n")
    result = runner.invoke(app, ["data", "inspect", str(path)])
    assert result.exit_code == 1 and "share no prefix ending in the assistant tag" in result.output
    info = _json([str(path), "--assistant-tag", "\\nBot:"])
    assert info["format"] == "implicit_prompt"
    assert [info["chars"][c]["max"] for c in ("prompt", "chosen", "rejected")] == [13, 4, 3]
