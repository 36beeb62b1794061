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


FRONTIER_MARKERS = {"sft": "*", "dpo": "o", "ppo": "s", "rloo": "^", "raft": "D", "unlikelihood": "v"}


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
