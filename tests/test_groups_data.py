"""Who labelled what: the annotator / group aliases on every preference format, `annotator` and `group`
carried from the data to the training batch, and `data inspect`'s counts and group agreement."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from preftune.cli import app
from preftune.data import load_preferences
from preftune.data.collate import collate_pairs, collate_responses
from preftune.data.formats import PreferencePair, Ranking
from preftune.data.validate import group_agreement, labellers
from preftune.errors import PreftuneError

runner = CliRunner()

MSG = [{"role": "user", "content": "2+2?"}]
ROWS = {  # one record per preference format, without annotator or group
    "standard": {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    "implicit_prompt": {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"},
    "conversational": {"prompt": MSG, "chosen": [{"role": "assistant", "content": "4"}],
                       "rejected": [{"role": "assistant", "content": "5"}]},
    "ranking": {"prompt": "2+2?", "responses": ["5", "4"], "ranking": [1, 0]},
    "unpaired": {"prompt": "2+2?", "completion": "4", "label": True},
}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("alias", ["user_id", "annotator_id", "worker_id"])
def test_aliases_name_the_annotator_and_group_on_every_format(tmp_path, fmt, alias):
    """{alias: 17, group_id: "minority"} loads as annotator "17" (a number becomes its text), group
    "minority"; the format detected is the same as without them."""
    path = _jsonl(tmp_path / "d.jsonl", [{**ROWS[fmt], alias: 17, "group_id": "minority"}])
    (example,), report = load_preferences(path)
    assert report.format == fmt
    assert (example.annotator, example.group) == ("17", "minority")
    if fmt == "ranking":   # rank breaking keeps who labelled the ranking on each pair
        (pair,), _ = load_preferences(path, rankings="pairs")
        assert (pair.annotator, pair.group) == ("17", "minority")


def test_aliases_in_a_csv_file_and_agreeing_duplicates(tmp_path):
    """CSV cells: user_id u1 / group_id g -> annotator u1, group g. Row 2 gives both annotator and
    worker_id with the same value (fine); an empty alias cell counts as absent."""
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected,user_id,group_id,annotator,worker_id\n"
                    "p,a,b,u1,g,,\n"
                    "p,a,c,,,u2,u2\n")
    pairs, _ = load_preferences(path)
    assert [(p.annotator, p.group) for p in pairs] == [("u1", "g"), ("u2", None)]


@pytest.mark.parametrize("extra, field", [
    ({"annotator": "ann1", "user_id": "ann2"}, "user_id"),
    ({"user_id": "ann1", "worker_id": "ann2"}, "worker_id"),
    ({"group": "A", "group_id": "B"}, "group_id"),
])
def test_alias_that_disagrees_with_the_canonical_key_names_line_and_field(tmp_path, extra, field):
    """Line 2 carries two names of the annotator (or group) with different values: an error at line 2
    naming the alias and both values; line 1 (no conflict) loads."""
    path = _jsonl(tmp_path / "d.jsonl", [ROWS["standard"], {**ROWS["standard"], **extra}])
    with pytest.raises(PreftuneError) as info:
        load_preferences(path)
    err = info.value
    assert (err.line, err.field) == (2, field)
    first, second = extra.values()
    assert repr(first) in err.message and repr(second) in err.message
    # drop_invalid drops (and counts) that row like any other invalid row
    pairs, report = load_preferences(path, drop_invalid=True)
    assert len(pairs) == 1 and report.n_dropped == 1 and report.problems[0].field == field


# ------------------------------------------------------------------------------------------------ to the batch


@pytest.fixture(scope="module")
def words():
    """One token per whitespace-separated word (a..z = 2..27, </s> = 1, <pad> = 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{chr(97 + i): 2 + i for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def _config(**over):
    base = {"data": None, "eval_data": None, "eval_fraction": 0.0, "seed": 0, "max_length": 16,
            "max_prompt_length": None, "truncation": "keep_end", "data_split": "train", "data_format": "auto"}
    return SimpleNamespace(**{**base, **over})


def test_preference_items_carry_annotator_and_group_into_the_batch(tmp_path, words):
    """A file with user_id / group_id -> load_preference_items (as reward and DPO training read it) ->
    the DPO batch (collate_pairs) and the reward batch (collate_responses, with a ranking) carry
    ``annotator`` and ``group`` as lists in item order, None where a row has none; the token tensors
    are those of the same pairs without the labels' owners."""
    from preftune.data.tokenize import tokenize_preferences
    from preftune.train.data import load_preference_items

    path = _jsonl(tmp_path / "d.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c", "user_id": "u1", "group_id": "maj"},
        {"prompt": "a", "chosen": "c", "rejected": "b", "worker_id": "u2", "group": "min"},
        {"prompt": "d", "chosen": "e", "rejected": "f"}])
    train, evaluation = load_preference_items(_config(data=str(path)), words, lambda _: None, rankings="keep")
    assert evaluation == []
    assert [(i.annotator, i.group) for i in train] == [("u1", "maj"), ("u2", "min"), (None, None)]
    batch = collate_pairs(train, pad_token_id=0)
    assert batch["annotator"] == ["u1", "u2", None] and batch["group"] == ["maj", "min", None]
    plain, _ = tokenize_preferences(words, [PreferencePair("a", "b", "c"), PreferencePair("a", "c", "b"),
                                            PreferencePair("d", "e", "f")], max_length=16)
    bare = collate_pairs(plain, pad_token_id=0)
    assert bare["group"] == [None, None, None]
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].equal(bare[key])

    ranked = [Ranking("a", ["b", "c", "d"], annotator="u3", group="min"), PreferencePair("a", "b", "c", group="maj")]
    items, _ = tokenize_preferences(words, ranked, max_length=16)
    batch = collate_responses(items, pad_token_id=0)
    assert batch["annotator"] == ["u3", None] and batch["group"] == ["min", "maj"]
    assert batch["is_ranking"].tolist() == [True, False]


def test_eval_split_and_rank_breaking_keep_the_groups(tmp_path, words):
    """eval_fraction 0.5 of 4 rankings: both halves keep their rows' groups; rankings: pairs expands a
    3-way ranking of group g into 3 pairs of group g."""
    from preftune.train.data import load_preference_items

    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "responses": ["b", "c", "d"], "ranking": [0, 1, 2],
                                          "annotator_id": f"u{i}", "group_id": f"g{i}"} for i in range(4)])
    train, evaluation = load_preference_items(_config(data=str(path), eval_fraction=0.5), words,
                                              lambda _: None, rankings="pairs")
    assert len(train) == 6 and len(evaluation) == 6
    groups = [i.group for i in train + evaluation]
    assert sorted(set(groups)) == ["g0", "g1", "g2", "g3"] and all(groups.count(g) == 3 for g in set(groups))
    assert all(i.annotator == "u" + i.group[1:] for i in train + evaluation)


# ------------------------------------------------------------------------------------------------ inspect

# Pair (p1: a vs b): maj labels a, a (u1, u2), min labels b (u3). Pair (p2: c vs d, given as d/c once):
# maj c (u1), min c (u3), min c (u4). Pair (p3: e vs f): maj only. One row without annotator or group.
LABELS = [
    {"prompt": "p1", "chosen": "a", "rejected": "b", "user_id": "u1", "group_id": "maj"},
    {"prompt": "p1", "chosen": "a", "rejected": "b", "user_id": "u2", "group_id": "maj"},
    {"prompt": "p1", "chosen": "b", "rejected": "a", "user_id": "u3", "group_id": "min"},
    {"prompt": "p2", "chosen": "c", "rejected": "d", "user_id": "u1", "group_id": "maj"},
    {"prompt": "p2", "chosen": "c", "rejected": "d", "user_id": "u3", "group_id": "min"},
    {"prompt": "p2", "chosen": "c", "rejected": "d", "user_id": "u4", "group_id": "min"},
    {"prompt": "p3", "chosen": "e", "rejected": "f", "user_id": "u2", "group_id": "maj"},
    {"prompt": "p4", "chosen": "g", "rejected": "h"},
]


def test_group_agreement_by_hand(tmp_path):
    """maj vs min: p1 maj {a, a} vs min {b}: 0 of 2 combinations agree -> 0; p2 maj {c} vs min {c, c}: 2 of 2
    -> 1; p3 only maj. Between = mean(0, 1) = 0.5 over 2 pairs. Within maj: p1 {a, a} -> 1 (1 pair);
    within min: p2 {c, c} -> 1 (1 pair). The same pair given with chosen and rejected swapped is the
    same pair (p1 row 3)."""
    pairs, _ = load_preferences(_jsonl(tmp_path / "d.jsonl", LABELS))
    agreement = group_agreement(pairs)
    assert agreement["between"] == [{"groups": ["maj", "min"], "pairs": 2, "agreement": 0.5}]
    assert agreement["within"] == {"maj": {"pairs": 1, "agreement": 1.0}, "min": {"pairs": 1, "agreement": 1.0}}
    # a third group that labelled nothing in common: no shared pair, agreement None (not 0)
    extra = PreferencePair("p9", "x", "y", annotator="u9", group="other")
    out = group_agreement([*pairs, extra])["between"]
    assert {"groups": ["maj", "other"], "pairs": 0, "agreement": None} in out


def test_labellers_counts_per_annotator_and_group(tmp_path):
    """u1: 2 rows (maj); u2: 2 (maj); u3: 2 (min); u4: 1 (min); 1 row unnamed. maj: 4 rows by 2 annotators;
    min: 3 rows by 2. A 3-way ranking counts 1 row and 3 pairs."""
    pairs, _ = load_preferences(_jsonl(tmp_path / "d.jsonl", LABELS))
    info = labellers(pairs)
    a, g = info["annotators"], info["groups"]
    assert (a["count"], a["without_annotator"], g["count"], g["without_group"]) == (4, 1, 2, 1)
    assert a["by_annotator"]["u1"] == {"labels": 2, "pairs": 2, "groups": ["maj"]}
    assert a["by_annotator"]["u4"] == {"labels": 1, "pairs": 1, "groups": ["min"]}
    assert a["labels_per_annotator"]["max"] == 2 and a["labels_per_annotator"]["min"] == 1
    assert g["by_group"] == {"maj": {"labels": 4, "pairs": 4, "annotators": 2},
                             "min": {"labels": 3, "pairs": 3, "annotators": 2}}
    ranking = labellers([Ranking("p", ["a", "b", "c"], annotator="u", group="g")])
    assert ranking["groups"]["by_group"]["g"] == {"labels": 1, "pairs": 3, "annotators": 1}
    assert labellers([PreferencePair("p", "a", "b")]) == {}


def test_inspect_reports_annotators_groups_and_agreement(tmp_path):
    """The same numbers through `preftune data inspect`: in --json, and as tables in the text output."""
    path = _jsonl(tmp_path / "d.jsonl", LABELS)
    result = runner.invoke(app, ["data", "inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["groups"]["agreement"]["between"][0]["agreement"] == 0.5
    assert info["annotators"]["by_annotator"]["u3"]["groups"] == ["min"]
    result = runner.invoke(app, ["data", "inspect", str(path)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "annotators 4, labels each: min 1, median 2, max 2; 1 row without an annotator" in out
    assert "groups 2; 1 row without a group" in out
    assert "maj 2 4 4" in out and "min 2 3 3" in out              # group, annotators, labels, pairs
    assert "maj 1.00 (1) 0.50 (2)" in out and "min 0.50 (2) 1.00 (1)" in out
    plain = runner.invoke(app, ["data", "inspect", str(_jsonl(tmp_path / "p.jsonl", [LABELS[-1]]))])
    assert "annotators" not in plain.stdout and "group agreement" not in plain.stdout


def test_inspect_the_shipped_groups_example():
    """tests/data/prefs_groups.jsonl (docs/data.md's example): 'concise' prefers the short line, 'imagery'
    the long one, on 3 prompts. Between them: prompt 1 concise {S, S} vs imagery {L} -> 0; prompt 2 {S} vs
    {L} -> 0; prompt 3 concise {S, L} vs {L} -> 1/2: mean 1/6 over 3 pairs. Within concise: prompt 1 {S, S}
    -> 1, prompt 3 {S, L} -> 0: 0.5 over 2 pairs. Every alias is used once (user_id, worker_id, annotator)."""
    info = _inspect_json(Path(__file__).parent / "data" / "prefs_groups.jsonl")
    agreement = info["groups"]["agreement"]
    assert agreement["between"] == [{"groups": ["concise", "imagery"], "pairs": 3, "agreement": pytest.approx(1 / 6)}]
    assert agreement["within"]["concise"] == {"pairs": 2, "agreement": 0.5}
    assert {n: e["labels"] for n, e in info["annotators"]["by_annotator"].items()} == {"u1": 3, "u2": 2, "u3": 3}
    one_group = runner.invoke(app, ["data", "inspect", str(Path(__file__).parent / "data" / "prefs_standard.jsonl")])
    assert "group agreement no pair was labelled by two groups" in " ".join(one_group.stdout.split())


def _inspect_json(path: Path) -> dict:
    result = runner.invoke(app, ["data", "inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)
