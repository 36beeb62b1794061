"""Completions as text (preftune.data.completions_text): generate's .txt layout and the course's
output_*_MODEL.txt files (PREFIX / POST blocks with COMPLETION / SUMMARY n-A), read by `compare`."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.compare import compare_generations, read_generations
from preftune.data.completions_text import looks_like_completions_text, read_completions_text
from preftune.errors import PreftuneError
from preftune.generate import write_generations
from preftune.judges import FunctionJudge

REPO = Path(__file__).resolve().parents[1]

COURSE_SFT = """\
POST 1:
SUBREDDIT: r/relationships
TITLE: My roommate never does the dishes
POST: We agreed on a rota in March.
Post 2 of the rota says dishes are hers.

SUMMARY 1-A:
Roommate ignores the dish rota.
SUMMARY 1-B: Dishes.

----------------------------------------
=== POST 2 ===
SUBREDDIT: r/cooking
TITLE: Rice always burns

### SUMMARY 2-A
My rice burns at the bottom of the pot, every time.
SUMMARY 2-B:
Burnt rice.
"""

COURSE_DPO = """\
POST 1:
SUBREDDIT: r/relationships
TITLE: My roommate never does the dishes
POST: We agreed on a rota in March.
Post 2 of the rota says dishes are hers.

SUMMARY 1-A:
Roommate skips her dishes despite the rota we agreed on.
SUMMARY 1-B: Dishes!

=== POST 2 ===
SUBREDDIT: r/cooking
TITLE: Rice always burns

SUMMARY 2-A: Rice burns.
SUMMARY 2-B:
My rice burns at the bottom of the pot.
"""


def test_course_layout_multiline_blocks(tmp_path):
    """POST / SUMMARY blocks span lines; the block's text runs to the next header. Lines such as
    "POST:" and "Post 2 of ..." inside a post are text (keywords count only upper case with a number);
    blank and separator lines at a block's end and '===' / '###' decorations are not text."""
    path = tmp_path / "output_I4_sft.txt"
    path.write_text(COURSE_SFT)
    assert looks_like_completions_text(path)
    records = read_completions_text(path)
    post1 = ("SUBREDDIT: r/relationships\nTITLE: My roommate never does the dishes\n"
             "POST: We agreed on a rota in March.\nPost 2 of the rota says dishes are hers.")
    post2 = "SUBREDDIT: r/cooking\nTITLE: Rice always burns"
    assert [(r["prompt_id"], r["prompt"], r["completion_id"], r["completion"], r["line"]) for r in records] == [
        (1, post1, "A", "Roommate ignores the dish rota.", 7),
        (1, post1, "B", "Dishes.", 9),
        (2, post2, "A", "My rice burns at the bottom of the pot, every time.", 16),
        (2, post2, "B", "Burnt rice.", 18)]


def test_generate_layout_reads_back_as_the_jsonl(tmp_path):
    """What `generate` writes beside its JSONL (PREFIX i: / COMPLETION i-X: one line each) reads back
    to the same records, a leading space and an empty completion included. A newline inside a
    completion is written as ' / ' and read back as written; other line-break characters (\x0b,
    \u2028, which a sampled completion can hold) stay inside the completion."""
    records = [{"prompt_id": i, "prompt": p, "completion_id": c, "completion": text, "model": "tiny"}
               for i, p, c, text in [(1, "O, what a noble mind", "A", " is here o'erthrown!"),
                                     (1, "O, what a noble mind", "B", ""),
                                     (2, "Look in thy glass", "A", "and\x0btell\u2028the face  "),
                                     (2, "Look in thy glass", "B", "line one\nline two")]]
    jsonl, txt = write_generations(records, tmp_path / "sft.jsonl")
    got = read_generations(txt)
    assert [(r["prompt_id"], r["prompt"], r["completion_id"], r["completion"]) for r in got] == [
        (1, "O, what a noble mind", "A", " is here o'erthrown!"), (1, "O, what a noble mind", "B", ""),
        (2, "Look in thy glass", "A", "and\x0btell\u2028the face  "),
        (2, "Look in thy glass", "B", "line one / line two")]
    same = [(r["prompt_id"], r["completion_id"], r["completion"]) for r in read_generations(jsonl)][:3]
    assert same == [(r["prompt_id"], r["completion_id"], r["completion"]) for r in got][:3]


def test_compare_reads_course_text_files_and_pairs_n_a_with_n_a(tmp_path):
    """The course's I.4 comparison on the files as handed out: longer summary wins. Pairs (dpo vs sft)
    1-A: 56 vs 31 chars -> W; 1-B: 7 vs 7 -> T; 2-A: 11 vs 51 -> L; 2-B: 39 vs 11 -> W."""
    sft, dpo = tmp_path / "output_I4_sft.txt", tmp_path / "output_I4_dpo.txt"
    sft.write_text(COURSE_SFT)
    dpo.write_text(COURSE_DPO)
    (tmp_path / "rules.py").write_text("def length(prompt, completion):\n    return len(completion)\n")
    result = CliRunner().invoke(app, ["compare", str(sft), str(dpo), "--judge", f"function:{tmp_path / 'rules.py'}:length",
                                      "--output", str(tmp_path / "cmp"), "--n-bootstrap", "50", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["baseline"], data["candidate"]) == ("output_I4_sft", "output_I4_dpo")
    assert [(r["prompt_id"], r["completion_id"], r["verdict"]) for r in data["rows"]] == [
        (1, "A", "W"), (1, "B", "T"), (2, "A", "L"), (2, "B", "W")]
    assert data["unmatched"] == {"only_in_baseline": [], "only_in_candidate": [], "prompt_mismatch": []}


def test_compare_of_generate_text_files_equals_compare_of_their_jsonl(tmp_path):
    """Same verdicts from the .txt files as from the JSONL files they sit beside (the longer wins)."""
    rows = [(1, "A", "aa", "aaaa"), (1, "B", "bbb", "bb"), (2, "A", "c", "c"), (2, "B", "dddd", "ddddd")]
    paths = {}
    for k, name in ((2, "sft"), (3, "dpo")):
        recs = [{"prompt_id": r[0], "prompt": f"prompt {r[0]}", "completion_id": r[1], "completion": r[k],
                 "model": name} for r in rows]
        paths[name] = write_generations(recs, tmp_path / f"{name}.jsonl")
    judge = FunctionJudge(lambda prompt, completion: len(completion))
    from_jsonl = compare_generations(paths["sft"][0], paths["dpo"][0], judge, n_bootstrap=0)
    from_text = compare_generations(paths["sft"][1], paths["dpo"][1], judge, n_bootstrap=0)
    assert [r["verdict"] for r in from_text.rows] == [r["verdict"] for r in from_jsonl.rows] == ["W", "L", "T", "W"]
    assert from_text.candidate == "dpo"


@pytest.mark.parametrize(("text", "line", "message"), [
    ("COMPLETION 1-A: hi\n", 1, "COMPLETION 1-A comes before any prompt block"),
    ("PREFIX 1: p\nCOMPLETION 2-A: x\n", 2, "COMPLETION 2-A is inside the block of prompt 1: its number must be 1"),
    ("PREFIX 1: p\nCOMPLETION 1-A: x\nCOMPLETION 1-A: y\n", 3, "COMPLETION 1-A appears twice (first on line 2)"),
    ("PREFIX 1: p\nCOMPLETION 1-A: x\nPREFIX 1: q\n", 3, "PREFIX 1 appears twice (first on line 1)"),
    ("POST 1:\ntext\nSUMMARY 1:\nsummary\n", 3, "cannot read the block header 'SUMMARY 1:'"),
    ("PREFIX 1: p\nCOMPLETION 1A: x\n", 2, "cannot read the block header 'COMPLETION 1A: x'"),
    ("PREFIX 1a: p\n", 1, "cannot read the block header 'PREFIX 1a: p'"),
    ("Model: gpt2\nPREFIX 1: p\nCOMPLETION 1-A: x\n", 1, "text before the first block: 'Model: gpt2'"),
    ("PREFIX 1:\n\nCOMPLETION 1-A: x\n", 1, "PREFIX 1 has no text"),
    ("PREFIX 1: p\nPREFIX 2: q\n", None, "no completion blocks in the file"),
])
def test_malformed_text_names_file_line_and_block(tmp_path, text, line, message):
    path = tmp_path / "output_bad.txt"
    path.write_text(text)
    with pytest.raises(PreftuneError) as info:
        read_generations(path)
    where = f"{path}:{line}: " if line else f"{path}: "
    assert str(info.value).splitlines()[0] == where + message


def test_cli_reports_a_bad_block_in_one_line(tmp_path):
    good, bad = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_text("PREFIX 1: p\nCOMPLETION 1-A: x\n")
    bad.write_text("PREFIX 1: p\nCOMPLETION 1-A: x\nSUMMARY 1 B: y\n")
    result = CliRunner().invoke(app, ["compare", str(good), str(bad), "--judge", "function:os.path:join",
                                      "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "b.txt:3: cannot read the block header 'SUMMARY 1 B: y'" in " ".join(result.output.split())


def test_compare_help_cites_files_that_exist():
    """`compare --help` once cited examples/judges.py, which does not exist; every path it cites
    (function:DIR/FILE.py:fn; function:file.py:fn is the placeholder of the syntax) must."""
    result = CliRunner().invoke(app, ["compare", "--help"], env={"COLUMNS": "200"})
    cited = re.findall(r"function:([\w.-]+/[\w./-]+\.py):", result.output)
    assert cited and all((REPO / path).is_file() for path in cited), cited
    assert "--judge function:examples/rewards.py:letters" in " ".join(result.output.split())


def test_plain_text_without_headers_is_not_taken_for_completions(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text(textwrap.dedent("""\

        Some notes
        PREFIX 1: p
    """))
    assert not looks_like_completions_text(path)
