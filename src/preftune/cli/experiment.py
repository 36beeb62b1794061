"""`preftune experiment frontier CONFIG.yaml [--key value ...]`: the reward-vs-KL frontier of every method.

Keys come from ``preftune.experiments.frontier.FrontierConfig`` (YAML file, then ``--key value`` overrides; mappings
take ``--ppo.learning_rate 1e-5``); the command's help lists them all.
"""

from __future__ import annotations

from pathlib import Path

import typer

from preftune.cli._common import console, handle_errors
from preftune.cli.train import _key_lines
from preftune.config import keys

experiment_app = typer.Typer(help="Experiments that train and compare several methods.", no_args_is_help=True,
                             rich_markup_mode="rich")


def _frontier_keys() -> str:
    from preftune.experiments.frontier import FrontierConfig

    return _key_lines(keys(FrontierConfig))  # type: ignore[arg-type]


@handle_errors
def frontier_command(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML config file (every key below; see docs/rlhf.md)."),
) -> None:
    """Train DPO (several beta), PPO and RLOO (several KL coefficients), RAFT and unlikelihood from one SFT
    model on a ground-truth reward; measure reward and KL on held-out prompts; write frontier.json + .png.

    Finished runs are skipped when the command is run again.
    """
    from preftune.config import load_config
    from preftune.experiments.frontier import FrontierConfig, frontier

    resolved = load_config(FrontierConfig, config, list(ctx.args))  # type: ignore[arg-type]
    result = frontier(resolved, log=lambda message: console.print(f"[dim]frontier[/] {message}", highlight=False))
    from rich.table import Table

    table = Table(title="reward vs KL (held-out prompts)", title_justify="left")
    for column in ("run", "reward", "KL", "length"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for p in result["points"]:
        table.add_row(p["name"], f"{p['reward']:.4f} ± {p['reward_se']:.4f}", f"{p['kl']:.3f} ± {p['kl_se']:.3f}",
                      f"{p['length']:.1f}")
    console.print(table)
    out = Path(resolved.output_dir)
    console.print(f"[green]done:[/] {out / 'frontier.json'}, {out / 'frontier.png'}")


experiment_app.command(
    name="frontier",
    epilog="[bold]Keys[/] (in CONFIG or as --key value; --ppo.learning_rate 1e-5 sets one key of a mapping):\n\n"
           + _frontier_keys(),
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(frontier_command)


def register(app: typer.Typer) -> None:
    """Add `preftune experiment` to the root app."""
    app.add_typer(experiment_app, name="experiment")
