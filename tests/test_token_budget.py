"""Token-budget micro-batches (`max_tokens_per_batch`): the split of a step's items into forwards, and that
it never changes the update: the same loss curve and weights as `grad_accum` micro-batches (sft, dpo with
group_robust, kto; with and without group_by_length), exact resume, two processes == one.

Every training test runs the 2-layer, 64-dim tiny Llama of `preftune.models.tiny` for a few steps on CPU.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune.config import from_mapping
from preftune.data.collate import row_lengths
from preftune.errors import PreftuneError
from preftune.train import resolve_config
from preftune.train.loop import read_metrics, train
from preftune.train.plan import micro_batches, padded_tokens, split_for_process, token_budget_split
from preftune.train.sft import SFTConfig, SFTMethod
from run_helpers import interrupt_at
from test_loop import EXAMPLES, MORE_EXAMPLES, _weights
from test_loop import _config as _sft

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread

REPO = Path(__file__).resolve().parents[1]




def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """1e-10 in float64: see tests/test_loop.py::test_batch8_accum1_equals_batch1_accum8 for why."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-10, msg=key)


class _Recording(SFTMethod):
    """SFT that records the row lengths of every training micro-batch it collates."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[list[list[int]]] = []

    def collate(self, items):
        self.seen.append([row_lengths(i) for i in items])
        return super().collate(items)


# ------------------------------------------------------------------------------------------------ the split


def _random_rows(rng: random.Random, n: int) -> list[list[int]]:
    """``n`` items of 1 row (sft) or 2 rows (a pair), 1-300 tokens each."""
    return [[rng.randint(1, 300) for _ in range(rng.choice((1, 2)))] for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_split_takes_every_item_once_within_the_budget(world: int) -> None:
    """200 random steps: process p gets the items p, p + W, ... of the step (each once over the processes),
    longest first; a micro-batch of several items is within the budget (rows x longest row); every process
    has the same number of micro-batches; and on one process (nothing to pair up) the split is greedy: the
    next micro-batch's first item would not have fit in the one before."""
    rng = random.Random(0)
    for _ in range(200):
        per_process = rng.randint(1, 12)
        rows = _random_rows(rng, per_process * world)
        budget = rng.choice((50, 300, 600, 1200, 5000))
        splits = [token_budget_split(rows, budget=budget, process=p, num_processes=world) for p in range(world)]
        assert len({len(s) for s in splits}) == 1
        for p, batches in enumerate(splits):
            flat = [i for b in batches for i in b]
            assert sorted(flat) == list(range(p, len(rows), world))
            assert [max(rows[i]) for i in flat] == sorted((max(rows[i]) for i in flat), reverse=True)
            for b in batches:
                assert b and (len(b) == 1 or padded_tokens([rows[i] for i in b]) <= budget), (b, budget)
        lone = token_budget_split(rows, budget=budget, process=0, num_processes=1)
        for b, after in zip(lone, lone[1:], strict=False):  # one process: greedy, no halving
            assert padded_tokens([rows[i] for i in [*b, after[0]]]) > budget


def test_an_item_over_the_budget_is_alone_and_processes_pair_up() -> None:
    """Budget 100. Process 0 gets items 0, 2, 4 ([150], [10], [10]): 150 is over the budget alone, the two
    10s fit together (2 rows x 10 = 20): 2 micro-batches. Process 1 gets the pairs [30, 40], [20, 20],
    [5, 5]: the first two are 4 rows x 40 = 160 > 100, so [30, 40] alone (80), then [20, 20] + [5, 5] =
    4 x 20 = 80: 2 micro-batches. With budget 1000 each process needs one."""
    rows = [[150], [30, 40], [10], [20, 20], [10], [5, 5]]
    assert token_budget_split(rows, budget=100, process=0, num_processes=2) == [[0], [2, 4]]
    assert token_budget_split(rows, budget=100, process=1, num_processes=2) == [[1], [3, 5]]
    assert token_budget_split(rows, budget=1000, process=1, num_processes=2) == [[1, 3, 5]]
    # budget 45: process 0 still needs 2 ([150], [10, 10]); process 1 needs 3 ([30, 40] is 80 > 45, alone;
    # [20, 20] + [5, 5] = 80 > 45: apart): process 0 halves its costliest micro-batch of several items
    assert token_budget_split(rows, budget=45, process=1, num_processes=2) == [[1], [3], [5]]
    assert token_budget_split(rows, budget=45, process=0, num_processes=2) == [[0], [2], [4]]


def test_without_a_budget_the_split_is_grad_accum_chunks() -> None:
    items = list(range(16))
    config = from_mapping(SFTConfig, {"model": "m", "data": "d", "batch_size": 2, "grad_accum": 4})
    for p in (0, 1):
        assert micro_batches(items, config, process=p, num_processes=2) == split_for_process(
            items, micro_batches=4, process=p, num_processes=2)


def test_online_methods_and_reward_mixtures_refuse_the_budget() -> None:
    with pytest.raises(PreftuneError, match="is for offline methods") as info:
        resolve_config("rloo", {"model": "m", "num_samples": 2, "max_tokens_per_batch": 512})
    assert info.value.field == "max_tokens_per_batch"
    with pytest.raises(PreftuneError, match="not supported with mixtures > 1") as info:
        resolve_config("reward", {"model": "m", "data": "d", "mixtures": 2, "max_tokens_per_batch": 512})
    assert info.value.field == "max_tokens_per_batch"
    with pytest.raises(PreftuneError, match="must be >= 1"):
        resolve_config("sft", {"model": "m", "data": "d", "max_tokens_per_batch": 0})
    config = from_mapping(SFTConfig, {"model": "m", "data": "d", "max_tokens_per_batch": 512})
    with pytest.raises(PreftuneError, match="before_step"):  # an online method's own items (the loop's guard)
        micro_batches([1, 2], config, process=0, num_processes=1, planned=False)


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("group_by_length", [False, True])
def test_sft_with_a_budget_gives_the_same_update(float64_model_dir: Path, tmp_path: Path, group_by_length: bool,
                                                 capsys: pytest.CaptureFixture) -> None:
    """16 examples of 8-115 tokens, global batch 8, 2 steps, float64: 8 x 1 without a budget is the
    reference; 8 x 1 with budget 100 (the 115-token example alone, short ones 3-6 to a forward), 1 x 8 with
    budget 10,000 (one forward where grad_accum says 8) and 2 x 4 with budget 1 (every example alone)
    give the same loss curve (rel 1e-12) and weights (1e-10): the normaliser is the step's tokens over
    every micro-batch, however many. The budget is kept, and the log says what it gives."""
    examples = EXAMPLES + MORE_EXAMPLES
    runs, seen = {}, {}
    for batch, accum, budget in [(8, 1, None), (8, 1, 100), (1, 8, 10_000), (2, 4, 1)]:
        out = tmp_path / f"b{batch}a{accum}t{budget}"
        method = _Recording(examples=examples)
        train(method, _sft(float64_model_dir, out, batch_size=batch, grad_accum=accum, max_steps=2,
                           group_by_length=group_by_length, max_tokens_per_batch=budget))
        runs[(batch, accum, budget)] = ([r["loss"] for r in read_metrics(out / "metrics.jsonl")], _weights(out / "final"))
        seen[budget] = method.seen
    assert [len(b) for b in seen[None]] == [8, 8] and [len(b) for b in seen[10_000]] == [8, 8]
    assert all(len(b) == 1 for b in seen[1]) and len(seen[1]) == 16
    assert 4 < len(seen[100]) < 16
    assert all(len(b) == 1 or padded_tokens(b) <= 100 for b in seen[100])
    assert [[115]] in seen[100]
    (curve, weights), *others = runs.values()
    for other_curve, other_weights in others:
        assert other_curve == pytest.approx(curve, rel=1e-12, abs=0)
        _same_weights(weights, other_weights)
    log = [line for line in capsys.readouterr().err.splitlines() if "max_tokens_per_batch 100:" in line]
    assert len(log) == 2  # the run with budget 100: what the budget gives, and the item over it
    assert "forwards per step and process on average over the first epoch" in log[0] and "padded" in log[0]
    assert "1 of 16 training items are over the budget alone (the largest 115 padded tokens)" in log[1]


def test_group_robust_dpo_and_kto_with_a_budget(float64_model_dir: Path, tmp_path: Path) -> None:
    """The methods that keep state across a step's micro-batches: group-robust DPO moves alpha once per
    step (after this process's batch_size x grad_accum pairs, however many forwards hold them) and KTO
    takes z0 from every micro-batch of the step. 3 steps of 8 pairs (or examples) in one forward, then
    with a budget that needs several per step: the same loss, alpha or z0 (rel 1e-12) and weights."""
    from preftune.train.dpo import DPOMethod
    from preftune.train.kto import KTOMethod
    from test_group_robust import ROWS as GROUP_ROWS
    from test_group_robust import _config as dpo_config
    from test_kto import ROWS as KTO_ROWS
    from test_kto import _config as kto_config

    cases = {
        "dpo": (DPOMethod, dpo_config, GROUP_ROWS, 60, ("loss", "group/alpha/few", "group/loss/few", "grad_norm")),
        "kto": (KTOMethod, kto_config, KTO_ROWS, 40, ("loss", "kl", "grad_norm", "rewards/chosen")),
    }
    for name, (method_cls, config, rows, budget, keys) in cases.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        runs = {}
        for tokens in (None, budget):
            out = tmp_path / f"{name}-{tokens}"
            method = method_cls()
            collate, calls = method.collate, []
            method.collate = lambda items, collate=collate, calls=calls: calls.append(len(items)) or collate(items)
            train(method, config(float64_model_dir, data, out, batch_size=8, max_steps=3,
                                 max_tokens_per_batch=tokens))
            steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
            runs[tokens] = (steps, _weights(out / "final"), calls)
        (base, w_base, base_calls), (steps, weights, calls) = runs[None], runs[budget]
        assert len(calls) >= len(base_calls) + 3, (name, calls)  # 2+ forwards a step instead of 1
        for a, b in zip(base, steps, strict=True):
            for key in keys:
                assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-15), (name, key)
        _same_weights(w_base, weights)


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with attention dropout 0.1, so every step consumes the torch RNG."""
    from preftune.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-dropout"), seed=0, attention_dropout=0.1)


def test_resume_with_a_budget_continues_the_identical_loss_curve(dropout_model_dir: Path, tmp_path: Path) -> None:
    """As tests/test_loop.py's resume test, with max_tokens_per_batch 100 and group_by_length: 5 steps
    straight == Ctrl-C during step 3, then resume; equal loss curves and weights, bit for bit."""
    values = {"batch_size": 2, "grad_accum": 2, "max_steps": 5, "lr_scheduler": "cosine", "warmup_steps": 2,
              "max_grad_norm": 1.0, "save_every": 100, "group_by_length": True, "max_tokens_per_batch": 100}
    examples = EXAMPLES + MORE_EXAMPLES
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(SFTMethod(examples=examples), _sft(dropout_model_dir, straight, **values))
    with pytest.raises(KeyboardInterrupt):
        train(interrupt_at(SFTMethod(examples=examples), 2), _sft(dropout_model_dir, resumed, **values))
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3]
    train(SFTMethod(examples=examples), _sft(dropout_model_dir, resumed, **values))

    def curve(out: Path) -> list[tuple]:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(out / "metrics.jsonl")]

    assert curve(resumed) == curve(straight) and len(curve(straight)) == 5
    a, b = _weights(straight / "final"), _weights(resumed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_a_budget_equal_one_without(float64_model_dir: Path, tmp_path: Path) -> None:
    """DPO, 2 steps of a global batch of 8 pairs: one process, batch 8, no budget; two gloo processes of
    batch_size 2 x grad_accum 2 with max_tokens_per_batch 120 (rows of 15-32 tokens: two pairs fit when
    their rows are at most 30; the greedy split gives the processes 3 and 2 forwards at step 1, 2 and 3 at
    step 2, so one process halves a micro-batch and both run 3). The same losses and grad norms (rel 1e-10)
    and weights (1e-10; see tests/test_distributed.py for why this tolerance)."""
    from preftune.train import run
    from test_distributed import dpo_config

    config = dpo_config(tmp_path, float64_model_dir)
    run("dpo", config, batch_size=8, output_dir=str(tmp_path / "one"), ref_cache_dir=str(tmp_path / "cache1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "examples" / "accelerate" / "multi_cpu.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "--num_cpu_threads_per_process", "1",
           "-m", "preftune", "train", "dpo", str(config), "--batch_size", "2", "--grad_accum", "2",
           "--max_tokens_per_batch", "120", "--output_dir", str(tmp_path / "two"),
           "--ref_cache_dir", str(tmp_path / "cache2")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "max_tokens_per_batch 120: 3.00 forwards per step" in proc.stdout + proc.stderr

    one, two = ([r for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-12), (a["step"], key)
    _same_weights(_weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final"))
