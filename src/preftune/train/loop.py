"""The one training loop. Every method (sft, reward, dpo, ...) only says how a batch becomes a loss.

Read ``train`` top to bottom: setup -> optimizer + schedule -> (resume) -> for each step:
before_step -> micro-batches -> forward/backward -> clip -> step -> log / eval / checkpoint -> final save.

Data order: ``preftune.train.plan`` (which items each step takes: a pure function of the step, so
resuming needs only the step counter).

Gradient accumulation and normalisation (the arithmetic that makes "batch 8 x accumulation 1" equal
"batch 1 x accumulation 8", and W processes equal one). Let process ``p`` hold micro-batches ``k = 1..A``
(A = grad_accum, or what max_tokens_per_batch needs) with ``u_pk`` units (tokens, examples or pairs) and
summed loss ``S_pk``; however the step's items are split, the sums below are the same. The goal is the
gradient of the global mean ``L = sum_pk S_pk / U`` with ``U = sum_pk u_pk``:

1. every process sums its ``u_pk`` and the sum is all-reduced, so all know ``U``;
2. each micro-batch's loss is ``S_pk / U`` (the method divides by ``normaliser=U``) and its backward
   adds ``grad(S_pk) / U`` to ``.grad`` (``no_sync`` on all but the last micro-batch, so DDP
   communicates once per step); process ``p`` then holds ``g_p = sum_k grad(S_pk) / U``;
3. DDP averages over processes: ``(1/W) sum_p g_p = grad(L) / W``. So the loss is multiplied by ``W``
   before backward, and the averaged gradient is exactly ``grad(L)``, whatever the split.

Logged values are global: ``loss`` is ``L`` (mean over the steps since the last log line), method
metrics are their sums over all units divided by ``U``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune import timing
from preftune.config import to_dict
from preftune.data.jsonl import append_jsonl, read_records, sync_file, truncate_jsonl
from preftune.errors import PreftuneError
from preftune.train.base import RunContext, StepOutput, TrainConfig, TrainingMethod
from preftune.train.checkpoint import TrainerState, checkpoint_dir, checkpoints_supported, save_checkpoint
from preftune.train.plan import batch_indices, describe_budget, epoch_order, micro_batches, plan_steps
from preftune.train.rundir import (
    check_checkpoints_supported,
    config_values,
    finished_already,
    inspect_run,
    mark_finished,
    resume_latest,
    save_final,
    start_run,
)
from preftune.train.schedule import lr_schedule

# ------------------------------------------------------------------------------------------------ the loop


def train(method: TrainingMethod, config: TrainConfig) -> Path:
    """Train ``method`` as ``config`` says; return ``OUTPUT_DIR/final`` (the saved model and tokenizer)."""
    timing.start("imports")  # the start-up clock (preftune.timing); `preftune train` started it already
    from accelerate.utils import ProjectConfiguration, set_seed

    from preftune.train.strategy import describe, make_accelerator

    out = Path(config.output_dir)
    trackers = _trackers(config.report_to)
    timing.mark("accelerate")
    accelerator = make_accelerator(  # the launcher's strategy, or an error if it cannot be honoured
        config, log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    log = _main_print(accelerator)
    log(describe(accelerator))
    try:
        set_seed(config.seed)
        # the run directory: a previous run with other settings is refused before anything loads
        # (preftune.train.rundir); nothing in it is changed until the model and data have loaded
        run_dir = inspect_run(out, config, num_processes=accelerator.num_processes, log=log)
        check_checkpoints_supported(accelerator, config, run_dir)
        method.setup(RunContext(config=config, accelerator=accelerator, output_dir=out, log=log))
        timing.mark("prepare")  # the loaders marked model, data and reference inside setup
        state = plan_steps(len(method.train_items), config, accelerator.num_processes,
                           updates_per_batch=getattr(method, "updates_per_batch", 1))
        _describe(method, state, config, log)
        if finished_already(run_dir, state, log):
            return out / "final"
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            start_run(run_dir, config, log)
        accelerator.wait_for_everyone()
        lengths = _item_lengths(method, state, config, log) if config.group_by_length else None
        for line in describe_budget(method.train_items, state, config, lengths=lengths):
            log(line)

        optimizer = _adamw(method.model, config)
        scheduler = lr_schedule(optimizer, config, state.total_steps)
        model, optimizer = accelerator.prepare(method.model, optimizer)
        resume_latest(run_dir, state, accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                      method=method, log=log)
        metrics = MetricsFile(out / "metrics.jsonl", keep_until=state.step, enabled=accelerator.is_main_process,
                              log=log)
        values = config_values(config)

        def save() -> Path:
            metrics.sync()  # the metrics up to the checkpoint's step survive with it
            return save_checkpoint(accelerator, state, out, keep=config.keep_checkpoints, model=model,
                                   optimizer=optimizer, scheduler=scheduler, config_values=values, method=method)

        if trackers:
            accelerator.init_trackers(config.run_name or out.name, config=_scalars(to_dict(config)))
        log(timing.ready_line(*timing.stop()))

        with _progress(accelerator, state) as bar, _StopOnSigint(log) as stop:
            while state.step < state.total_steps:
                step_log = _train_step(method, model, optimizer, scheduler, accelerator, config, state,
                                       lengths=lengths, stop=stop)
                state.step += 1
                _accumulate(state.pending, step_log)
                _after_step(method, model, state, metrics, accelerator, log)
                bar.update(state.step, step_log["loss"])
                if state.step % config.log_every == 0 or state.step == state.total_steps:
                    record = _finish_log(state, config)
                    metrics.write(record)
                    accelerator.log(record, step=state.step)
                if method.eval_items and (
                        (config.eval_every and state.step % config.eval_every == 0) or state.step == state.total_steps):
                    record = {"step": state.step, "epoch": _epoch(state),
                              **evaluate(method, model, accelerator, config)}
                    metrics.write(record)
                    accelerator.log(record, step=state.step)
                    log(_format_eval(record))
                saved = bool(config.save_every) and state.step % config.save_every == 0
                if saved:
                    save()
                if step_log["stop"]:
                    if not checkpoints_supported(accelerator):
                        log("interrupted; no checkpoint is saved under DeepSpeed")
                        raise KeyboardInterrupt
                    path = checkpoint_dir(out, state.step) if saved else save()
                    log(f"interrupted: saved {path}; run the same command again to continue")
                    raise KeyboardInterrupt

        final = save_final(method, model, accelerator, config, out, log)
        if accelerator.is_main_process:
            mark_finished(out, state)
        accelerator.wait_for_everyone()
        return final
    finally:
        timing.stop()
        if trackers:
            accelerator.end_training()
        _release(accelerator)


def _train_step(method: TrainingMethod, model: Any, optimizer: Any, scheduler: Any, accelerator: Any,
                config: TrainConfig, state: TrainerState, *, lengths: Sequence[int] | None,
                stop: _StopOnSigint) -> dict[str, Any]:
    """One optimizer step over this process's micro-batches (``grad_accum`` of them, or as many as
    max_tokens_per_batch needs: ``plan.micro_batches``); returns the step's global values (``lengths``: the
    training items' lengths with group_by_length, else None)."""
    started = time.perf_counter()
    world = accelerator.num_processes
    # 1. the step's items: this process's share of the seeded order of the training set (grouped by
    #    length when asked), or the items an online method's before_step produced on this process
    items = method.before_step(model, state.step)
    if items is None:
        items = [method.train_items[i] for i in batch_indices(state, state.step, seed=config.seed, lengths=lengths)]
        chunks = micro_batches(items, config, process=accelerator.process_index, num_processes=world)
    else:
        chunks = micro_batches(list(items), config, process=0, num_processes=1, planned=False)
    micro = [method.collate(chunk) for chunk in chunks]
    # 2. the normaliser U: units summed over this process's micro-batches and all-reduced over processes
    local_units = torch.tensor(sum(float(method.units(b)) for b in micro), dtype=torch.float64,
                               device=accelerator.device)
    total_units = accelerator.reduce(local_units, reduction="sum").item()
    if total_units <= 0:
        raise PreftuneError(f"step {state.step + 1} has no units to average over (e.g. every completion "
                            "was truncated away)", hint="raise max_length or check the data")
    # 3. forward / backward per micro-batch; DDP synchronises gradients on the last one only. A method with
    #    ``prepare_step`` first sees all of the step's micro-batches (KTO: its reference point z0, from all)
    model.train()
    if hasattr(method, "prepare_step"):
        method.prepare_step(model, micro)
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    metric_sums: dict[str, torch.Tensor] = {}
    metric_shares: dict[str, torch.Tensor] = {}
    logs: dict[str, float] = {}
    tokens = 0
    for k, batch in enumerate(micro):
        batch = _to_device(batch, accelerator.device)
        tokens += _count_tokens(batch)
        sync = contextlib.nullcontext() if k == len(micro) - 1 else accelerator.no_sync(model)
        with sync:
            out: StepOutput = method.loss(model, batch, normaliser=total_units)
            accelerator.backward(out.loss * world)  # x W: DDP's mean over processes becomes the sum
        loss_sum += out.loss.detach().double()
        for totals, values in ((metric_sums, out.metric_sums), (metric_shares, out.metric_shares)):
            for name, value in values.items():
                totals[name] = totals.get(name, 0.0) + torch.as_tensor(value).detach().double()
        logs.update(out.logs)
    # 4. clip, step, schedule
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # 5. global values: one all-reduce for the loss, the metrics, the token count and the stop flag;
    #    metric sums become means over the step's units, metric shares are summed as they are
    names, shared = sorted(metric_sums), sorted(metric_shares)
    values = [*(metric_sums[n] for n in names), *(metric_shares[n] for n in shared)]
    packed = torch.stack([loss_sum, *(v.to(accelerator.device).reshape(()) for v in values),
                          torch.tensor(float(tokens), dtype=torch.float64, device=accelerator.device),
                          torch.tensor(float(stop.requested), dtype=torch.float64, device=accelerator.device)])
    packed = accelerator.reduce(packed, reduction="sum").tolist()
    metrics = {n: v / total_units for n, v in zip(names, packed[1:1 + len(names)], strict=True)}
    metrics.update(zip(shared, packed[1 + len(names):-2], strict=True))
    return {"loss": packed[0], "grad_norm": float(grad_norm), "learning_rate": learning_rate,
            "metrics": metrics, "logs": logs, "tokens": packed[-2], "seconds": time.perf_counter() - started,
            "stop": packed[-1] > 0}


@torch.no_grad()
def evaluate(method: TrainingMethod, model: Any, accelerator: Any, config: TrainConfig) -> dict[str, float]:
    """``eval/loss`` and ``eval/<metric>`` over all eval items: sums over units, divided by the total units."""
    items = method.eval_items[accelerator.process_index::accelerator.num_processes]
    size = config.eval_batch_size or config.batch_size
    # every process runs as many batches as the first (it has the most items): a sharded model's forward is
    # collective; a process out of items runs the first item again with weight 0 (it joins with zeros)
    batches = -(-len(method.eval_items[::accelerator.num_processes]) // size)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    units = 0.0
    for start in range(0, batches * size, size):
        chunk = items[start:start + size]
        weight = 1.0 if chunk else 0.0
        batch = _to_device(method.collate(chunk or method.eval_items[:1]), accelerator.device)
        units += weight * float(method.units(batch))
        out = method.loss(model, batch, normaliser=1.0)  # normaliser 1: the loss comes back as a sum
        for name, value in {"loss": out.loss, **out.metric_sums}.items():
            sums[name] = sums.get(name, 0.0) + weight * torch.as_tensor(value).detach().double()
    model.train()
    names = sorted(sums)
    packed = torch.stack([torch.tensor(units, dtype=torch.float64),
                          *(torch.as_tensor(sums.get(n, 0.0), dtype=torch.float64).cpu() for n in names)])
    packed = accelerator.reduce(packed.to(accelerator.device), reduction="sum").tolist()
    return {f"eval/{n}": v / packed[0] for n, v in zip(names, packed[1:], strict=True)} if packed[0] > 0 else {}


# ------------------------------------------------------------------------------------------------ helpers


def _adamw(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) over trainable parameters; no weight decay on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PreftuneError("the model has no trainable parameters", field="lora")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    settings = {"lr": config.learning_rate, "betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon}
    try:  # one fused kernel per step: on CPU ~6x faster than the foreach update and without its temporary copies
        return torch.optim.AdamW([g for g in groups if g["params"]], fused=True, **settings)
    except (RuntimeError, ValueError, TypeError):  # a device or dtype the fused kernel does not support
        return torch.optim.AdamW([g for g in groups if g["params"]], **settings)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _count_tokens(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens: the sum of every ``*attention_mask`` tensor, else of ``input_ids`` sizes."""
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and isinstance(v, torch.Tensor)]
    if masks:
        return int(sum(m.sum().item() for m in masks))
    return int(sum(v.numel() for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor)))


def _after_step(method: TrainingMethod, model: Any, state: TrainerState, metrics: MetricsFile, accelerator: Any,
                log: Any) -> None:
    """The method's work between steps, when it has any (``after_step``: the reward mixture's E-step): its
    records become metrics.jsonl lines at this step; when it says training is done (EM has converged), the
    step counter moves to the plan's end, so the last log line, the final evaluation and finished.json
    follow as for a run of the planned length."""
    hook = getattr(method, "after_step", None)
    if hook is None:
        return
    records, done = hook(model, state.step)
    for record in records:
        record = {"step": state.step, **record}
        metrics.write(record)
        accelerator.log(record, step=state.step)
    if done and state.step < state.total_steps:
        log(f"{done}: the remaining {state.total_steps - state.step} planned steps are skipped")
        state.step = state.total_steps


def _accumulate(pending: dict[str, Any], step_log: dict[str, Any]) -> None:
    """Add one step's values to the sums kept until the next log line (saved in checkpoints)."""
    pending["steps"] = pending.get("steps", 0) + 1
    for key in ("loss", "grad_norm", "tokens", "seconds"):
        pending[key] = pending.get(key, 0.0) + step_log[key]
    sums = pending.setdefault("metrics", {})
    for name, value in step_log["metrics"].items():
        sums[name] = sums.get(name, 0.0) + value
    pending["learning_rate"] = step_log["learning_rate"]
    pending["logs"] = step_log["logs"]


def _finish_log(state: TrainerState, config: TrainConfig) -> dict[str, Any]:
    """One metrics.jsonl record: means over the steps since the last record; resets the sums."""
    p, n = state.pending, state.pending["steps"]
    record = {"step": state.step, "epoch": _epoch(state), "loss": p["loss"] / n, "grad_norm": p["grad_norm"] / n,
              "learning_rate": p["learning_rate"], "tokens_per_second": p["tokens"] / max(p["seconds"], 1e-9),
              **{name: value / n for name, value in p["metrics"].items()}, **p["logs"]}
    state.pending = {}
    return record


def _epoch(state: TrainerState) -> float:
    return round(state.step / state.steps_per_epoch, 4)


class MetricsFile:
    """``metrics.jsonl``: one JSON object per line, flushed as written and fsynced with every checkpoint.
    On resume, lines after the checkpoint's step (written by the interrupted run after its last
    checkpoint) are dropped, and so is a torn last line (a write cut off by a crash), with a message."""

    def __init__(self, path: Path, *, keep_until: int, enabled: bool, log: Any = None) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            truncate_jsonl(path, lambda record: record.get("step", 0) <= keep_until,
                           on_torn_tail=log)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_jsonl(self.path, [record])

    def sync(self) -> None:
        if self.enabled:
            sync_file(self.path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    return read_records(path)


def _trackers(report_to: str) -> list[str]:
    """Tracker names for accelerate's ``log_with``; ``auto`` = tensorboard when it is installed."""
    import importlib.util

    names = [t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"]
    if "auto" in names:
        names.remove("auto")
        if importlib.util.find_spec("tensorboard") is not None and "tensorboard" not in names:
            names.append("tensorboard")
    return names


def _scalars(values: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as trackers accept them (scalars; None and mappings as text)."""
    import json

    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in values.items()}


def _main_print(accelerator: Any) -> Any:
    from rich.console import Console

    console = Console(stderr=True)

    def log(message: str) -> None:
        if accelerator.is_main_process:
            console.print(f"[dim]preftune[/] {message}", highlight=False, soft_wrap=True)

    return log


def _describe(method: TrainingMethod, state: TrainerState, config: TrainConfig, log: Any) -> None:
    params = list(method.model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    unused = state.num_items % state.global_batch
    processes = state.global_batch // (config.batch_size * config.grad_accum)
    log(f"{_count(state.num_items, 'training item')}, {_count(len(method.eval_items), 'eval item')}; "
        f"{state.global_batch} per step (batch_size {config.batch_size} x grad_accum {config.grad_accum} x "
        f"{_count(processes, 'process', 'processes')}); {_count(state.steps_per_epoch, 'step')} per epoch, "
        f"{_count(state.total_steps, 'step')}")
    if unused:
        log(f"each epoch leaves out {_count(unused, 'item')} that "
            f"{'does' if unused == 1 else 'do'} not fill a last step (different ones each epoch)")
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)")


def _count(n: int, singular: str, plural: str | None = None) -> str:
    """``1 step``, ``2 steps``."""
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def _item_lengths(method: TrainingMethod, state: TrainerState, config: TrainConfig, log: Any) -> list[int]:
    """The training items' lengths for group_by_length; logs the padding of the first epoch with and without."""
    from preftune.data.collate import item_length, real_token_share, row_lengths

    lengths = [item_length(item) for item in method.train_items]
    rows = [row_lengths(item) for item in method.train_items]
    used = state.steps_per_epoch * state.global_batch
    share = {grouped: real_token_share([rows[i] for i in epoch_order(
        state.num_items, seed=config.seed, epoch=0, lengths=lengths if grouped else None,
        group=state.global_batch)[:used]], config.batch_size) for grouped in (False, True)}
    log(f"group_by_length: real tokens are {share[True]:.1%} of the padded positions of the first epoch's "
        f"micro-batches ({share[False]:.1%} in random order)")
    return lengths


def _format_eval(record: dict[str, Any]) -> str:
    values = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("eval/"))
    return f"step {record['step']}: {values}"


def _release(accelerator: Any) -> None:
    """Let a later ``train`` in the same process pick its own settings (accelerate keeps a singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    if accelerator.num_processes == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()


class _StopOnSigint:
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self, log: Any) -> None:
        self.log, self.requested, self._previous = log, False, None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Bar:
    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task

    def update(self, step: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=f"loss {loss:.4f}")


@contextlib.contextmanager
def _progress(accelerator: Any, state: TrainerState) -> Any:
    """A rich progress bar on the main process of an interactive terminal; nothing otherwise."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not (accelerator.is_main_process and console.is_terminal):
        yield _Bar(None, None)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("training", total=state.total_steps, completed=state.step)
        yield _Bar(progress, task)
