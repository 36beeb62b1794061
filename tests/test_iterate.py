"""`preftune iterate` on the tiny model: two rounds of sample -> label -> DPO -> compare with SFT, end to end;
a rerun skips every finished step; an interrupt inside round 2's training resumes to the same numbers; people
label through the annotation store; the labelling rules by hand; bad configs are refused before anything runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from preftune.errors import PreftuneError
from preftune.experiments.iterate import iterate
from preftune.experiments.iterate_label import label_completions

REPO = Path(__file__).resolve().parents[1]
LETTERS = f"{REPO / 'examples/rewards.py'}:letters"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _config(model: Path, out: Path, **keys) -> dict:
    """Round r takes prompts 4(r-1)+1..4r of the 8 in examples/data/prompts.txt, K = 2 completions of 8 tokens
    each; 3 DPO steps of 2 pairs (a checkpoint every step); 4 held-out prompts x 2 samples for the evaluation."""
    return {"model": str(model), "prompts": str(REPO / "examples/data/prompts.txt"), "prompts_per_round": 4,
            "rounds": 2, "samples_per_prompt": 2, "judge": LETTERS,
            "eval_prompts": str(REPO / "examples/data/prompts_heldout.txt"), "eval_reward": LETTERS,
            "eval_samples": 2, "max_new_tokens": 8, "max_length": 64, "output_dir": str(out),
            "train": {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-2, "report_to": "none", "dtype": "float32",
                      "save_every": 1, "log_every": 1}, **keys}


@pytest.fixture(scope="module")
def baseline(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    """One uninterrupted two-round run: (output_dir, result, log lines)."""
    out = tmp_path_factory.mktemp("iterate") / "run"
    messages: list[str] = []
    return out, iterate(_config(tiny_model_dir, out), log=messages.append), messages


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _without_paths(result: dict) -> dict:
    """The numbers of a result: no seconds, no paths (two runs in two directories)."""
    rounds = [{k: v for k, v in r.items() if k not in ("model", "start_model", "seconds")} for r in result["rounds"]]
    sft = {k: v for k, v in result["sft"].items() if k in ("reward", "reward_se", "completions")}
    return {"rounds": rounds, "sft": sft}


def test_two_rounds_end_to_end(baseline, tiny_model_dir: Path) -> None:
    """Files and records of both rounds. Each pair is the letters-best against the letters-worst of its prompt's
    two completions. W + T + L = 4 eval prompts x 2 samples = 8 and win rate = (W + T/2) / 8 (e.g. W 2, T 1,
    L 5 -> 2.5 / 8 = 0.3125). Round 2 samples from and trains from round 1's model, with the SFT model as its
    DPO reference (reference: initial)."""
    import yaml

    out, result, messages = baseline
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and result["waiting"] is None
    assert json.loads((out / "rounds.json").read_text()) == result
    assert (out / "rounds.png").stat().st_size > 10_000
    letters = _letters()
    for r in rounds:
        rdir = out / f"round_{r['round']}"
        pairs = [json.loads(line) for line in (rdir / "pairs.jsonl").read_text().splitlines()]
        assert r["pairs"] == len(pairs) > 0
        completions = [json.loads(line) for line in (rdir / "completions.jsonl").read_text().splitlines()]
        assert len(completions) == 4 * 2
        for p in pairs:
            texts = [c["completion"] for c in completions if c["prompt"] == p["prompt"]]
            scores = sorted(letters("", t) for t in texts)
            assert p["score_chosen"] == scores[-1] > p["score_rejected"] == scores[0]
        assert r["wins"] + r["ties"] + r["losses"] == 8
        assert r["win_rate"] == pytest.approx((r["wins"] + r["ties"] / 2) / 8)
        assert r["win_rate_ci"][0] <= r["win_rate"] <= r["win_rate_ci"][1]
        assert r["kl"] != 0.0 and 0.0 <= r["reward"] <= 1.0
        assert sorted(p.name for p in (rdir / "stages").iterdir()) == [
            "evaluate.json", "generate.json", "label.json", "train.json"]
    assert result["sft"]["completions"] == 8 and 0.0 <= result["sft"]["reward"] <= 1.0
    assert rounds[0]["start_model"] == str(tiny_model_dir)
    assert rounds[1]["start_model"] == rounds[0]["model"] == str(out / "round_1" / "train" / "final")
    second = yaml.safe_load((out / "round_2" / "train" / "config.yaml").read_text())
    assert second["model"] == rounds[0]["model"] and second["ref_model"] == str(tiny_model_dir)
    assert yaml.safe_load((out / "round_1" / "train" / "config.yaml").read_text())["ref_model"] is None
    sampled = json.loads((out / "round_2" / "stages" / "generate.json").read_text())
    assert sampled["model"] == rounds[0]["model"]
    assert {c["model"] for c in map(json.loads, (out / "round_2" / "completions.jsonl").read_text().splitlines())} == {
        "model_1"}
    assert any(m.startswith("round 2/2 train: `train dpo` from") for m in messages)
    sft, one, two = (_weights(p) for p in (tiny_model_dir, out / "round_1/train/final", out / "round_2/train/final"))
    assert any(not torch.equal(sft[k], one[k]) for k in sft) and any(not torch.equal(one[k], two[k]) for k in one)


def test_round_two_is_trained_from_round_one(baseline, tmp_path: Path) -> None:
    """`train dpo` with round 2's own resolved config (model: round 1's final model), run again into another
    directory, gives round 2's weights exactly: round 2 started from round 1's weights."""
    from preftune.train import run

    out, _, _ = baseline
    again = run("dpo", out / "round_2" / "train" / "config.yaml", output_dir=str(tmp_path / "again"))
    theirs, ours = _weights(out / "round_2" / "train" / "final"), _weights(again)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_rerun_skips_every_finished_step(baseline, tiny_model_dir: Path) -> None:
    """The same call again: 1 + 2 x 4 steps, each "done in an earlier run"; nothing is trained or written again."""
    out, result, _ = baseline
    final = out / "round_2" / "train" / "final" / "model.safetensors"
    stamp = final.stat().st_mtime_ns
    messages: list[str] = []
    assert iterate(_config(tiny_model_dir, out), log=messages.append) == result
    assert sum("done in an earlier run" in m for m in messages) == 9
    assert not any(m.endswith(" ...") for m in messages)
    assert final.stat().st_mtime_ns == stamp
    fewer = iterate(_config(tiny_model_dir, out, rounds=1), log=messages.append)  # only rounds may change
    assert fewer["rounds"] == result["rounds"][:1]


def test_changed_keys_are_refused(baseline, tiny_model_dir: Path) -> None:
    out, _, _ = baseline
    config = _config(tiny_model_dir, out)
    config["train"] = {**config["train"], "learning_rate": 0.5}
    with pytest.raises(PreftuneError, match=r"other keys: train: .*learning_rate: 0.01.* -> .*learning_rate: 0.5"):
        iterate(config, log=lambda m: None)
    with pytest.raises(PreftuneError, match="samples_per_prompt: 2 -> 3"):
        iterate(_config(tiny_model_dir, out, samples_per_prompt=3), log=lambda m: None)


class Interrupt(Exception):
    pass


def test_interrupted_in_round_two_resumes_to_the_same_numbers(baseline, tiny_model_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Stopped right after round 2's checkpoint at step 2 (of 3); the rerun skips round 1, generate and label of
    round 2, resumes the training from step-2 and ends with exactly the uninterrupted run's weights and numbers."""
    from preftune.train import loop

    save = loop.save_checkpoint

    def save_then_stop(accelerator, state, output_dir, **kwargs):
        path = save(accelerator, state, output_dir, **kwargs)
        if Path(output_dir).parent.name == "round_2" and state.step == 2:
            raise Interrupt
        return path

    out = tmp_path / "run"
    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupt):
        iterate(_config(tiny_model_dir, out), log=lambda m: None)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "round_2" / "stages").iterdir()) == ["generate.json", "label.json"]
    assert (out / "round_2" / "train" / "checkpoints" / "step-2").is_dir()
    capsys.readouterr()
    messages: list[str] = []
    result = iterate(_config(tiny_model_dir, out), log=messages.append)
    assert f"resumed from {out / 'round_2' / 'train' / 'checkpoints' / 'step-2'} at step 2" in capsys.readouterr().err
    assert sum("done in an earlier run" in m for m in messages) == 7  # sft, round 1 (4), generate and label of 2
    base_out, base, _ = baseline
    assert _without_paths(result) == _without_paths(base)
    theirs, ours = _weights(base_out / "round_2/train/final"), _weights(out / "round_2/train/final")
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_people_label_through_the_store(tiny_model_dir: Path, tmp_path: Path) -> None:
    """judge: human. The first run loads the round's pairs (K = 2: one pair per prompt, 2 prompts) into
    round_1/annotations.db and stops (exit status 3) with the serve command; with one pair labelled it stops
    again, 1 left; with both labelled it trains. The pairs trained on are the ones people chose: response_a in
    the first pair ("left" shown as a), response_b in the second."""
    from preftune.cli import app
    from preftune.data.annotations import AnnotationStore

    out = tmp_path / "run"
    config = _config(tiny_model_dir, out, judge="human", rounds=1, prompts_per_round=2, eval_judge=LETTERS)
    config_file = tmp_path / "iterate.yaml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    runner = CliRunner()
    first = runner.invoke(app, ["iterate", str(config_file)], env={"COLUMNS": "200"})
    db = out / "round_1" / "annotations.db"
    assert first.exit_code == 3, first.output
    assert f"preftune annotate serve --db {db}" in first.output and "2 of 2 pairs still need a label" in first.output
    assert not (out / "round_1" / "stages" / "label.json").exists()
    store = AnnotationStore(db)
    pairs = store.pairs()
    assert len(pairs) == 2
    completions = [json.loads(line) for line in (out / "round_1" / "completions.jsonl").read_text().splitlines()]
    assert {(p.prompt, p.response_a, p.response_b) for p in pairs} == {
        (completions[i]["prompt"], completions[i]["completion"], completions[i + 1]["completion"]) for i in (0, 2)}

    def label(pair, choice: str) -> None:
        shown = store.assignment(pair.id, "ann")
        side = "left" if (choice == "a") == shown.left_is_a else "right"
        store.record(pair_id=pair.id, annotator="ann", side=side, order=shown.order_token)

    label(pairs[0], "a")
    messages: list[str] = []
    again = iterate(config, log=messages.append)
    assert again["waiting"]["left"] == 1 and again["waiting"]["pairs"] == 2 and again["rounds"] == []
    label(pairs[1], "b")
    done = runner.invoke(app, ["iterate", str(config_file)], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "each round's model against SFT" in done.output
    trained = [json.loads(line) for line in (out / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert [(t["chosen"], t["rejected"]) for t in trained] == [(pairs[0].response_a, pairs[0].response_b),
                                                               (pairs[1].response_b, pairs[1].response_a)]
    result = json.loads((out / "rounds.json").read_text())
    assert result["waiting"] is None and result["rounds"][0]["pairs"] == 2
    assert result["rounds"][0]["wins"] + result["rounds"][0]["ties"] + result["rounds"][0]["losses"] == 8


# ------------------------------------------------------------------------------------------------ labelling rules


def _letters():
    from preftune.models.rewards import load_function

    return load_function(LETTERS)


def _records(*groups: list[str]) -> list[dict]:
    return [{"prompt_id": i + 1, "prompt": f"p{i + 1}", "completion_id": "ABCD"[k], "completion": text}
            for i, texts in enumerate(groups) for k, text in enumerate(texts)]


def test_best_vs_worst_by_score() -> None:
    """Scores = letters share. p1: "ab" 1.0, "a1" 0.5, "12" 0.0 -> ("ab", "12"). p2: "xy" and "zw" both 1.0 ->
    dropped (tie). p3: " " (blank) and "ab": the blank is never paired, one completion left -> dropped."""
    from preftune.judges import FunctionJudge

    got = label_completions(_records(["ab", "a1", "12"], ["xy", "zw"], [" ", "ab"]), FunctionJudge(_letters()))
    assert [(r["prompt"], r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"]) for r in got.rows] == [
        ("p1", "ab", "12", 1.0, 0.0)]
    assert got.counts == {"prompts": 3, "pairs": 1, "empty_completions": 1, "prompts_under_two_completions": 1,
                          "prompts_undecided": 1}


class LongerWins:
    """A pairwise judge (not a score judge): the longer response wins, equal lengths tie."""

    name = "longer"

    def judge(self, prompts, pairs):
        return [None if len(a) == len(b) else 0 if len(a) > len(b) else 1 for a, b in pairs]

    def judge_pairs(self, prompts, pairs):  # pragma: no cover - label_completions calls judge()
        raise AssertionError


def test_reward_then_rloo_with_a_pairwise_judge(tiny_model_dir: Path, tmp_path: Path) -> None:
    """method: reward_then_rloo, one round, a pairwise judge given in memory and eval_judge: none (no win rate,
    KL and reward only): `train reward` on the round's pairs (from the SFT model), then `train rloo` from the SFT
    model against that reward model on the round's 4 prompts."""
    import yaml

    out = tmp_path / "run"
    config = _config(tiny_model_dir, out, rounds=1, method="reward_then_rloo", eval_judge="none",
                     reward_train={"max_steps": 1, "batch_size": 2, "report_to": "none", "dtype": "float32"},
                     train={"max_steps": 1, "batch_size": 2, "num_samples": 2, "report_to": "none",
                            "dtype": "float32", "sample_every": 0})
    result = iterate(config, judge=LongerWins(), log=lambda m: None)
    (record,) = result["rounds"]
    assert record["win_rate"] is None and record["wins"] is None and record["kl"] != 0.0 and "reward" in record
    assert result["config"]["judge"] == "<in memory: judge longer>"
    rdir = out / "round_1"
    reward = yaml.safe_load((rdir / "reward" / "config.yaml").read_text())
    assert reward["model"] == str(tiny_model_dir) and reward["data"] == str(rdir / "pairs.jsonl")
    rloo = yaml.safe_load((rdir / "train" / "config.yaml").read_text())
    assert rloo["reward"] == str(rdir / "reward" / "final") and rloo["model"] == str(tiny_model_dir)
    assert rloo["max_new_tokens"] == 8 and rloo["ref_model"] is None
    assert sorted(p.name for p in (rdir / "stages").iterdir()) == [
        "evaluate.json", "generate.json", "label.json", "reward.json", "train.json"]
    assert (out / "rounds.png").is_file()


def test_round_robin_of_pairwise_verdicts() -> None:
    """p1: "aaa", "a", "aa" -> points 2, 0, 1 -> ("aaa" beat "a" directly) kept. p2: "bb", "cc", "d": "bb" and
    "cc" tie (0.5 each) and both beat "d": points 1.5, 1.5, 0 -> the first of the best, "bb", against "d". p3:
    "x", "y": a tie, 0.5 each -> no winner, dropped."""
    got = label_completions(_records(["aaa", "a", "aa"], ["bb", "cc", "d"], ["x", "y"]), LongerWins())
    assert [(r["chosen"], r["rejected"], r["points_chosen"], r["points_rejected"]) for r in got.rows] == [
        ("aaa", "a", 2.0, 0.0), ("bb", "d", 1.5, 0.0)]
    assert got.counts["prompts_undecided"] == 1


# ------------------------------------------------------------------------------------------------ bad configs


@pytest.mark.parametrize(("keys", "field", "words"), [
    ({"samples_per_prompt": 1}, "samples_per_prompt", "must be >= 2"),
    ({"train": {"model": "x"}}, "train", "sets model, which iterate sets"),
    ({"train": {"bta": 0.1}}, "train.bta", "did you mean beta"),
    ({"eval_judge": "human"}, "eval_judge", "people label the training pairs only"),
    ({"judge": "human", "eval_reward": None}, "eval_judge", "is needed with judge: human"),
    ({"judge": "human:x.db"}, "judge", "without a database"),
    ({"reward_train": {"epochs": 2}}, "reward_train", "reward_then_ppo"),
    ({"eval_reward": "llm:x"}, "eval_reward", "is a reward"),
    ({"prompts": ""}, "prompts", "is required"),
    ({"judge": "examples/rewards.py:nope"}, "judge", "no function 'nope'"),
    ({"reference": "latest"}, "reference", "not one of initial, previous"),
    ({"rounds": 0}, "rounds", "must be >= 1"),
])
def test_bad_configs_are_refused_before_anything_runs(tiny_model_dir: Path, tmp_path: Path, keys, field,
                                                      words, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    with pytest.raises(PreftuneError) as info:
        iterate(_config(tiny_model_dir, out, **keys), log=lambda m: None)
    assert info.value.field == field and re.search(words, str(info.value)), str(info.value)
    assert not (out / "stages").exists()
