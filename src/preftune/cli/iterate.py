"""`preftune iterate CONFIG.yaml [--key value ...]`: rounds of sample -> label -> train -> compare with SFT.

Keys come from ``preftune.experiments.iterate.IterateConfig`` (YAML file, then ``--key value`` overrides; mappings
take ``--train.beta 0.2``); the command's help lists them all. Exit status 3: people still have pairs to label
(``judge: human``); run the same command again once they are labelled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from preftune.cli._common import LazyEpilogCommand, console, handle_errors
from preftune.cli.train import _key_lines
from preftune.config import keys

WAITING = 3  # the exit status while people have pairs to label


def _iterate_keys() -> str:
    from preftune.experiments.iterate import IterateConfig

    return _key_lines(keys(IterateConfig))  # type: ignore[arg-type]


@handle_errors
def iterate_command(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML config file (every key below; see docs/rounds.md)."),
) -> None:
    """Rounds of iterative DPO: sample from the newest model, label, train from it, compare with SFT.

    Each round samples K completions per prompt from the newest model, a judge (or people) labels them, DPO
    (or a reward model, then PPO / RLOO) trains from the newest model, and the new model is compared with SFT
    on held-out prompts (win rate, KL, reward); writes rounds.json + rounds.png.

    Finished steps are skipped when the command is run again; with judge: human it stops (exit status 3) until
    the round's pairs are labelled in `preftune annotate serve`, then the same command goes on.
    """
    from preftune.config import load_config
    from preftune.experiments.iterate import IterateConfig, iterate

    resolved = load_config(IterateConfig, config, list(ctx.args))  # type: ignore[arg-type]
    result = iterate(resolved, log=lambda message: console.print(f"[dim]iterate[/] {escape(message)}",
                                                                 highlight=False))
    if result["rounds"]:
        console.print(rounds_table(result))
    out = Path(resolved.output_dir)
    if result["waiting"] is not None:  # the log said which pairs and the command that serves them
        console.print(f"[yellow]waiting for labels[/] (exit status {WAITING}): {escape(result['waiting']['command'])}",
                      highlight=False)
        raise typer.Exit(WAITING)
    console.print(f"[green]done:[/] {escape(str(out / 'rounds.json'))}, {escape(str(out / 'rounds.png'))}",
                  highlight=False)


def rounds_table(result: dict[str, Any]) -> Any:
    """One row per round: pairs, W / T / L and win rate against SFT with its interval, KL, reward, seconds."""
    from rich.table import Table

    rounds = result["rounds"]
    reward = any("reward" in r for r in rounds)
    table = Table(title="each round's model against SFT (eval prompts)", title_justify="left")
    for column in ("round", "pairs", "W / T / L", "win rate", "95% CI", "KL to SFT", *(("reward",) if reward else ()),
                   "seconds"):
        table.add_column(column, justify="right")
    if reward:
        sft = result["sft"]
        table.add_row("SFT", "", "", "", "", "0", f"{sft['reward']:.4f} ± {sft['reward_se']:.4f}", "")
    for r in rounds:
        judged = r["win_rate"] is not None
        ci = r["win_rate_ci"]
        table.add_row(str(r["round"]), str(r["pairs"]), f"{r['wins']} / {r['ties']} / {r['losses']}" if judged else "",
                      f"{r['win_rate']:.3f}" if judged else "not measured",
                      f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "", f"{r['kl']:.3f} ± {r['kl_se']:.3f}",
                      *((f"{r['reward']:.4f} ± {r['reward_se']:.4f}",) if reward else ()), f"{r['seconds']:.0f}")
    return table


def register(app: typer.Typer) -> None:
    """Add `preftune iterate` to the root app."""
    app.command(
        name="iterate",
        cls=LazyEpilogCommand,
        epilog=lambda: "[bold]Keys[/] (in CONFIG or as --key value; --train.beta 0.2 sets one key of a mapping):\n\n"
                       + _iterate_keys(),
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(iterate_command)
