"""`preftune train METHOD [CONFIG.yaml] [--key value ...]` for every registered method, and `preftune train keys`.

The commands come from the registry ``preftune.train.METHODS``. Every key of a method's config dataclass
can be set in the YAML file or on the command line (``--beta 0.2``, ``--lora.r 8``, ``--lora null``); the
file is optional (``preftune train dpo --model M --data D``, as TRL's CLI) and may also be given as
``--config FILE``. The help of each command lists every key with its type, range, default and help
string, generated from the dataclass. Every mistake in the keys is reported before a model loads.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import typer

from preftune.cli import _common
from preftune.cli._common import LazyEpilogCommand, console, handle_errors
from preftune.config import KeyInfo, format_value, keys
from preftune.train import METHODS

train_app = typer.Typer(
    help="Train a model. One loop for every method; each method says how a batch becomes a loss.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _key_lines(infos: list[KeyInfo]) -> str:
    """One line per key for the command's help: ``--key TYPE (default): help``; a bool key shows as
    ``--key [true|false]`` (a bare ``--key`` means true), a string key with choices as ``{a|b}``, a number
    key with its range (``float > 0``)."""
    rows = []
    for info in infos:
        if info.type == "bool":
            kind = "[true|false]"
        elif info.choices:
            kind = f"{{{'|'.join(info.choices)}}}"
        else:
            kind = info.type_label()
        rows.append(_escape(f"--{info.name} {kind} (default {format_value(info.default)}): {info.help}"))
    return "\n".join(rows)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def _command(name: str):
    def command(
        ctx: typer.Context,
        config: str | None = typer.Argument(None, help="YAML config file (every key below; see docs/training.md); "
                                     "optional: keys may all be given as --key value.", show_default=False),
    ) -> None:
        from preftune import timing
        from preftune.config import load_config
        from preftune.train import run

        # "ready to train after X s (imports ...)": from the start of the process when it runs this command only
        timing.start("imports", since_process_start=_common.WHOLE_PROCESS)
        try:
            path, overrides = split_config_argument([config, *ctx.args] if config is not None else list(ctx.args))
            resolved = load_config(METHODS[name].config, path, overrides)
            resolved.check_required(resolved.required_on_cli)
            resolved.preflight()
            check_model_sources(resolved)
            import_training_libraries(freeze=_common.WHOLE_PROCESS)
            final = run(name, resolved)
        finally:
            timing.stop()  # the loop stopped it before its first step; not when a mistake stopped the command
        if int(os.environ.get("RANK", "0")) == 0:  # once, not once per process of a multi-process launch
            console.print(f"[green]done:[/] {final}")

    command.__doc__ = METHODS[name].summary
    return handle_errors(command)


def split_config_argument(args: list[str]) -> tuple[Path | None, list[str]]:
    """The config file and the overrides of ``train METHOD [CONFIG] [--key value ...]``: the file is the first
    argument when it is not a ``--key``, or the value of ``--config`` (TRL's spelling) anywhere."""
    from preftune.errors import PreftuneError

    path: str | None = None
    if args and not args[0].startswith("--"):
        path, args = args[0], args[1:]
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" or arg.startswith("--config="):
            value = arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in arg else 2
            if not value or value.startswith("--"):
                raise PreftuneError("--config needs a file", field="config", hint="--config CONFIG.yaml")
            if path is not None:
                raise PreftuneError(f"two config files: {path} and {value}", field="config",
                                    hint="give one (as the first argument or as --config FILE)")
            path = value
            continue
        rest.append(arg)
        i += 1
    return (Path(path) if path is not None else None), rest


def import_training_libraries(*, freeze: bool) -> None:
    """Import what every training run needs (torch, accelerate, transformers' model, generation, mask and
    tokenizer modules: 4-6 s on a CPU, over 300,000 Python objects); with ``freeze``, then ``gc.freeze()``
    them: every later garbage collection, automatic or the one that frees the reference model after its
    log-prob pass, skips them instead of traversing them all (0.3-0.6 s per full collection). Only when the
    process runs this one training and exits (``WHOLE_PROCESS``): a frozen object is never collected, so a
    test session or a program calling the app must not freeze what it holds. The start-up clock counts this
    as imports."""
    import contextlib
    import gc
    import importlib

    import accelerate  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: F401

    for module in _TRAINING_MODULES:  # names of transformers 5; an older version without one skips it
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    if freeze:
        gc.freeze()


# What transformers imports on its first from_pretrained of a causal LM and its tokenizer, whatever the architecture
_TRAINING_MODULES = ("transformers.masking_utils", "transformers.generation.utils", "transformers.modeling_layers",
                     "transformers.processing_utils", "transformers.tokenization_python")


def check_model_sources(config: object) -> None:
    """Before training starts: each model key names an existing model directory or a hub id the local
    cache has when offline (``preftune.models.load.check_model``)."""
    from preftune.models.load import check_model

    for key, source in config.model_sources().items():  # type: ignore[attr-defined]
        check_model(source, field=key)


def keys_command(
    method: str = typer.Argument(None, help=f"{', '.join(METHODS)}; all when omitted."),
    markdown: bool = typer.Option(False, "--markdown", help="Print Markdown tables (as in docs/training.md)."),
) -> None:
    """List every config key of a training method: type, default and help."""
    from rich.table import Table

    from preftune.errors import PreftuneError
    from preftune.train import method_spec

    if method is not None:
        try:
            method_spec(method)
        except PreftuneError as exc:
            handle_errors(_raise)(exc)
    if markdown:
        _markdown(method)
        return
    for name in [method] if method else list(METHODS):
        infos = keys(METHODS[name].config)
        table = Table(title=f"preftune train {name}", title_justify="left")
        for column in ("key", "type", "default", "help"):
            table.add_column(column, overflow="fold")
        for i in infos:
            choices = f" ({', '.join(i.choices)})" if i.choices else ""
            table.add_row(i.name, i.type_label(), format_value(i.default), i.help + choices)
        console.print(table)


def markdown_sections() -> list[tuple[str, str]]:
    """(heading, Markdown table) for the docs: the keys of every method, then the keys a group of methods
    shares (a config base such as the online methods'), then each method's own keys and defaults."""
    from preftune.train.base import TrainConfig

    def base_of(cls: type) -> type:
        return next(b for b in cls.__mro__[1:] if issubclass(b, TrainConfig))

    def differing(cls: type, base: type) -> list[KeyInfo]:
        inherited = {i.name: i for i in keys(base)}
        return [i for i in keys(cls) if inherited.get(i.name) != i]

    sections = [("Keys of every training command", _markdown_table(keys(TrainConfig)))]
    groups: dict[type, list[str]] = {}
    for name, spec in METHODS.items():
        if base_of(spec.config) is not TrainConfig:
            groups.setdefault(base_of(spec.config), []).append(name)
    for base, names in groups.items():
        sections.append((f"Keys shared by {', '.join(names)}", _markdown_table(differing(base, TrainConfig))))
    for name, spec in METHODS.items():
        sections.append((f"`preftune train {name}`: its own keys and defaults",
                         _markdown_table(differing(spec.config, base_of(spec.config)))))
    return sections


def _markdown_table(infos: list[KeyInfo]) -> str:
    rows = ["| key | type | default | help |", "|---|---|---|---|"]
    for i in infos:
        choices = f" ({', '.join(i.choices)})" if i.choices else ""
        cells = [f"`{i.name}`", i.type_label(null=" or null"), f"`{format_value(i.default)}`", i.help + choices]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def _markdown(method: str | None) -> None:
    """Markdown tables: one method's every key, or the sections of ``markdown_sections``."""
    if method:
        typer.echo(f"### `preftune train {method}`\n\n{_markdown_table(keys(METHODS[method].config))}")
        return
    typer.echo("\n\n".join(f"### {heading}\n\n{table}" for heading, table in markdown_sections()))


def _raise(exc: Exception) -> None:
    raise exc


def _epilog(name: str) -> str:
    return ("[bold]Keys[/] (in CONFIG or as --key value or --key=value; --max-new-tokens is --max_new_tokens; "
            "a bare --flag means true; --lora.r 8 sets one LoRA field; a list is --key a,b or --key '\\[a, b]'; "
            "null clears an optional key):\n\n" + _key_lines(keys(METHODS[name].config)))


for _name in METHODS:
    train_app.command(
        name=_name,
        cls=LazyEpilogCommand,
        epilog=functools.partial(_epilog, _name),  # built when the help is shown
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        no_args_is_help=True,
    )(_command(_name))
train_app.command(name="keys")(keys_command)


def register(app: typer.Typer) -> None:
    """Add `preftune train` to the root app."""
    app.add_typer(train_app, name="train")
