"""MaxMin policy optimisation (issue 12): several rewards in the online methods.

The math on hand-made batches (``preftune.core.rl``): ``maxmin`` picks the group with the lowest
KL-regularised objective, ``min`` the per-sample minimum, ``mean`` and ``weighted`` the (weighted)
averages. Then runs of RLOO on the tiny in-process model with two function rewards: the standardisation
uses the starting policy's statistics, the metrics are logged and agree with the samples, one reward in
``rewards`` is exactly a plain ``reward`` run, and a maxmin run stopped mid-rollout resumes bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.train import resolve_config
from preftune.train.loop import read_metrics, train
from preftune.train.rloo import RLOOMethod
from run_helpers import interrupt_at

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Shall I compare thee to a summer's day?", "To be, or not to be, that is the question:",
           "The quick brown fox jumps over the lazy dog.", "Please write a short poem about the sea.",
           "Question: what colour is the sky? Answer:", "Rough winds do shake the darling buds of May,",
           "What is the answer?", "Here is a poem about the sea and the sky."]
REWARDS = '''
def letters(prompt, completion):
    return sum(c.isascii() and c.isalpha() for c in completion) / max(len(completion), 1)


def spaces(prompt, completion):  # on another scale on purpose: 10 x the share of spaces
    return 10.0 * sum(c == " " for c in completion) / max(len(completion), 1)
'''


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


@pytest.fixture
def reward_file(tmp_path: Path) -> Path:
    path = tmp_path / "group_rewards.py"
    path.write_text(REWARDS, encoding="utf-8")
    return path


def _keys(model: Path, out: Path, **keys):
    return {"model": str(model), "output_dir": str(out), "batch_size": 4, "max_new_tokens": 8, "max_length": 64,
            "learning_rate": 3e-2, "lr_scheduler": "constant", "log_every": 1, "report_to": "none",
            "dtype": "float32", "kl_coef": 0.1, "sample_every": 0, "seed": 0, "num_samples": 2, **keys}


def _samples(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ the math

# three groups, four completions (B = 4), beta = 0.5
SCORES = torch.tensor([[1.0, 0.0, 2.0, 1.0],     # a: mean 1.0
                       [0.5, 0.5, 0.0, 1.0],     # b: mean 0.5
                       [2.0, -1.0, 0.0, 0.6]],   # c: mean 0.4
                      dtype=torch.float64)
KL = torch.tensor([0.2, 0.4, 0.0, 0.2], dtype=torch.float64)  # mean 0.2


def test_maxmin_picks_the_group_with_the_lowest_objective():
    """F_u = mean_b r_u - beta * mean_b KL_b = (1.0, 0.5, 0.4) - 0.5 * 0.2 = (0.9, 0.4, 0.3): group c (2) is
    the worst off, so every completion gets c's reward (2.0, -1.0, 0.0, 0.6) -- although c is not the
    lowest reward of completion 0 (b's 0.5 is). The KL term is shared, so no beta changes the choice; a
    tie goes to the lowest index."""
    from preftune.core.rl import aggregate_rewards, maxmin_group, maxmin_objectives

    objectives = maxmin_objectives(SCORES.mean(-1), KL.mean(), kl_coef=0.5)
    torch.testing.assert_close(objectives, torch.tensor([0.9, 0.4, 0.3], dtype=torch.float64))
    assert maxmin_group(objectives) == 2
    expected = torch.tensor([2.0, -1.0, 0.0, 0.6], dtype=torch.float64)
    assert torch.equal(aggregate_rewards(SCORES, "maxmin", objectives=objectives), expected)
    assert torch.equal(aggregate_rewards(SCORES, "maxmin"), expected)  # objectives default to the means
    for beta in (0.0, 3.0):
        assert maxmin_group(maxmin_objectives(SCORES.mean(-1), KL.mean(), kl_coef=beta)) == 2
    assert maxmin_group(torch.tensor([0.3, 0.1, 0.1])) == 1


def test_min_mean_and_weighted_aggregations():
    """min per completion: (min(1, .5, 2), min(0, .5, -1), min(2, 0, 0), min(1, 1, .6)) = (.5, -1, 0, .6);
    mean: (3.5, -0.5, 2, 2.6) / 3; weighted (2, 1, 1): (2 r_a + r_b + r_c) / 4 = (1.125, -0.125, 1.0, 0.9);
    weights (1, 1, 1) are the mean. Standardisation: (r_u - m_u) / s_u per row."""
    from preftune.core.rl import aggregate_rewards, standardize

    f64 = {"dtype": torch.float64}
    torch.testing.assert_close(aggregate_rewards(SCORES, "min"), torch.tensor([0.5, -1.0, 0.0, 0.6], **f64))
    torch.testing.assert_close(aggregate_rewards(SCORES, "mean"), torch.tensor([3.5, -0.5, 2.0, 2.6], **f64) / 3)
    torch.testing.assert_close(aggregate_rewards(SCORES, "weighted", [2.0, 1.0, 1.0]),
                               torch.tensor([1.125, -0.125, 1.0, 0.9], **f64))
    torch.testing.assert_close(aggregate_rewards(SCORES, "weighted", [1.0, 1.0, 1.0]),
                               aggregate_rewards(SCORES, "mean"))
    torch.testing.assert_close(standardize(SCORES, torch.tensor([1.0, 0.5, 0.4]), torch.tensor([2.0, 1.0, 0.5])),
                               torch.tensor([[0.0, -0.5, 0.5, 0.0], [0.0, 0.0, -0.5, 0.5], [3.2, -2.8, -0.8, 0.4]],
                                            **f64))
    for how, weights in (("weighted", None), ("weighted", [1.0, -1.0, 1.0]), ("weighted", [0.0, 0.0, 0.0]),
                         ("median", None)):
        with pytest.raises(ValueError):
            aggregate_rewards(SCORES, how, weights)


def test_the_config_lists_the_same_aggregations_as_the_math():
    from preftune.core.rl import AGGREGATIONS
    from preftune.train.multireward import AGGREGATIONS as KEYS

    assert KEYS == AGGREGATIONS


# ------------------------------------------------------------------------------------------------ the keys


def test_default_reward_names():
    from preftune.train.multireward import default_reward_names

    assert default_reward_names(["rules.py:concise", "runs/rm_a/final", "org/rm-b", "runs/em/final/mixture-1"]) == [
        "concise", "rm_a", "rm-b", "mixture-1"]
    assert default_reward_names(["a.py:score", "b.py:score"]) == ["score_0", "score_1"]


TWO = ["a.py:f", "b.py:g"]


@pytest.mark.parametrize(("keys", "field", "message"), [
    ({"reward": "a.py:f", "rewards": TWO}, "rewards", "cannot be used together with reward"),
    ({"rewards": []}, "rewards", "is an empty list"),
    ({"rewards": TWO, "reward_names": ["x"]}, "reward_names", "has 1 names for 2 rewards"),
    ({"rewards": TWO, "reward_names": ["x", "x"]}, "reward_names", "'x' more than once"),
    ({"rewards": TWO, "reward_names": ["x", "a/b"]}, "reward_names", "cannot name a reward"),
    ({"reward": "a.py:f", "reward_names": ["x"]}, "reward_names", "names the entries of `rewards`"),
    ({"reward": "a.py:f", "reward_aggregation": "maxmin"}, "reward_aggregation", "list them under `rewards`"),
    ({"rewards": TWO, "reward_aggregation": "maxmn"}, "reward_aggregation", "did you mean 'maxmin'"),
    ({"rewards": TWO, "reward_weights": [1.0, 1.0]}, "reward_weights", "only with reward_aggregation: weighted"),
    ({"rewards": TWO, "reward_aggregation": "weighted"}, "reward_weights", "is required with reward_aggregation"),
    ({"rewards": TWO, "reward_aggregation": "weighted", "reward_weights": [1.0, 2.0, 3.0]}, "reward_weights",
     "has 3 weights for 2 rewards"),
    ({"rewards": TWO, "reward_aggregation": "weighted", "reward_weights": [1.0, -1.0]}, "reward_weights",
     ">= 0 with a positive sum"),
    ({"rewards": TWO, "reward_aggregation": "weighted", "reward_weights": [0.0, 0.0]}, "reward_weights",
     ">= 0 with a positive sum"),
    ({"rewards": TWO, "reward_standardize_prompts": -1}, "reward_standardize_prompts", "must be >= 0"),
])
def test_reward_key_errors_name_the_key(keys, field, message):
    with pytest.raises(PreftuneError, match=message) as info:
        resolve_config("rloo", {"model": "m", **keys})
    assert info.value.field == field


def test_rewards_on_the_command_line_and_in_preflight(tmp_path, reward_file):
    """A list on the command line: comma-separated or YAML. ``rewards`` stands in for the required
    ``reward``; preflight checks each entry and names it."""
    from preftune.config import load_config
    from preftune.train.rloo import RLOOConfig

    for text in (f"{reward_file}:letters,{reward_file}:spaces", f"[{reward_file}:letters, {reward_file}:spaces]"):
        config = load_config(RLOOConfig, None, ["--model", "m", "--rewards", text, "--reward_aggregation", "weighted",
                                                "--reward_weights", "3,1"])
        assert config.rewards == [f"{reward_file}:letters", f"{reward_file}:spaces"]
        assert config.reward_weights == [3.0, 1.0]
        config.check_required(config.required_on_cli[:1] + ("reward",))
        config.preflight()
    config = resolve_config("rloo", {"model": "m", "rewards": [f"{reward_file}:letters", str(tmp_path / "no.py:f")]})
    with pytest.raises(PreftuneError, match=r"rewards\[1\].*no such file") as info:
        config.preflight()
    assert info.value.field == "rewards"


# ------------------------------------------------------------------------------------------------ runs


def test_rewards_are_standardised_with_the_starting_policys_statistics(tiny_model_dir, tmp_path, reward_file):
    """reward_stats.json holds each reward's mean and std (n - 1) over 3 prompts (the seeded choice,
    stream 3) x 2 completions sampled from the starting model (seeds of stream 2), recomputed here from the
    tiny model itself; every rollout of the run (rows of steps 0, 1 and 2) is scored with those same
    numbers: score = mean_u (r_u - m_u) / s_u, r_u the raw scores in samples.jsonl."""
    from preftune.models import load_policy, load_tokenizer
    from preftune.models.sampling import GenerationSettings
    from preftune.train.rollout import encode_prompts, rollout_seed, sample_responses

    out = tmp_path / "run"
    specs = [f"{reward_file}:letters", f"{reward_file}:spaces"]
    keys = _keys(tiny_model_dir, out, rewards=specs, reward_standardize_prompts=3, max_steps=3, sample_every=1,
                 sample_rows=8)
    train(RLOOMethod(prompts=PROMPTS), resolve_config("rloo", keys))
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["names"] == ["letters", "spaces"] and stats["prompts"] == 3 and stats["samples"] == 6

    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_policy(str(tiny_model_dir), tokenizer=tokenizer)
    queries = [torch.tensor(q) for q in encode_prompts(tokenizer, PROMPTS, template="raw", max_tokens=56)[0]]
    chosen = torch.randperm(8, generator=torch.Generator().manual_seed(rollout_seed(0, 0, 0, stream=3)))[:3].tolist()
    rows = [i for i in chosen for _ in range(2)]
    responses = sample_responses(policy, tokenizer, [queries[i] for i in rows],
                                 seeds=[rollout_seed(0, 0, j, stream=2) for j in range(6)],
                                 settings=GenerationSettings(max_new_tokens=8, seed=0), batch_size=8)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    namespace: dict = {}
    exec(REWARDS, namespace)  # noqa: S102 - the test's own two functions
    for u, name in enumerate(("letters", "spaces")):
        raw = torch.tensor([namespace[name](PROMPTS[i], t) for i, t in zip(rows, texts, strict=True)],
                           dtype=torch.float32).double()
        assert stats["mean"][u] == pytest.approx(float(raw.mean()), rel=1e-12)
        assert stats["std"][u] == pytest.approx(float(raw.std()), rel=1e-12)
        assert stats["std"][u] > 0

    samples = _samples(out)
    assert sorted({s["step"] for s in samples}) == [0, 1, 2] and len(samples) == 24
    for s in samples:
        scaled = [(s["reward_scores"][n] - m) / sd for n, m, sd in zip(stats["names"], stats["mean"], stats["std"],
                                                                       strict=True)]
        assert s["score"] == pytest.approx(sum(scaled) / 2, abs=1e-6)
    records = read_metrics(out / "metrics.jsonl")
    first = [s for s in samples if s["step"] == 0]
    for name in ("letters", "spaces"):  # the first rollout's 8 completions are all in samples.jsonl
        assert records[0][f"objective/scores/{name}"] == pytest.approx(
            sum(s["reward_scores"][name] for s in first) / 8, abs=1e-6)
    assert not any(k.startswith("maxmin/") for k in records[0])  # mean: no group is chosen




def test_maxmin_rloo_logs_the_chosen_group_and_resumes_exactly(tiny_model_dir, tmp_path, reward_file, monkeypatch):
    """maxmin with two rewards on RLOO, 6 steps, a rollout every 2 steps: each rollout's maxmin/group is the
    argmin of its logged maxmin/objective/<name>, maxmin/chosen/<name> the running share of the rollouts
    that chose it, the rollout's completions are scored with that group's standardised reward, and the
    policy trains (its weights move). Ctrl-C during step 3 (the first step of the second rollout), then
    resume: the same metrics, samples and final weights, with the statistics restored from the checkpoint
    (computing them again would fail here)."""
    from safetensors.torch import load_file

    from preftune.train.multireward import RewardSet

    specs = [f"{reward_file}:letters", f"{reward_file}:spaces"]
    keys = _keys(tiny_model_dir, tmp_path / "straight", rewards=specs, reward_names=["alpha", "space"],
                 reward_aggregation="maxmin", reward_standardize_prompts=4, update_epochs=2, max_steps=6,
                 sample_every=2, sample_rows=8, save_every=100, kl_target=1.0, kl_horizon=100.0)
    train(RLOOMethod(prompts=PROMPTS), resolve_config("rloo", keys))
    straight = tmp_path / "straight"
    records = read_metrics(straight / "metrics.jsonl")
    stats = json.loads((straight / "reward_stats.json").read_text())
    names, counts = ["alpha", "space"], [0, 0]
    for k, r in enumerate(records):
        objectives = [r[f"maxmin/objective/{n}"] for n in names]
        group = int(r["maxmin/group"])
        assert group == min(range(2), key=lambda u: (objectives[u], u))
        assert r["objective/scores"] == pytest.approx(
            objectives[group] + r["objective/kl_coef"] * r["objective/kl"], abs=1e-6)
        if k % 2 == 0:
            counts[group] += 1
        assert [r[f"maxmin/chosen/{n}"] for n in names] == [c / sum(counts) for c in counts]
        assert {f"objective/scores/{n}" for n in names} <= set(r)
    for s in _samples(straight):  # rows of the rollouts made at steps 0, 2 and 4
        group = int(records[s["step"]]["maxmin/group"])
        name = names[group]
        assert s["score"] == pytest.approx((s["reward_scores"][name] - stats["mean"][group]) / stats["std"][group],
                                           abs=1e-6)
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    final = load_file(straight / "final" / "model.safetensors")
    assert any(not torch.equal(start[k], final[k]) for k in start)

    resumed = {**keys, "output_dir": str(tmp_path / "resumed")}
    with pytest.raises(KeyboardInterrupt):
        train(interrupt_at(RLOOMethod(prompts=PROMPTS), 2), resolve_config("rloo", resumed))
    assert (tmp_path / "resumed" / "checkpoints" / "step-3" / "method_state_0.pt").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("the statistics must come from the checkpoint")

    monkeypatch.setattr(RewardSet, "fit_statistics", refuse)
    train(RLOOMethod(prompts=PROMPTS), resolve_config("rloo", resumed))

    def curve(run):
        return [{k: v for k, v in r.items() if k != "tokens_per_second"}
                for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    assert [r["step"] for r in curve("resumed")] == [1, 2, 3, 4, 5, 6]
    assert curve("resumed") == curve("straight")
    assert (tmp_path / "resumed" / "samples.jsonl").read_text() == (straight / "samples.jsonl").read_text()
    a, b = final, load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_reward_in_rewards_is_a_plain_reward_run(tiny_model_dir, tmp_path, reward_file):
    """``rewards: [x]`` (with any aggregation) trains exactly as ``reward: x``: one reward is not
    standardised (nothing to put on a common scale), so every metric the plain run logs is the same and
    the final weights are identical; the named run also logs objective/scores/letters (= objective/scores,
    summed in float64 where the plain statistics sum in float32)."""
    from safetensors.torch import load_file

    spec = f"{reward_file}:letters"
    plain = _keys(tiny_model_dir, tmp_path / "plain", reward=spec, max_steps=3)
    named = _keys(tiny_model_dir, tmp_path / "named", rewards=[spec], reward_aggregation="maxmin", max_steps=3)
    train(RLOOMethod(), resolve_config("rloo", {**plain, "data": str(REPO / "examples/data/prompts.txt")}))
    train(RLOOMethod(), resolve_config("rloo", {**named, "data": str(REPO / "examples/data/prompts.txt")}))
    a, b = read_metrics(tmp_path / "plain" / "metrics.jsonl"), read_metrics(tmp_path / "named" / "metrics.jsonl")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if k != "tokens_per_second"} == {
            k: y[k] for k in x if k != "tokens_per_second"}
        assert set(y) - set(x) == {"objective/scores/letters"}
        assert y["objective/scores/letters"] == pytest.approx(x["objective/scores"], rel=1e-6)  # float64 vs float32 sums
    assert not (tmp_path / "named" / "reward_stats.json").exists()
    wa = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "named" / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
