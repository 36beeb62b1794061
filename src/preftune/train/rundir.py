"""The run directory on a rerun of a training command: continue it, say it is finished, extend it, or refuse.

``OUTPUT_DIR`` holds one run: ``config.yaml`` (the resolved config), ``metrics.jsonl``, ``checkpoints/``,
``final/`` and, once ``final/`` is saved, ``finished.json`` (the finished run's step and data plan).
Running a command again into the same directory (``resume: auto``, the default):

1. The settings must be the run's: the resolved config is compared with ``config.yaml`` (and with the
   newest checkpoint's ``config.json``); any difference outside ``resume_may_change`` (the run's length,
   how often it logs, evaluates and saves, where it writes) stops with the differing keys, old -> new.
   Paths inside a run directory that was moved or copied are compared relative to it.
2. The newest complete checkpoint is resumed; a damaged one (torn by a power cut, or foreign) is skipped
   with a message naming it, and the one before it is used.
3. A finished run: the same length -> nothing to train, ``final/`` is returned; longer -> it continues
   from its newest checkpoint; shorter (or a checkpoint past the new length) -> refused.

``resume: never`` starts over: once the new run's model and data have loaded, the previous run's
``checkpoints/``, ``final/``, ``final-merged/`` and ``finished.json`` are removed. ``resume: PATH``
continues from that checkpoint (which must be complete, with the same settings).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from preftune.data.jsonl import sync_dir, sync_file
from preftune.errors import PreftuneError
from preftune.train.checkpoint import (
    CONFIG_FILE,
    CheckpointDamaged,
    TrainerState,
    checkpoint_step,
    checkpoints_supported,
    list_checkpoints,
    load_checkpoint,
    read_config_values,
    read_manifest,
    unlisted_files,
    write_json,
)

FINISHED = "finished.json"
CONFIG_YAML = "config.yaml"


@dataclass
class RunDir:
    """What a new run found in its output directory."""

    out: Path
    candidates: list[Path]             # checkpoints to resume from, newest first (their manifests are complete)
    finished: TrainerState | None      # the finished run's state (finished.json), if any
    explicit: bool                     # resume: PATH (no fallback to an older checkpoint)


def config_values(config: Any) -> dict[str, Any]:
    """The resolved config as plain values, as ``config.yaml`` holds them (what reruns are compared on)."""
    import yaml

    from preftune.config import to_yaml

    return yaml.safe_load(to_yaml(config))


def inspect_run(out: Path, config: Any, *, num_processes: int, log: Any) -> RunDir:
    """Read (never change) ``out``: check a previous run's settings against ``config`` and find the
    checkpoints to resume from. Raises PreftuneError when the run cannot continue as asked."""
    out = Path(out)
    if config.resume == "never":
        return RunDir(out, [], None, explicit=False)
    new = config_values(config)
    ignore = set(type(config).resume_may_change)
    if has_run(out) and (out / CONFIG_YAML).is_file():
        _check_same_config(_read_yaml(out / CONFIG_YAML), new, ignore, source=out / CONFIG_YAML, out=out)
    explicit = config.resume != "auto"
    if explicit:
        path = Path(config.resume)
        checkpoint_step(path)
        read_manifest(path, num_processes=num_processes)
        candidates = [path]
    else:
        candidates, damaged = [], []
        for path in reversed(list_checkpoints(out)):
            try:
                read_manifest(path, num_processes=num_processes)
                read_config_values(path)
            except CheckpointDamaged as exc:
                damaged.append(exc)
                log(f"skipping damaged checkpoint {path}: {exc.reason}")
                continue
            candidates.append(path)
        if damaged and not candidates:
            raise _none_usable(damaged)
    if candidates:
        newest = candidates[0]
        _check_same_config(read_config_values(newest), new, ignore, source=newest / CONFIG_FILE, out=out)
        extra = unlisted_files(newest, read_manifest(newest))
        if extra:
            log(f"{newest}: ignoring files its manifest does not list (never read): {', '.join(extra)}")
    return RunDir(out, candidates, _read_finished(out, log), explicit)


def has_run(out: Path) -> bool:
    """Whether ``out`` holds what a run produced: checkpoints, a final model or finished.json."""
    return bool(list_checkpoints(out)) or (out / "final").exists() or (out / FINISHED).exists()


def finished_already(run: RunDir, state: TrainerState, log: Any) -> bool:
    """True when ``run.out`` holds this run, finished (nothing to train). Raises PreftuneError when the run
    asks for fewer steps than the directory holds, or for more with no checkpoint to continue from."""
    done, total = run.finished, state.total_steps
    hint = (f"train into a new output_dir, or start over in {run.out} with resume: never "
            "(--resume never; its checkpoints and final model are removed)")
    if done is not None:
        check_same_plan(done, state, run.out / FINISHED)
        if total == done.step:
            log(f"{run.out} already holds this run, finished at step {done.step}: nothing to train "
                f"(final model: {run.out / 'final'})")
            return True
        if total < done.step:
            raise PreftuneError(f"the run in {run.out} finished at step {done.step}; this run asks for {total} "
                                "steps, and a finished run is not shortened", field="max_steps", hint=hint)
        if not run.candidates:
            raise PreftuneError(f"the run in {run.out} finished at step {done.step} and has no checkpoint to "
                                f"continue from to step {total}", field="max_steps",
                                hint=f"set save_every to keep checkpoints; or {hint}")
        log(f"extending the finished run in {run.out} from step {done.step} to step {total}")
    if run.candidates and checkpoint_step(run.candidates[0]) > total:
        raise PreftuneError(f"the newest checkpoint is at step {checkpoint_step(run.candidates[0])}; this run "
                            f"asks for only {total} steps", path=str(run.candidates[0]), field="max_steps",
                            hint=hint)
    return False


def start_run(run: RunDir, config: Any, log: Any) -> None:
    """Prepare ``run.out`` for training (main process, after the model and data have loaded): with
    ``resume: never`` remove the previous run; drop finished.json (the run is not finished while it
    trains) and half-written ``step-N.tmp`` checkpoints; write the resolved config (atomically: a run
    killed while writing it must not leave a torn config.yaml, which reruns are compared with)."""
    from preftune.config import to_yaml

    out = run.out
    if config.resume == "never" and has_run(out):
        log(f"resume: never: starting over in {out}; removing the previous run's checkpoints/ and final model")
        for name in ("checkpoints", "final", "final-merged"):
            shutil.rmtree(out / name, ignore_errors=True)
    (out / FINISHED).unlink(missing_ok=True)
    for tmp in (out / "checkpoints").glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (CONFIG_YAML + ".tmp")
    tmp.write_text(to_yaml(config), encoding="utf-8")
    sync_file(tmp)
    tmp.replace(out / CONFIG_YAML)
    sync_dir(out)


def mark_finished(out: Path, state: TrainerState) -> None:
    """``finished.json``: written (atomically) once ``final/`` is saved."""
    tmp = Path(out) / (FINISHED + ".tmp")
    write_json(tmp, {k: v for k, v in asdict(state).items() if k != "pending"})
    tmp.replace(Path(out) / FINISHED)
    sync_dir(Path(out))


def check_same_plan(saved: TrainerState, now: TrainerState, path: Path) -> None:
    """The data plan (items, global batch, grouping) of a checkpoint or finished run is this run's."""
    for key in ("num_items", "global_batch", "group_by_length"):
        if getattr(saved, key) != getattr(now, key):
            raise PreftuneError(
                f"cannot resume: the saved run was trained with {key} = {getattr(saved, key)}, "
                f"this run has {getattr(now, key)}", path=str(path),
                hint="use the same data and batch settings, or set resume: never (or a new output_dir)")


def resume_latest(run_dir: RunDir, state: TrainerState, accelerator: Any, *, model: Any, optimizer: Any,
                  scheduler: Any, method: Any, log: Any) -> None:
    """Load the newest checkpoint that loads on every process (a damaged one is skipped with a message,
    unless it was named by resume: PATH) and continue its step."""
    import torch

    errors: list[CheckpointDamaged] = []
    for path in run_dir.candidates:
        error: CheckpointDamaged | None = None
        try:
            saved = load_checkpoint(accelerator, path, model=model, optimizer=optimizer, scheduler=scheduler,
                                    method=method)
        except CheckpointDamaged as exc:
            error = exc
        failed = torch.tensor(float(error is not None), device=accelerator.device)
        if accelerator.reduce(failed, reduction="sum").item() == 0:
            check_same_plan(saved, state, path)
            state.step, state.pending = saved.step, saved.pending
            log(f"resumed from {path} at step {state.step}")
            return
        error = error or CheckpointDamaged(path, "it could not be loaded on another process")
        if run_dir.explicit:
            raise error
        errors.append(error)
        log(f"skipping damaged checkpoint {path}: {error.reason}")
    if errors:
        raise _none_usable(errors)


def check_checkpoints_supported(accelerator: Any, config: Any, run_dir: RunDir) -> None:
    if checkpoints_supported(accelerator) or not (config.save_every or run_dir.candidates):
        return
    raise PreftuneError("checkpoints are written for single-process, DDP and FSDP2 runs, not under DeepSpeed "
                        "(its engine's partitioned state is not saved)",
                        field="save_every" if config.save_every else "resume",
                        hint="set save_every: 0 and resume: never under DeepSpeed, or train with FSDP2")


def save_final(method: Any, model: Any, accelerator: Any, config: Any, out: Path, log: Any) -> Path:
    """``OUTPUT_DIR/final`` (LoRA: the adapter) and, with ``merge_lora``, ``OUTPUT_DIR/final-merged``."""
    from preftune.train.sharded import full_state_dict, is_sharded

    accelerator.wait_for_everyone()
    final = out / "final"
    sharded = is_sharded(model)
    state = full_state_dict(model) if sharded else None  # FSDP2: every process sends its shards to the main one
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        method.save(inner, final, **({"state_dict": state} if sharded else {}))
        log(f"saved the final model to {final}")
        if config.lora and config.merge_lora:
            merged = merged_from_adapter(config, final, method.tokenizer) if sharded else inner.merge_and_unload()
            method.save(merged, out / "final-merged")
            log(f"saved the merged model to {out / 'final-merged'}")
    accelerator.wait_for_everyone()
    return final


def merged_from_adapter(config: Any, adapter: Path, tokenizer: Any) -> Any:
    """The base model with the LoRA adapter saved in ``adapter`` merged into it (a sharded model cannot merge
    in place: its weights are shards)."""
    from peft import PeftModel

    from preftune.models import load_policy

    base = load_policy(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                       tokenizer=tokenizer)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


# ------------------------------------------------------------------------------------------------ helpers


def _none_usable(errors: list[CheckpointDamaged]) -> PreftuneError:
    """Every checkpoint is damaged: the error names the newest one's damaged file."""
    newest = errors[0]
    others = f" (and {len(errors) - 1} older, also damaged)" if len(errors) > 1 else ""
    return PreftuneError(f"no checkpoint to resume from: {newest.checkpoint.name} is damaged{others}: "
                         f"{newest.reason}", path=newest.path,
                         hint="start over with resume: never, or train into a new output_dir")


def _check_same_config(old: dict[str, Any], new: dict[str, Any], ignore: set[str], *, source: Path,
                       out: Path) -> None:
    differences = config_differences(old, new, ignore)
    if differences:
        raise PreftuneError(
            f"output_dir holds a run with other settings, which is not continued: {'; '.join(differences)}",
            path=str(source),
            hint=f"train into a new output_dir, or start over in {out} with resume: never (--resume never; "
                 "its checkpoints and final model are removed)")


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: set[str]) -> list[str]:
    """``key: old -> new`` for every key both configs have that differs, apart from ``ignore``. When the
    run directory was moved (output_dir differs only in its leading folders), a path value under the
    old location is compared as if it were under the new one."""
    relocate = _relocation(old.get("output_dir"), new.get("output_dir"))
    found = []
    for key, value in new.items():
        if key in ignore or key not in old:
            continue
        before = old[key]
        if before == value or relocate(before) == value:
            continue
        found.append(f"{key}: {_show(before)} -> {_show(value)}")
    return found


def _relocation(old: Any, new: Any) -> Any:
    def same(value: Any) -> Any:
        return value

    if not (isinstance(old, str) and isinstance(new, str)):
        return same
    a, b = list(Path(old).parts), list(Path(new).parts)
    while a and b and a[-1] == b[-1]:
        a.pop()
        b.pop()
    if not a or not b or a == b:
        return same
    old_root, new_root = str(Path(*a)), str(Path(*b))

    def moved(value: Any) -> Any:
        if isinstance(value, str) and (value == old_root or value.startswith(old_root.rstrip("/") + "/")):
            return new_root + value[len(old_root):]
        return value

    return moved


def _show(value: Any) -> str:
    from preftune.config import format_value

    return format_value(value)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise PreftuneError(f"the run's resolved config cannot be read ({type(exc).__name__})", path=str(path),
                            hint="train into a new output_dir, or start over with resume: never") from None
    if not isinstance(values, dict):
        raise PreftuneError("the run's resolved config is not a mapping of keys", path=str(path),
                            hint="train into a new output_dir, or start over with resume: never")
    return values


def _read_finished(out: Path, log: Any) -> TrainerState | None:
    """The finished run's state, when finished.json and final/ are both there. An unreadable finished.json
    counts as absent (the run is then resumed or trained again, to the same result), with a message."""
    import json

    path = out / FINISHED
    if not (path.is_file() and (out / "final").is_dir()):
        return None
    try:
        state = TrainerState(**json.loads(path.read_text(encoding="utf-8")))
        if isinstance(state.step, int):
            return state
    except (ValueError, TypeError, UnicodeDecodeError):
        pass
    log(f"{path} is not a finished-run record: ignored (the run is continued as if unfinished)")
    return None
