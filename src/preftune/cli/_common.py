"""Small helpers shared by the CLI modules."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from preftune.errors import PreftuneError

# True when this process was started to run one preftune command (``preftune.cli.main``: the `preftune`
# executable, ``python -m preftune``), False when a program calls the app (a test's CliRunner): only then may
# a command act on the whole process (count its start-up from the process start, gc.freeze)
WHOLE_PROCESS = False

console = Console()
err_console = Console(stderr=True)
plain_console = Console(markup=False)  # output holding the user's names ("[/g]" is a group, not markup)

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Print a PreftuneError as one clear message (no traceback) and exit with status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PreftuneError as exc:  # the message may hold [brackets] (a path, a value): not markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class LazyEpilogCommand(typer.core.TyperCommand):
    """A command whose epilog is a function, called when the help is shown: the lists of every config key
    (``train``, ``experiment``, ``iterate``) are built from the config dataclasses, which took tens of
    milliseconds of every CLI start (and imported the experiments) when built at import time."""

    @property  # type: ignore[override]
    def epilog(self) -> str | None:
        value = self.__dict__.get("_epilog")
        return value() if callable(value) else value

    @epilog.setter
    def epilog(self, value: Any) -> None:
        self.__dict__["_epilog"] = value


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``1 completion``, ``2 completions``, ``1,000 completions`` (``nouns``: an irregular plural)."""
    return f"{n:,} {noun if n == 1 else nouns or noun + 's'}"


def show_progress() -> bool:
    """Whether a progress bar may draw: only on a terminal. Into a log or a pipe a bar writes nothing."""
    return err_console.is_terminal


# Environment variables read when these libraries are imported (after this, inside the commands).
_QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
          "TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def quiet_libraries() -> None:
    """One progress display, preftune's own: no progress bars ("Loading weights", "Writing model shards")
    and no info logging from transformers, huggingface_hub and datasets. Every command runs this first (the
    root callback). Libraries not imported yet read environment variables (a value the user set wins);
    those already imported (in a test session, or a caller's program) are told directly."""
    for name, value in _QUIET.items():
        os.environ.setdefault(name, value)
    if "huggingface_hub" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        logging = sys.modules["transformers"].utils.logging
        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            logging.disable_progress_bar()
        if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
            logging.set_verbosity_error()
    if "datasets" in sys.modules:
        logging = sys.modules["datasets"].utils.logging
        if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
            logging.disable_progress_bar()
        if os.environ["DATASETS_VERBOSITY"] == "error":
            logging.set_verbosity_error()


def print_json(obj: Any) -> None:
    """Write machine-readable output to stdout, unrounded."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    return str(obj)
