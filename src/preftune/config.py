"""Training configs: one dataclass per command, loaded from YAML and overridden from the command line.

Every field has a type, a default and a one-line help string (``metadata["help"]``); the CLI help, the
``preftune train keys`` table and docs/training.md are generated from these fields, so they cannot
drift apart. A config is resolved in three layers, later ones winning::

    dataclass defaults  <  CONFIG.yaml  <  command-line overrides (--beta 0.2 --lora.r 8)

Unknown keys and wrong types are errors that name the key, the YAML file and line, and the nearest
valid key. The resolved config is written to ``OUTPUT_DIR/config.yaml`` (with the help strings as
comments), which is itself a valid config for the same command.

Batch arithmetic: ``batch_size`` is the micro-batch (examples or pairs per forward pass per process),
so one optimizer step sees ``batch_size * grad_accum * num_processes`` examples, and
"batch_size 8, grad_accum 1" and "batch_size 1, grad_accum 8" describe the same update.

This module imports only the standard library and PyYAML, so ``preftune --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from preftune.errors import PreftuneError


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A config field: default, one-line help and (for strings) the allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------------------------ configs
@dataclass
class TrainConfig:
    """Keys shared by every training command."""

    requires_data: ClassVar[bool] = True  # online methods may take their prompts in memory instead

    model: str = opt("", "model to start from: a Hugging Face hub id or a local directory (required)")
    data: str = opt("", "training data: a JSONL/JSON/CSV/Parquet file or a hub dataset id (required)")
    data_format: str = opt("auto", "format of `data` and `eval_data` rows; auto = detect from the keys")
    data_split: str = opt("train", "split to read when `data` is a hub dataset")
    eval_data: str | None = opt(None, "evaluation data (same format as `data`); null = use eval_fraction")
    eval_fraction: float = opt(0.0, "fraction of `data` held out for evaluation when eval_data is null")
    output_dir: str = opt("runs/train", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    learning_rate: float = opt(1e-5, "peak learning rate of AdamW")
    batch_size: int = opt(8, "micro-batch: examples (or pairs) per forward pass per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step (step = batch_size*grad_accum*processes)")
    group_by_length: bool = opt(False, "put items of similar length in the same step: less padding "
                                "(sft, reward, dpo; not the online methods)")
    eval_batch_size: int | None = opt(None, "micro-batch size for evaluation; null = batch_size")
    max_steps: int | None = opt(None, "optimizer steps to train; null = run `epochs` over the data")
    epochs: float = opt(1.0, "passes over the training data (fractions allowed) when max_steps is null")
    max_length: int = opt(1024, "maximum tokens per sequence (prompt + response); longer ones are truncated")
    seed: int = opt(42, "seed of the data order, the eval split, dropout and LoRA initialisation")
    lora: dict[str, Any] | None = opt(None, "peft LoraConfig fields (e.g. {r: 8}); null = full fine-tuning")
    merge_lora: bool = opt(False, "with lora: also save the merged model in OUTPUT_DIR/final-merged")
    dtype: str = opt("auto", "dtype the weights are loaded in; auto = as stored in the checkpoint",
                     choices=("auto", "float32", "bfloat16", "float16"))
    mixed_precision: str = opt("no", "autocast compute in bf16/fp16 over the loaded weights (GPU)",
                               choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    lr_scheduler: str = opt("cosine", "learning-rate schedule after warmup",
                            choices=("cosine", "linear", "constant"))
    warmup_steps: int = opt(0, "steps of linear warmup from 0 (wins over warmup_ratio when > 0)")
    warmup_ratio: float = opt(0.0, "fraction of the total steps used for warmup when warmup_steps is 0")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay (not applied to biases and norms)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this; 0 = no clipping")
    log_every: int = opt(10, "write a metrics.jsonl line (and tracker point) every N steps")
    eval_every: int = opt(0, "evaluate every N steps; 0 = only at the end (when there is eval data)")
    save_every: int = opt(0, "checkpoint every N steps in OUTPUT_DIR/checkpoints/step-N; 0 = never")
    keep_checkpoints: int = opt(2, "keep only the last K checkpoints (0 = keep all)")
    resume: str = opt("auto", "auto = continue from the latest checkpoint in output_dir; never; or a path")
    report_to: str = opt("auto", "trackers, comma-separated: tensorboard, wandb, mlflow, none; "
                         "auto = tensorboard when installed")
    run_name: str | None = opt(None, "run name shown by the trackers; null = the output_dir name")
    trust_remote_code: bool = opt(False, "allow model code from the hub (only for models you trust)")

    def validate(self) -> None:
        """Checks that need more than one key or a range; raise PreftuneError naming the key."""
        check_choices(self)
        _require(self, "model", bool(self.model), "is required: a hub id or a local model directory")
        if self.requires_data:
            _require(self, "data", bool(self.data), "is required: a data file or a hub dataset id")
        _require(self, "learning_rate", self.learning_rate > 0, "must be > 0")
        _require(self, "batch_size", self.batch_size >= 1, "must be >= 1")
        _require(self, "grad_accum", self.grad_accum >= 1, "must be >= 1")
        _require(self, "eval_batch_size", self.eval_batch_size is None or self.eval_batch_size >= 1, "must be >= 1")
        _require(self, "max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1 (or null)")
        _require(self, "epochs", self.epochs > 0, "must be > 0")
        _require(self, "max_length", self.max_length >= 2, "must be >= 2")
        _require(self, "eval_fraction", 0.0 <= self.eval_fraction < 1.0, "must be in [0, 1)")
        _require(self, "eval_fraction", not (self.eval_data and self.eval_fraction > 0),
                 "cannot be used together with eval_data: set one of them")
        _require(self, "warmup_ratio", 0.0 <= self.warmup_ratio <= 1.0, "must be in [0, 1]")
        for key in ("warmup_steps", "log_every", "eval_every", "save_every", "keep_checkpoints"):
            _require(self, key, getattr(self, key) >= 0, "must be >= 0")
        _require(self, "log_every", self.log_every >= 1, "must be >= 1")
        _require(self, "max_grad_norm", self.max_grad_norm >= 0, "must be >= 0 (0 = no clipping)")
        _require(self, "merge_lora", not (self.merge_lora and not self.lora), "needs `lora` to be set")
        if self.lora:
            _check_lora_keys(self)
        trackers = [t.strip() for t in self.report_to.split(",") if t.strip()]
        allowed = ("auto", "tensorboard", "wandb", "mlflow", "none")
        for tracker in trackers or [""]:
            if tracker not in allowed:
                _fail(self, "report_to", f"unknown tracker {tracker!r}", _suggest(tracker, allowed))


@dataclass
class SFTConfig(TrainConfig):
    """`preftune train sft`: supervised fine-tuning on demonstrations."""

    learning_rate: float = opt(2e-5, "peak learning rate of AdamW")
    output_dir: str = opt("runs/sft", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    completion_only_loss: bool = opt(True, "loss on completion / assistant tokens only; false = on all tokens")


@dataclass
class PairConfig(TrainConfig):
    """Keys shared by the methods trained on preference pairs (prompt, chosen, rejected)."""

    max_prompt_length: int | None = opt(None, "maximum prompt tokens; null = max_length // 2")
    truncation: str = opt("keep_end", "too-long pairs: keep_end = cut the prompt's start, then the response's "
                          "end (counted); error = stop; drop = leave the pair out (counted)",
                          choices=("keep_end", "error", "drop"))

    def validate(self) -> None:
        super().validate()
        _require(self, "max_prompt_length",
                 self.max_prompt_length is None or 1 <= self.max_prompt_length < self.max_length,
                 f"must be >= 1 and < max_length ({self.max_length})")


@dataclass
class RewardConfig(PairConfig):
    """`preftune train reward`: a scalar reward model r_phi(x, y) from preference pairs."""

    learning_rate: float = opt(1e-5, "peak learning rate of AdamW")
    output_dir: str = opt("runs/reward", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    margin: bool = opt(False, "use the pair's `margin` field in -log sigmoid(r_w - r_l - m) (Llama 2)")
    rankings: str = opt("keep", "K-way rankings: keep = one item, all K-choose-2 pairs in one forward "
                        "(InstructGPT); pairs = split into separate pairs", choices=("keep", "pairs"))
    center_rewards_coefficient: float = opt(0.0, "weight of the (r_w + r_l)^2 penalty that centres rewards "
                                            "(Eisenstein et al. 2023); 0 = off")


# The flat loss keys; null means "the loss function's own default" (e.g. beta 0.1 for dpo, 2.0 for simpo).
_DPO_LOSS_KEYS = ("beta", "label_smoothing", "gamma", "alpha")


@dataclass
class DPOConfig(PairConfig):
    """`preftune train dpo`: direct preference optimisation and its family of losses."""

    learning_rate: float = opt(5e-7, "peak learning rate of AdamW")
    output_dir: str = opt("runs/dpo", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    ref_model: str | None = opt(None, "reference pi_ref; null = the starting model (with lora: adapters off)")
    loss: str = opt("dpo", "preference loss: dpo, ipo, cdpo, hinge, robust, orpo, simpo, unlikelihood")
    beta: float | None = opt(None, "loss temperature beta; null = the loss's default (0.1 for dpo)")
    label_smoothing: float | None = opt(None, "label-flip rate eps of cdpo / robust; null = their default")
    gamma: float | None = opt(None, "SimPO target margin gamma; null = its default (0.5)")
    alpha: float | None = opt(None, "unlikelihood weight alpha; null = its default (1.0)")
    loss_kwargs: dict[str, Any] = opt({}, "any other keyword hyperparameters of the loss function")
    precompute_ref_logps: bool = opt(True, "compute reference log-probs once before training (cached on "
                                     "disk), then free the reference; false = a reference forward every step")
    ref_cache_dir: str | None = opt(None, "directory of the reference log-prob cache; "
                                    "null = ~/.cache/preftune/ref_logps")

    def validate(self) -> None:
        super().validate()
        self.loss_hparams()

    def loss_hparams(self) -> dict[str, Any]:
        """The keyword hyperparameters for ``preftune.core.losses.preference_loss(self.loss, ...)``.

        Flat keys (beta, label_smoothing, gamma, alpha) that are set, plus ``loss_kwargs``; a key the
        chosen loss does not accept is an error naming it and listing what the loss accepts.
        """
        from preftune.core.losses import LOSSES  # torch only; imported when a DPO config is validated

        spec = LOSSES.get(self.loss)
        if spec is None:
            _fail(self, "loss", f"unknown loss {self.loss!r}", _suggest(self.loss, list(LOSSES)))
        hparams = {k: getattr(self, k) for k in _DPO_LOSS_KEYS if getattr(self, k) is not None}
        clash = sorted(set(hparams) & set(self.loss_kwargs))
        if clash:
            _fail(self, "loss_kwargs", f"sets {', '.join(clash)} which is also a top-level key",
                  "set it in one place only")
        hparams.update(self.loss_kwargs)
        for key in hparams:
            if key not in spec.hparams:
                where = "loss_kwargs" if key in self.loss_kwargs else key
                _fail(self, where, f"loss {self.loss!r} has no hyperparameter {key!r}",
                      f"{self.loss} accepts: {', '.join(spec.hparams) or 'nothing'}")
        return hparams


# command -> config class; preftune.config_online adds ppo, rloo and raft (imported at the end of this module)
CONFIGS: dict[str, type[TrainConfig]] = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig}


# ------------------------------------------------------------------------------------------------ fields
@dataclass(frozen=True)
class KeyInfo:
    name: str
    type: str
    default: Any
    help: str
    choices: tuple[str, ...] | None


def keys(cls: type[TrainConfig]) -> list[KeyInfo]:
    """Every key of a config class, in declaration order (subclass overrides keep the base position)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(KeyInfo(f.name, _type_name(hints[f.name]), default, f.metadata.get("help", ""),
                           f.metadata.get("choices")))
    return out


def _type_name(tp: Any) -> str:
    base, optional = _unwrap_optional(tp)
    if typing.get_origin(base) is list:
        name = "list"
    else:
        name = {bool: "bool", int: "int", float: "float", str: "str"}.get(base, "mapping")
    return f"{name} | null" if optional else name


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def format_value(value: Any) -> str:
    """A value as it would be written in YAML (null, true, 1e-05, {r: 8})."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


# ------------------------------------------------------------------------------------------------ coercion
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def coerce(value: Any, tp: Any, *, key: str, from_text: bool) -> Any:
    """Convert ``value`` to the field type ``tp``; raise ValueError (message only) when it cannot.

    ``from_text`` is true for command-line values (always strings), which are parsed as YAML scalars
    where the type needs it. Floats also accept strings like "1e-5" (PyYAML reads them as strings).
    """
    import yaml

    base, optional = _unwrap_optional(tp)
    if value is None or (from_text and optional and str(value).lower() in ("null", "none", "~")):
        if optional:
            return None
        raise ValueError(f"must be a {_type_name(tp)}, not null")
    origin = typing.get_origin(base) or base
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"must be true or false, not {value!r}")
    if base is int:
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"must be an integer, not {value!r}")
    if base is float:
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ValueError(f"must be a number, not {value!r}")
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"must be a string, not {value!r}")
    if origin is dict:
        if from_text and isinstance(value, str):
            value = yaml.safe_load(value)
            if value is None and optional:
                return None
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(f"must be a mapping like {{r: 8}}, not {value!r}")
    if origin is list:
        if from_text and isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list like [0.1, 0.5], not {value!r}")
        (inner,) = typing.get_args(base) or (str,)
        try:
            return [coerce(v, inner, key=key, from_text=False) for v in value]
        except ValueError as exc:
            raise ValueError(f"has an element that {exc}") from None
    raise TypeError(f"config key {key!r} has an unsupported type {tp!r}")  # a bug in this module


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


# ------------------------------------------------------------------------------------------------ loading
def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--beta", "0.2", "--lora.r=8", "--merge_lora"]`` -> ``[("beta", "0.2"), ("lora.r", "8"),
    ("merge_lora", "true")]``. Dashes in key names become underscores; a bare flag means true."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise PreftuneError(f"unexpected argument {arg!r}", hint="overrides look like --key value or --key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        head, dot, rest = name.partition(".")
        out.append((head.replace("-", "_") + dot + rest, value))
        i += 1
    return out


def _apply_mapping(cls: type[TrainConfig], data: dict[Any, Any], values: dict[str, Any],
                   sources: dict[str, tuple[str | None, int | None]], *, path: str | None,
                   lines: dict[str, int]) -> None:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        key = str(key)
        where = (path, lines.get(key))
        _check_key(cls, key, names, where)
        try:
            values[key] = coerce(value, hints[key], key=key, from_text=False)
        except ValueError as exc:
            raise PreftuneError(str(exc), path=where[0], line=where[1], field=key) from None
        sources[key] = where


def from_mapping(cls: type[TrainConfig], data: dict[str, Any], **overrides: Any) -> Any:
    """A validated config from Python values (``{"model": ..., "data": ...}``), with the same checks as YAML."""
    values: dict[str, Any] = {}
    sources: dict[str, tuple[str | None, int | None]] = {}
    _apply_mapping(cls, {**data, **overrides}, values, sources, path=None, lines={})
    config = cls(**values)
    object.__setattr__(config, "_sources", sources)
    config.validate()
    return config


def load_config(cls: type[TrainConfig], path: str | Path | None = None,
                overrides: list[tuple[str, str]] | list[str] | None = None) -> Any:
    """Defaults < YAML file < overrides, converted to the field types and validated.

    ``overrides`` is a list of ``(key, text)`` pairs or raw ``["--key", "value", ...]`` arguments.
    Returns an instance of ``cls``.
    """
    import yaml

    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    sources: dict[str, tuple[str | None, int | None]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PreftuneError("config file not found", path=str(path), hint="give the path of a YAML file")
        text = path.read_text(encoding="utf-8")
        try:
            lines = _key_lines(text, path)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise PreftuneError(f"not valid YAML: {getattr(exc, 'problem', exc)}", path=str(path),
                                line=mark.line + 1 if mark else None) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PreftuneError("a config file must be a mapping of key: value lines", path=str(path), line=1)
        _apply_mapping(cls, data, values, sources, path=str(path), lines=lines)
        sources.update({k: (str(path), line) for k, line in lines.items() if "." in k})
    if overrides and isinstance(overrides[0], str):
        overrides = parse_overrides(overrides)  # type: ignore[arg-type]
    for key, text in overrides or []:
        where = (None, None)
        head, dot, sub = key.partition(".")
        _check_key(cls, head, names, where, cli=True)
        try:
            if dot:
                if typing.get_origin(_unwrap_optional(hints[head])[0]) is not dict:
                    raise ValueError(f"is a {_type_name(hints[head])}, it has no sub-key {sub!r}")
                mapping = dict(values.get(head) or _default(cls, head) or {})
                mapping[sub] = yaml.safe_load(text) if text else text
                values[head] = mapping
            else:
                values[head] = coerce(text, hints[head], key=head, from_text=True)
        except ValueError as exc:
            raise PreftuneError(f"--{key} {text}: {exc}", field=key) from None
        sources[head] = ("command line", None)
    config = cls(**values)
    object.__setattr__(config, "_sources", sources)
    config.validate()
    return config


def _default(cls: type[TrainConfig], name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _check_key(cls: type[TrainConfig], key: str, names: list[str], where: tuple[str | None, int | None],
               *, cli: bool = False) -> None:
    if key in names:
        return
    command = next((n for n, c in CONFIGS.items() if c is cls), cls.__name__)
    label = getattr(cls, "command_label", None) or f"train {command}"
    dash = "--" if cli else ""
    alias = _ALIASES.get(key)
    close = [alias] if alias in names else difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"did you mean {dash}{close[0]}? " if close else ""
    hint += getattr(cls, "keys_hint", None) or f"`preftune train keys {command}` lists every key"
    raise PreftuneError(f"unknown key '{dash}{key}' for `{label}`", path=where[0], line=where[1],
                        field=key, hint=hint)


# Names other tools use for the same settings: suggested (never silently accepted) when mistyped.
_ALIASES = {
    "lr": "learning_rate", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
    "lr_scheduler_type": "lr_scheduler", "scheduler": "lr_scheduler", "max_seq_length": "max_length",
    "model_name_or_path": "model", "dataset": "data", "train_data": "data", "save_steps": "save_every",
    "eval_steps": "eval_every", "logging_steps": "log_every", "save_total_limit": "keep_checkpoints",
    "bf16": "mixed_precision", "fp16": "mixed_precision", "torch_dtype": "dtype", "peft": "lora",
    "resume_from_checkpoint": "resume", "ref_model_name_or_path": "ref_model",
    "init_kl_coef": "kl_coef", "beta": "kl_coef", "kl_penalty": "kl_estimator", "target_kl": "kl_target",
    "target": "kl_target", "horizon": "kl_horizon", "ppo_epochs": "update_epochs",
    "num_ppo_epochs": "update_epochs", "cliprange": "clip_range", "cliprange_value": "value_clip_range",
    "rloo_k": "num_samples", "num_generations": "num_samples", "response_length": "max_new_tokens",
    "reward_model": "reward", "reward_model_path": "reward", "prompts": "data",
}


def _key_lines(text: str, path: Path) -> dict[str, int]:
    """1-based line of each top-level key (and ``parent.child`` for nested mappings); duplicates are errors."""
    import yaml

    root = yaml.compose(text)
    lines: dict[str, int] = {}
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key_node, value_node in root.value:
        key = str(key_node.value)
        if key in lines:
            raise PreftuneError(f"key {key!r} appears twice (first on line {lines[key]})", path=str(path),
                                line=key_node.start_mark.line + 1, field=key, hint="keep one of them")
        lines[key] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.MappingNode):
            for sub_key, _ in value_node.value:
                lines[f"{key}.{sub_key.value}"] = sub_key.start_mark.line + 1
    return lines


def _suggest(value: str, valid: Any) -> str:
    close = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=0.5)
    return (f"did you mean {close[0]!r}? " if close else "") + f"valid: {', '.join(valid)}"


def _fail(config: Any, key: str, message: str, hint: str | None = None) -> typing.NoReturn:
    sources = getattr(config, "_sources", {})
    path, line = sources.get(key) or sources.get(key.split(".")[0], (None, None))
    if path == "command line":
        path = None
    raise PreftuneError(message, path=path, line=line, field=key, hint=hint)


def _require(config: Any, key: str, ok: bool, message: str) -> None:
    if not ok:
        _fail(config, key, f"{message} (got {format_value(getattr(config, key))})")


def _check_lora_keys(config: TrainConfig) -> None:
    """Each key under ``lora`` is a field of ``peft.LoraConfig`` (peft is imported only when lora is set)."""
    from peft import LoraConfig

    valid = [f.name for f in dataclasses.fields(LoraConfig) if f.init]
    for key in config.lora or {}:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            _fail(config, f"lora.{key}", f"unknown LoRA option {key!r}",
                  (f"did you mean {close[0]!r}? " if close else "") + "keys are peft.LoraConfig fields "
                  "(r, lora_alpha, lora_dropout, target_modules, ...)")


def check_choices(config: TrainConfig) -> None:
    """Every string key with declared choices holds one of them (called by ``validate``)."""
    for info in keys(type(config)):
        value = getattr(config, info.name)
        if info.choices and value not in info.choices:
            _fail(config, info.name, f"{value!r} is not one of {', '.join(info.choices)}",
                  _suggest(value, info.choices))


# ------------------------------------------------------------------------------------------------ writing
def to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as a plain dict in declaration order."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def to_yaml(config: TrainConfig, *, command: str | None = None) -> str:
    """The config as commented YAML (each key preceded by its help line); loads back into the same class."""
    header = f"# preftune train {command}: resolved config" if command else "# preftune: resolved config"
    out = [header, ""]
    for info in keys(type(config)):
        out.append(f"# {info.help}")
        out.append(f"{info.name}: {format_value(getattr(config, info.name))}")
    return "\n".join(out) + "\n"


def write_config(config: TrainConfig, path: str | Path, *, command: str | None = None) -> Path:
    """Write the resolved config (``to_yaml``) to ``path`` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(config, command=command), encoding="utf-8")
    return path


def command_of(config: TrainConfig) -> str:
    """The command name of a config instance ("sft", "dpo", ...)."""
    for name, cls in CONFIGS.items():
        if type(config) is cls:
            return name
    return type(config).__name__.removesuffix("Config").lower()


import preftune.config_online  # noqa: E402, F401  (registers the online methods' configs in CONFIGS)
