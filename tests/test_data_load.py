"""load_preferences / load_sft: every format, every source, every error, and what is counted and dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.data import (
    PreferencePair,
    Ranking,
    SFTExample,
    UnpairedExample,
    load_preferences,
    load_sft,
)
from preftune.errors import PreftuneError

DATA = Path(__file__).parent / "data"


def _write(tmp_path: Path, rows: list, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _error(source, **kw) -> PreftuneError:
    with pytest.raises(PreftuneError) as err:
        load_preferences(source, **kw)
    return err.value


def test_standard_jsonl_keeps_optional_columns_and_reports_problems():
    """Rows on lines 1, 2, 4, 5: line 2 has chosen == rejected ('Blue.'); line 4 repeats line 1's
    prompt/chosen/rejected (another annotator) and is reported as a duplicate, not dropped."""
    pairs, report = load_preferences(DATA / "prefs_standard.jsonl")
    assert report.format == "standard" and report.format_from.endswith("prefs_standard.jsonl:1")
    assert (report.n_rows, report.n_loaded, report.n_dropped) == (4, 4, 0)
    first = pairs[0]
    assert first == PreferencePair("What is 2+2?", "4", "5", margin=1.5, annotator="ann1", group="A", id="7",
                                   source=f"{DATA / 'prefs_standard.jsonl'}:1")
    assert [(p.kind, p.where.rsplit(":", 1)[1]) for p in report.problems] == [
        ("chosen_equals_rejected", "2"), ("duplicate", "4")]
    assert report.problems[1].message == f"same example as {DATA / 'prefs_standard.jsonl'}:1"


def test_chosen_equals_rejected_dropped_only_with_flag():
    pairs, report = load_preferences(DATA / "prefs_standard.jsonl", drop_invalid=True)
    assert (report.n_rows, report.n_loaded, report.n_dropped) == (4, 3, 1)
    assert report.count("chosen_equals_rejected") == 1                  # still reported when dropped
    assert all(p.chosen != p.rejected for p in pairs)


@pytest.mark.parametrize("name", ["prefs_standard.json", "prefs_standard.csv"])
def test_json_and_csv_sources(name):
    pairs, report = load_preferences(DATA / name)
    assert report.format == "standard" and report.n_loaded == 2 and not report.problems
    if name.endswith(".csv"):                                            # CSV strings become numbers / None
        assert (pairs[0].margin, pairs[0].annotator) == (0.5, "ann1")
        assert (pairs[1].margin, pairs[1].annotator, pairs[1].source.rsplit(":", 1)[1]) == (None, None, "3")


def test_parquet_and_directory_and_saved_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": None},
            {"prompt": "q", "chosen": "c", "rejected": "d", "margin": 2.0}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    pairs, report = load_preferences(tmp_path / "d.parquet")
    assert [(p.prompt, p.margin) for p in pairs] == [("p", None), ("q", 2.0)]
    assert report.files == [str(tmp_path / "d.parquet")]

    pairs, report = load_preferences(DATA / "prefs_dir")
    assert [p.prompt for p in pairs] == ["p1", "p2"]
    assert [Path(f).name for f in report.files] == ["a.jsonl", "b.csv"]

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    pairs, _ = load_preferences(tmp_path / "ds")
    assert [p.chosen for p in pairs] == ["a", "c"]


def test_implicit_prompt_file():
    pairs, report = load_preferences(DATA / "prefs_implicit.jsonl")
    assert report.format == "implicit_prompt"
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (
        "\n\nHuman: Hi\n\nAssistant:", " Hello! How can I help?", " Go away.")
    assert pairs[1].prompt == "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: and 3+3?\n\nAssistant:"
    assert (pairs[1].chosen, pairs[1].rejected) == (" 6", " 7")


def test_implicit_prompt_without_tag_is_an_error(tmp_path):
    path = _write(tmp_path, [{"chosen": "User: hi\nBot: a", "rejected": "User: hi\nBot: b"}])
    err = _error(path)
    assert (err.line, err.field) == (1, "chosen") and "share no prefix ending in the assistant tag" in str(err)
    pairs, _ = load_preferences(path, assistant_tag="\nBot:")
    assert (pairs[0].prompt, pairs[0].chosen) == ("User: hi\nBot:", " a")


def test_conversational_explicit_prompt_and_shared_prefix():
    """Line 1: explicit prompt messages. Line 2 (UltraFeedback style): a string prompt and full conversations;
    the shared first message becomes the prompt and the replies the remainders."""
    pairs, report = load_preferences(DATA / "prefs_conversational.jsonl")
    assert report.format == "conversational"
    user = {"role": "user", "content": "2+2?"}
    assert (pairs[0].prompt, pairs[0].chosen) == ([user], [{"role": "assistant", "content": "4"}])
    assert pairs[1].prompt == [{"role": "user", "content": "Hi"}]
    assert pairs[1].rejected == [{"role": "assistant", "content": "Go away."}]


def test_rankings_keep_and_pairs():
    """Line 1: ranking [1, 2, 0] of ['5', '4', 'four'] -> best first ['4', 'four', '5'].
    Line 2: scores [0.5, 2.0, 1.0] -> order 'Hello!' (2.0), 'Yo' (1.0), 'Hi.' (0.5); margins 1.0, 1.5, 0.5.
    Line 3: ranks [2, 3, 1] -> 'Green.', 'Red.', 'Blue.'. Expanded: 3 rankings x 3 pairs = 9 pairs."""
    rankings, report = load_preferences(DATA / "prefs_ranking.jsonl")
    assert report.format == "ranking" and all(isinstance(r, Ranking) for r in rankings)
    assert rankings[0].responses == ["4", "four", "5"] and rankings[0].id == "r1"
    assert (rankings[1].responses, rankings[1].scores) == (["Hello!", "Yo", "Hi."], [2.0, 1.0, 0.5])
    assert rankings[2].responses == ["Green.", "Red.", "Blue."]
    pairs, report = load_preferences(DATA / "prefs_ranking.jsonl", rankings="pairs")
    assert len(pairs) == 9 and report.n_loaded == 9 and report.n_rows == 3
    assert [(p.chosen, p.rejected, p.margin) for p in pairs[3:6]] == [
        ("Hello!", "Yo", 1.0), ("Hello!", "Hi.", 1.5), ("Yo", "Hi.", 0.5)]
    assert pairs[0].id == "r1:0>1"


def test_ranking_errors_and_problems(tmp_path):
    err = _error(_write(tmp_path, [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2, 3]}]))
    assert (err.line, err.field) == (1, "ranking")
    assert "index 3 is out of range for 3 responses (indices are 0..2)" in str(err) and "'ranks'" in str(err)
    err = _error(_write(tmp_path, [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}]))
    assert "every response index exactly once" in str(err)
    err = _error(_write(tmp_path, [{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}]))
    assert err.field == "ranks" and "ties are not supported" in str(err)
    # scores [1, 1, 0]: one tied pair is skipped (and counted) when expanding; ranking [1, 0] against
    # scores [2, 1] puts the lower score first, which is reported.
    path = _write(tmp_path, [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 1, 0]},
                             {"prompt": "q", "responses": ["x", "y"], "ranking": [1, 0], "scores": [2, 1]}])
    pairs, report = load_preferences(path, rankings="pairs")
    assert len(pairs) == 3
    assert [p.kind for p in report.problems] == ["tied_scores", "ranking_disagrees_with_scores"]


def test_ranking_with_identical_responses_counts_as_chosen_equals_rejected(tmp_path):
    path = _write(tmp_path, [{"prompt": "p", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}])
    _, report = load_preferences(path)
    assert report.problems[0].message == "responses ranked 1 and 3 are identical"
    pairs, report = load_preferences(path, rankings="pairs", drop_invalid=True)
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("b", "a")] and report.n_dropped == 1


def test_unpaired_labels():
    examples, report = load_preferences(DATA / "prefs_unpaired.jsonl")
    assert report.format == "unpaired" and all(isinstance(e, UnpairedExample) for e in examples)
    assert [e.label for e in examples] == [True, False, False]


def test_missing_field_names_fields_present_and_detected_format(tmp_path):
    path = _write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}])
    err = _error(path)
    assert (err.path, err.line, err.field) == (str(path), 2, "rejected")
    assert str(err).startswith(f"{path}:2 field 'rejected': missing field 'rejected'; fields present: chosen, "
                               f"prompt; format 'standard' (detected from {path}:1) needs prompt, chosen, rejected")


def test_null_field_is_named_as_null_not_as_missing(tmp_path):
    """A JSON null (or a Parquet null) means the column exists but this row has no value: say so."""
    path = _write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"},
                             {"prompt": None, "chosen": "a", "rejected": "b"}])
    err = _error(path)
    assert (err.line, err.field) == (2, "prompt")
    assert err.message.startswith("field 'prompt' is null; fields present: chosen, rejected; format 'standard'")
    assert err.hint.startswith("a 'standard' record looks like")


def test_hint_article_follows_the_format_name(tmp_path):
    err = _error(_write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}]), format="unpaired")
    assert err.hint.startswith("an 'unpaired' record looks like {\"prompt\": \"2+2?\", \"completion\"")


@pytest.mark.parametrize(("row", "field", "message"), [
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "chosen", "empty text"),
    ({"prompt": "p", "chosen": 4, "rejected": "b"}, "chosen", "expected a string, got int"),
    ({"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "prompt",
     "message 1 must be an object with 'role' and 'content', got ['role']"),
    ({"prompt": [{"role": "user", "content": 3}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "prompt", "message 1 content must be a string, got int"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "expected a number, got 'big'"),
])
def test_bad_values_name_line_and_field(tmp_path, row, field, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    if isinstance(row["chosen"], list):
        good = {"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}]}
    err = _error(_write(tmp_path, [good, row]))
    assert (err.line, err.field, err.message) == (2, field, message)


def test_record_of_another_format_is_an_error(tmp_path):
    path = _write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"},
                             {"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"}])
    err = _error(path)
    assert err.line == 2 and "looks like format 'conversational', but the data's format is 'standard'" in str(err)


def test_forced_and_unknown_formats(tmp_path):
    path = _write(tmp_path, [{"prompt": "p", "completion": "c", "label": True}])
    examples, report = load_sft(path, format="sft_prompt_completion")     # the label column is not used
    assert report.format_from == "forced" and examples[0].completion == "c"
    err = _error(path, format="dpo")
    assert err.field == "format" and "unknown format 'dpo'" in str(err)
    err = _error(_write(tmp_path, [{"question": "q", "answer": "a"}]))
    assert err.line == 1 and "cannot tell the data format from the fields present (answer, question)" in str(err)
    err = _error(DATA / "sft_text.jsonl")
    assert "this is SFT data (format 'sft_text'), not preference data" in str(err)
    with pytest.raises(PreftuneError, match="this is preference data"):
        load_sft(DATA / "prefs_standard.jsonl")
    with pytest.raises(PreftuneError, match="unknown rankings mode 'expand'"):
        load_preferences(DATA / "prefs_ranking.jsonl", rankings="expand")


def test_drop_invalid_turns_row_errors_into_counted_problems(tmp_path):
    path = _write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": ""},
                             {"prompt": "p", "chosen": "", "rejected": "b"}, {"prompt": "q", "chosen": "a",
                                                                              "rejected": "b"}])
    pairs, report = load_preferences(path, drop_invalid=True)
    assert [p.prompt for p in pairs] == ["p", "q"]
    assert (report.n_rows, report.n_loaded, report.n_dropped) == (4, 2, 2)
    assert [(p.kind, p.where.rsplit(":", 1)[1], p.field) for p in report.problems] == [
        ("invalid", "2", "rejected"), ("invalid", "3", "chosen")]


def test_empty_source(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    err = _error(tmp_path / "empty.jsonl")
    assert "no records found" in str(err)


def test_load_sft_formats():
    """messages [system, user, assistant '4'] -> prompt = the first two, completion = [assistant]; a lone
    assistant message has no prompt; {"text"} has prompt None."""
    ex, report = load_sft(DATA / "sft_messages.jsonl")
    assert report.format == "sft_messages" and all(isinstance(e, SFTExample) for e in ex)
    assert [m["role"] for m in ex[0].prompt] == ["system", "user"]
    assert ex[0].completion == [{"role": "assistant", "content": "4"}] and len(ex[0].messages) == 3
    assert ex[1].prompt is None
    (text,), _ = load_sft(DATA / "sft_text.jsonl")
    assert (text.prompt, text.completion) == (None, "To be, or not to be, that is the question.")
    (pc,), _ = load_sft(DATA / "sft_prompt_completion.jsonl")
    assert (pc.prompt, pc.completion) == ("To be, or not to be,", " that is the question.")


def test_sft_messages_must_end_with_assistant(tmp_path):
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(PreftuneError) as err:
        load_sft(path)
    assert err.value.field == "messages" and "last message must be the assistant's reply, got role 'user'" in str(
        err.value)


def test_csv_list_cells_are_json(tmp_path):
    """A CSV ranking: responses '["a", "b"]', ranking '[1, 0]' -> best first ['b', 'a']; a cell '[1, 0' is
    malformed JSON (the array is not closed: expecting ',' delimiter at column 6)."""
    path = tmp_path / "r.csv"
    path.write_text('prompt,responses,ranking\np,"[""a"", ""b""]","[1, 0]"\nq,"[""a"", ""b""]","[1, 0"\n')
    with pytest.raises(PreftuneError) as err:
        load_preferences(path)
    assert (err.value.line, err.value.field) == (3, "ranking")
    assert err.value.message == "malformed JSON list in the cell: Expecting ',' delimiter (column 6)"
    path.write_text('prompt,responses,ranking\np,"[""a"", ""b""]","[1, 0]"\n')
    (ranking,), _ = load_preferences(path)
    assert ranking.responses == ["b", "a"]
