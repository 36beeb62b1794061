"""Configs as dataclasses: the engine that loads them from YAML and the command line, checks and writes them.

A config class is a dataclass deriving from ``Config`` whose fields are made with ``opt``: each has a
type, a default, a one-line help string (``metadata["help"]``) and, where it applies, its allowed values
(``choices=``) or range (``gt=0``, ``ge=0, lt=1``), so the CLI help, the ``preftune train keys`` table and
the docs' key tables are generated from the fields and cannot drift apart, and ``check_fields`` enforces
them for every config. The training configs live with their methods (``preftune.train.base.TrainConfig``
and one per ``train/<method>.py``); this module knows none of them. A config is resolved in three layers, later ones winning::

    dataclass defaults  <  CONFIG.yaml  <  command-line overrides (--beta 0.2 --lora.r 8)

A list on the command line is YAML (``--rewards '[a.py:f, b.py:g]'``) or comma-separated (``--rewards a.py:f,b.py:g``).

Unknown keys and wrong types are errors that name the key, the YAML file and line, and the nearest
valid key (or the key another tool's name stands for, ``Config.aliases``: TRL's ``--dataset_name`` is
``--data``, its ``--per_device_train_batch_size`` is ``--batch_size``). Checks of values use
``require`` / ``fail``, which name the file and line the key was set on. ``Config.preflight`` checks what
the values point at (a model directory that does not exist); whoever is about to use a config calls it, so
every mistake is reported before anything heavy loads. ``write_config`` writes the resolved config with the help
strings as comments; it is itself a valid config for the same command.

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


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, gt: float | None = None,
        ge: float | None = None, lt: float | None = None, le: float | None = None, why: str | None = None) -> Any:
    """A config field: default, one-line help, (for strings) the allowed values and (for numbers) the
    allowed range: ``gt``/``ge`` a lower bound (> or >=), ``lt``/``le`` an upper one (< or <=); ``why``
    says what goes wrong outside it. ``check_fields`` enforces both; ``keys`` shows them."""
    if gt is not None and ge is not None or lt is not None and le is not None:
        raise TypeError("give one lower bound (gt or ge) and one upper bound (lt or le)")  # a bug in a config class
    bounds = Range(gt if gt is not None else ge, gt is not None, lt if lt is not None else le, lt is not None)
    meta = {"help": help, "choices": choices, "range": bounds if bounds != Range() else None, "why": why}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Range:
    """The allowed values of a number: ``low``..``high``, each end open (excluded) or closed; None = unbounded."""

    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        """``> 0``, ``>= 1``, ``in [0, 1)``, ``<= 5``."""
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "any number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# ------------------------------------------------------------------------------------------------ the base


class Config:
    """Base of every config dataclass: what the engine asks of a config class.

    ``label()`` names the command in errors (``unknown key '--bta' for `train dpo```), ``keys_hint()`` says
    where every key is listed, ``aliases`` maps names other tools use to this config's keys (suggested,
    never silently accepted; a target may be ``lora.r``, a field of a mapping key) and ``alias_notes`` says
    more where the other tool's key means something a little different; ``validate()`` checks values
    (here: declared choices and ranges) and ``preflight()`` what the values point at (files, directories),
    when the config is about to be used.
    """

    aliases: ClassVar[dict[str, str]] = {}
    alias_notes: ClassVar[dict[str, str]] = {}

    @classmethod
    def label(cls) -> str:
        return cls.__name__

    @classmethod
    def keys_hint(cls) -> str:
        return f"`preftune {cls.label()} --help` lists every key"

    def validate(self) -> None:
        check_fields(self)

    def preflight(self) -> None:
        """Checks of what the values point at (files exist, ...), made by whoever is about to use the config
        (``preftune.train.run``, the CLI) after ``validate``: a config may name files that do not exist yet."""


# ------------------------------------------------------------------------------------------------ fields
@dataclass(frozen=True)
class KeyInfo:
    name: str
    type: str                  # bool, int, float, str, mapping, list; "int | null" when null is allowed
    default: Any
    help: str
    choices: tuple[str, ...] | None
    range: str | None = None   # the allowed numbers: "> 0", ">= 1", "in [0, 1)"

    def type_label(self, null: str = " | null") -> str:
        """The type with its range: ``float > 0``, ``int >= 1 | null``, ``float in [0, 1)``."""
        base, optional = self.type.removesuffix(" | null"), self.type.endswith(" | null")
        return base + (f" {self.range}" if self.range else "") + (null if optional else "")


def keys(cls: type[Config]) -> list[KeyInfo]:
    """Every key of a config class, in declaration order (subclass overrides keep the base position)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        bounds = f.metadata.get("range")
        out.append(KeyInfo(f.name, _type_name(hints[f.name]), default, f.metadata.get("help", ""),
                           f.metadata.get("choices"), str(bounds) if bounds else None))
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
        if from_text and isinstance(value, str):  # --key '[a, b]' (YAML) or --key a,b
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
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
    ("merge_lora", "true")]``. Dashes in key names become underscores (``--max-new-tokens`` is
    ``--max_new_tokens``); a bare flag means true."""
    return [(key, value) for key, value, _ in _parse_overrides(args)]


def _parse_overrides(args: list[str]) -> list[tuple[str, str, bool]]:
    """``parse_overrides`` plus, for each key, whether it was a bare flag (no value given)."""
    out: list[tuple[str, str, bool]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            hint = "overrides look like --key value or --key=value"
            if arg.endswith((".yaml", ".yml")):
                hint = "the config file goes first (`preftune train dpo CONFIG.yaml --key value`), or use --config FILE"
            raise PreftuneError(f"unexpected argument {arg!r}", hint=hint)
        name, eq, value = arg[2:].partition("=")
        bare = False
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value, bare = "true", True
        head, dot, rest = name.partition(".")
        out.append((head.replace("-", "_") + dot + rest, value, bare))
        i += 1
    return out


def _apply_mapping(cls: type[Config], data: dict[Any, Any], values: dict[str, Any],
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


def from_mapping(cls: type[Config], data: dict[str, Any], **overrides: Any) -> Any:
    """A validated config from Python values (``{"model": ..., "data": ...}``), with the same checks as YAML."""
    values: dict[str, Any] = {}
    sources: dict[str, tuple[str | None, int | None]] = {}
    _apply_mapping(cls, {**data, **overrides}, values, sources, path=None, lines={})
    return _build(cls, values, sources)


def _build(cls: type[Config], values: dict[str, Any], sources: dict[str, tuple[str | None, int | None]]) -> Any:
    """The config from its converted values, with the source of each key (for errors), validated."""
    config = cls(**values)
    object.__setattr__(config, "_sources", sources)
    config.validate()
    return config


def load_config(cls: type[Config], path: str | Path | None = None,
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
    parsed = (_parse_overrides(overrides) if overrides and isinstance(overrides[0], str)  # type: ignore[arg-type]
              else [(key, text, False) for key, text in overrides or []])
    for key, text, bare in parsed:
        where = (None, None)
        head, dot, sub = key.partition(".")
        _check_key(cls, head, names, where, cli=True)
        if bare and _unwrap_optional(hints[head])[0] is not bool:
            raise PreftuneError(f"--{key} needs a value", field=key,
                                hint=f"write --{key} VALUE or --{key}=VALUE (default {format_value(_default(cls, head))})")
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
    return _build(cls, values, sources)


def _default(cls: type[Config], name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _check_key(cls: type[Config], key: str, names: list[str], where: tuple[str | None, int | None],
               *, cli: bool = False) -> None:
    if key in names:
        return
    raise PreftuneError(f"unknown key '{'--' if cli else ''}{key}' for `{cls.label()}`", path=where[0],
                        line=where[1], field=key, hint=key_suggestion(cls, key, cli=cli))


def key_suggestion(cls: type[Config], key: str, *, cli: bool = False) -> str:
    """The hint for an unknown key: the key another tool's name stands for (``cls.aliases``, with its note),
    else the nearest valid key, then where every key is listed."""
    names = [f.name for f in dataclasses.fields(cls)]
    dash = "--" if cli else ""
    alias = cls.aliases.get(key) or cls.aliases.get(key.replace("-", "_"))
    if alias is not None and alias.split(".")[0] in names:
        note = cls.alias_notes.get(key)
        head, dot, sub = alias.partition(".")
        shown = f"{head}: {{{sub}: ...}}" if dot and not cli else f"{dash}{alias}"  # in YAML: lora: {r: ...}
        return f"did you mean {shown}? " + (f"({note}) " if note else "") + cls.keys_hint()
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return (f"did you mean {dash}{close[0]}? " if close else "") + cls.keys_hint()


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


def suggest(value: str, valid: Any) -> str:
    """A hint: the nearest valid value (when one is near) and the list of valid values."""
    close = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=0.5)
    return (f"did you mean {close[0]!r}? " if close else "") + f"valid: {', '.join(valid)}"


def fail(config: Any, key: str, message: str, hint: str | None = None) -> typing.NoReturn:
    """Raise a PreftuneError about ``key`` of ``config``, naming the YAML file and line it was set on."""
    sources = getattr(config, "_sources", {})
    path, line = sources.get(key) or sources.get(key.split(".")[0], (None, None))
    if path == "command line":
        path = None
    raise PreftuneError(message, path=path, line=line, field=key, hint=hint)


def require(config: Any, key: str, ok: bool, message: str) -> None:
    """``fail`` with ``message`` and the key's value unless ``ok``."""
    if not ok:
        fail(config, key, f"{message} (got {format_value(getattr(config, key))})")


def check_choices(config: Config) -> None:
    """Every string key with declared choices holds one of them (called by ``validate``)."""
    for info in keys(type(config)):
        value = getattr(config, info.name)
        if info.choices and value not in info.choices:
            fail(config, info.name, f"{value!r} is not one of {', '.join(info.choices)}",
                 suggest(value, info.choices))


def check_ranges(config: Config) -> None:
    """Every number key with a declared range (``opt(..., gt=0)``) holds a value inside it; null is left to
    the key's type (called by ``validate``)."""
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        bounds, value = f.metadata.get("range"), getattr(config, f.name)
        if bounds is not None and isinstance(value, (int, float)) and value not in bounds:
            default = _default(type(config), f.name)
            fail(config, f.name, range_message(bounds, value, f.metadata.get("why")),
                 f.metadata.get("help", "") + (f"; default {format_value(default)}" if default is not None else ""))


def range_message(bounds: Range, value: Any, why: str | None = None) -> str:
    """``must be > 0 (got 0)``, followed by ``why`` when given."""
    return f"must be {bounds} (got {format_value(value)})" + (f": {why}" if why else "")


def check_fields(config: Config) -> None:
    """What every config's ``validate`` starts with: declared choices and ranges."""
    check_choices(config)
    check_ranges(config)


# ------------------------------------------------------------------------------------------------ writing
def to_dict(config: Config) -> dict[str, Any]:
    """The config as a plain dict in declaration order."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def to_yaml(config: Config) -> str:
    """The config as commented YAML (each key preceded by its help line); loads back into the same class."""
    out = [f"# preftune {config.label()}: resolved config", ""]
    for info in keys(type(config)):
        out.append(f"# {info.help}")
        out.append(f"{info.name}: {format_value(getattr(config, info.name))}")
    return "\n".join(out) + "\n"


def write_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config (``to_yaml``) to ``path`` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(config), encoding="utf-8")
    return path
