"""Several machines, simulated on one: two launchers on localhost, node ranks 0 and 1, one process each,
train exactly like one process on the same global batch.

Each launcher is started as its own subprocess, as a user starts one on each machine:

* ``python -m torch.distributed.run --nnodes 2 --node_rank R --nproc_per_node 1 --rdzv_backend static
  --master_addr 127.0.0.1 --master_port P -m preftune train dpo CONFIG.yaml --batch_size 4 ...``
* ``accelerate launch --config_file examples/accelerate/multi_node.yaml --num_machines 2 --machine_rank R
  --num_processes 2 --main_process_ip 127.0.0.1 --main_process_port P -m preftune train dpo ...``

Why the static rendezvous (torchrun's default, and what ``multi_node.yaml`` asks accelerate for): the node
rank decides the ranks, so global rank 0, the process that writes the run directory, is node 0's. With
``c10d`` torchrun ignores ``--node_rank`` (it warns so) and numbers the nodes by sorting (hostname, pid):
on one machine, by whichever launcher got the smaller pid. c10d's rendezvous is for elastic jobs (nodes
joining and leaving, restarts), which preftune does not use: a stopped run resumes from its checkpoint.

Both nodes share this machine's filesystem, as nodes on a cluster share one for their output directory
(docs/distributed.md says why it must be shared): the run directory must be written once, by node 0.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_distributed import _free_port, _weights, dpo_config

REPO = Path(__file__).resolve().parents[1]
MULTI_NODE = REPO / "examples" / "accelerate" / "multi_node.yaml"
TIMEOUT = 300  # seconds for both launchers together; each run takes ~15 s on 2 busy cores
KEYS = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
        "logps/rejected"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def one_process(float64_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the DPO config, the run directory of one process with batch_size 8 on it): what both nodes must equal."""
    from preftune.train import run

    base = tmp_path_factory.mktemp("one-process")
    config = dpo_config(base, float64_model_dir)
    run("dpo", config, batch_size=8, output_dir=str(base / "one"), ref_cache_dir=str(base / "cache"))
    return config, base / "one"


def _train_args(config: Path, out: Path) -> list[str]:
    """What each node runs: DPO, 4 pairs per process (8 per step over the 2 nodes), a checkpoint every step
    (every process writes its RNG state into the checkpoint that global rank 0 created)."""
    return ["-m", "preftune", "train", "dpo", str(config), "--batch_size", "4", "--output_dir", str(out / "run"),
            "--ref_cache_dir", str(out / "cache"), "--save_every", "1"]


def _torchrun(rank: int, port: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
            "--nproc_per_node", "1", "--rdzv_backend", "static", "--master_addr", "127.0.0.1",
            "--master_port", str(port), *args]


def _accelerate(rank: int, port: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTI_NODE),
            "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), *args]


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launcher and every process under it. torchrun starts each worker in a session of its own, so
    killing the launcher's process group would leave the workers waiting for their peers."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=10)
    proc.wait()


def run_nodes(commands: list[list[str]], cwd: Path, *, timeout: float = TIMEOUT) -> list[str]:
    """Start one launcher per node at once, wait for all of them and return each one's output (stdout and
    stderr). Fails the test when one exits with an error (the others are stopped at once: they would wait
    for it until the rendezvous or a collective times out) or when they run past ``timeout``: then every
    launcher and its workers are killed, so a hang fails the test instead of blocking CI."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    logs = [cwd / f"node{rank}.log" for rank in range(len(commands))]
    procs: list[subprocess.Popen] = []
    problem = ""
    try:
        for command, log in zip(commands, logs, strict=True):
            with open(log, "w", encoding="utf-8") as out:
                procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and not problem:
            failed = [rank for rank, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                problem = f"node {failed[0]} exited with {procs[failed[0]].returncode}"
            elif time.monotonic() > deadline:
                problem = f"the launchers ran past {timeout} s (a hang?) and were killed"
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill_tree(proc)
    outputs = [log.read_text(encoding="utf-8", errors="replace") for log in logs]
    codes = [p.returncode for p in procs]
    if problem or any(codes):
        shown = "\n".join(f"--- node {rank} (exit {code}):\n{text[-4000:]}"
                          for rank, (code, text) in enumerate(zip(codes, outputs, strict=True)))
        pytest.fail(f"{problem or 'a launcher failed'}\n{shown}")
    return outputs


def assert_same_training(one: Path, other: Path) -> None:
    """The two runs logged the same loss, reward metrics and grad_norm at steps 1 and 2 (one record per step:
    a second writer would add lines) and saved the same final weights. The tolerance (1e-10 on float64) is
    argued in test_distributed.test_two_cpu_processes_equal_one_process: the runs differ only in summation
    order and padding width; a synchronisation bug changes values at the 1e-3 level."""
    from preftune.train.loop import read_metrics

    runs = [[r for r in read_metrics(path / "metrics.jsonl") if "loss" in r and "eval/loss" not in r]
            for path in (one, other)]
    assert [r["step"] for r in runs[0]] == [r["step"] for r in runs[1]] == [1, 2]
    for a, b in zip(*runs, strict=True):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-12), (a["step"], key)
    w1, w2 = _weights(one / "final"), _weights(other / "final")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-10, msg=key)


def _check_two_nodes(outputs: list[str], run_dir: Path) -> None:
    """Two processes, one per node; node 0 holds global rank 0 and is the only one that logs and writes the
    run directory; every process wrote its own file into the shared checkpoint directory."""
    node0, node1 = outputs
    assert "batch_size 4 x grad_accum 1 x 2 processes" in node0  # one step = 4 pairs x 2 processes
    assert "strategy: DDP, 2 processes (gloo, CPU, 2 nodes), mixed precision no" in node0  # the first log line
    assert f"saved the final model to {run_dir / 'final'}" in node0
    assert "saved the final model" not in node1 and "x 2 processes" not in node1  # node 1 is not rank 0
    for step in (1, 2):
        checkpoint = run_dir / "checkpoints" / f"step-{step}"
        assert (checkpoint / "rng_state_0.json").is_file() and (checkpoint / "rng_state_1.json").is_file()
        assert not (checkpoint / "rng_state_2.json").exists()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert (run_dir / "finished.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_nodes_equal_one_process(launcher: str, one_process: tuple[Path, Path], tmp_path: Path) -> None:
    """DPO, 2 steps of 8 pairs: node 0 and node 1 (one process each, 4 pairs per process) against one
    process with batch_size 8; launched with torchrun, or with ``accelerate launch --config_file
    examples/accelerate/multi_node.yaml`` (accelerate gives each node ``--num_processes // --num_machines``
    = 1 process and calls torchrun with the config's static rendezvous at main_process_ip:port)."""
    config, one = one_process
    port, args = _free_port(), _train_args(config, tmp_path)
    command = _torchrun if launcher == "torchrun" else _accelerate
    outputs = run_nodes([command(rank, port, args) for rank in (0, 1)], tmp_path)
    _check_two_nodes(outputs, tmp_path / "run")
    assert_same_training(one, tmp_path / "run")


@pytest.mark.slow
def test_nodes_that_do_not_synchronise_would_differ(one_process: tuple[Path, Path], tmp_path: Path) -> None:
    """The comparison above can fail. A node whose launcher does not join the other (started with
    ``--nnodes 1``, or another master address or port) runs alone: WORLD_SIZE 1, so it is exactly a
    1-process run with batch_size 4, whose steps take 4 pairs each instead of the global 8. Its result
    differs from the 8-pair run far beyond the tolerance (step 1's loss is log 2 in both: the policy is
    the reference before the first update; its grad_norm and everything after differ)."""
    from preftune.train import run

    config, one = one_process
    run("dpo", config, batch_size=4, output_dir=str(tmp_path / "alone"), ref_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(AssertionError):
        assert_same_training(one, tmp_path / "alone")
    w1, w2 = _weights(one / "final"), _weights(tmp_path / "alone" / "final")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) > 1e-6  # 1e4 x the tolerance
