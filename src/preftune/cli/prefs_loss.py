"""`preftune prefs loss`: compute a preference loss by hand and see its parts.

Reward-model (Bradley-Terry) loss, DPO, IPO, cDPO, ORPO and SimPO for one example, from sequence
probabilities (or log-probabilities with ``--log``). ``--beta-sweep`` plots a DPO-family loss against
beta. Numbers print with 6 decimals; ``--json`` prints every number unrounded. The arithmetic is done
by :mod:`preftune.core.losses`, the same functions the trainers use.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from preftune.cli._common import console, handle_errors, print_json
from preftune.errors import PreftuneError

loss_app = typer.Typer(
    help="Compute a preference loss for one example and print its parts (reward-model, DPO, IPO, cDPO, "
         "ORPO, SimPO).",
    no_args_is_help=True,
)

JSON_HELP = "Print every number unrounded as JSON."
LOG_HELP = "The numbers are log-probabilities (<= 0) instead of probabilities in (0, 1]."
SWEEP_HELP = "START:STOP:N - print the loss for N betas from START to STOP and plot it (e.g. 0.1:5:50)."
PLOT_HELP = "Where --beta-sweep writes its PNG plot."
COMPARE_HELP = "With --beta-sweep: a second curve with this pi_ref(y_l) instead of --ref-rejected."


def _f(x: float) -> str:
    return f"{x:.6f}"


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


def _library(fn: Any, *args: Any, field: str, **kwargs: Any) -> Any:
    """Call a loss function; its ValueError (a bad hyperparameter) becomes a user error."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise PreftuneError(str(exc), field=field) from None


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


# ------------------------------------------------------------------------------- reference-based parts


def _reference_parts(name: str, lp: tuple[float, float, float, float], hp: dict[str, float]) -> dict[str, float]:
    """Loss, implicit rewards and the loss's own parts for one example of a reference-based loss."""
    import torch

    from preftune.core import losses

    fn = {"dpo": losses.dpo_loss, "ipo": losses.ipo_loss, "cdpo": losses.cdpo_loss}[name]
    t = [torch.tensor([x], dtype=torch.float64) for x in lp]
    out = _library(fn, *t, field="--label-smoothing" if "label_smoothing" in hp else "--beta", **hp)
    beta = hp["beta"]
    h = (lp[0] - lp[2]) - (lp[1] - lp[3])
    r_w, r_l = out.chosen_rewards.item(), out.rejected_rewards.item()
    parts = {"loss": out.losses.item(), "log_ratio_chosen": lp[0] - lp[2], "log_ratio_rejected": lp[1] - lp[3],
             "h": h, "reward_chosen": r_w, "reward_rejected": r_l, "margin": r_w - r_l,
             "gradient_weight": losses.dpo_gradient_weight(out.chosen_rewards, out.rejected_rewards).item()}
    if name == "ipo":
        parts["target"] = 1.0 / (2.0 * beta)
    if name == "cdpo":
        z = torch.tensor(beta * h, dtype=torch.float64)
        parts["dpo_term"] = -torch.nn.functional.logsigmoid(z).item()
        parts["flipped_term"] = -torch.nn.functional.logsigmoid(-z).item()
    return parts


def _reference_rows(name: str, p: dict[str, float], hp: dict[str, float]) -> list[tuple[str, float, str]]:
    rows = [("log pi/pi_ref (chosen)", p["log_ratio_chosen"], "log pi(y_w) - log pi_ref(y_w)"),
            ("log pi/pi_ref (rejected)", p["log_ratio_rejected"], "log pi(y_l) - log pi_ref(y_l)"),
            ("h", p["h"], "difference of the two log-ratios"),
            ("r_w", p["reward_chosen"], "beta * log pi(y_w)/pi_ref(y_w)"),
            ("r_l", p["reward_rejected"], "beta * log pi(y_l)/pi_ref(y_l)"),
            ("margin", p["margin"], "r_w - r_l = beta * h")]
    if name == "dpo":
        rows.append(("gradient weight", p["gradient_weight"], "sigmoid(r_l - r_w)"))
        rows.append(("loss", p["loss"], "-log sigmoid(r_w - r_l)"))
    elif name == "ipo":
        rows.append(("target", p["target"], "1 / (2 beta)"))
        rows.append(("loss", p["loss"], "(h - 1/(2 beta))^2"))
    else:
        eps = hp["label_smoothing"]
        rows.append(("DPO term", p["dpo_term"], "-log sigmoid(beta h)"))
        rows.append(("flipped term", p["flipped_term"], "-log sigmoid(-beta h)"))
        rows.append(("loss", p["loss"], f"{1 - eps:g} * DPO term + {eps:g} * flipped"))
    return rows


_SWEEP_NOTES = {
    "dpo": r"$h > 0$ (the policy favours $y_w$ more than the reference does): the loss falls as $\beta$ grows;"
           "\n" r"$h < 0$: it rises. Changing $\pi_{ref}(y_l)$ changes the sign of $h$ for the same policy.",
    "ipo": r"IPO pulls $h$ towards $1/(2\beta)$: the loss is 0 at $\beta = 1/(2h)$ (only possible when $h > 0$)"
           "\n" r"and grows again for larger $\beta$ instead of vanishing like DPO's.",
    "cdpo": r"With label smoothing the flipped-label term grows like $\epsilon\beta|h|$,"
            "\n" r"so even when $h > 0$ the loss has a finite best $\beta$.",
}


def _sweep_plot(name: str, betas: list[float], curves: list[tuple[str, list[float]]], inputs: str,
                path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for (label, values), style in zip(curves, ("-", "--"), strict=False):
        ax.plot(betas, values, style, linewidth=2, label=label)
    if name in ("dpo", "cdpo"):
        ax.axhline(math.log(2), color="grey", linewidth=0.8, linestyle=":", label="log 2 (policy = reference)")
    pretty = _pretty(name)
    ax.set_xlabel(r"$\beta$")
    ax.set_ylabel(f"{pretty} loss")
    title = f"{pretty} loss vs $\\beta$  ({inputs})"
    if len(curves) > 1:
        title += "\n" + _SWEEP_NOTES[name]
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, title=r"$h = \log\frac{\pi(y_w)}{\pi_{ref}(y_w)} - \log\frac{\pi(y_l)}{\pi_{ref}(y_l)}$",
              title_fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _pretty(name: str) -> str:
    return "cDPO" if name == "cdpo" else name.upper()


def _run_reference(name: str, *, values: tuple[float, float, float, float], log: bool, hp: dict[str, float],
                   beta_sweep: str | None, plot: Path, compare_ref_rejected: float | None,
                   as_json: bool) -> None:
    fields = ("--policy-chosen", "--policy-rejected", "--ref-chosen", "--ref-rejected")
    lp = tuple(_logp(v, log=log, field=f) for v, f in zip(values, fields, strict=True))
    _positive(hp["beta"], "--beta")
    inputs: dict[str, Any] = dict(zip(("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"),
                                      values, strict=True))
    inputs["log"] = log
    if compare_ref_rejected is not None and beta_sweep is None:
        raise PreftuneError("only used with --beta-sweep", field="--compare-ref-rejected")
    if beta_sweep is None:
        parts = _reference_parts(name, lp, hp)  # type: ignore[arg-type]
        title = f"{_pretty(name)} loss, " + ", ".join(f"{k} = {v:g}" for k, v in hp.items())
        _emit(title, _reference_rows(name, parts, hp), {"loss_name": name, "inputs": {**inputs, **hp}, **parts},
              as_json)
        return

    betas = _parse_sweep(beta_sweep)
    rest = {k: v for k, v in hp.items() if k != "beta"}
    prob, tex = ("log pi", r"\log\pi") if log else ("pi", r"\pi")
    variants = [(values[3], lp)]
    if compare_ref_rejected is not None:
        lp_cmp = (*lp[:3], _logp(compare_ref_rejected, log=log, field="--compare-ref-rejected"))
        variants.append((compare_ref_rejected, lp_cmp))
    curves: list[tuple[str, list[float]]] = []
    series: list[dict[str, Any]] = []
    for ref_rej, lps in variants:
        losses = [_reference_parts(name, lps, {"beta": b, **rest})["loss"] for b in betas]
        h = (lps[0] - lps[2]) - (lps[1] - lps[3])
        curves.append((f"${tex}_{{ref}}(y_l)$ = {ref_rej:g}   ($h$ = {h:+.3f})", losses))
        series.append({"ref_rejected": ref_rej, "h": h, "losses": losses})
    shown = f"{prob}(y_w)={values[0]:g}, {prob}(y_l)={values[1]:g}, {prob}_ref(y_w)={values[2]:g}"
    shown += "".join(f", {k}={v:g}" for k, v in rest.items())
    shown_tex = ", ".join(f"${tex}{w}$={v:g}" for w, v in zip(("(y_w)", "(y_l)", "_{ref}(y_w)"), values, strict=False))
    shown_tex += "".join(f", {k}={v:g}" for k, v in rest.items())
    _sweep_plot(name, betas, curves, shown_tex, plot)
    if as_json:
        print_json({"loss_name": name, "inputs": {**inputs, **rest}, "beta": betas, "losses": series[0]["losses"],
                    "h": series[0]["h"], "compare": series[1] if len(series) > 1 else None, "plot": str(plot)})
        return
    out = Table(title=f"{_pretty(name)} loss vs beta ({shown})")
    out.add_column("beta", justify="right")
    for s in series:
        out.add_column(f"loss, {prob}_ref(y_l) = {s['ref_rejected']:g}", justify="right")
    for i, b in enumerate(betas):
        out.add_row(_f(b), *(_f(s["losses"][i]) for s in series))
    console.print(out)
    console.print(f"plot written to {plot}")


# ------------------------------------------------------------------------------------------- commands


def _pc() -> Any:
    return typer.Option(..., "--policy-chosen", help="pi(y_w | x): the policy's probability of the chosen response.")


def _pr() -> Any:
    return typer.Option(..., "--policy-rejected", help="pi(y_l | x): the policy's probability of the rejected one.")


def _rc() -> Any:
    return typer.Option(..., "--ref-chosen", help="pi_ref(y_w | x): the reference model's probability.")


def _rr() -> Any:
    return typer.Option(..., "--ref-rejected", help="pi_ref(y_l | x): the reference model's probability.")


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

    from preftune.core.losses import bradley_terry_loss

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


@loss_app.command("dpo")
@handle_errors
def dpo(
    policy_chosen: float = _pc(), policy_rejected: float = _pr(), ref_chosen: float = _rc(),
    ref_rejected: float = _rr(),
    beta: float = typer.Option(0.1, "--beta", help="KL strength beta (> 0)."),
    log: bool = typer.Option(False, "--log", help=LOG_HELP),
    beta_sweep: str = typer.Option(None, "--beta-sweep", help=SWEEP_HELP),
    plot: Path = typer.Option(Path("beta_sweep.png"), "--plot", help=PLOT_HELP),
    compare_ref_rejected: float = typer.Option(None, "--compare-ref-rejected", help=COMPARE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """DPO loss -log sigmoid(r_w - r_l), r = beta log pi/pi_ref (Rafailov et al. 2023, Eq. 7)."""
    _run_reference("dpo", values=(policy_chosen, policy_rejected, ref_chosen, ref_rejected), log=log,
                   hp={"beta": beta}, beta_sweep=beta_sweep, plot=plot, compare_ref_rejected=compare_ref_rejected,
                   as_json=as_json)


@loss_app.command("ipo")
@handle_errors
def ipo(
    policy_chosen: float = _pc(), policy_rejected: float = _pr(), ref_chosen: float = _rc(),
    ref_rejected: float = _rr(),
    beta: float = typer.Option(0.1, "--beta", help="Regularisation beta (tau in the paper, > 0)."),
    log: bool = typer.Option(False, "--log", help=LOG_HELP),
    beta_sweep: str = typer.Option(None, "--beta-sweep", help=SWEEP_HELP),
    plot: Path = typer.Option(Path("beta_sweep.png"), "--plot", help=PLOT_HELP),
    compare_ref_rejected: float = typer.Option(None, "--compare-ref-rejected", help=COMPARE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """IPO loss (h - 1/(2 beta))^2, h = difference of log-ratios (Azar et al. 2023, Eq. 17)."""
    _run_reference("ipo", values=(policy_chosen, policy_rejected, ref_chosen, ref_rejected), log=log,
                   hp={"beta": beta}, beta_sweep=beta_sweep, plot=plot, compare_ref_rejected=compare_ref_rejected,
                   as_json=as_json)


@loss_app.command("cdpo")
@handle_errors
def cdpo(
    policy_chosen: float = _pc(), policy_rejected: float = _pr(), ref_chosen: float = _rc(),
    ref_rejected: float = _rr(),
    beta: float = typer.Option(0.1, "--beta", help="KL strength beta (> 0)."),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing", help="eps: probability a label is flipped."),
    log: bool = typer.Option(False, "--log", help=LOG_HELP),
    beta_sweep: str = typer.Option(None, "--beta-sweep", help=SWEEP_HELP),
    plot: Path = typer.Option(Path("beta_sweep.png"), "--plot", help=PLOT_HELP),
    compare_ref_rejected: float = typer.Option(None, "--compare-ref-rejected", help=COMPARE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Conservative DPO: (1 - eps) DPO loss + eps DPO loss with the labels swapped (Mitchell 2023)."""
    _run_reference("cdpo", values=(policy_chosen, policy_rejected, ref_chosen, ref_rejected), log=log,
                   hp={"beta": beta, "label_smoothing": label_smoothing}, beta_sweep=beta_sweep, plot=plot,
                   compare_ref_rejected=compare_ref_rejected, as_json=as_json)


def _reference_free(name: str, *, pc: float, pr: float, nc: int, nr: int, log: bool,
                    hp: dict[str, float]) -> tuple[dict[str, Any], Any]:
    """Validate the inputs of orpo / simpo and run the loss; returns (inputs, output, mean log-probs)."""
    import torch

    from preftune.core import losses

    lp_c = _logp(pc, log=log, field="--policy-chosen")
    lp_r = _logp(pr, log=log, field="--policy-rejected")
    for n, f in ((nc, "--chosen-length"), (nr, "--rejected-length")):
        if n < 1:
            raise PreftuneError(f"a token count must be >= 1, got {n}", field=f)
    _positive(hp["beta"], "--beta")
    t = [torch.tensor([x], dtype=torch.float64) for x in (lp_c, lp_r, nc, nr)]
    fn = {"orpo": losses.orpo_loss, "simpo": losses.simpo_loss}[name]
    out = _library(fn, *t, field="--beta", **hp)
    inputs = {"policy_chosen": pc, "policy_rejected": pr, "chosen_length": nc, "rejected_length": nr, "log": log,
              **hp}
    return inputs, (out, lp_c / nc, lp_r / nr)


def _nc() -> Any:
    return typer.Option(1, "--chosen-length", help="Tokens in y_w (1: the number already is per token).")


def _nr() -> Any:
    return typer.Option(1, "--rejected-length", help="Tokens in y_l (1: the number already is per token).")


@loss_app.command("orpo")
@handle_errors
def orpo(
    policy_chosen: float = _pc(), policy_rejected: float = _pr(), chosen_length: int = _nc(),
    rejected_length: int = _nr(),
    beta: float = typer.Option(0.1, "--beta", help="Weight lambda of the odds-ratio term (> 0)."),
    log: bool = typer.Option(False, "--log", help=LOG_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """ORPO loss -m_w + beta * -log sigmoid(log odds(y_w) - log odds(y_l)), m = log pi / length (Hong et al. 2024)."""
    from preftune.core.losses import log1mexp

    inputs, (out, m_w, m_l) = _reference_free("orpo", pc=policy_chosen, pr=policy_rejected, nc=chosen_length,
                                              nr=rejected_length, log=log, hp={"beta": beta})
    import torch

    mt = torch.tensor([m_w, m_l], dtype=torch.float64)
    log_odds = (mt - log1mexp(mt)).tolist()
    ratio = log_odds[0] - log_odds[1]
    l_or = -torch.nn.functional.logsigmoid(torch.tensor(ratio, dtype=torch.float64)).item()
    data = {"loss_name": "orpo", "inputs": inputs, "mean_logp_chosen": m_w, "mean_logp_rejected": m_l,
            "log_odds_chosen": log_odds[0], "log_odds_rejected": log_odds[1], "log_odds_ratio": ratio,
            "nll": -m_w, "odds_ratio_loss": l_or, "reward_chosen": out.chosen_rewards.item(),
            "reward_rejected": out.rejected_rewards.item(), "loss": out.losses.item()}
    rows = [("m_w", m_w, "log pi(y_w) / |y_w| (mean token log-prob)"),
            ("m_l", m_l, "log pi(y_l) / |y_l|"),
            ("log odds(y_w)", log_odds[0], "m_w - log(1 - exp(m_w))"),
            ("log odds(y_l)", log_odds[1], "m_l - log(1 - exp(m_l))"),
            ("log odds ratio", ratio, "log odds(y_w) - log odds(y_l)"),
            ("NLL (SFT term)", -m_w, "-m_w"),
            ("L_OR", l_or, "-log sigmoid(log odds ratio)"),
            ("r_w", data["reward_chosen"], "beta * m_w (as TRL logs it)"),
            ("r_l", data["reward_rejected"], "beta * m_l"),
            ("loss", data["loss"], "NLL + beta * L_OR")]
    _emit(f"ORPO loss, beta = {beta:g}", rows, data, as_json)


@loss_app.command("simpo")
@handle_errors
def simpo(
    policy_chosen: float = _pc(), policy_rejected: float = _pr(), chosen_length: int = _nc(),
    rejected_length: int = _nr(),
    beta: float = typer.Option(2.0, "--beta", help="Reward scale beta (> 0)."),
    gamma: float = typer.Option(0.5, "--gamma", help="Target reward margin gamma."),
    log: bool = typer.Option(False, "--log", help=LOG_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """SimPO loss -log sigmoid(beta m_w - beta m_l - gamma), m = log pi / length (Meng et al. 2024, Eq. 6)."""
    inputs, (out, m_w, m_l) = _reference_free("simpo", pc=policy_chosen, pr=policy_rejected, nc=chosen_length,
                                              nr=rejected_length, log=log, hp={"beta": beta, "gamma": gamma})
    r_w, r_l = out.chosen_rewards.item(), out.rejected_rewards.item()
    data = {"loss_name": "simpo", "inputs": inputs, "mean_logp_chosen": m_w, "mean_logp_rejected": m_l,
            "reward_chosen": r_w, "reward_rejected": r_l, "margin": r_w - r_l, "margin_minus_gamma": r_w - r_l - gamma,
            "loss": out.losses.item()}
    rows = [("m_w", m_w, "log pi(y_w) / |y_w|"), ("m_l", m_l, "log pi(y_l) / |y_l|"),
            ("r_w", r_w, "beta * m_w"), ("r_l", r_l, "beta * m_l"), ("margin", r_w - r_l, "r_w - r_l"),
            ("margin - gamma", r_w - r_l - gamma, "r_w - r_l - gamma"),
            ("loss", data["loss"], "-log sigmoid(r_w - r_l - gamma)")]
    _emit(f"SimPO loss, beta = {beta:g}, gamma = {gamma:g}", rows, data, as_json)

