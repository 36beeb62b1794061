"""`preftune prefs`: a preference calculator (Bradley-Terry tables, MaxMin, Plackett-Luce, BT fits).

Every command prints rich tables rounded to 6 decimals, or with ``--json`` every number unrounded.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from preftune.cli._common import handle_errors, plural, print_json
from preftune.cli._common import plain_console as console
from preftune.cli.prefs_loss import loss_app
from preftune.errors import PreftuneError

prefs_app = typer.Typer(
    help="Preference calculator: Bradley-Terry and Plackett-Luce probabilities, MaxMin choice, BT fits.",
    no_args_is_help=True,
)
prefs_app.add_typer(loss_app, name="loss")  # `prefs loss ...`: reward-model and DPO-family loss values

JSON_HELP = "Print every number unrounded as JSON."
WIDE_PAIRS = 6  # up to this many pairs, one table with a column per pair; beyond, a matrix per group


def _f(x: float) -> str:
    return f"{x:.6f}"


@prefs_app.command("table")
@handle_errors
def table(
    ratings: Path = typer.Argument(..., help="Ratings: CSV 'group,y1,y2,...' or JSON {group: {response: r}}."),
    scale: str = typer.Option("logit", "--scale", help="logit: sigmoid(r_i - r_j); ratio: r_i / (r_i + r_j)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Bradley-Terry P(y_i > y_j) for every pair of responses in every group, and each group's favourite."""
    from preftune.core.prefs import bradley_terry_table
    from preftune.data.ratings import read_ratings

    result = bradley_terry_table(read_ratings(ratings), scale=scale)
    if as_json:
        print_json(result)
        return
    formula = "sigmoid(r_i - r_j)" if scale == "logit" else "r_i / (r_i + r_j)"
    groups = result["groups"]
    pairs = list(next(iter(groups.values()))["pairwise"])
    if len(pairs) <= WIDE_PAIRS:
        out = Table(title=f"Bradley-Terry P(y_i > y_j) = {formula}")
        out.add_column("group")
        for pair in pairs:
            out.add_column(pair, justify="right")
        out.add_column("most preferred")
        for group, res in groups.items():
            out.add_row(group, *(_f(p) for p in res["pairwise"].values()), ", ".join(res["most_preferred"]))
        console.print(out)
        return
    responses = result["responses"]
    for group, res in groups.items():
        out = Table(title=f"{group}: P(row > column) = {formula}; most preferred: "
                          f"{', '.join(res['most_preferred'])}")
        out.add_column("")
        for resp in responses:
            out.add_column(resp, justify="right")
        for a in responses:
            out.add_row(a, *("-" if a == b else _f(res["matrix"][a][b]) for b in responses))
        console.print(out)


@prefs_app.command("aggregate")
@handle_errors
def aggregate(
    ratings: Path = typer.Argument(..., help="Ratings: CSV 'group,y1,y2,...' or JSON {group: {response: r}}."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """MaxMin (egalitarian) choice next to the utilitarian choice and each group's favourite."""
    from preftune.core.prefs import aggregate as aggregate_ratings
    from preftune.data.ratings import read_ratings

    result = aggregate_ratings(read_ratings(ratings))
    if as_json:
        print_json(result)
        return
    maxmin, util = set(result["maxmin"]), set(result["utilitarian"])
    out = Table(title="min over groups (MaxMin) and mean over groups (utilitarian)")
    out.add_column("response")
    out.add_column("min rating", justify="right")
    out.add_column("mean rating", justify="right")
    out.add_column("chosen by")
    for resp in result["responses"]:
        chosen = [name for name, picked in (("MaxMin", maxmin), ("utilitarian", util)) if resp in picked]
        out.add_row(resp, _f(result["min_rating"][resp]), _f(result["mean_rating"][resp]), ", ".join(chosen))
    console.print(out)
    favs = Table(title="each group's favourite")
    favs.add_column("group")
    favs.add_column("favourite")
    for group, fav in result["favourites"].items():
        favs.add_row(group, ", ".join(fav))
    console.print(favs)
    console.print(f"MaxMin: {', '.join(result['maxmin'])}   utilitarian: {', '.join(result['utilitarian'])}")
    console.print(result["summary"])


def parse_rewards(spec: str) -> dict[str, float]:
    """``y1=1.0,y2=0.5`` or a file: JSON ``{"y1": 1.0}``, or lines ``y1,1.0`` / ``y1=1.0``."""
    path = Path(spec)
    if "=" not in spec and path.is_file():
        from preftune.data.jsonl import decode_json, read_text, split_lines

        text = read_text(path)
        if text.lstrip().startswith("{"):
            obj = decode_json(text, path=str(path), hint='a rewards file holds one JSON object {"y1": 1.0, ...}')
            items = [(1, str(k), v) for k, v in obj.items()]
        else:
            items = []
            for line, raw in enumerate(split_lines(text), start=1):
                if raw.strip():
                    name, sep, value = raw.replace("=", ",", 1).partition(",")
                    if not sep:
                        raise PreftuneError("expected 'name,reward'", path=str(path), line=line)
                    items.append((line, name.strip(), value.strip()))
        return _rewards(items, path=str(path))
    if "=" not in spec and spec.strip():
        raise PreftuneError("no such file, and not name=reward pairs", path=spec, field="--rewards",
                            hint="write --rewards y1=1.0,y2=0.5,y3=-1 or give the path of a rewards file")
    items = []
    for k, part in enumerate(p for p in spec.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        if not sep:
            raise PreftuneError(f"'{part}' is not name=reward", field="--rewards",
                                hint="write --rewards y1=1.0,y2=0.5,y3=-1 or give a file")
        items.append((k + 1, name.strip(), value.strip()))
    return _rewards(items, path=None)


def _rewards(items: list[tuple[int, str, object]], *, path: str | None) -> dict[str, float]:
    rewards: dict[str, float] = {}
    for line, name, value in items:
        where = {"path": path, "line": line} if path else {}
        if name in rewards:
            raise PreftuneError(f"response '{name}' is given twice", field=name if path else "--rewards", **where)
        try:
            if isinstance(value, bool):
                raise TypeError(value)
            rewards[name] = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise PreftuneError(f"reward {value!r} of '{name}' is not a number",
                                field=name if path else "--rewards", **where) from None
        if not math.isfinite(rewards[name]):
            raise PreftuneError(f"reward {value!r} of '{name}' is not finite", field=name if path else "--rewards",
                                hint="rewards are finite numbers such as 1.0, -0.5 or 2e3", **where)
    return rewards


@prefs_app.command("rank")
@handle_errors
def rank(
    rewards: str = typer.Option(..., "--rewards", help="y1=1.0,y2=0.5,y3=-1, or a file (JSON or 'name,reward')."),
    ranking: str = typer.Option(None, "--ranking", help="Ranking to score, best first (default: by reward)."),
    top_k: int = typer.Option(None, "--top-k", help="Also print P(response is among the first k)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Plackett-Luce probability of a ranking and each response's probability of being ranked first."""
    from preftune.core.prefs import plackett_luce

    order = [y.strip() for y in ranking.split(",") if y.strip()] if ranking else None
    result = plackett_luce(parse_rewards(rewards), order, top_k=top_k)
    if as_json:
        print_json(result)
        return
    out = Table(title="Plackett-Luce: P(first) = softmax(r)")
    out.add_column("response")
    out.add_column("reward", justify="right")
    out.add_column("P(first)", justify="right")
    if top_k is not None:
        out.add_column(f"P(in top {top_k})", justify="right")
    for resp, r in result["rewards"].items():
        extra = [_f(result["top_k_probability"][resp])] if top_k is not None else []
        out.add_row(resp, _f(r), _f(result["first_place"][resp]), *extra)
    console.print(out)
    console.print(f"P({' > '.join(result['ranking'])}) = {_f(result['probability'])}   "
                  f"(log-probability {_f(result['log_probability'])})")


@prefs_app.command("fit")
@handle_errors
def fit(
    comparisons: Path = typer.Argument(..., help="Comparisons: CSV with header a,b,winner, or JSONL."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Bootstrap resamples for 95% intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resampling."),
    prior: float = typer.Option(0.01, "--prior", help="Gaussian penalty prior/2*|theta|^2 (keeps strengths finite)."),
    elo: bool = typer.Option(False, "--elo", help="Also show strengths on an Elo-like scale."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Fit Bradley-Terry strengths (ties count half) with bootstrap 95% intervals; rank the players."""
    from preftune.core.bt_fit import fit_bradley_terry
    from preftune.data.comparisons import read_comparisons

    if not math.isfinite(prior):  # the fit checks > 0; NaN and inf pass that check
        raise PreftuneError(f"prior must be a finite number > 0, got {prior}", field="prior")
    data = read_comparisons(comparisons)
    if not as_json and bootstrap > 0:
        from rich.progress import Progress

        with Progress(transient=True, console=console, disable=not console.is_terminal) as progress:
            progress.add_task(f"fitting and {plural(bootstrap, 'bootstrap refit')}", total=None)
            result = fit_bradley_terry(data, n_bootstrap=bootstrap, seed=seed, prior=prior)
    else:
        result = fit_bradley_terry(data, n_bootstrap=bootstrap, seed=seed, prior=prior)
    if as_json:
        print_json(result.to_dict())
        return
    out = Table(title=f"Bradley-Terry fit of {plural(result.n_comparisons, 'comparison')}")
    columns = ["#", "player", "strength", "2.5%", "97.5%", *(["Elo"] if elo else []), "W", "T", "L"]
    for name in columns:
        out.add_column(name, justify="left" if name == "player" else "right", no_wrap=name != "player")
    for row in result.to_dict()["players"]:
        ci = [_f(row["ci_low"]), _f(row["ci_high"])] if row["ci_low"] is not None else ["-", "-"]
        out.add_row(str(row["rank"]), row["name"], _f(row["strength"]), *ci,
                    *([f"{row['elo']:.1f}"] if elo else []), str(row["wins"]), str(row["ties"]),
                    str(row["losses"]))
    console.print(out)
    console.print("strength: log-strength s with mean 0, P(a beats b) = sigmoid(s_a - s_b); "
                  "W/T/L: wins, ties, losses (a tie counts half a win to each side)"
                  + ("; Elo = 1000 + 400/ln(10) * s." if elo else "."))
    if bootstrap > 0:
        console.print(f"95% percentile intervals from {plural(bootstrap, 'bootstrap resample')} of the comparisons "
                      f"(seed {seed}).")


def register(app: typer.Typer) -> None:
    """Add `preftune prefs` to the root app."""
    app.add_typer(prefs_app, name="prefs")
