"""`preftune prefs loss`: compute a preference loss by hand and see its parts.

``reward`` is the reward-model (Bradley-Terry) loss and ``kto`` the KTO loss of unpaired examples (not a
registry entry: its examples are single completions with a label, not pairs). Every other command comes from
the registry :data:`preftune.core.losses.LOSSES`: its inputs from ``needs_reference`` / ``takes_lengths``,
one option per hyperparameter (default and help from the spec), and its table from generic rows plus the
spec's ``parts``. A loss added to the registry is a command here without touching this file. The commands
are built on first use, so importing the CLI does not import torch.

Numbers are sequence probabilities (log-probabilities with ``--log``), printed with 6 decimals; ``--json``
prints every number unrounded. ``--beta-sweep`` (losses with a reference model and a ``beta``) tabulates
the loss against beta and plots it with :func:`preftune.plots.beta_sweep`. The arithmetic is done by
:mod:`preftune.core.losses`, the same functions the trainers use.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from preftune.cli._common import console, handle_errors, print_json
from preftune.errors import PreftuneError

if TYPE_CHECKING:
    from preftune.core.losses import LossPart, LossSpec

JSON_HELP = "Print every number unrounded as JSON."
LOG_HELP = "The numbers are log-probabilities (<= 0) instead of probabilities in (0, 1]."
SWEEP_HELP = "START:STOP:N - print the loss for N betas from START to STOP and plot it (e.g. 0.1:5:50)."
PLOT_HELP = "Where --beta-sweep writes its PNG plot."
COMPARE_HELP = "With --beta-sweep: a second curve with this pi_ref(y_l) instead of --ref-rejected."
INPUT_HELP = {
    "policy_chosen": "pi(y_w | x): the policy's probability of the chosen response.",
    "policy_rejected": "pi(y_l | x): the policy's probability of the rejected one.",
    "ref_chosen": "pi_ref(y_w | x): the reference model's probability.",
    "ref_rejected": "pi_ref(y_l | x): the reference model's probability.",
}
LENGTH_HELP = "Tokens in y_{} (1: the number already is per token)."
REF_LENGTH_HELP = "Tokens in y_{} (only used by a per-token option such as --length-normalize)."
_FIXED = ("log", "beta_sweep", "plot", "compare_ref_rejected", "as_json")


class _LossGroup(TyperGroup):
    """The `prefs loss` group: `reward` plus one command per LOSSES entry, added when first listed or called."""

    def _add_registry(self) -> None:
        if getattr(self, "_registry_added", False):
            return
        self._registry_added = True
        from preftune.core.losses import LOSSES  # torch: only when a loss command is listed or run

        for name, spec in LOSSES.items():
            self.add_command(_click_command(name, spec), name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_registry()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._add_registry()
        return super().get_command(ctx, cmd_name)


loss_app = typer.Typer(
    cls=_LossGroup,
    help="Compute a preference loss for one example and print its parts: the reward-model loss, KTO and every "
         "DPO-family loss of the registry (preftune.core.losses.LOSSES).",
    no_args_is_help=True,
)


def _f(x: float) -> str:
    return f"{x:.6f}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _g(value: Any) -> str:
    return str(value) if isinstance(value, bool) else f"{value:g}"


# ----------------------------------------------------------------------------------------- validation


def _logp(value: float, *, log: bool, field: str) -> float:
    """A probability in (0, 1] (or a log-prob <= 0 with ``--log``) as a log-prob."""
    if log:
        if not (math.isfinite(value) and value <= 0):
            raise PreftuneError(f"a log-probability must be finite and <= 0, got {value}", field=field,
                                hint="drop --log to pass probabilities in (0, 1]")
        return value
    if not (0.0 < value <= 1.0):
        raise PreftuneError(f"a probability must be in (0, 1], got {value}", field=field,
                            hint="pass --log if these numbers are log-probabilities")
    return math.log(value)


def _positive(value: float, field: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise PreftuneError(f"must be > 0, got {value}", field=field)
    return value


def _parse_sweep(spec: str) -> list[float]:
    parts = spec.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        start, stop, n = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise PreftuneError(f"'{spec}' is not START:STOP:N", field="--beta-sweep",
                            hint="e.g. --beta-sweep 0.1:5:50 (50 betas from 0.1 to 5)") from None
    if not (start > 0 and stop > start and n >= 2):
        raise PreftuneError(f"need 0 < START < STOP and N >= 2, got {spec}", field="--beta-sweep")
    return [start + (stop - start) * i / (n - 1) for i in range(n)]


# -------------------------------------------------------------------------------------------- output


def _emit(title: str, rows: list[tuple[str, float, str]], data: dict[str, Any], as_json: bool) -> None:
    """Rows are (quantity, value, formula); JSON gets ``data`` unrounded."""
    if as_json:
        print_json(data)
        return
    out = Table(title=title)
    out.add_column("quantity")
    out.add_column("value", justify="right")
    out.add_column("formula", style="dim")
    for name, value, formula in rows:
        out.add_row(name, _f(value), formula)
    console.print(out)


# ------------------------------------------------------------------------------------------- the parts


def _parts(name: str, spec: LossSpec, x: dict[str, Any], hp: dict[str, Any]) -> list[LossPart]:
    """One example's rows: generic ones, then the loss's own (``spec.parts``, see LossSpec), then the loss."""
    import torch

    from preftune.core.losses import LossPart, dpo_gradient_weight, preference_loss

    t = {k: None if v is None else torch.tensor([float(v)], dtype=torch.float64) for k, v in x.items()}
    try:
        out = preference_loss(name, **t, **hp)
    except ValueError as exc:  # a bad hyperparameter: name its option
        field = next((_flag(k) for k in hp if str(exc).startswith(k)), None)
        raise PreftuneError(str(exc), field=field) from None
    r_w, r_l = out.chosen_rewards.item(), out.rejected_rewards.item()
    b = "beta * " if "beta" in hp else ""  # the family's rewards: beta * log-ratio, beta * m (or without beta)
    if spec.needs_reference:
        cl, rl = x["policy_chosen_logps"] - x["ref_chosen_logps"], x["policy_rejected_logps"] - x["ref_rejected_logps"]
        weight = dpo_gradient_weight(out.chosen_rewards, out.rejected_rewards).item()
        rows = [LossPart("log_ratio_chosen", "log pi/pi_ref (chosen)", cl, "log pi(y_w) - log pi_ref(y_w)"),
                LossPart("log_ratio_rejected", "log pi/pi_ref (rejected)", rl, "log pi(y_l) - log pi_ref(y_l)"),
                LossPart("h", "h", cl - rl, "difference of the two log-ratios"),
                LossPart("reward_chosen", "r_w", r_w, f"{b}log pi(y_w)/pi_ref(y_w)"),
                LossPart("reward_rejected", "r_l", r_l, f"{b}log pi(y_l)/pi_ref(y_l)"),
                LossPart("margin", "margin", r_w - r_l, f"r_w - r_l = {b}h"),
                LossPart("gradient_weight", "gradient weight", weight, "sigmoid(r_l - r_w)", shown=False)]
    else:
        m_w, m_l = x["policy_chosen_logps"] / x["chosen_lengths"], x["policy_rejected_logps"] / x["rejected_lengths"]
        rows = [LossPart("mean_logp_chosen", "m_w", m_w, "log pi(y_w) / |y_w| (mean token log-prob)"),
                LossPart("mean_logp_rejected", "m_l", m_l, "log pi(y_l) / |y_l|"),
                LossPart("reward_chosen", "r_w", r_w, f"{b}m_w"),
                LossPart("reward_rejected", "r_l", r_l, f"{b}m_l"),
                LossPart("margin", "margin", r_w - r_l, "r_w - r_l")]
    table = {p.key: p for p in rows}
    table["loss"] = LossPart("loss", "loss", out.losses.item(), spec.summary)
    values = {**x, "loss": out.losses.item(), "reward_chosen": r_w, "reward_rejected": r_l}
    for part in spec.parts(values, hp) if spec.parts else []:
        table[part.key] = part  # a generic key keeps its place; a new one goes before the loss
    loss = table.pop("loss")
    return [*table.values(), loss]


def _values(rows: list[LossPart]) -> dict[str, float]:
    return {p.key: p.value for p in rows}


# ----------------------------------------------------------------------------------------- one command


def _run(name: str, spec: LossSpec, kw: dict[str, Any]) -> None:
    """Validate the options of `prefs loss NAME`, then print the parts table or the beta sweep."""
    log, hp = kw["log"], {k: kw[k] for k in spec.hparams}
    inputs = ["policy_chosen", "policy_rejected", *(["ref_chosen", "ref_rejected"] if spec.needs_reference else [])]
    x: dict[str, Any] = {f"{k}_logps": _logp(kw[k], log=log, field=_flag(k)) for k in inputs}
    x.update(chosen_lengths=kw.get("chosen_length"), rejected_lengths=kw.get("rejected_length"))
    for key in ("chosen_length", "rejected_length"):
        if key in kw and kw[key] < 1:
            raise PreftuneError(f"a token count must be >= 1, got {kw[key]}", field=_flag(key))
    for key, value in hp.items():
        if not isinstance(value, bool) and not math.isfinite(value):
            raise PreftuneError(f"must be a finite number, got {value}", field=_flag(key))
    if "beta" in hp:
        _positive(hp["beta"], "--beta")
    shown = {k: kw[k] for k in [*inputs, "chosen_length", "rejected_length"] if k in kw}
    shown.update(log=log)
    title = spec.title or name
    if kw.get("compare_ref_rejected") is not None and kw.get("beta_sweep") is None:
        raise PreftuneError("only used with --beta-sweep", field="--compare-ref-rejected")
    if kw.get("beta_sweep") is None:
        rows = _parts(name, spec, x, hp)
        heading = f"{title} loss, " + ", ".join(f"{k} = {_g(v)}" for k, v in hp.items() if v is not False)
        _emit(heading.rstrip(", "), [(p.label, p.value, p.formula) for p in rows if p.shown],
              {"loss_name": name, "inputs": {**shown, **hp}, **_values(rows)}, kw["as_json"])
        return
    _sweep(name, spec, x, hp, kw, inputs={**shown, **hp})


def _sweep(name: str, spec: LossSpec, x: dict[str, Any], hp: dict[str, Any], kw: dict[str, Any], *,
           inputs: dict[str, Any]) -> None:
    """The loss for each beta of --beta-sweep (and --compare-ref-rejected), as a table or JSON, plus a PNG."""
    from preftune import plots

    betas, log, path = _parse_sweep(kw["beta_sweep"]), kw["log"], kw["plot"]
    rest = {k: v for k, v in hp.items() if k != "beta"}
    inputs = {k: v for k, v in inputs.items() if k != "beta"}
    prob, tex = ("log pi", r"\log\pi") if log else ("pi", r"\pi")
    variants = [(kw["ref_rejected"], x)]
    if kw["compare_ref_rejected"] is not None:
        lp = _logp(kw["compare_ref_rejected"], log=log, field="--compare-ref-rejected")
        variants.append((kw["compare_ref_rejected"], {**x, "ref_rejected_logps": lp}))
    curves: list[tuple[str, list[float]]] = []
    series: list[dict[str, Any]] = []
    for ref_rejected, xv in variants:
        per_beta = [_values(_parts(name, spec, xv, {**hp, "beta": b})) for b in betas]
        losses, h = [p["loss"] for p in per_beta], per_beta[0]["h"]
        curves.append((f"${tex}_{{ref}}(y_l)$ = {ref_rejected:g}   ($h$ = {h:+.3f})", losses))
        series.append({"ref_rejected": ref_rejected, "h": h, "losses": losses})
    # the loss when policy = reference (h = 0): a dotted line when it does not depend on beta (log 2 for DPO)
    zero = {**x, **{k: 0.0 for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                     "ref_rejected_logps")}}
    level = [_values(_parts(name, spec, zero, {**hp, "beta": b}))["loss"] for b in (betas[0], betas[-1])]
    extra = "".join(f", {k}={_g(v)}" for k, v in rest.items() if v is not False)
    values = (kw["policy_chosen"], kw["policy_rejected"], kw["ref_chosen"])
    shown = f"{prob}(y_w)={values[0]:g}, {prob}(y_l)={values[1]:g}, {prob}_ref(y_w)={values[2]:g}" + extra
    shown_tex = ", ".join(f"${tex}{w}$={v:g}" for w, v in zip(("(y_w)", "(y_l)", "_{ref}(y_w)"), values, strict=True))
    try:
        plots.beta_sweep(betas, curves, path, loss=name, title=spec.title or name, inputs=shown_tex + extra,
                         at_reference=level[0] if math.isclose(level[0], level[1], abs_tol=1e-12) else None)
    except OSError as exc:
        raise PreftuneError(f"cannot write the plot: {exc.strerror or exc}", path=str(path), field="--plot",
                            hint="give a writable path such as beta_sweep.png") from None
    except ValueError as exc:  # matplotlib: an unknown image format
        raise PreftuneError(f"cannot write the plot: {str(exc).splitlines()[0]}", path=str(path), field="--plot",
                            hint="end the path with .png, .pdf or .svg") from None
    if kw["as_json"]:
        print_json({"loss_name": name, "inputs": inputs, "beta": betas, "losses": series[0]["losses"],
                    "h": series[0]["h"], "compare": series[1] if len(series) > 1 else None, "plot": str(path)})
        return
    out = Table(title=f"{spec.title or name} loss vs beta ({shown})")
    out.add_column("beta", justify="right")
    for s in series:
        out.add_column(f"loss, {prob}_ref(y_l) = {s['ref_rejected']:g}", justify="right")
    for i, b in enumerate(betas):
        out.add_row(_f(b), *(_f(s["losses"][i]) for s in series))
    console.print(out)
    console.print(f"plot written to {path}", markup=False, soft_wrap=True)


# ------------------------------------------------------------------------------------ building commands


def _option(name: str, annotation: Any, default: Any, decl: str, help: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, decl, help=help))


def _parameters(name: str, spec: LossSpec) -> list[inspect.Parameter]:
    """The options of `prefs loss NAME`: inputs, one per hyperparameter, --log, the sweep's, --json."""
    inputs = ["policy_chosen", "policy_rejected", *(["ref_chosen", "ref_rejected"] if spec.needs_reference else [])]
    params = [_option(k, float, ..., _flag(k), INPUT_HELP[k]) for k in inputs]
    if not spec.needs_reference or spec.takes_lengths:
        text = REF_LENGTH_HELP if spec.needs_reference else LENGTH_HELP
        params += [_option(f"{side}_length", int, 1, f"--{side}-length", text.format(w))
                   for side, w in (("chosen", "w"), ("rejected", "l"))]
    for key, default in spec.hparams.items():
        if key in _FIXED or key in INPUT_HELP:
            raise RuntimeError(f"loss '{name}': hyperparameter '{key}' clashes with an option of `prefs loss`")
        help = spec.hparam_help.get(key, f"Hyperparameter {key} of the loss (see its formula).")
        if isinstance(default, bool):
            params.append(_option(key, bool, default, f"{_flag(key)}/--no-{key.replace('_', '-')}", help))
        else:
            params.append(_option(key, float, default, _flag(key), help))
    params.append(_option("log", bool, False, "--log", LOG_HELP))
    if spec.needs_reference and "beta" in spec.hparams:
        params += [_option("beta_sweep", str, None, "--beta-sweep", SWEEP_HELP),
                   _option("plot", Path, Path("beta_sweep.png"), "--plot", PLOT_HELP),
                   _option("compare_ref_rejected", float, None, "--compare-ref-rejected", COMPARE_HELP)]
    return [*params, _option("as_json", bool, False, "--json", JSON_HELP)]


def _click_command(name: str, spec: LossSpec) -> click.Command:
    """`prefs loss NAME` as a click command: a function whose signature typer reads the options from."""
    params = _parameters(name, spec)

    def command(**kw: Any) -> None:
        _run(name, spec, kw)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    inputs = "pi and pi_ref of y_w and y_l" if spec.needs_reference else "pi(y_w), pi(y_l) and their token counts"
    command.__doc__ = (f"{spec.title or name} loss: {spec.summary}.\n\nInputs: {inputs} (probabilities, or "
                       "log-probabilities with --log).")
    app = typer.Typer(add_completion=False)
    app.command(name)(handle_errors(command))
    return typer.main.get_command(app)


# ------------------------------------------------------------------------------ the reward-model loss


@loss_app.command("reward")
@handle_errors
def reward(
    chosen: float = typer.Option(..., "--chosen", help="r(x, y_w): reward-model score of the chosen response."),
    rejected: float = typer.Option(..., "--rejected", help="r(x, y_l): score of the rejected response."),
    margin: float = typer.Option(None, "--margin", help="Required gap m (Llama 2): loss -log sigmoid(r_w - r_l - m)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Bradley-Terry reward-model loss -log sigmoid(r_w - r_l [- m]) (InstructGPT Eq. 1, Llama 2 Eq. 2)."""
    import torch

    from preftune.core.reward_losses import bradley_terry_loss

    for v, f in ((chosen, "--chosen"), (rejected, "--rejected"), (margin or 0.0, "--margin")):
        if not math.isfinite(v):
            raise PreftuneError(f"must be a finite number, got {v}", field=f)
    rc, rr = torch.tensor([chosen], dtype=torch.float64), torch.tensor([rejected], dtype=torch.float64)
    loss = bradley_terry_loss(rc, rr, margin=margin).item()
    p = torch.sigmoid(rc - rr).item()
    m = 0.0 if margin is None else margin
    data = {"loss_name": "reward", "inputs": {"chosen": chosen, "rejected": rejected, "margin": margin},
            "difference": chosen - rejected, "p_chosen_preferred": p, "loss": loss}
    rows = [("r_w - r_l", chosen - rejected, "reward difference"),
            ("P(y_w > y_l)", p, "sigmoid(r_w - r_l), Bradley-Terry")]
    if margin is not None:
        rows.append(("margin", m, "m"))
    rows.append(("loss", loss, "-log sigmoid(r_w - r_l - m)" if margin is not None else "-log sigmoid(r_w - r_l)"))
    _emit("Reward-model (Bradley-Terry) loss", rows, data, as_json)


# ------------------------------------------------------------------------------------------ the KTO loss

KTO_SIDES = (("desirable", "D", "desirable_weight", "lambda_D"), ("undesirable", "U", "undesirable_weight", "lambda_U"))


@loss_app.command("kto")
@handle_errors
def kto(
    policy_desirable: float = typer.Option(None, "--policy-desirable", help="pi(y_D | x): the policy's probability "
                                           "of a desirable completion (label true)."),
    ref_desirable: float = typer.Option(None, "--ref-desirable", help="pi_ref(y_D | x): the reference's."),
    policy_undesirable: float = typer.Option(None, "--policy-undesirable", help="pi(y_U | x): the policy's "
                                             "probability of an undesirable completion (label false)."),
    ref_undesirable: float = typer.Option(None, "--ref-undesirable", help="pi_ref(y_U | x): the reference's."),
    z0: float = typer.Option(0.0, "--z0", help="Reference point z0 = max(0, KL estimate) >= 0, in nats."),
    beta: float = typer.Option(0.1, "--beta", help="KTO's beta (> 0)."),
    desirable_weight: float = typer.Option(1.0, "--desirable-weight", help="lambda_D (> 0)."),
    undesirable_weight: float = typer.Option(1.0, "--undesirable-weight", help="lambda_U (> 0)."),
    log: bool = typer.Option(False, "--log", help=LOG_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """KTO loss lambda_y - v(x, y) of a desirable and/or an undesirable example (Ethayarajh et al. 2024, Eq. 8).

    Each example is one completion: give --policy-desirable with --ref-desirable, --policy-undesirable with
    --ref-undesirable, or both (probabilities, or log-probabilities with --log). The loss is their mean.
    """
    import torch

    from preftune.core.losses import LossPart, kto_loss

    given = {"desirable": (policy_desirable, ref_desirable), "undesirable": (policy_undesirable, ref_undesirable)}
    sides = [s for s in KTO_SIDES if any(v is not None for v in given[s[0]])]
    if not sides:
        raise PreftuneError("no example given", field="--policy-desirable",
                            hint="give --policy-desirable and --ref-desirable, and/or --policy-undesirable and "
                                 "--ref-undesirable")
    for name, value in (("--z0", z0), ("--beta", beta), ("--desirable-weight", desirable_weight),
                        ("--undesirable-weight", undesirable_weight)):
        if not math.isfinite(value):
            raise PreftuneError(f"must be a finite number, got {value}", field=name)
    if z0 < 0:
        raise PreftuneError(f"must be >= 0, got {z0}", field="--z0", hint="z0 is max(0, KL estimate)")
    for value, name in ((beta, "--beta"), (desirable_weight, "--desirable-weight"),
                        (undesirable_weight, "--undesirable-weight")):
        _positive(value, name)
    hp = {"beta": beta, "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
    rows, losses, inputs = [], [], {}
    for side, y, weight_key, lam in sides:
        policy, ref = given[side]
        for value, name in ((policy, f"--policy-{side}"), (ref, f"--ref-{side}")):
            if value is None:
                other = f"--ref-{side}" if name.startswith("--policy") else f"--policy-{side}"
                raise PreftuneError(f"needed with {other}", field=name,
                                    hint="an example needs the policy's and the reference's probability")
        logp, logp_ref = (_logp(v, log=log, field=f"--{w}-{side}") for v, w in ((policy, "policy"), (ref, "ref")))
        inputs.update({f"policy_{side}": policy, f"ref_{side}": ref})
        t = (torch.tensor([v], dtype=torch.float64) for v in (logp, logp_ref))
        out = kto_loss(*t, torch.tensor([side == "desirable"]), z0, **hp)
        ratio, reward, loss = logp - logp_ref, out.rewards.item(), out.losses.item()
        value = 1.0 - loss / hp[weight_key]  # v(x, y) / lambda_y, as kto_loss computed it
        term = f"sigmoid(r_{y} - beta z0)" if side == "desirable" else f"sigmoid(beta z0 - r_{y})"
        rows += [LossPart(f"log_ratio_{side}", f"log pi/pi_ref ({side})", ratio, f"log pi(y_{y}) - log pi_ref(y_{y})"),
                 LossPart(f"reward_{side}", f"r_{y}", reward, f"beta * log pi(y_{y})/pi_ref(y_{y})")]
        losses.append((LossPart(f"value_{side}", f"v_{y} / {lam}", value, term),
                       LossPart(f"loss_{side}", f"loss ({side})", loss, f"{lam} - v_{y}")))
    rows.append(LossPart("z0", "z0", z0, "reference point (--z0)"))
    rows += [value_row for value_row, _ in losses] + [loss_row for _, loss_row in losses]
    mean = sum(p.value for _, p in losses) / len(losses)
    rows.append(LossPart("loss", "loss", mean, "mean of the two example losses" if len(losses) == 2
                         else f"the {sides[0][0]} example's loss"))
    title = "KTO loss, " + ", ".join(f"{k} = {_g(v)}" for k, v in {**hp, "z0": z0}.items())
    _emit(title, [(p.label, p.value, p.formula) for p in rows],
          {"loss_name": "kto", "inputs": {**inputs, "log": log, "z0": z0, **hp}, **_values(rows)}, as_json)
