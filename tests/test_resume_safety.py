"""Resume safety: a checkpoint is data (a planted pickle never runs), a torn write (power cut) is survived,
and a rerun into a run directory with other settings or another length is refused instead of silently
continuing or replacing the run.

Every run trains the 2-layer, 64-dim tiny Llama of `preftune.models.tiny` for a few steps on CPU.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from preftune.cli import app
from preftune.config import from_mapping
from preftune.data.jsonl import truncate_jsonl
from preftune.errors import PreftuneError
from preftune.train.checkpoint import MANIFEST, checkpoints_supported
from preftune.train.loop import read_metrics, train
from preftune.train.rundir import config_differences
from preftune.train.sft import SFTConfig, SFTMethod

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = [
    {"prompt": "Question: what is two plus two? Answer:", "completion": " four."},
    {"prompt": "Please write a short poem about the sea.", "completion": " The sea is blue and the sky is wide."},
    {"prompt": "What colour is the sky?", "completion": " Blue."},
    {"prompt": "Shall I compare thee to a summer's day?", "completion": " Thou art more lovely and more temperate."},
    {"prompt": "To be, or not to be:", "completion": " that is the question."},
    {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog."},
    {"prompt": "Rough winds do shake", "completion": " the darling buds of May."},
    {"prompt": "Answer yes or no:", "completion": " yes"},
]


def _config(model: Path, out: Path, **values) -> SFTConfig:
    base = {"model": str(model), "data": "in-memory", "output_dir": str(out), "report_to": "none",
            "learning_rate": 1e-3, "lr_scheduler": "cosine", "max_grad_norm": 1.0, "log_every": 1,
            "batch_size": 2}
    return from_mapping(SFTConfig, {**base, **values})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _curve(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["learning_rate"]) for r in read_metrics(out / "metrics.jsonl")]


class _InterruptAt(SFTMethod):
    """SFT that sends this process a real SIGINT (Ctrl-C) while preparing step ``at`` (0-based): the loop
    finishes that step, saves a checkpoint and raises KeyboardInterrupt."""

    def __init__(self, at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at = at

    def before_step(self, model, step):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return None


class _MustNotLoad(SFTMethod):
    """SFT whose setup fails the test: the run must stop before the model and data load."""

    def setup(self, ctx):
        raise AssertionError("the model was loaded")


class _MustNotTrain(SFTMethod):
    def before_step(self, model, step):
        raise AssertionError("a training step was taken")


# ------------------------------------------------------------------------------------------------ planted pickles


class _Plant:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _payloads(marker: Path) -> dict[str, bytes]:
    """The planted file as a plain pickle (accelerate's ``*.pkl``) and as a torch.save zip (``*.bin``, ``*.pt``)."""
    buffer = io.BytesIO()
    torch.save(_Plant(marker), buffer)
    return {"pickle": pickle.dumps(_Plant(marker)), "torch": buffer.getvalue()}


def test_the_planted_files_do_run_code_when_unpickled(tmp_path: Path) -> None:
    """The control: both payloads really run their command when loaded the unsafe way (what accelerate's
    load_state did with custom_checkpoint_0.pkl), so the tests below that see no marker prove something."""
    marker = tmp_path / "ran"
    payloads = _payloads(marker)
    pickle.loads(payloads["pickle"])
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(payloads["torch"]), weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step SFT run with one checkpoint, step-2; a rerun with max_steps 3 continues from it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=2, save_every=1, keep_checkpoints=1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    return out


def test_a_planted_pickle_in_any_checkpoint_file_never_runs(finished_run: Path, tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    """Each file of the checkpoint in turn is replaced by a pickle that would create a marker file; the
    run is then extended (max_steps 3), which loads step-2. Twice per file: as planted (the manifest's size
    no longer matches) and with the manifest's size set to the planted file's (an attacker who also edits
    the manifest), so the file's own loader meets the pickle. Every time: no marker, and a PreftuneError
    naming the file and saying the checkpoint is damaged / not a preftune checkpoint."""
    marker = tmp_path / "ran"
    payload = _payloads(marker)["pickle"]
    names = sorted(p.name for p in (finished_run / "checkpoints" / "step-2").iterdir())
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state_0.json",
            "trainer_state.json", "config.json", MANIFEST} <= set(names)
    for name in names:
        for fix_manifest in (False, True):
            if fix_manifest and name == MANIFEST:
                continue
            out = tmp_path / f"{name}-{fix_manifest}"
            shutil.copytree(finished_run, out)
            step = out / "checkpoints" / "step-2"
            (step / name).write_bytes(payload)
            if fix_manifest:
                manifest = json.loads((step / MANIFEST).read_text())
                manifest["files"][name] = len(payload)
                (step / MANIFEST).write_text(json.dumps(manifest))
            with pytest.raises(PreftuneError) as caught:
                train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=3, save_every=1))
            text = str(caught.value)
            assert not marker.exists(), (name, fix_manifest)
            assert name in text and ("damaged" in text or "not a preftune" in text), (name, fix_manifest, text)
            assert "resume: never" in text  # the way out


def test_planted_pickles_beside_a_checkpoint_are_never_read(finished_run: Path, tiny_model_dir: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """custom_checkpoint_0.pkl and random_states_0.pkl (the names accelerate's load_state unpickled) added to
    a complete checkpoint: the manifest does not list them, so they are not opened; the run resumes
    (resume: auto, and resume: PATH as `--resume DIR` gives it) and says it ignored them."""
    marker = tmp_path / "ran"
    payloads = _payloads(marker)
    for resume in ("auto", "path"):
        out = tmp_path / resume
        shutil.copytree(finished_run, out)
        step = out / "checkpoints" / "step-2"
        (step / "custom_checkpoint_0.pkl").write_bytes(payloads["pickle"])
        (step / "random_states_0.pkl").write_bytes(payloads["pickle"])
        (step / "optimizer.bin").write_bytes(payloads["torch"])
        train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=3,
                                                    resume=str(step) if resume == "path" else "auto"))
        assert not marker.exists()
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
        err = capsys.readouterr().err
        assert "ignoring files its manifest does not list (never read): custom_checkpoint_0.pkl, optimizer.bin, " \
               "random_states_0.pkl" in err
        assert f"resumed from {step} at step 2" in err


def test_an_earlier_format_checkpoint_is_refused_not_unpickled(finished_run: Path, tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    """A checkpoint as accelerate's save_state wrote it (preftune before format 1: random_states_0.pkl,
    custom_checkpoint_0.pkl for the scheduler, optimizer.bin, no manifest), every pickle planted: refused
    with a message saying why, through resume: auto and resume: PATH; nothing runs."""
    marker = tmp_path / "ran"
    payloads = _payloads(marker)
    out = tmp_path / "old"
    shutil.copytree(finished_run, out)
    step = out / "checkpoints" / "step-2"
    for path in step.iterdir():
        if path.name not in ("model.safetensors", "trainer_state.json"):
            path.unlink()
    for name, kind in [("random_states_0.pkl", "pickle"), ("custom_checkpoint_0.pkl", "pickle"),
                       ("optimizer.bin", "torch"), ("scheduler.bin", "torch")]:
        (step / name).write_bytes(payloads[kind])
    for resume in ("auto", str(step)):
        with pytest.raises(PreftuneError, match="written by an earlier preftune version and holds pickle files"):
            train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=3, resume=resume))
    assert not marker.exists()


def test_a_planted_pickle_as_an_online_methods_state_never_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """PPO keeps its rollout in method_state_0.pt, the one file read with torch.load (weights_only=True):
    a torch.save'd planted object there (manifest size fixed up) is refused naming the file; nothing runs."""
    from preftune.train import resolve_config
    from preftune.train.ppo import PPOMethod

    prompts = ["Shall I compare thee to a summer's day?", "To be, or not to be, that is the question:",
               "The quick brown fox jumps over the lazy dog.", "Please write a short poem about the sea."]

    def letters(prompt: str, completion: str) -> float:
        return sum(c.isalpha() for c in completion) / max(len(completion), 1)

    keys = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "ppo"), "batch_size": 4, "max_new_tokens": 4,
            "max_length": 32, "learning_rate": 1e-3, "report_to": "none", "dtype": "float32", "sample_every": 0,
            "seed": 0, "max_steps": 1, "save_every": 1}
    train(PPOMethod(prompts=prompts, reward_fn=letters), resolve_config("ppo", keys))
    step = tmp_path / "ppo" / "checkpoints" / "step-1"
    marker = tmp_path / "ran"
    payload = _payloads(marker)["torch"]
    (step / "method_state_0.pt").write_bytes(payload)
    manifest = json.loads((step / MANIFEST).read_text())
    manifest["files"]["method_state_0.pt"] = len(payload)
    (step / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PreftuneError, match=r"damaged.*method_state_0\.pt"):
        train(PPOMethod(prompts=prompts, reward_fn=letters), resolve_config("ppo", {**keys, "max_steps": 2}))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ torn writes


@pytest.fixture(scope="module")
def straight(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps without interruption: what every resumed run below must equal exactly."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=4, save_every=1, keep_checkpoints=3))
    return out


def test_a_torn_last_metrics_line_is_dropped_on_resume(straight: Path, tiny_model_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C during step 2 saves step-2; then a power cut tears the next metrics line (half a JSON object,
    no newline). The rerun drops that line with a message naming it, resumes, and its loss curve and
    weights equal the straight run's. (Before: every rerun failed on the torn line.)"""
    out = tmp_path / "run"
    config = _config(tiny_model_dir, out, max_steps=4, save_every=1, keep_checkpoints=3)
    with pytest.raises(KeyboardInterrupt):
        train(_InterruptAt(1, examples=EXAMPLES), config)
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "epoch": 0.75, "loss": 5.1')
    capsys.readouterr()
    train(SFTMethod(examples=EXAMPLES), config)
    err = capsys.readouterr().err
    assert f"{out / 'metrics.jsonl'}:3: dropped a torn last line" in err
    assert _curve(out) == _curve(straight)
    a, b = _weights(straight / "final"), _weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncate_jsonl_drops_only_a_torn_last_line(tmp_path: Path) -> None:
    """A torn last line: half an object, zeros (a block not yet written when the power went), a cut
    UTF-8 character; dropped with a message when on_torn_tail is given. A bad line before the last one
    stays an error, and without on_torn_tail a torn last line is an error as before."""
    good = b'{"step": 1}\n{"step": 2}\n'
    path = tmp_path / "metrics.jsonl"
    for tail in (b'{"step": 3, "lo', b"\x00" * 64, '{"step": 3, "note": "é'.encode()[:-1], b'[1, 2]\n'):
        path.write_bytes(good + tail)
        messages: list[str] = []
        truncate_jsonl(path, lambda record: True, on_torn_tail=messages.append)
        assert path.read_bytes() == good and len(messages) == 1 and ":3: dropped a torn last line" in messages[0]
    path.write_bytes(good + b'{"step": 3}\n')
    truncate_jsonl(path, lambda record: True, on_torn_tail=messages.append)
    assert path.read_bytes() == good + b'{"step": 3}\n' and len(messages) == 1  # a complete file: nothing dropped
    path.write_bytes(b'{"step": 1}\n{"st\n{"step": 3}\n{"step": 4, "lo')
    with pytest.raises(PreftuneError, match="malformed JSON") as caught:
        truncate_jsonl(path, lambda record: True, on_torn_tail=messages.append)
    assert caught.value.line == 2
    path.write_bytes(good + b'{"step": 3, "lo')
    with pytest.raises(PreftuneError, match="malformed JSON"):
        truncate_jsonl(path, lambda record: True)


def _truncate_file(step: Path) -> str:
    data = (step / "optimizer.safetensors").read_bytes()
    (step / "optimizer.safetensors").write_bytes(data[:len(data) // 2])
    return "optimizer.safetensors has"


def _same_size_garbage(step: Path) -> str:
    data = (step / "model.safetensors").read_bytes()
    (step / "model.safetensors").write_bytes(b"\x00" * len(data))  # the size the manifest says, no content
    return "model.safetensors:"


def _no_manifest(step: Path) -> str:
    (step / MANIFEST).unlink()
    return "no manifest.json"


@pytest.mark.parametrize("damage", [_truncate_file, _same_size_garbage, _no_manifest])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(straight: Path, tiny_model_dir: Path,
                                                                    tmp_path: Path, damage,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C during step 3: checkpoints step-1..3. A power cut damaged step-3 (a file cut in half; a file
    of the right size but zeros; no manifest). The rerun skips step-3 with a message naming it and the
    damage, resumes from step-2, and ends exactly where the straight run ends."""
    out = tmp_path / "run"
    config = _config(tiny_model_dir, out, max_steps=4, save_every=1, keep_checkpoints=3)
    with pytest.raises(KeyboardInterrupt):
        train(_InterruptAt(2, examples=EXAMPLES), config)
    step3 = out / "checkpoints" / "step-3"
    expected = damage(step3)
    capsys.readouterr()
    train(SFTMethod(examples=EXAMPLES), config)
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {step3}: {expected}" in err
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in err
    assert _curve(out) == _curve(straight)
    a, b = _weights(straight / "final"), _weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_only_checkpoint_is_an_error_naming_the_file(finished_run: Path, tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _truncate_file(out / "checkpoints" / "step-2")
    with pytest.raises(PreftuneError, match=r"no checkpoint to resume from: step-2 is damaged: optimizer\."
                                            r"safetensors has \d+ bytes, the manifest says \d+"):
        train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=3))


# ------------------------------------------------------------------------------------------------ reruns


def test_a_rerun_with_other_settings_is_refused_before_the_model_loads(finished_run: Path, tiny_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    """The run finished with learning_rate 1e-3 and seed 42; a rerun with 2e-3 and seed 7 stops before the
    model loads, naming both keys (old -> new) and both ways out; the finished model is untouched."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = _weights(out / "final")
    with pytest.raises(PreftuneError) as caught:
        train(_MustNotLoad(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=2, learning_rate=2e-3, seed=7))
    text = str(caught.value)
    assert "holds a run with other settings, which is not continued: learning_rate: 0.001 -> 0.002; seed: 42 -> 7" \
        in text
    assert "hint: train into a new output_dir, or start over in" in text and "resume: never" in text
    after = _weights(out / "final")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_finished_run_rerun_unchanged_is_already_done(finished_run: Path, tiny_model_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """The same command again (log_every may differ): nothing is trained, final/ and metrics.jsonl stay."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    stamp = (out / "final" / "model.safetensors").stat().st_mtime_ns
    metrics = (out / "metrics.jsonl").read_bytes()
    final = train(_MustNotTrain(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=2, log_every=5))
    assert final == out / "final"
    assert f"{out} already holds this run, finished at step 2: nothing to train" in capsys.readouterr().err
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_fewer_steps_than_the_run_holds_is_refused(finished_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """`run("sft", CONFIG, max_steps=10)` after a 40-step run used to return the 40-step model. Here: a
    finished 2-step run asked for 1 step; an interrupted run with its checkpoint at step 2 asked for 1."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    with pytest.raises(PreftuneError, match="finished at step 2; this run asks for 1 steps, and a finished run is "
                                            "not shortened"):
        train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=1))
    shutil.rmtree(out / "final")  # now an unfinished run whose newest checkpoint is step-2
    with pytest.raises(PreftuneError, match="the newest checkpoint is at step 2; this run asks for only 1 steps"):
        train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=1))


def test_a_longer_run_continues_from_the_newest_checkpoint(straight: Path, tiny_model_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """max_steps (and log_every) may change: a finished 2-step run asked for 4 continues from step-2. The
    schedule is the 4-step one from then on (the constant schedule here, so the result equals a straight
    4-step run's exactly)."""
    out = tmp_path / "run"
    train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=2, save_every=2,
                                                lr_scheduler="constant"))
    capsys.readouterr()
    train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=4, save_every=2,
                                                lr_scheduler="constant", log_every=2))
    err = capsys.readouterr().err
    assert f"extending the finished run in {out} from step 2 to step 4" in err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 4]
    reference = tmp_path / "reference"
    train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, reference, max_steps=4, lr_scheduler="constant"))
    a, b = _weights(reference / "final"), _weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_without_checkpoints_cannot_be_extended(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=1))
    with pytest.raises(PreftuneError, match="finished at step 1 and has no checkpoint to continue from to step 2"):
        train(SFTMethod(examples=EXAMPLES), _config(tiny_model_dir, out, max_steps=2))


def test_config_differences_follow_a_moved_run_directory() -> None:
    """A run directory copied from /a/out to /b/copy: paths under the old location count as the same; a
    path outside it that is unchanged is the same; a real change is named; ignored keys are not compared."""
    old = {"output_dir": "/a/out/reward", "data": "/a/out/prefs/train.jsonl", "model": "/a/out/sft/final",
           "learning_rate": 0.001, "max_steps": 40}
    new = {"output_dir": "/b/copy/reward", "data": "/b/copy/prefs/train.jsonl", "model": "/a/out/sft/final",
           "learning_rate": 0.001, "max_steps": 10}
    assert config_differences(old, new, {"output_dir", "max_steps"}) == []
    new["data"] = "/b/copy/prefs/other.jsonl"
    assert config_differences(old, new, {"output_dir", "max_steps"}) == [
        "data: /a/out/prefs/train.jsonl -> /b/copy/prefs/other.jsonl"]
    assert config_differences(old, new, {"output_dir"}) == [
        "data: /a/out/prefs/train.jsonl -> /b/copy/prefs/other.jsonl", "max_steps: 40 -> 10"]


def test_checkpoints_are_refused_under_deepspeed_and_fsdp1() -> None:
    """FSDP2 checkpoints are sharded per process (tests/test_fsdp.py); DeepSpeed's partitioned engine state
    and FSDP1's are not saved, so save_every is refused there."""
    from types import SimpleNamespace

    from preftune.train.rundir import RunDir, check_checkpoints_supported

    for kind, fsdp2, ok in [("DistributedType.NO", False, True), ("DistributedType.MULTI_GPU", False, True),
                            ("DistributedType.FSDP", True, True), ("DistributedType.FSDP", False, False),
                            ("DistributedType.DEEPSPEED", False, False)]:
        assert checkpoints_supported(SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2)) is ok
    config = from_mapping(SFTConfig, {"model": "m", "data": "d", "save_every": 10})
    with pytest.raises(PreftuneError, match="not under DeepSpeed") as caught:
        check_checkpoints_supported(SimpleNamespace(distributed_type="DistributedType.DEEPSPEED"), config,
                                    RunDir(Path("out"), [], None, explicit=False))
    assert caught.value.field == "save_every"


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_output_dir_that_is_a_file_is_one_line_before_anything_loads(tmp_path: Path) -> None:
    """--output_dir naming an existing file: one error line (field output_dir) and a hint, no traceback. The
    model does not exist, so an error about it would mean the check came too late."""
    afile = tmp_path / "taken.txt"
    afile.write_text("not a directory\n")
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {tmp_path / 'no-such-model'}\ndata: {REPO / 'examples/data/sft.jsonl'}\n")
    for out in (afile, afile / "run"):
        result = CliRunner().invoke(app, ["train", "sft", str(config), "--output_dir", str(out)])
        assert result.exit_code == 1
        output = " ".join(result.output.split())
        assert f"field 'output_dir': {afile} is a file, not a directory" in output
        assert "hint: give a directory for the run" in output
        assert "Traceback" not in result.output and "no-such-model" not in output


def test_cli_rerun_with_other_data_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`preftune train sft CONFIG` finished; the same command with other data used to train again and
    replace final/. Now: exit 1, one error naming `data: old -> new`, and final/ is the first run's."""
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    config = tmp_path / "sft.yaml"
    out = tmp_path / "run"
    config.write_text(f"model: {tiny_model_dir}\ndata: {REPO / 'examples/data/sft.jsonl'}\noutput_dir: {out}\n"
                      "max_steps: 1\nbatch_size: 2\nreport_to: none\n")
    assert CliRunner().invoke(app, ["train", "sft", str(config)]).exit_code == 0
    before = _weights(out / "final")
    result = CliRunner().invoke(app, ["train", "sft", str(config), "--data", str(other)])
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert f"data: {REPO / 'examples/data/sft.jsonl'} -> {other}" in output
    assert "Traceback" not in result.output
    after = _weights(out / "final")
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------ two processes


@pytest.mark.slow
def test_two_processes_resume_exactly_and_need_two_processes(tmp_path: Path) -> None:
    """Two gloo CPU processes (accelerate launch, multi_cpu.yaml), DPO on a tiny model with dropout (every
    step draws from each process's torch RNG): 4 steps straight, and 2 steps then the same command with
    max_steps 4 (constant schedule, so the longer run is the same run). The checkpoint holds one RNG state
    per process; the final weights and the loss curve are bit-identical. One process cannot resume it."""
    import socket
    import subprocess
    import sys

    from preftune.models.tiny import make_tiny

    model = make_tiny(tmp_path / "tiny", seed=0, attention_dropout=0.1)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": e["prompt"], "chosen": e["completion"], "rejected": " no."}) + "\n"
                            for e in EXAMPLES), encoding="utf-8")
    config = tmp_path / "dpo.yaml"
    config.write_text(f"model: {model}\ndata: {data}\nreport_to: none\nlearning_rate: 1.0e-3\nlr_scheduler: constant\n"
                      f"log_every: 1\nbatch_size: 2\nsave_every: 1\nref_cache_dir: {tmp_path / 'cache'}\n",
                      encoding="utf-8")

    def launch(out: str, steps: int, processes: int = 2) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "examples" / "accelerate" / "multi_cpu.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(port), "--num_cpu_threads_per_process", "1",
               "-m", "preftune", "train", "dpo", str(config), "--output_dir", str(tmp_path / out),
               "--max_steps", str(steps)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    for out, steps in (("straight", 4), ("resumed", 2), ("resumed", 4)):
        proc = launch(out, steps)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-4"
    assert {"rng_state_0.json", "rng_state_1.json"} <= {p.name for p in checkpoint.iterdir()}
    assert _curve(tmp_path / "resumed") == _curve(tmp_path / "straight")
    a, b = _weights(tmp_path / "straight" / "final"), _weights(tmp_path / "resumed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PreftuneError, match="written by 2 processes, this run has 1"):
        train(SFTMethod(examples=EXAMPLES), _config(model, tmp_path / "one", max_steps=5, resume=str(checkpoint)))
