"""Reading records from JSONL, JSON, CSV, Parquet, directories and datasets, with exact line numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.data import read_records
from preftune.data.sources import read_file
from preftune.errors import PreftuneError

DATA = Path(__file__).parent / "data"
ROWS = [{"prompt": "p1", "chosen": "good", "rejected": "bad"}, {"prompt": "p2", "chosen": "fine", "rejected": "worse"}]


def _lines(source, **kw):
    return [(Path(f).name, line) for f, line, _ in read_records(source, **kw)]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers():
    """prefs_standard.jsonl has a blank third line, so the records sit on lines 1, 2, 4, 5."""
    recs = list(read_records(DATA / "prefs_standard.jsonl"))
    assert [line for _, line, _ in recs] == [1, 2, 4, 5]
    assert recs[0][2]["id"] == 7 and recs[3][2]["chosen"] == "Hello there, friend!"


def test_json_object_with_data_list_reports_element_lines():
    """The first element opens on line 3; the second is spread over lines 4-8 and starts on line 4."""
    recs = list(read_records(DATA / "prefs_standard.json"))
    assert [line for _, line, _ in recs] == [3, 4]
    assert recs[1][2]["rejected"] == "Hi."


def test_json_list_and_split_key(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(ROWS, indent=1))
    assert [r for _, _, r in read_records(tmp_path / "l.json")] == ROWS
    (tmp_path / "s.json").write_text(json.dumps({"train": ROWS[:1], "test": ROWS[1:]}))
    assert [r["prompt"] for _, _, r in read_records(tmp_path / "s.json", split="test")] == ["p2"]
    with pytest.raises(PreftuneError, match="holding a 'validation' or 'data' list; found keys: train, test"):
        list(read_records(tmp_path / "s.json", split="validation"))


def test_json_lines_saved_as_json(tmp_path):
    (tmp_path / "x.json").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    assert [line for _, line, _ in read_records(tmp_path / "x.json")] == [1, 2]


def test_csv_quoted_commas_multiline_cells_and_line_numbers():
    """Header on line 1, a row on line 2, and a row whose quoted prompt spans lines 3-4 (starts on 3)."""
    recs = list(read_records(DATA / "prefs_standard.csv"))
    assert [line for _, line, _ in recs] == [2, 3]
    assert recs[0][2] == {"prompt": "Write, briefly, a greeting.", "chosen": "Hello!", "rejected": "Go away.",
                          "margin": "0.5", "annotator": "ann1"}
    assert recs[1][2]["prompt"] == "A two-line\nprompt"


def test_csv_row_with_too_many_cells(tmp_path):
    (tmp_path / "bad.csv").write_text("prompt,chosen,rejected\np,a,b\np,a,b,extra\n")
    with pytest.raises(PreftuneError) as err:
        list(read_records(tmp_path / "bad.csv"))
    assert str(err.value).startswith(f"{tmp_path / 'bad.csv'}:3: the row has 4 cells but the header names 3")


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    recs = list(read_records(tmp_path / "d.parquet"))
    assert [(line, r) for _, line, r in recs] == [(1, ROWS[0]), (2, ROWS[1])]


def test_parquet_unreadable(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PreftuneError, match="broken.parquet: cannot read the Parquet file"):
        list(read_records(tmp_path / "broken.parquet"))


def test_directory_reads_all_data_files_sorted():
    """prefs_dir holds a.jsonl, b.csv and a README.md (not data, not read)."""
    assert _lines(DATA / "prefs_dir") == [("a.jsonl", 1), ("b.csv", 2)]


def test_directory_with_split_named_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "data" / "test-00000.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    assert _lines(tmp_path) == [("train-00000.jsonl", 1)]
    assert _lines(tmp_path, split="test") == [("test-00000.jsonl", 1)]
    with pytest.raises(PreftuneError, match="no files for split 'dev'; the file names name the splits: test, train"):
        list(read_records(tmp_path, split="dev"))


def test_empty_directory(tmp_path):
    with pytest.raises(PreftuneError, match="no data files"):
        list(read_records(tmp_path))


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert [r for _, _, r in read_records(tmp_path / "ds")] == ROWS
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                               "test": datasets.Dataset.from_list(ROWS[1:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    recs = list(read_records(tmp_path / "dd", split="test"))
    assert recs == [(f"{tmp_path / 'dd'}[test]", 1, ROWS[1])]
    with pytest.raises(PreftuneError, match=r"no split 'validation'; the dataset has: train, test"):
        list(read_records(tmp_path / "dd", split="validation"))


def test_load_dataset_path_with_local_folder(tmp_path, monkeypatch):
    """`hf:FOLDER` goes through datasets.load_dataset, which reads a local folder of JSON files offline."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "hub_like"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recs = list(read_records(f"hf:{folder}"))
    assert [(line, r) for _, line, r in recs] == [(1, ROWS[0]), (2, ROWS[1])]
    assert recs[0][0] == f"{folder}[train]"


def test_unloadable_name_says_what_was_tried(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PreftuneError) as err:
        list(read_records("no-such-dataset-xyz", split="train"))
    msg = str(err.value)
    assert msg.startswith("no-such-dataset-xyz: it is not a file or a directory, and "
                          "datasets.load_dataset('no-such-dataset-xyz', split='train') failed: ")


def test_missing_file_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(PreftuneError, match="nope.jsonl: no such file or directory"):
        list(read_records(tmp_path / "nope.jsonl"))


def test_malformed_json_line_names_line_and_column(tmp_path):
    """Line 2 is '{"prompt": "p", "chosen": }': the decoder expects a value at column 27."""
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + '\n{"prompt": "p", "chosen": }\n')
    with pytest.raises(PreftuneError) as err:
        list(read_records(tmp_path / "bad.jsonl"))
    assert err.value.line == 2
    assert str(err.value).startswith(f"{tmp_path / 'bad.jsonl'}:2: malformed JSON: Expecting value (column 27)")


def test_malformed_json_file_names_line_and_column(tmp_path):
    (tmp_path / "bad.json").write_text('[\n  {"prompt": "p",\n   "chosen" "a"}\n]')
    with pytest.raises(PreftuneError) as err:
        list(read_records(tmp_path / "bad.json"))
    assert "bad.json:3: malformed JSON: Expecting ':' delimiter (column 13)" in str(err.value)


def test_non_object_jsonl_line(tmp_path):
    (tmp_path / "list.jsonl").write_text('["a", "b"]\n')
    with pytest.raises(PreftuneError, match=r"list.jsonl:1: expected a JSON object, got list"):
        list(read_records(tmp_path / "list.jsonl"))


def test_unreadable_and_unsupported_files(tmp_path):
    """Line 2 is '{"prompt": "caf\xe9"}' in Latin-1: '{"prompt": "caf' is 15 bytes, so 0xe9 is column 16."""
    (tmp_path / "latin1.jsonl").write_bytes(('{"text": "ok"}\n{"prompt": "caf\xe9"}\n').encode("latin-1"))
    with pytest.raises(PreftuneError, match=r"latin1.jsonl:2: not UTF-8 text: byte 0xe9 at column 16"):
        list(read_records(tmp_path / "latin1.jsonl"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PreftuneError, match="notes.txt: unsupported file type '.txt'"):
        list(read_records(tmp_path / "notes.txt"))
    (tmp_path / "folder.jsonl").mkdir()           # reading fails with an OSError (EISDIR)
    with pytest.raises(PreftuneError, match="folder.jsonl: cannot read the file: Is a directory"):
        list(read_file(tmp_path / "folder.jsonl"))
