"""Checkpoints with exact resume: ``OUTPUT_DIR/checkpoints/step-N``.

A checkpoint holds everything the next step depends on, and nothing in it is a pickle: a checkpoint is
data, so loading one (perhaps one someone else sent you) cannot run code. Every file is safetensors or
JSON, except an online method's state, read with ``torch.load(weights_only=True)`` (tensors and plain
Python values only). Format version 1:

* ``model.safetensors``: the trained model's weights (every process holds the same; the main process
  writes them); under FSDP2 instead ``model_shard_R.safetensors`` and ``optimizer_shard_R.safetensors`` (one
  per process R: its shards of the weights and of AdamW's moments; ``preftune.train.sharded``), and the
  manifest says ``"sharded": true``;
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors (AdamW's step, exp_avg and
  exp_avg_sq, named ``<parameter index>/<name>``) and the rest of its ``state_dict`` (the param groups);
* ``scheduler.json``: the learning-rate scheduler's ``state_dict``; ``scaler.json``: the fp16 gradient
  scaler's (mixed_precision: fp16 only);
* ``rng_state_R.json`` (one per process R): the python, numpy and torch CPU (and CUDA / MPS) RNG states;
* ``trainer_state.json``: the step counter, the data plan (examples, global batch, steps per epoch,
  length grouping; the position in the data is a pure function of the step, see ``plan.batch_indices``)
  and the metric sums accumulated since the last log line, so a resumed run writes the same
  metrics.jsonl lines;
* ``method_state_R.pt`` (one per process R) when the method has ``state_dict()`` / ``load_state_dict()``:
  what an online method keeps between steps (its current rollout, the adaptive KL coefficient), or
  group-robust DPO (its group weights);
* ``config.json``: the resolved config the run was trained with (a rerun with other settings is refused,
  see ``rundir``);
* ``manifest.json``, written last: the format, its version, the step, the number of processes and the size
  of every other file.

Writing: into ``step-N.tmp``; every file is fsynced, then the manifest, then the directory, which is
renamed to ``step-N`` (and its parent fsynced). A run killed while saving leaves only ``step-N.tmp``;
after a power cut the manifest (sizes) shows a half-written file.

Reading: the manifest first (every listed file present, with its size), then each file is parsed and
applied; anything wrong raises ``CheckpointDamaged`` naming the file, and resume falls back to the
previous checkpoint (``rundir``). Files not in the manifest are never opened. A checkpoint of the earlier
format (accelerate's ``save_state``: ``*.pkl`` and ``*.bin`` pickles) is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.jsonl import sync_dir, sync_file
from preftune.errors import PreftuneError

FORMAT, VERSION = "preftune-checkpoint", 1
MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_REST = "optimizer.safetensors", "optimizer.json"
SCHEDULER_FILE, SCALER_FILE = "scheduler.json", "scaler.json"
_REQUIRED = (MODEL_FILE, OPTIMIZER_TENSORS, OPTIMIZER_REST, SCHEDULER_FILE, STATE_FILE, CONFIG_FILE)
_SHARDED = (OPTIMIZER_REST, SCHEDULER_FILE, STATE_FILE, CONFIG_FILE)  # + model_shard_R, optimizer_shard_R


def shard_files(rank: int) -> tuple[str, str]:
    """Process ``rank``'s files of a sharded (FSDP2) checkpoint: its model shards, its optimizer shards."""
    return f"model_shard_{rank}.safetensors", f"optimizer_shard_{rank}.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
DAMAGED_HINT = ("delete that checkpoint directory (resume then uses the previous one), or start over with "
                "resume: never")


class CheckpointDamaged(PreftuneError):
    """A checkpoint that is incomplete or unreadable (a torn write, a foreign or tampered file)."""

    def __init__(self, checkpoint: Path, reason: str, *, file: str | None = None) -> None:
        self.checkpoint, self.reason = Path(checkpoint), reason
        where = Path(checkpoint) / file if file else Path(checkpoint)
        super().__init__(f"damaged checkpoint, not loaded: {reason}", path=str(where), hint=DAMAGED_HINT)


@dataclass
class TrainerState:
    """The loop's own state: what is not inside the model, optimizer, scheduler or RNGs."""

    step: int = 0                                  # optimizer steps completed
    num_items: int = 0                             # training examples (or pairs) in the plan
    global_batch: int = 0                          # examples per optimizer step over all processes
    steps_per_epoch: int = 0
    total_steps: int = 0
    group_by_length: bool = False                  # steps of items of similar length (plan.epoch_order)
    pending: dict[str, Any] = field(default_factory=dict)  # metric sums since the last log line

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        return cls(**json.loads(text))


# ------------------------------------------------------------------------------------------------ finding


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step}"


def checkpoint_step(path: Path) -> int:
    """N of a ``step-N`` directory."""
    match = _STEP_DIR.match(Path(path).name)
    if not match:
        raise PreftuneError(f"{path} is not a checkpoint directory (its name is not step-N)", field="resume",
                            hint="give OUTPUT_DIR/checkpoints/step-N, or `auto` / `never`")
    return int(match.group(1))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The ``step-N`` directories in ``output_dir/checkpoints`` (complete or not), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def is_old_format(path: Path) -> bool:
    """A checkpoint written by accelerate's ``save_state`` (preftune before format 1): pickles, no manifest."""
    path = Path(path)
    return not (path / MANIFEST).exists() and any(
        p.suffix in (".pkl", ".bin") for p in path.iterdir() if p.is_file())


def old_format_error(path: Path) -> PreftuneError:
    return PreftuneError(
        "this checkpoint was written by an earlier preftune version and holds pickle files (*.pkl, *.bin), "
        "which can run code when loaded; it is not loaded", path=str(path),
        hint="start over with resume: never (removes the run's checkpoints), or train into a new output_dir")


def read_manifest(path: Path, *, num_processes: int | None = None) -> dict[str, Any]:
    """The checkpoint's manifest, after checking that every file it lists is there with its size (and, with
    ``num_processes``, that the checkpoint was written by as many processes). Raises CheckpointDamaged, or
    PreftuneError for an earlier-format checkpoint or another number of processes."""
    path = Path(path)
    if not path.is_dir():
        raise PreftuneError(f"{path} is not a checkpoint directory", field="resume",
                            hint="give OUTPUT_DIR/checkpoints/step-N, or `auto` / `never`")
    if is_old_format(path):
        raise old_format_error(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointDamaged(path, f"no {MANIFEST} (the checkpoint was not completely written)")
    manifest = _read_json(path, MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT:
        raise CheckpointDamaged(path, f"{MANIFEST} is not a preftune checkpoint manifest", file=MANIFEST)
    if manifest.get("version") != VERSION:
        raise PreftuneError(f"checkpoint format version {manifest.get('version')!r}; this preftune reads "
                            f"version {VERSION}", path=str(path / MANIFEST),
                            hint="resume with the preftune version that wrote it, or start over with resume: never")
    if manifest.get("step") != checkpoint_step(path):
        raise CheckpointDamaged(path, f"{MANIFEST} is for step {manifest.get('step')!r}", file=MANIFEST)
    for name, size in files.items():
        if not (isinstance(name, str) and _FILE_NAME.match(name) and name != MANIFEST and isinstance(size, int)):
            raise CheckpointDamaged(path, f"{MANIFEST} lists an invalid file {name!r}", file=MANIFEST)
        file = path / name
        if not file.is_file():
            raise CheckpointDamaged(path, f"{name} is missing", file=name)
        if file.stat().st_size != size:
            raise CheckpointDamaged(path, f"{name} has {file.stat().st_size} bytes, the manifest says {size} "
                                    "(a torn or replaced file)", file=name)
    saved_processes = manifest.get("num_processes")
    ranks = range(saved_processes if isinstance(saved_processes, int) else 1)
    if manifest.get("sharded"):
        needed = [*_SHARDED, *(name for r in ranks for name in shard_files(r))]
    else:
        needed = list(_REQUIRED)
    needed += [f"rng_state_{r}.json" for r in ranks]
    for name in needed:
        if name not in files:
            raise CheckpointDamaged(path, f"{name} is missing", file=name)
    if num_processes is not None and saved_processes != num_processes:
        raise PreftuneError(f"the checkpoint was written by {saved_processes} processes, this run has "
                            f"{num_processes}", path=str(path),
                            hint="resume with the same number of processes (each one's RNG state is in the "
                                 "checkpoint), or start over with resume: never")
    return manifest


def unlisted_files(path: Path, manifest: dict[str, Any]) -> list[str]:
    """Files in the checkpoint directory that its manifest does not list (never read)."""
    return sorted(p.name for p in Path(path).iterdir() if p.name != MANIFEST and p.name not in manifest["files"])


# ------------------------------------------------------------------------------------------------ saving


def checkpoints_supported(accelerator: Any) -> bool:
    """Single process, DDP and FSDP2 runs write checkpoints; DeepSpeed runs do not (its engine keeps its own
    partitioned optimizer state, which preftune does not save)."""
    kind = str(getattr(accelerator, "distributed_type", "")).upper()
    return "DEEPSPEED" not in kind and ("FSDP" not in kind or bool(getattr(accelerator, "is_fsdp2", False)))


def save_checkpoint(accelerator: Any, state: TrainerState, output_dir: Path, *, keep: int, model: Any,
                    optimizer: Any, scheduler: Any, config_values: dict[str, Any], method: Any = None) -> Path:
    """Write ``checkpoints/step-{state.step}`` (all processes call this) and delete all but the last ``keep``."""
    import torch
    from safetensors.torch import save_file, save_model

    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    main, rank = accelerator.is_main_process, accelerator.process_index
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    from preftune.train.sharded import is_sharded, local_state

    sharded = is_sharded(model)
    if sharded or main:  # unsharded, every process holds the same optimizer state: only the main one reads it
        tensors, rest = _split_optimizer_state(optimizer.state_dict())
    if sharded:  # every process its own shards (preftune.train.sharded)
        names = shard_files(rank)
        save_file(local_state(model), str(tmp / names[0]))
        save_file(tensors, str(tmp / names[1]))
        for name in names:
            sync_file(tmp / name)
    if main:
        if not sharded:
            save_model(accelerator.unwrap_model(model), str(tmp / MODEL_FILE))
            save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
            for name in (MODEL_FILE, OPTIMIZER_TENSORS):
                sync_file(tmp / name)
        write_json(tmp / OPTIMIZER_REST, rest)
        write_json(tmp / SCHEDULER_FILE, scheduler.state_dict())
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            write_json(tmp / SCALER_FILE, scaler.state_dict())
        write_json(tmp / STATE_FILE, asdict(state))
        write_json(tmp / CONFIG_FILE, config_values)
    write_json(tmp / f"rng_state_{rank}.json", _rng_state())
    if hasattr(method, "state_dict"):
        torch.save(method.state_dict(), tmp / f"method_state_{rank}.pt")
        sync_file(tmp / f"method_state_{rank}.pt")
    accelerator.wait_for_everyone()
    if main:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        write_json(tmp / MANIFEST, {"format": FORMAT, "version": VERSION, "step": state.step,
                                    "num_processes": accelerator.num_processes, "files": files,
                                    **({"sharded": True} if sharded else {})})
        sync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        sync_dir(final.parent)
        if keep > 0:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer ``state_dict`` as (tensors named ``<param>/<name>``, everything else as JSON values)."""
    import torch

    from preftune.train import sharded

    tensors: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for param, values in state_dict["state"].items():
        rest[str(param)] = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{name}"] = sharded.local(value).detach().cpu().contiguous()
            else:
                rest[str(param)][name] = value
    return tensors, {"state": rest, "param_groups": state_dict["param_groups"]}


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON values: python, numpy, torch CPU and (when present) CUDA / MPS."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": [version, list(internal), gauss],
                             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state().tolist()
    return state


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON in ``path``, fsynced."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------ loading


def load_checkpoint(accelerator: Any, path: Path, *, model: Any, optimizer: Any, scheduler: Any,
                    method: Any = None) -> TrainerState:
    """Restore model, optimizer, scheduler, RNG states (and the method's state) from ``path``; return the
    loop's state. Every piece is overwritten, so a failed load followed by another checkpoint's is clean."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    path = Path(path)
    manifest = read_manifest(path, num_processes=accelerator.num_processes)
    rank = accelerator.process_index
    try:
        saved = TrainerState(**_read_json(path, STATE_FILE))
        if not isinstance(saved.step, int) or not isinstance(saved.pending, dict):
            raise TypeError
    except TypeError:
        raise CheckpointDamaged(path, f"{STATE_FILE} does not hold a trainer state", file=STATE_FILE) from None

    def damaged(name: str, exc: BaseException) -> CheckpointDamaged:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return CheckpointDamaged(path, f"{name}: {reason}", file=name)

    from preftune.train.sharded import is_sharded, load_local_state

    sharded = bool(manifest.get("sharded"))
    if sharded != is_sharded(model):
        raise PreftuneError(f"the checkpoint was written {'with' if sharded else 'without'} FSDP, this run "
                            f"{'uses' if is_sharded(model) else 'does not use'} it", path=str(path),
                            hint="resume with the launcher config that wrote it, or start over with resume: never")
    model_file, optimizer_file = shard_files(rank) if sharded else (MODEL_FILE, OPTIMIZER_TENSORS)
    try:
        if sharded:
            load_local_state(model, load_file(str(path / model_file)))
        else:
            load_model(accelerator.unwrap_model(model), str(path / MODEL_FILE), strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
        raise damaged(model_file, exc) from None
    try:
        tensors = load_file(str(path / optimizer_file))
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
        raise damaged(optimizer_file, exc) from None
    rest = _read_json(path, OPTIMIZER_REST)
    try:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.load_state_dict(_join_optimizer_state(tensors, rest, params=params))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        raise damaged(f"{optimizer_file} / {OPTIMIZER_REST}", exc) from None
    try:
        scheduler.load_state_dict(_read_json(path, SCHEDULER_FILE))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise damaged(SCHEDULER_FILE, exc) from None
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        if SCALER_FILE not in manifest["files"]:
            raise CheckpointDamaged(path, f"{SCALER_FILE} is missing (the fp16 gradient scaler)", file=SCALER_FILE)
        try:
            scaler.load_state_dict(_read_json(path, SCALER_FILE))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise damaged(SCALER_FILE, exc) from None
    rng = f"rng_state_{rank}.json"
    try:
        _set_rng_state(_read_json(path, rng))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise damaged(rng, exc) from None
    if hasattr(method, "load_state_dict"):
        name = f"method_state_{rank}.pt"
        if name not in manifest["files"]:
            raise PreftuneError(f"the checkpoint has no {name} (the method's state)", path=str(path),
                                hint="resume with the same method, or start over with resume: never")
        try:
            method.load_state_dict(torch.load(path / name, weights_only=True, map_location="cpu"))
        except Exception as exc:  # noqa: BLE001 - the restricted unpickler raises many kinds; none runs code
            raise damaged(name, exc) from None
    return saved


def read_config_values(path: Path) -> dict[str, Any]:
    """The resolved config a checkpoint was trained with (``config.json``)."""
    values = _read_json(Path(path), CONFIG_FILE)
    if not isinstance(values, dict):
        raise CheckpointDamaged(path, f"{CONFIG_FILE} does not hold a config", file=CONFIG_FILE)
    return values


def _read_json(path: Path, name: str) -> Any:
    try:
        text = (path / name).read_bytes().decode("utf-8")
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointDamaged(path, f"{name} is not valid JSON ({type(exc).__name__})", file=name) from None
    except OSError as exc:
        raise CheckpointDamaged(path, f"{name} cannot be read ({exc.strerror or exc})", file=name) from None


def _join_optimizer_state(tensors: dict[str, Any], rest: dict[str, Any], *, params: list[Any] = ()) -> dict[str, Any]:
    """The inverse of ``_split_optimizer_state``; ``params`` (the optimizer's, in order): shards become
    ``DTensor``s laid out like their parameter (FSDP2)."""
    from preftune.train.sharded import to_like

    state: dict[int, dict[str, Any]] = {int(param): dict(values) for param, values in rest["state"].items()}
    for key, tensor in tensors.items():
        param, name = key.split("/", 1)
        state[int(param)][name] = to_like(tensor, params[int(param)]) if params else tensor
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    python_state = (int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss))
    numpy_state = (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
    torch_state = torch.tensor(state["torch"], dtype=torch.uint8)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if "mps" in state and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(torch.tensor(state["mps"], dtype=torch.uint8))
