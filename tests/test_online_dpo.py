"""Online DPO (`preftune train online-dpo`, Guo et al. 2024) on the tiny in-process Llama: the pair selection
(best vs worst by score, and the LLM judge's round robin in both orders), the loss against core.losses, a toy
reward that rises, exact resume with pairs.jsonl truncated, the tied-everything step, the configs and the CLI.

The toy task is test_train_online.py's: the reward is the share of ASCII letters in the completion (1.0 at
best); the random tiny model writes about half letters. 8-token completions, 8 prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from preftune.core.losses import preference_loss
from preftune.errors import PreftuneError
from preftune.models.llm_judge import PairwiseLLM
from preftune.train import resolve_config
from preftune.train.loop import read_metrics, train
from preftune.train.online_dpo import (
    OnlineDPOMethod,
    best_and_worst,
    judge_scores,
    pair_loss,
    round_robin,
    tournament_points,
)
from run_helpers import interrupt_at

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Shall I compare thee to a summer's day?", "To be, or not to be, that is the question:",
           "The quick brown fox jumps over the lazy dog.", "Please write a short poem about the sea.",
           "Question: what colour is the sky? Answer:", "Rough winds do shake the darling buds of May,",
           "What is the answer?", "Here is a poem about the sea and the sky."]
HELDOUT = ["Thou art more lovely and more temperate:", "Whether 'tis nobler in the mind to suffer",
           "Question: what is two plus two? Answer:", "The slings and arrows of outrageous fortune,"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def letters(prompt: str, completion: str) -> float:
    return sum(c.isascii() and c.isalpha() for c in completion) / max(len(completion), 1)


def _keys(model: Path, out: Path, **keys):
    return {"model": str(model), "output_dir": str(out), "batch_size": 4, "max_new_tokens": 8, "max_length": 64,
            "learning_rate": 3e-2, "lr_scheduler": "constant", "log_every": 1, "report_to": "none",
            "dtype": "float32", "sample_every": 0, "seed": 0, **keys}


def _pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ selection


def test_best_and_worst_on_hand_made_scores():
    """Per group of K scores: chosen = the FIRST of the highest, rejected = the FIRST of the lowest; a group
    whose scores are all equal ties (no pair; both indices 0).

        [0.1, 0.7, 0.3]  -> chosen 1 (0.7), rejected 0 (0.1)
        [2, 2, 1]        -> chosen 0 (the first 2), rejected 2
        [-1, 5, 5, -1]   -> chosen 1 (the first 5), rejected 0 (the first -1)
        [1, 1, 1]        -> tied
    """
    assert best_and_worst([[0.1, 0.7, 0.3], [2, 2, 1], [-1, 5, 5, -1], [1, 1, 1]]) == (
        [1, 0, 1, 0], [0, 2, 0, 0], [False, False, False, True])
    assert best_and_worst(torch.tensor([[0.25, 0.25], [0.0, 0.5]]).tolist()) == ([0, 1], [0, 0], [True, False])


def test_tournament_points_by_hand():
    """K = 3, games (0,1), (0,2), (1,2) in that order; a win is 1, a tie 1/2 to each:

        verdicts 0, 1, 1      -> 0 beats 1, 2 beats 0, 2 beats 1: points [1, 0, 2]: chosen 2, rejected 1
        verdicts None, 1, 1   -> 0 and 1 tie, 2 beats both: [0.5, 0.5, 2]: chosen 2, rejected 0 (first lowest)
        verdicts 0, 1, 0      -> a cycle (0 > 1 > 2 > 0): [1, 1, 1]: tied, no pair
        K = 2, verdict None   -> [0.5, 0.5]: tied
    """
    assert round_robin(3) == [(0, 1), (0, 2), (1, 2)] and round_robin(2) == [(0, 1)]
    assert tournament_points([0, 1, 1], 3) == [1.0, 0.0, 2.0]
    assert tournament_points([None, 1, 1], 3) == [0.5, 0.5, 2.0]
    assert tournament_points([0, 1, 0], 3) == [1.0, 1.0, 1.0]
    assert tournament_points([None], 2) == [0.5, 0.5]
    assert best_and_worst([[1.0, 0.0, 2.0], [0.5, 0.5, 2.0], [1.0, 1.0, 1.0]]) == (
        [2, 2, 0], [1, 0, 0], [False, False, True])
    with pytest.raises(PreftuneError, match="answered 2"):
        tournament_points([2], 2)


def test_judge_scores_run_the_round_robin_on_a_fake_judge():
    """Two prompts x K = 3 completions, a fake judge that prefers the longer text (equal lengths tie), called
    once for the whole rollout with every pair (i < j) of each prompt and that prompt's text.

        prompt p: "aa", "a", "aaa"  -> games (aa, a): 0, (aa, aaa): 1, (a, aaa): 1 -> [1, 0, 2]
        prompt q: "bb", "cc", "d"   -> games (bb, cc): tie, (bb, d): 0, (cc, d): 0  -> [1.5, 1.5, 0]
    """
    calls = []

    def longer(prompts, pairs):
        calls.append((list(prompts), list(pairs)))
        return [None if len(a) == len(b) else int(len(b) > len(a)) for a, b in pairs]

    texts = ["aa", "a", "aaa", "bb", "cc", "d"]
    points = judge_scores(longer, ["p", "p", "p", [{"role": "user", "content": "q"}]] + ["q", "q"], texts, k=3)
    assert points == [1.0, 0.0, 2.0, 1.5, 1.5, 0.0]
    assert len(calls) == 1 and calls[0][0] == ["p"] * 3 + ["q"] * 3  # chat messages become their text
    assert calls[0][1] == [("aa", "a"), ("aa", "aaa"), ("a", "aaa"), ("bb", "cc"), ("bb", "d"), ("cc", "d")]
    assert best_and_worst([points[:3], points[3:]]) == ([2, 0], [1, 2], [False, False])


def test_the_llm_judge_judges_both_orders_in_the_tournament():
    """models.llm_judge.PairwiseLLM, as `judge_model` builds it, with a scorer instead of a model:

    * a judge that always says "Response 1" prefers a in (a, b) and b in (b, a): every game is a tie, the
      points are all (K - 1)/2 = 1 and the prompt is skipped;
    * a judge that prefers the response containing "good" agrees with itself in both orders: "good" wins both
      its games (2 points), the other two tie with each other (1/2 + 0 each)."""
    biased = PairwiseLLM(scorer=lambda texts: [(-0.1, -2.3)] * len(texts))
    points = judge_scores(lambda p, pairs: biased.verdicts(p, pairs)[0], ["x"] * 3, ["u", "v", "w"], k=3)
    assert points == [1.0, 1.0, 1.0] and best_and_worst([points])[2] == [True]

    def good(texts):
        first = [t.split("Response 1: ")[1].split("\n\nResponse 2:")[0] for t in texts]
        return [(-0.2, -1.5) if "good" in f else (-1.5, -0.2) for f in first]

    judge = PairwiseLLM(scorer=good)
    points = judge_scores(lambda p, pairs: judge.verdicts(p, pairs)[0], ["x"] * 3, ["meh", "good", "bad"], k=3)
    assert points == [0.5, 2.0, 0.5]
    assert best_and_worst([points]) == ([1], [0], [False])


# ------------------------------------------------------------------------------------------------ the loss


def test_pair_loss_is_core_dpo_by_hand():
    """Pair 1: log pi(y+) = -1.0 (two tokens of -0.5), log pi(y-) = -2.0, both reference log-probs -1.5,
    beta 0.1: h = (-1 + 1.5) - (-2 + 1.5) = 1, loss = -log sigma(0.1) = log(1 + e^-0.1) = 0.644397.
    Pair 2 is a tied prompt's stand-in (weight 0): no loss and no metric, whatever its log-probs."""
    config = resolve_config("online-dpo", {"model": "m", "beta": 0.1})
    logps = torch.tensor([[-0.5, -0.5], [-3.0, -0.2], [-1.0, -1.0], [-0.1, 0.0]], dtype=torch.float64)
    batch = {"response_mask": torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]),
             "ref_chosen_logps": torch.tensor([-1.5, -9.0]), "ref_rejected_logps": torch.tensor([-1.5, 0.0]),
             "weight": torch.tensor([1.0, 0.0])}
    losses, metrics = pair_loss(logps, None, batch, config)
    assert losses.tolist() == pytest.approx([0.644397, 0.0], abs=1e-6)
    core = preference_loss("dpo", policy_chosen_logps=torch.tensor([-1.0], dtype=torch.float64),
                           policy_rejected_logps=torch.tensor([-2.0], dtype=torch.float64),
                           ref_chosen_logps=torch.tensor([-1.5], dtype=torch.float64),
                           ref_rejected_logps=torch.tensor([-1.5], dtype=torch.float64), beta=0.1)
    assert float(losses[0]) == float(core.losses[0])
    assert {k: round(float(v), 6) for k, v in metrics.items()} == {
        "rewards/chosen": 0.05, "rewards/rejected": -0.05, "rewards/margins": 0.1, "rewards/accuracies": 1.0,
        "logps/chosen": -1.0, "logps/rejected": -2.0}


def _by_hand(config):
    """setup + before_step(0) + collate outside the loop, on one accelerator; returns method, batch."""
    from accelerate import Accelerator

    from preftune.train.base import RunContext
    from preftune.train.loop import _release

    accelerator = Accelerator(cpu=True)
    method = OnlineDPOMethod(prompts=PROMPTS, reward_fn=letters)
    method.setup(RunContext(config=config, accelerator=accelerator, output_dir=Path(config.output_dir),
                            log=lambda message: None))
    batch = method.collate(method.before_step(method.model, 0))
    _release(accelerator)
    return method, batch


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_the_step_loss_is_core_losses_on_the_same_log_probs(loss, float64_model_dir, tmp_path):
    """The first rollout (K = 3, temperature 0.7, float64): each prompt's pair is its best and worst completion
    by the reward, the reference log-probs the rollout kept are those of the starting model, and, after the
    policy has moved (its lm_head perturbed), the step's loss is core.losses' on log-probs computed here:
    sum over kept pairs / their number. Before it moved (pi == pi_ref) a DPO pair's loss is log 2 = 0.693147."""
    from preftune.core.forward import forward_logits
    from preftune.models import load_policy
    from preftune.train.rollout import response_logps

    config = resolve_config("online-dpo", _keys(float64_model_dir, tmp_path, num_samples=3, dtype="auto",
                                                temperature=0.7, max_steps=1, loss=loss))
    method, batch = _by_hand(config)
    items, n = method.buffer["items"], len(method.buffer["items"])
    texts = method.tokenizer.batch_decode([i["chosen"] for i in items] + [i["rejected"] for i in items],
                                          skip_special_tokens=True)
    weight = batch["weight"]
    kept = float(weight.sum())
    assert n == 4 and kept > 0 and method.units(batch) == kept
    for k, item in enumerate(items):  # chosen = the best by the reward; tied prompts weigh 0
        assert float(item["score_chosen"]) == pytest.approx(letters("", texts[k]), abs=1e-6)
        assert float(item["score_rejected"]) == pytest.approx(letters("", texts[n + k]), abs=1e-6)
        assert (float(item["score_chosen"]) > float(item["score_rejected"])) == bool(weight[k])

    def sums(model):
        return response_logps(forward_logits(model, batch), batch, temperature=0.7).sum(-1)

    with torch.no_grad():
        ref = sums(load_policy(str(float64_model_dir)))
    torch.testing.assert_close(torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]), ref,
                               rtol=0, atol=1e-10)
    if loss == "dpo":
        step = method.loss(method.model, batch, normaliser=kept)
        assert float(step.loss.detach()) == pytest.approx(math.log(2), abs=1e-10)
    with torch.no_grad():
        head = method.model.policy.lm_head.weight
        head.add_(0.05 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0), dtype=head.dtype))
        policy = sums(method.model)
    counts = batch["response_mask"].sum(-1)
    core = preference_loss(loss, policy_chosen_logps=policy[:n], policy_rejected_logps=policy[n:],
                           ref_chosen_logps=ref[:n], ref_rejected_logps=ref[n:], chosen_lengths=counts[:n],
                           rejected_lengths=counts[n:])
    step = method.loss(method.model, batch, normaliser=kept)
    expected = (core.losses * weight).sum() / kept
    assert abs(float(expected) - math.log(2)) > 1e-3  # the policy moved: a real test
    assert float(step.loss.detach()) == pytest.approx(float(expected), abs=1e-10)


# ------------------------------------------------------------------------------------------------ training


def _measure(model_dir: Path, reference_dir: Path) -> dict[str, float]:
    """Mean toy reward and KL of 8 samples on each held-out prompt (32 completions, fixed seeds)."""
    from preftune.models import load_policy, load_tokenizer
    from preftune.models.rewards import load_scorer
    from preftune.train.rollout import evaluate_policy

    tokenizer = load_tokenizer(str(reference_dir))
    policy, reference = load_policy(str(model_dir), tokenizer=tokenizer), load_policy(str(reference_dir))
    return evaluate_policy(policy, reference, tokenizer, HELDOUT, load_scorer(letters), num_samples=8,
                           max_new_tokens=8, seed=123)


def test_online_dpo_raises_the_reward_and_writes_its_pairs(tiny_model_dir, tmp_path):
    """12 steps, K = 4, beta 0.1: the held-out reward (32 fixed-seed completions) rises by more than 5 standard
    errors of the difference (about 13 when written; random drift moves it by about one) and the policy has
    left the reference. The first step's loss is log 2 (pi == pi_ref). Every step logs the DPO metrics and
    the rollout's; pairs.jsonl holds each rollout's kept pairs, chosen scoring higher than rejected."""
    out = tmp_path / "run"
    final = train(OnlineDPOMethod(prompts=PROMPTS, reward_fn=letters),
                  resolve_config("online-dpo", _keys(tiny_model_dir, out, num_samples=4, max_steps=12, beta=0.1)))
    before, after = _measure(tiny_model_dir, tiny_model_dir), _measure(final, tiny_model_dir)
    assert after["reward"] - before["reward"] > 5 * math.hypot(before["reward_se"], after["reward_se"]), (before,
                                                                                                          after)
    assert before["kl"] == 0.0 and after["kl"] > 0.1
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and records[0]["objective/kl"] == 0.0
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected", "objective/scores", "objective/kl", "pairs/kept", "pairs/tied"):
        assert all(math.isfinite(r[name]) for r in records), name
    assert all(r["pairs/kept"] + r["pairs/tied"] == 4 for r in records)
    assert not any(k in records[0] for k in ("objective/kl_coef", "objective/rlhf_reward"))  # no KL shaping
    pairs = _pairs(out / "pairs.jsonl")
    assert [p["step"] for p in pairs] == [s for r in records for s in [r["step"] - 1] * int(r["pairs/kept"])]
    for p in pairs:
        assert set(p) == {"step", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "judge"}
        assert p["judge"] == "function:letters" and p["prompt"] in PROMPTS
        assert p["score_chosen"] > p["score_rejected"]
        assert p["score_chosen"] == pytest.approx(letters("", p["chosen"]), abs=1e-6)




def test_resume_in_the_middle_of_a_rollout_is_exact_and_truncates_pairs(tiny_model_dir, tmp_path):
    """6 steps straight == Ctrl-C during step 3, checkpoint, resume. A rollout serves 2 steps (2 passes), so
    step 4 trains on the rollout made at step 3, restored from the checkpoint. pairs.jsonl is cut back to the
    checkpoint's step on resume: a record of a later step (as a run killed after writing it leaves) and a torn
    last line are dropped, so both runs end with the same pairs, samples, metrics and weights."""
    from safetensors.torch import load_file

    keys = _keys(tiny_model_dir, tmp_path / "straight", num_samples=2, update_epochs=2, max_steps=6,
                 sample_every=2, save_every=100, beta=0.1)
    train(OnlineDPOMethod(prompts=PROMPTS, reward_fn=letters), resolve_config("online-dpo", keys))
    resumed = {**keys, "output_dir": str(tmp_path / "resumed")}
    with pytest.raises(KeyboardInterrupt):
        train(interrupt_at(OnlineDPOMethod(prompts=PROMPTS, reward_fn=letters), 2),
              resolve_config("online-dpo", resumed))
    assert (tmp_path / "resumed" / "checkpoints" / "step-3" / "method_state_0.pt").is_file()
    pairs = tmp_path / "resumed" / "pairs.jsonl"
    assert sorted({p["step"] for p in _pairs(pairs)}) == [0, 2]
    with pairs.open("a") as f:
        f.write(json.dumps({**_pairs(pairs)[0], "step": 4}) + "\n" + '{"step": 4, "prompt": "torn')
    train(OnlineDPOMethod(prompts=PROMPTS, reward_fn=letters), resolve_config("online-dpo", resumed))

    def curve(run):
        return [{k: v for k, v in r.items() if k != "tokens_per_second"}
                for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    assert [r["step"] for r in curve("resumed")] == [1, 2, 3, 4, 5, 6]
    assert curve("resumed") == curve("straight")
    for name in ("pairs.jsonl", "samples.jsonl"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "straight" / name).read_text(), name
    assert sorted({p["step"] for p in _pairs(pairs)}) == [0, 2, 4]
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_step_whose_prompts_all_tie_trains_on_nothing(tiny_model_dir, tmp_path, capsys):
    """A constant reward ties every prompt's K completions: pairs/tied = 4, pairs/kept = 0, nothing in
    pairs.jsonl, the loss and every DPO metric 0, the skip said in the log, and the weights unchanged (a zero
    gradient's first AdamW step is 0 / (0 + eps) = 0, no weight decay)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    final = train(OnlineDPOMethod(prompts=PROMPTS, reward_fn=lambda prompt, completion: 1.0),
                  resolve_config("online-dpo", _keys(tiny_model_dir, out, max_steps=1)))
    record = read_metrics(out / "metrics.jsonl")[0]
    assert record["pairs/tied"] == 4 and record["pairs/kept"] == 0 and record["loss"] == 0.0
    assert record["rewards/margins"] == 0.0 and record["logps/chosen"] == 0.0
    assert (out / "pairs.jsonl").read_text() == ""
    captured = capsys.readouterr()
    assert "4 of 4 prompts skipped, their 2 completions all tie" in captured.out + captured.err
    start, end = load_file(tiny_model_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_an_llm_judge_in_memory_picks_the_pairs(tiny_model_dir, tmp_path):
    """`judge=preftune.judges.LLMJudge(...)` (here with a scorer that reads the two responses out of the filled
    template and favours the one with the larger share of letters, in either position) replaces judge_model:
    2 steps with K = 3, each prompt's completions play a round robin in both orders, and every kept pair's
    chosen completion has more letters than its rejected one, with points that are halves in [0, 2]."""
    from preftune.judges import LLMJudge

    def by_letters(texts):
        out = []
        for t in texts:
            first, second = t.split("Response 1: ")[1].split("\n\nResponse 2: ")
            second = second.split("\n\nThe better response is Response")[0]
            out.append((letters("", first), letters("", second)))
        return out

    out = tmp_path / "run"
    train(OnlineDPOMethod(prompts=PROMPTS, judge=LLMJudge(scorer=by_letters)),
          resolve_config("online-dpo", _keys(tiny_model_dir, out, num_samples=3, max_steps=2)))
    records = read_metrics(out / "metrics.jsonl")
    assert all(r["pairs/kept"] + r["pairs/tied"] == 4 for r in records)
    assert all(r["objective/scores"] == pytest.approx(1.0) for r in records)  # 3 games, 3 points, 3 players
    pairs = _pairs(out / "pairs.jsonl")
    assert len(pairs) == sum(r["pairs/kept"] for r in records) > 0
    for p in pairs:
        assert p["judge"] == "llm" and letters("", p["chosen"]) > letters("", p["rejected"])
        assert {2 * p["score_chosen"], 2 * p["score_rejected"]} <= {0.0, 1.0, 2.0, 3.0, 4.0}


# ------------------------------------------------------------------------------------------------ config, CLI


@pytest.mark.parametrize(("keys", "field", "message"), [
    ({"kl_coef": 0.1}, "kl_coef", "is not used by online DPO"),
    ({"kl_target": 1.0}, "kl_target", "is not used by online DPO"),
    ({"num_samples": 1}, "num_samples", "must be >= 2"),
    ({"loss": "dpoo"}, "loss", "unknown loss 'dpoo'"),
    ({"loss": "simpo", "label_smoothing": 0.1}, "label_smoothing", "has no hyperparameter 'label_smoothing'"),
    ({"beta": 0.0}, "beta", "must be > 0"),
    ({"whiten_advantages": True}, "whiten_advantages", "is not used by online DPO"),
    ({"judge_model": "j", "reward": "r"}, "judge_model", "cannot be used together with reward"),
    ({"judge_template": "{prompt}"}, "judge_template", "is used only with judge_model"),
    ({"judge_model": "j", "judge_template": "{prompt} {response_1}"}, "judge_template", "lacks {response_2}"),
    ({"judge_labels": [" A", " A"]}, "judge_labels", "two different"),
])
def test_config_errors_name_the_key(keys, field, message):
    with pytest.raises(PreftuneError, match=message) as info:
        resolve_config("online-dpo", {"model": "m", **keys})
    assert info.value.field == field


def test_beta_is_dpo_beta_not_the_kl_coefficient():
    """OnlineConfig maps `beta` to kl_coef (the KL penalty's beta); online DPO's beta is the loss's."""
    config = resolve_config("online-dpo", {"model": "m", "beta": 0.3, "loss": "ipo"})
    assert config.beta == 0.3 and config.kl_coef == 0.0 and config.loss_hparams() == {"beta": 0.3}
    assert "beta" not in type(config).aliases and type(config).aliases["loss_type"] == "loss"


def test_cli_help_and_an_llm_judged_run(tiny_model_dir, tmp_path, monkeypatch):
    """`preftune train online-dpo --help` lists the keys; a run with `judge_model` (the tiny random LM as the
    judge, every pair of K = 3 in both orders) trains a step: each prompt is kept or tied, and pairs.jsonl
    names the judge and holds round-robin points (0 to K - 1 = 2, in halves). (The random judge favours a
    position, so its verdicts mostly disagree between the orders and tie: when written, every prompt tied.)"""
    from typer.testing import CliRunner

    from preftune.cli import app

    result = CliRunner().invoke(app, ["train", "online-dpo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for key in ("--loss", "--beta", "--num_samples", "--judge_model", "--judge_template", "--judge_labels"):
        assert f"{key} " in result.output, key
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "online-dpo", "--model", str(tiny_model_dir), "--data",
                                      "examples/data/prompts.txt", "--judge_model", str(tiny_model_dir),
                                      "--output_dir", str(out), "--num_samples", "3", "--batch_size", "4",
                                      "--max_new_tokens", "4", "--max_length", "64", "--max_steps", "1",
                                      "--report_to", "none", "--log_every", "1"])
    assert result.exit_code == 0, result.output
    record = read_metrics(out / "metrics.jsonl")[0]
    assert record["pairs/kept"] + record["pairs/tied"] == 4
    assert record["objective/scores"] == pytest.approx(1.0)  # the points of a round robin of 3 average (3-1)/2
    pairs = _pairs(out / "pairs.jsonl")
    assert len(pairs) == record["pairs/kept"]
    for p in pairs:
        assert p["judge"] == f"llm:{tiny_model_dir}" and p["score_chosen"] > p["score_rejected"]
        assert {2 * p["score_chosen"], 2 * p["score_rejected"]} <= {0.0, 1.0, 2.0, 3.0, 4.0}
