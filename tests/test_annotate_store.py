"""The annotation store, pair sources, agreement statistics, export and the annotate CLI."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.annotate.export import pair_agreement, preference_rows
from preftune.annotate.sources import load_generations, load_pairs_file
from preftune.annotate.stats import agreement, cohen_kappa, fleiss_kappa, fleiss_observed, label_counts
from preftune.cli import app
from preftune.data.annotations import (
    AnnotationStore,
    DuplicateLabelError,
    InvalidLabelError,
    Label,
    NothingToUndoError,
    OrderMismatchError,
    Pair,
    UnknownPairError,
    content_id,
    order_token,
    seeded_left_is_a,
    side_to_choice,
)
from preftune.errors import PreftuneError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_pairs(n: int) -> list[Pair]:
    return [Pair(id=f"p{i}", prompt=f"prompt {i}", response_a=f"a{i}", response_b=f"b{i}") for i in range(n)]


@pytest.fixture
def store(tmp_path: Path) -> AnnotationStore:
    s = AnnotationStore(tmp_path / "ann.sqlite")
    s.add_pairs(make_pairs(4))
    return s


def label_of(store: AnnotationStore, pair_id: str, annotator: str, answer: str) -> Label:
    """Answer in terms of responses ("a"/"b"/"tie"/"skip"), translating to the side shown."""
    a = store.assignment(pair_id, annotator)
    side = {"a": "left" if a.left_is_a else "right", "b": "right" if a.left_is_a else "left"}.get(answer, answer)
    return store.record(pair_id=pair_id, annotator=annotator, side=side, order=a.order_token)


# --- store ------------------------------------------------------------------------------------

def test_wal_and_full_sync(store: AnnotationStore) -> None:
    assert store.journal_mode().lower() == "wal"
    with store._connect() as con:
        assert con.execute("PRAGMA synchronous").fetchone()[0] == 2          # 2 = FULL
        assert con.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_loading_is_idempotent(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "response_a": "x", "response_b": "y"},
            {"id": "fixed", "prompt": "q", "a": "u", "b": "v", "meta": {"k": 1}}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    store = AnnotationStore(tmp_path / "db.sqlite")
    assert store.add_pairs(load_pairs_file(path).pairs) == (2, 0)
    assert store.add_pairs(load_pairs_file(path).pairs) == (0, 2)
    assert store.count_pairs() == 2
    ids = [p.id for p in store.pairs()]
    assert ids == [content_id("p", "x", "y"), "fixed"]
    assert store.get_pair("fixed").meta == {"k": 1, "source": "pairs.jsonl:2"}
    # the same id with other text is refused, and nothing is added
    changed = write_jsonl(tmp_path / "changed.jsonl", [{"id": "fixed", "prompt": "q", "a": "u", "b": "w"}])
    with pytest.raises(PreftuneError, match="already stored with different text"):
        store.add_pairs(load_pairs_file(changed).pairs)
    assert store.get_pair("fixed").response_b == "v"


def test_pairs_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response_a": "x", "response_b": "y"}\n{"prompt": "p",\n')
    with pytest.raises(PreftuneError, match=r"bad.jsonl:2: malformed JSON"):
        load_pairs_file(bad)
    write_jsonl(bad, [{"prompt": "p", "response_a": "x"}])
    with pytest.raises(PreftuneError, match=r"bad.jsonl:1 field 'response_b': missing field"):
        load_pairs_file(bad)
    write_jsonl(bad, [{"prompt": "p", "chosen": "x", "rejected": "y"}])
    with pytest.raises(PreftuneError, match="must not say which response is better"):
        load_pairs_file(bad)
    write_jsonl(bad, [{"prompt": "p", "response_a": "x", "response_b": "x"},
                      {"prompt": "p", "response_a": "x", "response_b": "y"},
                      {"prompt": "p", "response_a": "x", "response_b": "y"}])
    result = load_pairs_file(bad)
    assert len(result.pairs) == 1
    assert any("not loaded: 1 row with response_a == response_b" in n for n in result.notes)
    assert any("loaded once: 1 row repeating" in n for n in result.notes)


def test_generations_one_and_two_files(tmp_path: Path) -> None:
    """One file, 2 prompts x 3 completions -> 3 pairs per prompt = 6; two files pair 1-A with 1-A."""
    def gen(model: str, texts: dict[tuple[int, str], str]) -> list[dict]:
        return [{"prompt_id": pid, "prompt": f"prompt {pid}", "completion_id": cid, "completion": text,
                 "model": model} for (pid, cid), text in texts.items()]

    one = write_jsonl(tmp_path / "sft.jsonl", gen("sft", {(1, "A"): "x1", (1, "B"): "y1", (1, "C"): "z1",
                                                          (2, "A"): "x2", (2, "B"): "y2", (2, "C"): "z2"}))
    pairs = load_generations([one]).pairs
    assert len(pairs) == 6
    assert (pairs[0].response_a, pairs[0].response_b, pairs[0].meta["completion_b"]) == ("x1", "y1", "B")
    two = write_jsonl(tmp_path / "dpo.jsonl", gen("dpo", {(1, "A"): "X1", (1, "B"): "y1", (2, "A"): "X2",
                                                          (3, "A"): "X3"}))
    result = load_generations([one, two])
    # 1-A and 2-A pair up; 1-B is the same text in both (not loaded); 3-A has no partner
    assert [(p.response_a, p.response_b) for p in result.pairs] == [("x1", "X1"), ("x2", "X2")]
    assert result.pairs[0].meta["model_b"] == "dpo"
    assert any("not loaded: 1 pair with two identical" in n for n in result.notes)
    assert any("1 completion in dpo.jsonl has no partner" in n for n in result.notes)


def test_choice_mapping_uses_stored_order() -> None:
    assert side_to_choice("left", left_is_a=True) == "a"
    assert side_to_choice("left", left_is_a=False) == "b"
    assert side_to_choice("right", left_is_a=True) == "b"
    assert side_to_choice("right", left_is_a=False) == "a"
    assert side_to_choice("tie", left_is_a=False) == "tie"
    with pytest.raises(InvalidLabelError, match="unknown choice"):
        side_to_choice("both", left_is_a=True)


def test_record_maps_left_right_both_orders(tmp_path: Path) -> None:
    """Find one pair shown a-left and one shown b-left; "left" must mean a in the first, b in the second."""
    store = AnnotationStore(tmp_path / "db.sqlite")
    store.add_pairs(make_pairs(12))
    shown = {p.id: store.assignment(p.id, "ann") for p in store.pairs()}
    a_left = next(pid for pid, a in shown.items() if a.left_is_a)
    b_left = next(pid for pid, a in shown.items() if not a.left_is_a)
    assert shown[a_left].left == f"a{a_left[1:]}" and shown[b_left].left == f"b{b_left[1:]}"
    assert store.record(pair_id=a_left, annotator="ann", side="left", order="ab").choice == "a"
    assert store.record(pair_id=b_left, annotator="ann", side="left", order="ba").choice == "b"
    got = {lab.pair_id: (lab.choice, lab.left_is_a) for lab in store.labels()}
    assert got == {a_left: ("a", True), b_left: ("b", False)}


def test_order_is_seeded_stored_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = AnnotationStore(path)
    store.configure(seed=7)
    store.add_pairs(make_pairs(20))
    first = {p.id: store.assignment(p.id, "x").left_is_a for p in store.pairs()}
    assert first == {p.id: seeded_left_is_a(7, p.id, "x") for p in store.pairs()}
    assert 0 < sum(first.values()) < 20                     # both orders occur
    # stored: changing the seed later does not change what was already shown
    reopened = AnnotationStore(path)
    reopened.configure(seed=8)
    assert {pid: reopened.assignment(pid, "x").left_is_a for pid in first} == first


def test_uniqueness_and_errors_change_nothing(store: AnnotationStore) -> None:
    a = store.assignment("p0", "x")
    store.record(pair_id="p0", annotator="x", side="left", order=a.order_token)
    wrong = order_token(not a.left_is_a)
    cases = [
        (DuplicateLabelError, dict(pair_id="p0", annotator="x", side="right", order=a.order_token)),
        (UnknownPairError, dict(pair_id="nope", annotator="x", side="left", order="ab")),
        (InvalidLabelError, dict(pair_id="p1", annotator="x", side="better", order="ab")),
        (InvalidLabelError, dict(pair_id="p1", annotator="x", side="left", order="xx")),
        (InvalidLabelError, dict(pair_id="p1", annotator="  ", side="left", order="ab")),
        (OrderMismatchError, dict(pair_id="p0", annotator="x", side="left", order=wrong)),
    ]
    for exc, kwargs in cases:
        with pytest.raises(exc):
            store.record(**kwargs)
    labels = store.labels()
    assert [(lab.pair_id, lab.annotator) for lab in labels] == [("p0", "x")]
    with pytest.raises(sqlite3.IntegrityError):            # the schema itself forbids a second row
        with store._connect() as con:
            con.execute("INSERT INTO labels (pair_id, annotator, choice, left_is_a, created_at) "
                        "VALUES ('p0', 'x', 'b', 1, 'now')")


def test_undo_deletes_last_label_only(store: AnnotationStore) -> None:
    label_of(store, "p0", "x", "a")
    label_of(store, "p1", "x", "b")
    label_of(store, "p2", "y", "tie")
    assert store.undo("x") == "p1"
    assert [(lab.pair_id, lab.annotator) for lab in store.labels()] == [("p0", "x"), ("p2", "y")]
    assert store.undo("x") == "p0"
    with pytest.raises(NothingToUndoError):
        store.undo("x")
    assert [(lab.pair_id, lab.annotator) for lab in store.labels()] == [("p2", "y")]


def test_assignment_respects_per_pair(tmp_path: Path) -> None:
    """4 pairs, K=2: x and y can label all 4 each (8 labels), then z finds nothing left."""
    store = AnnotationStore(tmp_path / "db.sqlite")
    store.configure(per_pair=2)
    store.add_pairs(make_pairs(4))
    for name in ("x", "y"):
        seen = []
        while (a := store.next_pair(name)) is not None:
            seen.append(a.pair.id)
            label_of(store, a.pair.id, name, "a")
        assert sorted(seen) == ["p0", "p1", "p2", "p3"]
    assert store.next_pair("z") is None
    assert (store.progress("z").done, store.progress("z").left) == (0, 0)


def test_assignment_coverage_first_and_skips_do_not_count(tmp_path: Path) -> None:
    """K=1: a labelled pair is closed to others; a skipped pair stays open to others."""
    store = AnnotationStore(tmp_path / "db.sqlite")
    store.add_pairs(make_pairs(3))
    label_of(store, "p0", "x", "a")
    label_of(store, "p1", "x", "skip")
    assert store.progress("x").done == 2 and store.progress("x").left == 1          # only p2
    offered = set()
    while (a := store.next_pair("y")) is not None:
        offered.add(a.pair.id)
        label_of(store, a.pair.id, "y", "b")
    assert offered == {"p1", "p2"}
    store.configure(per_pair=0)                             # no limit: every pair for everyone
    assert store.next_pair("z") is not None and store.progress("z").left == 3


def test_annotator_group_conflict(store: AnnotationStore) -> None:
    store.register_annotator("ann", "g1")
    store.register_annotator("ann")                        # no group given: fine
    with pytest.raises(InvalidLabelError, match="already registered in group 'g1'"):
        store.register_annotator("ann", "g2")
    label_of(store, "p0", "ann", "a")
    assert store.labels()[0].group == "g1"


# --- agreement --------------------------------------------------------------------------------

def test_cohen_kappa_hand_value() -> None:
    """X = a a a b b tie, Y = a a b b b a: agree on 4 of 6, p_o = 2/3.
    Marginals X (a, b, tie) = (3, 2, 1)/6, Y = (3, 3, 0)/6: p_e = (9 + 6 + 0)/36 = 5/12.
    kappa = (2/3 - 5/12) / (1 - 5/12) = (3/12) / (7/12) = 3/7."""
    x = ["a", "a", "a", "b", "b", "tie"]
    y = ["a", "a", "b", "b", "b", "a"]
    assert cohen_kappa(x, y) == pytest.approx(3 / 7, abs=1e-12)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None     # p_e = 1: undefined
    assert cohen_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)


def test_fleiss_kappa_hand_value() -> None:
    """4 pairs, 3 raters, columns (a, b, tie): (3,0,0) (2,1,0) (0,3,0) (1,1,1).
    P_i = (sum n_ij^2 - 3)/6 = 1, 1/3, 1, 0 -> P-bar = 7/12.
    p = (6, 5, 1)/12 -> P_e = (36 + 25 + 1)/144 = 31/72.
    kappa = (7/12 - 31/72) / (1 - 31/72) = (11/72) / (41/72) = 11/41."""
    table = [[3, 0, 0], [2, 1, 0], [0, 3, 0], [1, 1, 1]]
    assert fleiss_observed(table) == pytest.approx(7 / 12, abs=1e-12)
    assert fleiss_kappa(table) == pytest.approx(11 / 41, abs=1e-12)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[2, 0, 0], [1, 1, 1]])


def _labels(rows: list[tuple[str, str, str]]) -> list[Label]:
    return [Label(pair_id=p, prompt=f"q{p}", response_a=f"A{p}", response_b=f"B{p}", annotator=who,
                  group="g1" if who in ("x", "y") else None, choice=c, left_is_a=True, created_at=str(i))
            for i, (p, who, c) in enumerate(rows)]


def test_agreement_report_from_labels() -> None:
    """Cohen's example above as labels, plus skips (ignored) and a pair only x labelled (ignored)."""
    x = ["a", "a", "a", "b", "b", "tie"]
    y = ["a", "a", "b", "b", "b", "a"]
    rows = [(str(i), "x", c) for i, c in enumerate(x)] + [(str(i), "y", c) for i, c in enumerate(y)]
    rows += [("6", "x", "a"), ("6", "y", "skip"), ("7", "x", "skip")]
    rep = agreement(_labels(rows))
    assert (rep.method, rep.n_pairs, rep.raters_per_pair) == ("cohen", 6, 2)
    assert rep.agreement == pytest.approx(2 / 3) and rep.kappa == pytest.approx(3 / 7)
    counts = label_counts(_labels(rows))
    assert counts["x"] == {"a": 4, "b": 2, "tie": 1, "skip": 1}
    assert label_counts(_labels(rows), by="group")["g1"]["skip"] == 2


def test_agreement_report_fleiss_picks_common_rater_count() -> None:
    """Fleiss' table above (x, y, z on pairs 0-3) + pair 4 with only two raters: left out, and said so."""
    answers = {"0": "a a a", "1": "a a b", "2": "b b b", "3": "a b tie"}
    rows = [(p, who, c) for p, s in answers.items() for who, c in zip("xyz", s.split(), strict=True)]
    rows += [("4", "x", "a"), ("4", "y", "b")]
    rep = agreement(_labels(rows))
    assert (rep.method, rep.n_pairs, rep.raters_per_pair) == ("fleiss", 4, 3)
    assert rep.kappa == pytest.approx(11 / 41) and rep.agreement == pytest.approx(7 / 12)
    assert "1 pair with another number of raters left out" in rep.note
    xy = next(pw for pw in rep.pairwise if (pw.first, pw.second) == ("x", "y"))
    assert (xy.n_pairs, xy.agreement) == (5, pytest.approx(3 / 5))         # agree on 0, 1, 2


# --- export ---------------------------------------------------------------------------------

def test_export_rows_ties_and_skips() -> None:
    rows = [("1", "x", "a"), ("1", "y", "b"), ("2", "x", "tie"), ("3", "x", "skip")]
    out = preference_rows(_labels(rows))
    assert out.rows == [
        {"prompt": "q1", "chosen": "A1", "rejected": "B1", "annotator": "x", "group": "g1", "pair_id": "1"},
        {"prompt": "q1", "chosen": "B1", "rejected": "A1", "annotator": "y", "group": "g1", "pair_id": "1"},
    ]
    assert out.counts["ties"] == 1 and out.counts["skips"] == 1 and out.tie_rows == []
    kept = preference_rows(_labels(rows), ties="keep")
    assert kept.rows[-1] == {"prompt": "q2", "chosen": "A2", "rejected": "B2", "tie": True,
                             "annotator": "x", "group": "g1", "pair_id": "2"}
    apart = preference_rows(_labels(rows), ties="separate")
    assert len(apart.rows) == 2 and apart.tie_rows[0]["choice"] == "tie"
    with pytest.raises(PreftuneError, match="unknown ties mode"):
        preference_rows(_labels(rows), ties="maybe")


def test_export_leaves_out_empty_responses_so_the_file_trains(tmp_path: Path) -> None:
    """A generated completion can be empty (the model ended at once). Pair 1 has an empty response_b:
    'a' (A1 over '') and 'b' ('' over A1) are both left out and counted, and so is a kept tie on it;
    pair 2 exports normally. The exported file then loads with the preference loader."""
    from dataclasses import replace

    from preftune.data import load_preferences
    from preftune.data.jsonl import write_jsonl as export_jsonl

    labels = [replace(lab, response_b="") if lab.pair_id == "1" else lab
              for lab in _labels([("1", "x", "a"), ("1", "y", "b"), ("1", "z", "tie"), ("2", "x", "b")])]
    out = preference_rows(labels, ties="keep")
    assert [(r["pair_id"], r["chosen"], r["rejected"]) for r in out.rows] == [("2", "B2", "A2")]
    assert out.counts["empty_response"] == 3 and out.counts["preferences"] == 3 and out.counts["ties"] == 1
    export_jsonl(tmp_path / "prefs.jsonl", out.rows)
    pairs, report = load_preferences(tmp_path / "prefs.jsonl")
    assert [p.chosen for p in pairs] == ["B2"] and report.problems == []


def test_export_min_agreement() -> None:
    """Pair 1: a, b -> agreement 1/2; pair 2: a, a, b -> 2/3; pair 3: b -> 1.
    --min-agreement 0.6 keeps pairs 2 and 3 (4 rows); adding --min-labels 2 keeps pair 2 only."""
    rows = [("1", "x", "a"), ("1", "y", "b"), ("2", "x", "a"), ("2", "y", "a"), ("2", "z", "b"),
            ("3", "x", "b")]
    assert pair_agreement(["a", "a", "b"]) == pytest.approx(2 / 3)
    out = preference_rows(_labels(rows), min_agreement=0.6)
    assert [r["pair_id"] for r in out.rows] == ["2", "2", "2", "3"]
    assert out.counts["pairs_left_out_by_agreement"] == 1 and out.counts["left_out_by_agreement"] == 2
    out = preference_rows(_labels(rows), min_agreement=0.6, min_labels=2)
    assert [r["pair_id"] for r in out.rows] == ["2", "2", "2"]


# --- CLI ----------------------------------------------------------------------------------

def test_cli_load_export_stats(tmp_path: Path) -> None:
    runner = CliRunner()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "response_a": f"A{i}",
                                                    "response_b": f"B{i}"} for i in range(3)])
    db = tmp_path / "ann.sqlite"
    res = runner.invoke(app, ["annotate", "load", "--db", str(db), "--pairs", str(pairs)])
    assert res.exit_code == 0, res.output
    assert "loaded 3 new pairs (0 already in the database)" in res.output
    res = runner.invoke(app, ["annotate", "load", "--db", str(db), "--pairs", str(pairs)])
    assert "loaded 0 new pairs (3 already in the database)" in res.output
    store = AnnotationStore(db)
    ids = [p.id for p in store.pairs()]
    for who, answers in (("x", "a b tie"), ("y", "a a skip")):
        for pid, ans in zip(ids, answers.split(), strict=True):
            label_of(store, pid, who, ans)
    out = tmp_path / "prefs.jsonl"
    res = runner.invoke(app, ["annotate", "export", "--db", str(db), "-o", str(out), "--ties", "separate"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert (f"wrote 4 rows to {out} from 6 labels: 4 preferences, 1 tie (separate), 1 skip (never exported), "
            "0 labels on 0 pairs left out by --min-agreement/--min-labels") in said
    assert f"wrote 1 tie to {tmp_path / 'prefs.ties.jsonl'}" in said
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["annotator"], r["chosen"]) for r in rows] == [("x", "A0"), ("x", "B1"), ("y", "A0"), ("y", "A1")]
    assert len((tmp_path / "prefs.ties.jsonl").read_text().splitlines()) == 1
    res = runner.invoke(app, ["annotate", "stats", "--db", str(db), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    # x, y both answered pairs 0 and 1: agree on 0 only -> p_o = 1/2; x (a, b), y (a, a): p_e = 2/4
    # -> kappa = (1/2 - 1/2) / (1 - 1/2) = 0
    assert data["agreement"]["method"] == "cohen" and data["agreement"]["kappa"] == pytest.approx(0.0)
    res = runner.invoke(app, ["annotate", "stats", "--db", str(db)])
    assert "percent agreement 50.0%, Cohen's kappa 0.0000 (Cohen's kappa on the 2 pairs" in res.output


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["annotate", "stats", "--db", str(tmp_path / "none.sqlite")])
    assert res.exit_code == 1 and "no annotation database here" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["annotate", "serve", "--db", str(tmp_path / "empty.sqlite")])
    assert res.exit_code == 1 and "the database holds no pairs" in res.output


def test_threads_share_one_store(tmp_path: Path) -> None:
    """8 threads answer 20 pairs each for their own annotator, and all race on one pair as "dup":
    every distinct answer is stored once (160 + 1 rows), the 7 losers of the race get DuplicateLabelError."""
    from concurrent.futures import ThreadPoolExecutor

    store = AnnotationStore(tmp_path / "db.sqlite")
    store.add_pairs(make_pairs(20))

    def work(i: int) -> int:
        for p in make_pairs(20):
            label_of(store, p.id, f"t{i}", "a")
        try:
            label_of(store, "p0", "dup", "b")
            return 0
        except DuplicateLabelError:
            return 1

    with ThreadPoolExecutor(max_workers=8) as pool:
        losers = sum(pool.map(work, range(8)))
    assert losers == 7
    assert store.count_labels() == 8 * 20 + 1


# --- files that are not annotation databases (issue 11) ---------------------------------------

def _foreign_sqlite(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    con.execute("INSERT INTO users VALUES (1, 'ann')")
    con.commit()
    con.close()
    return path


def test_store_refuses_files_that_are_not_annotation_databases(tmp_path: Path) -> None:
    """A text file, another program's SQLite database, an empty file (for readers) and a folder are
    refused with a PreftuneError naming the file, and left exactly as they were."""
    text = tmp_path / "notes.txt"
    text.write_text("hello\nnot a database\n")
    foreign = _foreign_sqlite(tmp_path / "other.sqlite")
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    cases = [(text, True, "SQLite cannot read it"), (text, False, "SQLite cannot read it"),
             (foreign, True, "has none of the tables"), (foreign, False, "has none of the tables"),
             (empty, False, "holds no tables"), (tmp_path, True, "is a folder")]
    for path, create, why in cases:
        before = path.read_bytes() if path.is_file() else None
        with pytest.raises(PreftuneError, match="not a preftune annotation database") as info:
            AnnotationStore(path, create=create)
        assert why in str(info.value) and str(path) in str(info.value), (path, create)
        if before is not None:
            assert path.read_bytes() == before, (path, create)
    with pytest.raises(PreftuneError, match="no annotation database here"):
        AnnotationStore(tmp_path / "missing.sqlite", create=False)
    assert not (tmp_path / "missing.sqlite").exists()
    assert AnnotationStore(empty).count_pairs() == 0             # an empty file may become a new database


def test_store_secret_is_made_once_and_kept(tmp_path: Path) -> None:
    first = AnnotationStore(tmp_path / "db.sqlite").secret()
    assert len(first) == 64 and AnnotationStore(tmp_path / "db.sqlite").secret() == first
    assert AnnotationStore(tmp_path / "other.sqlite").secret() != first


def test_cli_refuses_what_is_not_an_annotation_database(tmp_path: Path) -> None:
    """stats, export, load and serve on a non-SQLite file or a foreign SQLite database: one error line
    naming the file, exit 1, no traceback, nothing written."""
    runner = CliRunner()
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    foreign = _foreign_sqlite(tmp_path / "other.sqlite")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "response_a": "A", "response_b": "B"}])
    out = tmp_path / "prefs.jsonl"
    for db in (text, foreign):
        before = db.read_bytes()
        for args in (["stats"], ["stats", "--json"], ["export", "-o", str(out)], ["load", "--pairs", str(pairs)],
                     ["serve", "--pairs", str(pairs), "--port", "9"]):
            res = runner.invoke(app, ["annotate", *args[:1], "--db", str(db), *args[1:]])
            assert res.exit_code == 1, (db, args, res.output)
            lines = res.output.strip().splitlines()
            assert len(lines) == 1 and f"{db}: not a preftune annotation database" in lines[0], res.output
            assert "Traceback" not in res.output
        assert db.read_bytes() == before and not out.exists()


def test_cli_export_needs_an_existing_database(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["annotate", "export", "--help"], terminal_width=200)
    said = " ".join(res.output.split())
    assert "created if missing" not in said and "it must exist" in said
    assert "created if missing" in " ".join(runner.invoke(app, ["annotate", "load", "--help"],
                                                          terminal_width=200).output.split())
    db, out = tmp_path / "missing.sqlite", tmp_path / "prefs.jsonl"
    res = runner.invoke(app, ["annotate", "export", "--db", str(db), "-o", str(out)])
    assert res.exit_code == 1 and f"{db}: no annotation database here" in res.output
    assert not db.exists() and not out.exists()


def test_cli_load_with_a_bad_pairs_file_creates_no_database(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("")
    db = tmp_path / "new.sqlite"
    res = CliRunner().invoke(app, ["annotate", "load", "--db", str(db), "--pairs", str(bad)])
    assert res.exit_code == 1 and not db.exists(), res.output


def test_cli_export_refuses_a_ties_file_before_writing(tmp_path: Path) -> None:
    db, out = tmp_path / "ann.sqlite", tmp_path / "prefs.jsonl"
    AnnotationStore(db).add_pairs(make_pairs(1))
    res = CliRunner().invoke(app, ["annotate", "export", "--db", str(db), "-o", str(out),
                                   "--ties-file", str(tmp_path / "t.jsonl")])
    assert res.exit_code == 1 and "--ties-file is only used with --ties separate" in res.output
    assert not out.exists()
