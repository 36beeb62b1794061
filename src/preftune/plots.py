"""Shared matplotlib helpers: headless (Agg backend), one function per kind of figure, each writes a PNG.

matplotlib is imported when a function is called, so importing this module costs nothing.
"""

from __future__ import annotations

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
