"""A mixture of reward models by EM over annotators (MaxMin-RLHF, Chakraborty et al. 2024, Alg. 2):
the E-step, purity, the adjusted Rand index and re-seeding by hand; EM recovering two annotator groups
with opposing preferences from a random start; exact resume mid-EM; outputs that load as classifiers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from preftune.config import from_mapping
from preftune.core.mixture import (
    adjusted_rand_index,
    annotator_log_likelihoods,
    assignment_log_likelihood,
    e_step,
    group_assignment,
    purity,
    random_assignment,
    reseed_empty,
)
from preftune.errors import PreftuneError
from preftune.train import method_spec, run
from preftune.train.loop import read_metrics, train
from preftune.train.reward import RewardConfig, RewardMethod
from preftune.train.reward_mixture import RewardMixtureMethod
from run_helpers import interrupt_at

# ------------------------------------------------------------------------------------------------ the math by hand


def test_e_step_by_hand():
    """margins r_k(y_w) - r_k(y_l), rows (annotator: [k=0, k=1]), log sigma(m) = -log(1 + e^-m):
        annotator 0: [2, -1], [0, 1]  -> L[0] = [ls(2) + ls(0), ls(-1) + ls(1)]
                                               = [-0.126928 - 0.693147, -1.313262 - 0.313262] = [-0.820075, -1.626524]
        annotator 1: [-1, 3], [1, 0]  -> L[1] = [-1.313262 - 0.313262, -0.048587 - 0.693147] = [-1.626524, -0.741734]
        annotator 2: [0.5, 0.5]       -> L[2] = [-0.474077, -0.474077] (a tie: the lower index)
    E-step z = [0, 1, 0]; log-likelihood -0.820075 - 0.741734 - 0.474077 = -2.035886."""
    margins = torch.tensor([[2.0, -1.0], [-1.0, 3.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    who = torch.tensor([0, 1, 0, 1, 2])
    table = annotator_log_likelihoods(margins, who, 3)
    assert table.flatten().tolist() == pytest.approx([-0.820075, -1.626524, -1.626524, -0.741734,
                                                      -0.474077, -0.474077], abs=1e-6)
    assert e_step(table).tolist() == [0, 1, 0]
    assert assignment_log_likelihood(table, e_step(table)) == pytest.approx(-2.035886, abs=1e-6)
    # logsigmoid stays finite where log(sigmoid) underflows
    assert annotator_log_likelihoods(torch.tensor([[-200.0]]), torch.tensor([0]), 1).item() == pytest.approx(-200.0)


def test_purity_and_adjusted_rand_index_by_hand():
    """z = [0,0,1,1,1,2], truth = [a,a,a,b,b,b]: contingency (0,a)=2, (1,a)=1, (1,b)=2, (2,b)=1.
    purity = (2 + 2 + 1) / 6 = 5/6.
    ARI: sum C(n_ij) = 1 + 0 + 1 + 0 = 2; rows 2,3,1 -> 1 + 3 + 0 = 4; columns 3,3 -> 3 + 3 = 6;
    E = 4 * 6 / C(6,2) = 24/15 = 1.6; max = (4 + 6)/2 = 5; ARI = (2 - 1.6) / (5 - 1.6) = 0.4/3.4 = 0.117647.
    [0,1,0,1] vs [a,a,b,b]: every cell 1 -> index 0; rows 1+1, columns 1+1; E = 2*2/6; max 2;
    ARI = (0 - 2/3) / (2 - 2/3) = -0.5. The same partition under other labels: 1."""
    assert purity([0, 0, 1, 1, 1, 2], list("aaabbb")) == pytest.approx(5 / 6)
    assert adjusted_rand_index([0, 0, 1, 1, 1, 2], list("aaabbb")) == pytest.approx(0.4 / 3.4)
    assert adjusted_rand_index([0, 1, 0, 1], list("aabb")) == pytest.approx(-0.5)
    assert adjusted_rand_index([1, 1, 0, 0, 2], list("xxyyz")) == 1.0 and purity([1, 1, 0, 0], list("xxyy")) == 1.0
    assert adjusted_rand_index([0, 0, 0], list("aaa")) == 1.0  # both put everyone together
    assert purity([0, 0, 0, 0], list("aabb")) == 0.5 and adjusted_rand_index([0, 0, 0, 0], list("aabb")) == 0.0


def test_reseed_and_initial_assignments():
    """Component 2 is empty: it takes the worst-explained annotator (fit -5: annotator 1) of a component
    that keeps another (component 1's only annotator is not taken). Random starts fill every component;
    group starts put the largest group in component 0."""
    assignment = [0, 0, 0, 1]
    assert reseed_empty(assignment, [-1.0, -5.0, -2.0, -9.0], 3) == [(1, 2)] and assignment == [0, 2, 0, 1]
    assert sorted(random_assignment(5, 2, seed=3)) == [0, 0, 0, 1, 1]
    assert random_assignment(6, 3, seed=1) == random_assignment(6, 3, seed=1) != random_assignment(6, 3, seed=2)
    assert group_assignment(["b", "a", "b", "c"], 2) == [0, 1, 0, 0]


def test_em_state_stops_keeps_the_best_and_round_trips():
    """Restart 0 starts at [0, 1] and its E-step agrees (converged, log-likelihood -1.5); restart 1 starts
    at [1, 0], moves both annotators (changed 2) and, at em_iterations 1, stops there (-1.5 too: a tie,
    the first restart is kept). The state is tensors only and loads back; another shape is refused."""
    from preftune.core.mixture import EMState

    em = EMState([[0, 1], [1, 0]], 2)
    table = torch.tensor([[-0.5, -3.0], [-2.0, -1.0]], dtype=torch.float64)
    first = em.update(0, table, max_iterations=1)
    second = em.update(1, table, max_iterations=1)
    assert (first.changed, first.stop, first.log_likelihood) == (0, "converged", -1.5)
    assert (second.changed, second.stop, second.moves, second.empty) == (2, "at em_iterations", [], [])
    assert em.best() == 0 and not em.running.any() and em.iterations.tolist() == [1, 1]
    state = em.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = EMState([[0, 0], [0, 0]], 2)
    fresh.load_state_dict(state)
    assert fresh.assignment.tolist() == [[0, 1], [0, 1]] and torch.equal(fresh.tables, em.tables)
    with pytest.raises(ValueError, match="assignment has shape"):
        EMState([[0, 1, 1]], 2).load_state_dict(state)


# ------------------------------------------------------------------------------------------------ a synthetic task

RESPONSES = [f"the {adjective} {noun}" for adjective in ("bright", "dull") for noun in ("sun", "moon")]
PROMPTS = ["Say it:", "Write:", "Now:", "Tell me:"]


def true_reward(text: str, group: str) -> int:
    """Linear in two features: both groups like `bright` (+1); on `sun` versus `moon` they disagree (+-2)."""
    return ("bright" in text) + (2 if group == "A" else -2) * ("sun" in text)


def write_labels(path: Path, *, majority: int = 5, minority: int = 3) -> Path:
    """Every annotator labels the 6 pairs of the 4 responses (prompts at random) by its group's reward."""
    rng, rows = random.Random(0), []
    for a in range(majority + minority):
        group = "A" if a < majority else "B"
        for i, x in enumerate(RESPONSES):
            for y in RESPONSES[i + 1:]:
                chosen, rejected = (x, y) if true_reward(x, group) > true_reward(y, group) else (y, x)
                rows.append({"prompt": rng.choice(PROMPTS) + " ", "chosen": chosen, "rejected": rejected,
                             "user_id": f"u{a}", "group": group})
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from preftune.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("mixture-model") / "tiny", hidden_size=32, num_layers=1)


def keys(model: Path, data: Path, out: Path, **more) -> dict:
    return {"model": str(model), "data": str(data), "output_dir": str(out), "batch_size": 12,
            "learning_rate": 3e-3, "lr_scheduler": "constant", "log_every": 1, "report_to": "none",
            "dtype": "float32", "seed": 0, "mixtures": 2, "em_restarts": 2, "em_iterations": 3, "em_epochs": 2,
            "eval_batch_size": 64,
            **more}


def em_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "em/iteration" in r]


def test_em_recovers_the_groups_from_a_random_start(small_model, tmp_path):
    """5 annotators of group A (sun > moon) and 3 of group B (moon > sun), 6 labels each, no group used for
    fitting. From random starts that mix the groups, EM ends with one mixture per group (purity and ARI
    1), stops once no annotator moves, and each final/mixture-k loads as a sequence classifier that
    ranks by its own group's preference."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from preftune.models import score_texts
    from preftune.models.sampling import row_seed

    data = write_labels(tmp_path / "labels.jsonl")
    final = run("reward", keys(small_model, data, tmp_path / "run"))
    starts = [random_assignment(8, 2, seed=row_seed(0, r)) for r in range(2)]
    assert all(adjusted_rand_index(s, list("AAAAABBB")) < 1 for s in starts)  # the starts mix the groups
    rows = em_rows(tmp_path / "run")
    assert rows[0]["em/changed"] > 0 and {r["em/restart"] for r in rows} == {0, 1}
    summary = json.loads((final / "mixture.json").read_text())
    best = [r for r in rows if r["em/restart"] == summary["restart"]]
    assert best[-1]["em/changed"] == 0 and best[-1]["em/purity"] == 1.0 and best[-1]["em/ari"] == 1.0
    assert summary["purity"] == 1.0 and summary["ari"] == 1.0 and sorted(summary["sizes"]) == [3, 5]
    lines = [json.loads(line) for line in (tmp_path / "run" / "assignments.jsonl").read_text().splitlines()]
    assert [line["annotator"] for line in lines] == [f"u{a}" for a in range(8)]
    mixture_of = {group: {line["mixture"] for line in lines if line["group"] == group} for group in "AB"}
    assert len(mixture_of["A"]) == len(mixture_of["B"]) == 1 and mixture_of["A"] != mixture_of["B"]
    assert all(line["log_likelihoods"][line["mixture"]] == max(line["log_likelihoods"]) for line in lines)
    for group in "AB":
        path = final / f"mixture-{mixture_of[group].pop()}"
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        sun, moon = score_texts(model, tokenizer, ["Say it: "] * 2, ["the bright sun", "the bright moon"])
        assert (sun > moon) == (group == "A")




def test_resume_mid_em_is_exact(small_model, tmp_path):
    """One restart, M-steps of 4 steps (48 pairs / 12 per step, 1 pass). Ctrl-C during step 6 (in the
    second M-step, after the first E-step): the checkpoint at step 6 holds the assignment, the tables and
    the iteration; the resumed run makes the same E-steps, metrics, assignments and weights bit for bit."""
    from safetensors.torch import load_file

    data = write_labels(tmp_path / "labels.jsonl")
    common = {"em_restarts": 1, "em_epochs": 1, "em_iterations": 3, "save_every": 100}
    train(RewardMixtureMethod(), from_mapping(RewardConfig, keys(small_model, data, tmp_path / "straight", **common)))
    resumed = from_mapping(RewardConfig, keys(small_model, data, tmp_path / "resumed", **common))
    with pytest.raises(KeyboardInterrupt):
        train(interrupt_at(RewardMixtureMethod(), 5), resumed)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-6"
    assert any(p.name.startswith("method_state_0") for p in checkpoint.iterdir())  # the EM state
    assert len(em_rows(tmp_path / "resumed")) == 1
    train(RewardMixtureMethod(), resumed)

    def curve(run_dir):
        return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in read_metrics(run_dir / "metrics.jsonl")]

    assert curve(tmp_path / "resumed") == curve(tmp_path / "straight")
    assert len(em_rows(tmp_path / "straight")) >= 2
    for name in ("assignments.jsonl", "final/mixture.json"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "straight" / name).read_text()
    for k in range(2):
        a = load_file(tmp_path / "straight" / "final" / f"mixture-{k}" / "model.safetensors")
        b = load_file(tmp_path / "resumed" / "final" / f"mixture-{k}" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _set_up(config: RewardConfig, messages: list) -> RewardMixtureMethod:
    """A mixture method after setup (model and data loaded, nothing trained)."""
    from preftune.train.base import RunContext

    method = RewardMixtureMethod()
    method.setup(RunContext(config=config, accelerator=type("A", (), {"num_processes": 1})(), output_dir=Path("."),
                            log=messages.append))
    return method


def test_em_init_groups_starts_from_the_groups(small_model, tmp_path):
    """em_init: groups puts the larger group (A, annotators u0-u4) in mixture 0 and runs one restart; an
    annotator without a group is then an error."""
    data = write_labels(tmp_path / "labels.jsonl")
    config = from_mapping(RewardConfig, keys(small_model, data, tmp_path / "run", em_init="groups", em_restarts=1))
    method = _set_up(config, [])
    assert method.restarts == 1 and method.em.assignment.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    data.write_text(data.read_text().replace('"user_id": "u7", "group": "B"', '"user_id": "u7"'))
    with pytest.raises(PreftuneError, match="1 of 8 have none") as err:
        _set_up(config, [])
    assert err.value.field == "em_init"


def test_an_emptied_mixture_is_reseeded(small_model, tmp_path):
    """An E-step under which every annotator prefers mixture 0 (margins +1 there, -1 under mixture 1)
    would leave mixture 1 empty: it takes back the annotator mixture 0 explains worst (the one with the
    most labels, so the lowest summed log-likelihood), and the record and the log say so."""
    data = write_labels(tmp_path / "labels.jsonl", majority=2, minority=1)
    with open(data, "a") as f:  # annotator u0 gets two more labels: the worst summed log-likelihood
        f.write(json.dumps({"prompt": "Now: ", "chosen": "the bright sun", "rejected": "the dull moon", "user_id": "u0"})
                + "\n" + json.dumps({"prompt": "Now: ", "chosen": "the dull sun", "rejected": "the dull moon",
                                     "user_id": "u0"}) + "\n")
    config = from_mapping(RewardConfig, keys(small_model, data, tmp_path / "run", em_restarts=1, batch_size=4))
    messages: list = []
    method = _set_up(config, messages)
    n = len(method.train_items)
    method._margins = lambda model, restart: torch.tensor([[1.0, -1.0]] * n)
    records, done = method.after_step(method.model, method.m_step_steps)
    assert done is None and records[0]["em/reseeded"] == 1 and records[0]["em/changed"] >= 1
    assert method.em.assignment[0].tolist() == [1, 0, 0]
    assert any("re-seeded with 'u0'" in m for m in messages)


def test_keys_and_data_errors(small_model, tmp_path):
    """The EM keys need mixtures > 1; a mixture's run length comes from em_iterations x em_epochs; pairs
    without an annotator are an error with a hint; train reward picks the mixture method by its keys."""
    data = write_labels(tmp_path / "labels.jsonl")
    base = keys(small_model, data, tmp_path / "run")
    with pytest.raises(PreftuneError, match="used only with mixtures > 1") as err:
        from_mapping(RewardConfig, {**base, "mixtures": 1})
    assert err.value.field == "em_restarts"
    with pytest.raises(PreftuneError, match="em_iterations x em_epochs"):
        from_mapping(RewardConfig, {**base, "max_steps": 5})
    config = from_mapping(RewardConfig, base)
    assert method_spec("reward").method_for(config) is RewardMixtureMethod
    assert method_spec("reward").method_for(from_mapping(RewardConfig, {"model": "m", "data": "d"})) is RewardMethod
    with pytest.raises(PreftuneError, match="RewardMixtureMethod"):
        train(RewardMethod(), config)
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(line.replace('"user_id": "u7", ', "") + "\n" for line in data.read_text().splitlines()))
    with pytest.raises(PreftuneError, match="6 of 48 pairs have no annotator") as err:
        run("reward", {**base, "data": str(plain)})
    assert "annotator" in err.value.hint and "user_id" in err.value.hint


def test_lora_components_are_adapters_on_one_base(small_model, tmp_path):
    """With lora the R x K components are adapters (each with its own score head) on one base: far fewer
    parameters than copies. Each final/mixture-k is merged and loads alone, scoring as its live adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from preftune.models import score_texts

    data = write_labels(tmp_path / "labels.jsonl")
    method = RewardMixtureMethod()
    final = train(method, from_mapping(RewardConfig, keys(small_model, data, tmp_path / "run", lora={"r": 4},
                                                          em_restarts=2, em_iterations=1, em_epochs=1)))
    counts = method.model.parameter_counts()
    assert counts["adapter"] > 0 and counts["total"] == counts["per_component"] + 4 * counts["adapter"]
    assert counts["total"] < 2 * counts["per_component"]
    best = json.loads((final / "mixture.json").read_text())["restart"]
    texts = ["the bright sun", "the dull moon"]
    for k in range(2):
        model = AutoModelForSequenceClassification.from_pretrained(final / f"mixture-{k}").eval()
        saved = score_texts(model, AutoTokenizer.from_pretrained(final / f"mixture-{k}"), ["Now: "] * 2, texts)
        live_model = method.model.eval()._activate(best * 2 + k)  # the base with that adapter active
        live = score_texts(live_model, method.tokenizer, ["Now: "] * 2, texts)
        assert saved == pytest.approx(live, abs=1e-5)
