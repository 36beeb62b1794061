"""Shared matplotlib helpers: headless (Agg backend), one function per kind of figure, each writes a PNG.

matplotlib is imported when a function is called, so importing this module costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

WIN, TIE, LOSS = "#2e7d32", "#9e9e9e", "#c62828"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (parents created), close it and return the path."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def wtl_bars(labels: Sequence[str], wins: Sequence[int], ties: Sequence[int], losses: Sequence[int],
             path: str | Path, *, title: str = "", legend: tuple[str, str, str] = ("win", "tie", "loss")) -> Path:
    """Horizontal stacked bars of win / tie / loss counts, one bar per label (top to bottom)."""
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(7.0, 1.6 + 0.35 * max(n, 1)), layout="constrained")
    ys = list(range(n))[::-1]
    left = [0.0] * n
    for values, color, name in ((wins, WIN, legend[0]), (ties, TIE, legend[1]), (losses, LOSS, legend[2])):
        ax.barh(ys, values, left=left, color=color, label=name, edgecolor="white")
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_yticks(ys, labels)
    ax.set_xlabel("comparisons")
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(loc="outside lower center", fontsize="small", frameon=False, ncols=3)
    ax.margins(x=0.02)
    return save(fig, path)


def length_histograms(lengths: Mapping[str, Sequence[float]], path: str | Path, *, unit: str = "characters",
                      title: str = "Completion lengths") -> Path:
    """Overlaid histograms of completion lengths, one per model, on shared bins."""
    plt = _pyplot()
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    everything = [x for values in lengths.values() for x in values]
    bins = np.histogram_bin_edges(everything or [0], bins=min(30, max(5, len(everything) // 4)))
    for name, values in lengths.items():
        mean = float(np.mean(values)) if len(values) else float("nan")
        ax.hist(values, bins=bins, alpha=0.5, label=f"{name} (mean {mean:.1f})")
    ax.set_xlabel(f"length ({unit})")
    ax.set_ylabel("completions")
    ax.set_title(title)
    ax.legend(fontsize="small", frameon=False)
    return save(fig, path)


def interval_plot(names: Sequence[str], values: Sequence[float], low: Sequence[float] | None,
                  high: Sequence[float] | None, path: str | Path, *, xlabel: str, title: str = "") -> Path:
    """Points with horizontal 95% interval bars, first name on top (e.g. a Bradley-Terry ranking)."""
    plt = _pyplot()
    n = len(names)
    fig, ax = plt.subplots(figsize=(6.0, 1.2 + 0.4 * max(n, 1)))
    ys = list(range(n))[::-1]
    if low is not None and high is not None:
        err = [[v - lo for v, lo in zip(values, low, strict=True)], [hi - v for v, hi in zip(values, high, strict=True)]]
        ax.errorbar(values, ys, xerr=err, fmt="o", color="#1565c0", capsize=4)
    else:
        ax.plot(values, ys, "o", color="#1565c0")
    ax.set_yticks(ys, names)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


def win_rate_intervals(names: Sequence[str], series: Mapping[str, Sequence[tuple[float, float | None, float | None]]],
                       path: str | Path, *, title: str = "") -> Path:
    """Win rates with 95% interval bars: one row per name, one marker per series (e.g. per judge), and a
    dashed line at 0.5 (no better than the baseline)."""
    plt = _pyplot()
    n, k = len(names), max(len(series), 1)
    fig, ax = plt.subplots(figsize=(7.0, 1.4 + 0.16 * n * (k + 1)), layout="constrained")
    colors = ("#1565c0", "#ef6c00", "#6a1b9a", "#2e7d32")
    for s, (label, points) in enumerate(series.items()):
        ys = [n - 1 - i + (0.2 * (k - 1) / 2 - 0.2 * s) for i in range(n)]
        values = [p[0] for p in points]
        err = [[p[0] - (p[1] if p[1] is not None else p[0]) for p in points],
               [(p[2] if p[2] is not None else p[0]) - p[0] for p in points]]
        ax.errorbar(values, ys, xerr=err, fmt="o", capsize=4, color=colors[s % len(colors)], label=label)
    ax.axvline(0.5, color="#9e9e9e", linestyle="--", linewidth=1)
    ax.set_yticks(list(range(n))[::-1], names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate against the baseline (ties count half)")
    ax.set_title(title, fontsize="medium")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize="small", frameon=False, ncols=max(1, len(series)))
    return save(fig, path)


def training_curves(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                    path: str | Path, *, columns: int = 3) -> Path:
    """A grid of line plots: panel title -> series name -> (steps, values)."""
    plt = _pyplot()
    n = max(len(panels), 1)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.0 * columns, 2.8 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels.items(), strict=False):
        for name, (steps, values) in series.items():
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small", frameon=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save(fig, path)


FRONTIER_MARKERS = {"sft": "*", "dpo": "o", "ppo": "s", "rloo": "^", "raft": "D", "unlikelihood": "v", "grpo": "P",
                    "online-dpo": "X", "iterative-dpo": "h"}


def frontier_plot(points: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Mean reward against KL(pi || pi_ref), one marker style per method, the points of a sweep joined in
    order of KL, standard errors as bars, each point labelled with its swept value (beta=0.1)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    methods = list(dict.fromkeys(p["method"] for p in points))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, method in enumerate(methods):
        group = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        xs, ys = [p["kl"] for p in group], [p["reward"] for p in group]
        color = "black" if method == "sft" else colors[k % len(colors)]
        ax.errorbar(xs, ys, xerr=[p.get("kl_se", 0.0) for p in group], yerr=[p.get("reward_se", 0.0) for p in group],
                    fmt="-" + FRONTIER_MARKERS.get(method, "o"), color=color, label=method, capsize=2,
                    markersize=9 if method == "sft" else 6, linewidth=1.2, elinewidth=0.6)
        for p in group:
            if p.get("param"):
                short = {"kl_coef": "kl", "beta": "beta"}.get(p["param"], p["param"])
                ax.annotate(f"{short}={p['value']:g}", (p["kl"], p["reward"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=color)
    ax.set_xlabel("KL(pi || pi_ref), nats per completion (held-out prompts)")
    ax.set_ylabel("mean ground-truth reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", frameon=False)
    return save(fig, path)


def overoptimization_plot(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *,
                          peaks: Mapping[str, Mapping[str, Any]] | None = None,
                          fits: Mapping[str, Mapping[str, Any] | None] | None = None, title: str = "") -> Path:
    """Reward-model overoptimization (``preftune experiment overoptimization``): the proxy reward (left) and
    the true reward (right) against KL(pi || pi_ref), one line per run through its measurements in order of
    steps, standard errors as bars, its last point labelled; the true reward's peak starred, and Gao et al.'s fit
    ``R(d) = d (alpha - beta log d)``, d = sqrt(KL), dashed where it explains the curve (``clean``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, curve) in enumerate(curves.items()):
        color, marker = colors[k % len(colors)], FRONTIER_MARKERS.get(name, "o")
        xs = [p["kl"] for p in curve]
        for ax, key in zip(axes, ("proxy", "true"), strict=True):
            ax.errorbar(xs, [p[f"{key}_reward"] for p in curve], yerr=[p[f"{key}_se"] for p in curve],
                        fmt="-" + marker, color=color, label=name, capsize=2, markersize=5, linewidth=1.2,
                        elinewidth=0.6)
            ax.annotate(f"step {curve[-1]['step']}", (xs[-1], curve[-1][f"{key}_reward"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color=color)  # where the run ended: KL need not only grow
        peak = (peaks or {}).get(name)
        if peak is not None:
            axes[1].plot([peak["kl"]], [peak["true_reward"]], "*", color=color, markersize=15, markeredgecolor="black",
                         label=f"{name}: peak at step {peak['step']}")
        fit = (fits or {}).get(name)
        if fit is not None and fit.get("clean"):  # a clean fit has 3 points or more with KL > 0
            ds = [math.sqrt(max(xs)) * (i + 1) / 100 for i in range(100)]
            start = curve[0]["true_reward"]
            gains = [d * (fit["alpha"] - fit["beta"] * math.log(d)) for d in ds]  # Gao et al. 2023, R_RL(d)
            axes[1].plot([0.0, *(d * d for d in ds)], [start, *(start + g for g in gains)], "--", color=color,
                         linewidth=0.9,
                         label=f"{name}: Gao fit, alpha {fit['alpha']:.2f}, beta {fit['beta']:.2f} (r2 {fit['r2']:.2f})")
    for ax, label in zip(axes, ("proxy reward (what the policy optimises)", "true reward (the ground truth)"),
                         strict=True):
        ax.set_xlabel("KL(pi || pi_ref), nats (Gao et al. use sqrt(KL))")
        ax.set_ylabel(f"mean {label.split(' (')[0]}, held-out prompts")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", frameon=False)
    fig.suptitle(title)
    return save(fig, path)


# What a second curve (--compare-ref-rejected) shows, per loss: the title's second line in beta_sweep.
BETA_SWEEP_NOTES = {
    "dpo": r"$h > 0$ (the policy favours $y_w$ more than the reference does): the loss falls as $\beta$ grows;"
           "\n" r"$h < 0$: it rises. Changing $\pi_{ref}(y_l)$ changes the sign of $h$ for the same policy.",
    "ipo": r"IPO pulls $h$ towards $1/(2\beta)$: the loss is 0 at $\beta = 1/(2h)$ (only possible when $h > 0$)"
           "\n" r"and grows again for larger $\beta$ instead of vanishing like DPO's.",
    "cdpo": r"With label smoothing the flipped-label term grows like $\epsilon\beta|h|$,"
            "\n" r"so even when $h > 0$ the loss has a finite best $\beta$.",
    "hinge": r"The hinge is $1 - \beta h$ until $\beta h$ reaches 1: for $h > 0$ it is 0 from $\beta = 1/h$ on;"
             "\n" r"for $h < 0$ it grows linearly in $\beta$.",
    "robust": r"rDPO is the DPO loss minus $\epsilon\beta h/(1 - 2\epsilon)$: for $h > 0$ it keeps falling (in the end"
              "\n" r"below 0), with no finite best $\beta$; for $h < 0$ it rises faster than DPO's.",
}


def beta_sweep(betas: Sequence[float], curves: Sequence[tuple[str, Sequence[float]]], path: str | Path, *,
               loss: str, title: str, inputs: str, at_reference: float | None = None) -> Path:
    """A loss against beta (``preftune prefs loss NAME --beta-sweep``): one line per curve (label, losses),
    solid then dashed. ``at_reference`` is the loss when policy = reference (h = 0) if it does not depend on
    beta (log 2 for DPO), drawn dotted. With two or more curves the title adds ``BETA_SWEEP_NOTES[loss]``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for k, (label, values) in enumerate(curves):
        ax.plot(betas, values, ("-", "--", "-.", ":")[k % 4], linewidth=2, label=label)
    if at_reference is not None:
        level = "log 2" if math.isclose(at_reference, math.log(2)) else f"{at_reference:g}"
        ax.axhline(at_reference, color="grey", linewidth=0.8, linestyle=":", label=f"{level} (policy = reference)")
    ax.set_xlabel(r"$\beta$")
    ax.set_ylabel(f"{title} loss")
    heading = f"{title} loss vs $\\beta$  ({inputs})"
    if len(curves) > 1 and loss in BETA_SWEEP_NOTES:
        heading += "\n" + BETA_SWEEP_NOTES[loss]
    ax.set_title(heading, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, title=r"$h = \log\frac{\pi(y_w)}{\pi_{ref}(y_w)} - \log\frac{\pi(y_l)}{\pi_{ref}(y_l)}$",
              title_fontsize=9)
    return save(fig, path)


def rounds_plot(rounds: Sequence[Mapping[str, Any]], path: str | Path, *, sft_reward: float | None = None,
                title: str = "") -> Path:
    """``preftune iterate``: after each round (round 0 = the SFT model), the win rate against SFT with its 95%
    interval (a dashed line at 0.5), the KL to SFT with its standard error and, when the records hold a
    ``reward``, the mean reward (``sft_reward`` at round 0)."""
    plt = _pyplot()
    with_reward = any(r.get("reward") is not None for r in rounds)
    fig, axes = plt.subplots(1, 3 if with_reward else 2, figsize=(11.5 if with_reward else 8.5, 3.6), squeeze=False)
    axes = list(axes[0])
    xs = [0, *(r["round"] for r in rounds)]
    judged = [r for r in rounds if r.get("win_rate") is not None]
    ax = axes[0]
    if judged:
        wr = [r["win_rate"] for r in judged]
        ci = [r.get("win_rate_ci") or (w, w) for r, w in zip(judged, wr, strict=True)]
        ax.errorbar([0, *(r["round"] for r in judged)], [0.5, *wr],
                    yerr=[[0.0, *(w - c[0] for w, c in zip(wr, ci, strict=True))],
                          [0.0, *(c[1] - w for w, c in zip(wr, ci, strict=True))]],
                    fmt="-o", color="#1565c0", capsize=4)
    ax.axhline(0.5, color="#9e9e9e", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate against SFT (95% CI)")
    ax.set_title("win rate (ties count half)" if judged else "win rate: not measured", fontsize="medium")
    panels = [("kl", "kl_se", 0.0, "KL(pi || pi_SFT), nats", "KL to SFT")]
    if with_reward:
        panels.append(("reward", "reward_se", sft_reward, "mean reward", "reward (eval prompts)"))
    for ax, (key, se, start, ylabel, name) in zip(axes[1:], panels, strict=True):
        ys = [start, *(r.get(key) for r in rounds)]
        err = [0.0, *(r.get(se) or 0.0 for r in rounds)]
        keep = [i for i, y in enumerate(ys) if y is not None]
        ax.errorbar([xs[i] for i in keep], [ys[i] for i in keep], yerr=[err[i] for i in keep], fmt="-o",
                    color="#ef6c00" if key == "kl" else "#2e7d32", capsize=4)
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize="medium")
    for ax in axes:
        ax.set_xticks(xs, ["SFT", *(str(x) for x in xs[1:])])
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize="medium")
    return save(fig, path)
