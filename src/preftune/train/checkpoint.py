"""Checkpoints with exact resume: ``OUTPUT_DIR/checkpoints/step-N``.

A checkpoint holds everything the next step depends on:

* model weights, optimizer state (AdamW moments), the learning-rate scheduler and the RNG states of
  python, numpy and torch (CPU and CUDA) of every process, written by ``accelerator.save_state``;
* ``trainer_state.json``: the step counter, the data plan (examples, global batch, steps per epoch,
  length grouping; the position in the data is a pure function of the step, see ``plan.batch_indices``)
  and the metric sums accumulated since the last log line, so a resumed run writes the same
  metrics.jsonl lines;
* ``method_state_R.pt`` (one per process R) when the method has ``state_dict()`` / ``load_state_dict()``:
  what an online method keeps between steps (its current rollout, the adaptive KL coefficient), so a run
  interrupted in the middle of a rollout resumes on the same rollout. It holds only tensors and plain
  Python values and is read with ``torch.load(weights_only=True)``.

A checkpoint is written to ``step-N.tmp`` and renamed when complete, so a run killed while saving never
leaves a half-written ``step-N`` behind; resume picks the highest complete ``step-N``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a trainer_state.json) in ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def find_resume(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``auto`` = the latest in output_dir (None if none), ``never`` = None,
    anything else = that path, which must be a checkpoint directory."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise PreftuneError(f"{path} is not a checkpoint directory (no {STATE_FILE})", field="resume",
                            hint="give OUTPUT_DIR/checkpoints/step-N, or `auto` / `never`")
    return path


def save_checkpoint(accelerator: Any, state: TrainerState, output_dir: Path, *, keep: int,
                    method: Any = None) -> Path:
    """Write ``checkpoints/step-{state.step}`` (all processes call this) and delete all but the last ``keep``."""
    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if hasattr(method, "state_dict"):
        import torch

        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(method.state_dict(), tmp / f"method_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(state.to_json(), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep > 0:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: Path, *, method: Any = None) -> TrainerState:
    """Restore model, optimizer, scheduler, RNG states (and the method's state) from ``path``; return the
    loop's state."""
    accelerator.load_state(str(path))
    if hasattr(method, "load_state_dict"):
        import torch

        saved = Path(path) / f"method_state_{accelerator.process_index}.pt"
        if not saved.is_file():
            raise PreftuneError(f"the checkpoint has no {saved.name} (the method's state)", path=str(path),
                                hint="resume with the same method and number of processes, or set resume: never")
        method.load_state_dict(torch.load(saved, weights_only=True))
    return TrainerState.from_json((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
