"""The `preftune` command line: one thin module per stage of the flow of work.

Each module in this package exposes ``register(app)``, which adds its command or command group
to the root app. Commands parse their options and call the library; heavy imports (torch,
transformers) happen inside the command functions so that `preftune --help` stays fast.
"""

from __future__ import annotations

import typer

from preftune import __version__
from preftune.cli import annotate, compare, data, demo, experiment, generate, prefs, score, train

app = typer.Typer(
    name="preftune",
    help="Preference-based fine-tuning for language models: Bradley-Terry to RLHF and DPO.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
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


for _module in (prefs, data, train, score, generate, compare, experiment, annotate, demo):
    _module.register(app)


def main() -> None:
    app()
