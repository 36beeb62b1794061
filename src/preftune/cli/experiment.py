"""`preftune experiment frontier CONFIG.yaml [--key value ...]`: the reward-vs-KL frontier of every method.

Keys come from ``preftune.experiments.frontier.FrontierConfig`` (YAML file, then ``--key value`` overrides; mappings
take ``--ppo.learning_rate 1e-5``); the command's help lists them all.
"""

from __future__ import annotations

from pathlib import Path

import typer

from preftune.cli._common import LazyEpilogCommand, console, handle_errors
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
    cls=LazyEpilogCommand,
    epilog=lambda: "[bold]Keys[/] (in CONFIG or as --key value; --ppo.learning_rate 1e-5 sets one key of a "
                   "mapping):\n\n" + _frontier_keys(),
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(frontier_command)


def _overoptimization_keys() -> str:
    from preftune.experiments.overoptimization import OveroptimizationConfig

    return _key_lines(keys(OveroptimizationConfig))  # type: ignore[arg-type]


@handle_errors
def overoptimization_command(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML config file (every key below; see docs/rlhf.md)."),
) -> None:
    """Optimise an imperfect (proxy) reward far from the SFT model with RLOO or PPO, and DPO on the same labels
    beside it; measure proxy reward, true reward and KL on held-out prompts along the way (Gao et al. 2023);
    write overoptimization.json + .png.

    Finished runs are skipped when the command is run again.
    """
    from rich.table import Table

    from preftune.config import load_config
    from preftune.experiments.overoptimization import OveroptimizationConfig, describe_drop, overoptimization

    resolved = load_config(OveroptimizationConfig, config, list(ctx.args))  # type: ignore[arg-type]
    result = overoptimization(resolved, log=lambda message: console.print(f"[dim]overoptimization[/] {message}",
                                                                          highlight=False))
    for name, curve in result["curves"].items():
        peak = result["peak"][name]
        table = Table(title=f"{name}: proxy and true reward along training (held-out prompts)", title_justify="left")
        for column in ("step", "KL", "proxy reward", "true reward", "length"):
            table.add_column(column, justify="right")
        for p in curve:
            mark = " [bold]< peak[/]" if p["step"] == peak["step"] else ""
            table.add_row(str(p["step"]), f"{p['kl']:.3f} ± {p['kl_se']:.3f}",
                          f"{p['proxy_reward']:.4f} ± {p['proxy_se']:.4f}",
                          f"{p['true_reward']:.4f} ± {p['true_se']:.4f}{mark}", f"{p['length']:.1f}")
        console.print(table)
        console.print(f"{name}: true reward peak {peak['true_reward']:.4f} at step {peak['step']} (KL {peak['kl']:.3f}); "
                      f"last {peak['final_true_reward']:.4f}: {'fell' if peak['fell'] else 'did not fall'} "
                      f"({describe_drop(peak)} below the peak)", highlight=False)
        fit = result["fit"][name]
        if fit is not None and fit["clean"]:
            console.print(f"{name}: Gao et al.'s R(d) = d (alpha - beta log d), d = sqrt(KL): alpha {fit['alpha']:.3f}, "
                          f"beta {fit['beta']:.3f}, r2 {fit['r2']:.2f} over {fit['points']} points", highlight=False)
    out = Path(resolved.output_dir)
    console.print(f"[green]done:[/] {out / 'overoptimization.json'}, {out / 'overoptimization.png'}")


experiment_app.command(
    name="overoptimization",
    cls=LazyEpilogCommand,
    epilog=lambda: "[bold]Keys[/] (in CONFIG or as --key value; --online.learning_rate 1e-5 sets one key of a "
                   "mapping):\n\n" + _overoptimization_keys(),
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(overoptimization_command)


def register(app: typer.Typer) -> None:
    """Add `preftune experiment` to the root app."""
    app.add_typer(experiment_app, name="experiment")
