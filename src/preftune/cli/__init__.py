"""The `preftune` command line: one thin module per stage of the flow of work.

Each module in this package exposes ``register(app)``, which adds its command or command group
to the root app. Commands parse their options and call the library; heavy imports (torch,
transformers) happen inside the command functions so that `preftune --help` stays fast.

Conventions every command gets from here, once:

* ``--max-new-tokens`` and ``--max_new_tokens`` are the same option (click's ``token_normalize_func``
  turns ``_`` into ``-`` in option names, both those declared and those typed);
* ``preftune --help`` lists the commands in the order of the flow of work (``FLOW``), not alphabetically
  and not commands-before-groups;
* a flag's help shows no ``<bool>`` type (it takes no value);
* the root callback silences the progress bars and info logging of transformers, huggingface_hub and
  datasets (``_common.quiet_libraries``): the only progress display is preftune's own, on a terminal.
"""

from __future__ import annotations

from typing import Any

import typer
import typer.core

from preftune import __version__
from preftune.cli import annotate, compare, data, demo, experiment, generate, iterate, prefs, score, train
from preftune.cli._common import quiet_libraries

# The order of `preftune --help`: the course's calculator, then data -> train -> generate -> annotate -> score
# -> compare (docs/architecture.md), iterate (those steps again, in rounds), then the experiments that run the
# whole flow.
FLOW = ("prefs", "data", "train", "generate", "annotate", "score", "compare", "iterate", "experiment", "demo")


def dashed(token: str) -> str:
    """``max_new_tokens`` -> ``max-new-tokens``: applied to option names only (not to values), so both
    spellings reach the same option. Unknown options (the ``--key value`` overrides of `train`) pass
    through as typed."""
    return token.replace("_", "-")


class _FlowGroup(typer.core.TyperGroup):
    """The root group: commands listed in the order of ``FLOW`` (typer lists commands before groups)."""

    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: FLOW.index(n) if n in FLOW else len(FLOW))


_display_type_rich = typer.core.TyperOption.display_type_rich


def _no_flag_type(self: typer.core.TyperOption, ctx: Any) -> str | None:
    """`--json  Print ...`, not `--json <bool>  Print ...`: a flag takes no value, so it shows no type."""
    return None if self.is_flag else _display_type_rich(self, ctx)


typer.core.TyperOption.display_type_rich = _no_flag_type  # type: ignore[method-assign]

app = typer.Typer(
    name="preftune",
    cls=_FlowGroup,
    help="Preference-based fine-tuning for language models: Bradley-Terry to RLHF and DPO.\n\n"
         "Every option can be written with dashes or underscores: --max-new-tokens or --max_new_tokens.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"token_normalize_func": dashed},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"preftune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """preftune: generate -> annotate -> train -> compare, in one tool."""
    quiet_libraries()


for _module in (prefs, data, train, generate, annotate, score, compare, iterate, experiment, demo):
    _module.register(app)


def main() -> None:
    """The `preftune` executable and ``python -m preftune``: this process runs one command, then exits."""
    from preftune.cli import _common

    _common.WHOLE_PROCESS = True
    app()
