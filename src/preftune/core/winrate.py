"""Win rates and their intervals: the statistics behind ``preftune compare`` (numpy only).

* win rate = (W + T / 2) / (W + T + L): a tie counts half a win.
* 95% interval: percentile bootstrap that resamples PROMPTS with replacement (all completions of a
  drawn prompt come along), because completions of one prompt are not independent; a cluster
  bootstrap (Field & Welsh 2007), which gives wider, honest intervals when prompts differ in difficulty.
* length-controlled win rate (the idea of AlpacaEval 2.0, Dubois et al. 2024): fit the logistic model
  P(candidate wins) = sigmoid(b0 + b1 * d / s), where d = len(candidate) - len(baseline) in characters
  and s = the standard deviation of d (scaled, not centred), to the verdicts (win = 1, loss = 0, a tie
  counts as half a win and half a loss); report sigmoid(b0), the predicted win rate when both
  completions have the same length. AlpacaEval uses tanh(d / s) and more covariates; the idea is the same.
  On few or degenerate data the fit runs off to infinity (a handful of pairs separated by length gives
  0.001 with a "confident" interval), so ``length_problem`` refuses it first: one outcome only, wins and
  losses separated by length (no finite maximum), one length difference for all pairs, or fewer than 10
  of the rarer outcome (events per variable, Peduzzi et al. 1996); and when more than 2.5% of the
  bootstrap resamples admit no finite fit, the data are nearly separated. Then the win rate is None
  and ``reason`` says why: "not enough data", not a number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from preftune.errors import PreftuneError

SCORE = {"W": 1.0, "T": 0.5, "L": 0.0}
RIDGE = 1e-3  # numerical safety for Newton's method; separated data are refused before the fit (length_problem)
MIN_EVENTS = 10  # rarer outcome per length coefficient for the length-controlled fit (Peduzzi et al. 1996)
MAX_DEGENERATE = 0.025  # share of bootstrap resamples without a finite fit above which there is no LC interval


def win_rate(verdicts: Sequence[str]) -> float:
    """(W + T / 2) / n."""
    if not verdicts:
        raise PreftuneError("no verdicts to compute a win rate from")
    return sum(SCORE[v] for v in verdicts) / len(verdicts)


def cluster_weights(clusters: Sequence[Any], *, n_bootstrap: int, seed: int) -> Any:
    """[n_bootstrap, n_items] weights: how often each item's cluster was drawn when the clusters are
    resampled with replacement (a cluster bootstrap)."""
    import numpy as np

    names = list(dict.fromkeys(clusters))
    index = np.array([names.index(c) for c in clusters])
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=n_bootstrap)
    return counts[:, index].astype(float)


def bootstrap_interval(values: Sequence[float], clusters: Sequence[Any], *, n_bootstrap: int = 1000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` over cluster-bootstrap resamples."""
    import numpy as np

    w = cluster_weights(clusters, n_bootstrap=n_bootstrap, seed=seed)
    stats = (w @ np.asarray(values, dtype=float)) / w.sum(axis=1)
    tail = (1.0 - level) / 2 * 100
    return float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))


def fit_logistic(x: Sequence[float], y: Sequence[float], *, weights: Sequence[float] | None = None,
                 ridge: float = RIDGE, tol: float = 1e-10, max_iter: int = 100) -> tuple[float, float]:
    """(b0, b1) maximising sum_i w_i [y_i log sigmoid(z_i) + (1 - y_i) log sigmoid(-z_i)]
    - ridge / 2 (b0^2 + b1^2), z_i = b0 + b1 x_i, for targets y_i in [0, 1] (a tie is y = 1/2).
    Newton's method: gradient X^T w (y - p) - ridge b, Hessian -X^T diag(w p (1 - p)) X - ridge I.
    Raises ``FloatingPointError`` when Newton's method does not converge to finite coefficients."""
    import numpy as np

    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    w = np.ones_like(xs) if weights is None else np.asarray(weights, dtype=float)
    design = np.stack([np.ones_like(xs), xs], axis=1)
    beta = np.zeros(2)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ beta, -500, 500)))
        grad = design.T @ (w * (ys - p)) - ridge * beta
        hess = design.T @ (design * (w * p * (1 - p))[:, None]) + ridge * np.eye(2)
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            raise FloatingPointError("the Hessian became singular (separated data?)") from None
        beta = beta + step
        if np.max(np.abs(step)) < tol:
            break
    else:
        raise FloatingPointError(f"Newton's method did not converge in {max_iter} steps")
    if not np.all(np.isfinite(beta)):
        raise FloatingPointError("the logistic fit gave non-finite coefficients")
    return float(beta[0]), float(beta[1])


def length_problem(verdicts: Sequence[str], length_diffs: Sequence[float], *,
                   weights: Sequence[float] | None = None, min_events: float = MIN_EVENTS) -> str | None:
    """Why the logistic fit of the verdicts on the length difference cannot be trusted, or None.

    The fit (a tie = half a win and half a loss) has a finite maximum exactly when neither of these holds
    (Albert & Anderson 1984): one outcome is absent, or the wins are (quasi-)completely separated from
    the losses by the length difference (every win and tie at a difference >= c, every loss and tie at
    <= c, or the reverse). When every pair has the same nonzero length difference, the intercept and
    the slope cannot be told apart. And a fit that exists can still rest on too few outcomes: we ask
    for ``min_events`` of the rarer outcome (ties count half) per fitted length coefficient, the
    events-per-variable rule of Peduzzi et al. (1996). Only items with weight > 0 count; the event
    count is weighted (bootstrap resamples pass ``min_events=0``)."""
    import numpy as np

    d = np.asarray(length_diffs, dtype=float)
    y = np.array([SCORE[v] for v in verdicts])
    w = np.ones_like(d) if weights is None else np.asarray(weights, dtype=float)
    keep = w > 0
    d, y, w = d[keep], y[keep], w[keep]
    wins, losses, ties = float(w[y == 1].sum()), float(w[y == 0].sum()), float(w[y == 0.5].sum())
    if wins + ties == 0 or losses + ties == 0:
        return (f"the {'baseline' if wins + ties == 0 else 'candidate'} won every judged pair, so a win rate "
                "at equal length cannot be estimated")
    if d.min() == d.max():
        if d[0] == 0:
            return None  # all pairs of equal length: the intercept alone is the answer
        unit = "character" if abs(d[0]) == 1 else "characters"
        return (f"every pair has the same length difference ({d[0]:+g} {unit}): the length effect cannot be told "
                "apart from the rest")
    high, low = d[y > 0], d[y < 1]  # where wins (and ties) lie, where losses (and ties) lie
    if low.max() <= high.min() or high.max() <= low.min():
        wins_d = d[y == 1] if (y == 1).any() else high  # name wins and losses; ties only when there is no other
        losses_d = d[y == 0] if (y == 0).any() else low
        win_at, loss_at = ((f"{wins_d.min():+.0f} or more", f"{losses_d.max():+.0f} or less") if low.max() <= high.min()
                           else (f"{wins_d.max():+.0f} or less", f"{losses_d.min():+.0f} or more"))
        return (f"the verdicts are separated by length: every win at a length difference of {win_at}, every loss "
                f"at {loss_at} (characters), so the logistic fit has no finite solution")
    if min(wins, losses) + ties / 2 < min_events:
        return (f"too few decisive outcomes ({count(wins, 'win')}, {count(losses, 'loss', 'losses')}, "
                f"{count(ties, 'tie')}): a fit of the length effect needs at least {min_events:g} of each outcome "
                "(a tie counts half of each)")
    return None


def length_controlled_win_rate(verdicts: Sequence[str], length_diffs: Sequence[float], *,
                               weights: Sequence[float] | None = None, scale: float | None = None,
                               min_events: float = MIN_EVENTS) -> dict[str, Any]:
    """sigmoid(b0) of the logistic fit of the verdicts on d / s (see the module docstring).

    Returns ``{"win_rate", "intercept", "slope", "scale", "reason"}``; ``slope`` is per standard deviation
    of the length difference. When the data cannot support the fit (``length_problem``) ``win_rate``,
    ``intercept`` and ``slope`` are None and ``reason`` says why ("not enough data"). When every pair has
    equal length only the intercept is fitted and the result is the raw win rate.
    """
    import numpy as np

    if not verdicts:
        raise PreftuneError("no verdicts to compute a length-controlled win rate from")
    d = np.asarray(length_diffs, dtype=float)
    s = float(np.std(d)) if scale is None else scale
    out: dict[str, Any] = {"win_rate": None, "intercept": None, "slope": None, "scale": s, "reason": None}
    out["reason"] = length_problem(verdicts, d, weights=weights, min_events=min_events)
    if out["reason"] is not None:
        return out
    x = d / s if s > 0 else np.zeros_like(d)
    try:
        b0, b1 = fit_logistic(x, [SCORE[v] for v in verdicts], weights=weights)
    except FloatingPointError as exc:
        out["reason"] = f"the logistic fit failed ({exc})"
        return out
    out.update(win_rate=1.0 / (1.0 + math.exp(-b0)), intercept=b0, slope=b1 if s > 0 else 0.0)
    return out


def length_controlled_interval(verdicts: Sequence[str], length_diffs: Sequence[float], clusters: Sequence[Any], *,
                               scale: float, n_bootstrap: int, seed: int,
                               max_degenerate: float = MAX_DEGENERATE) -> dict[str, Any]:
    """The 95% percentile interval of the length-controlled win rate over the same prompt resamples as
    the raw win rate: ``{"ci", "degenerate", "reason"}``. A resample whose data admit no finite fit
    (separated by length, one outcome only) is degenerate; when more than ``max_degenerate`` of them
    are, the percentiles would be those of the lucky resamples, so ``ci`` is None and ``reason`` says so."""
    import numpy as np

    draws, degenerate = [], 0
    for wi in cluster_weights(clusters, n_bootstrap=n_bootstrap, seed=seed):
        value = length_controlled_win_rate(verdicts, length_diffs, weights=wi, scale=scale, min_events=0)["win_rate"]
        if value is None:
            degenerate += 1
        else:
            draws.append(value)
    out: dict[str, Any] = {"ci": None, "degenerate": degenerate, "reason": None}
    if degenerate > max_degenerate * n_bootstrap:
        out["reason"] = (f"{degenerate} of {n_bootstrap} bootstrap resamples of the prompts admit no finite fit "
                         "(separated by length or one outcome only)")
    else:
        out["ci"] = (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)))
    return out


def worst_win_rate(verdicts: Mapping[str, Sequence[str]], clusters: Mapping[str, Sequence[Any]], *,
                   n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """The lowest of several win rates of one candidate (one per judge, e.g. one judge per group of
    annotators: the egalitarian min over groups of MaxMin-RLHF, Chakraborty et al. 2024), with a percentile
    interval of that minimum: ``{"name", "win_rate", "ci"}``.

    The prompts are resampled once for all judges (the draws of :func:`bootstrap_interval` with the same
    seed, so each judge's own interval comes from the same resamples), and each resample's minimum over the
    judges is taken: the interval accounts for the lowest judge changing from resample to resample, which
    the interval of the named judge alone would not. A judge with no pair in a resample (possible only
    when judges decided different pairs) is left out of that resample's minimum. ``ci`` is None without
    a bootstrap; on a tie the first judge given is named."""
    import numpy as np

    if not verdicts:
        raise PreftuneError("no judges to take the worst win rate of")
    rates = {name: win_rate(v) for name, v in verdicts.items()}
    worst = min(rates, key=rates.__getitem__)
    ci = None
    if n_bootstrap > 0:
        names = list(dict.fromkeys(c for name in verdicts for c in clusters[name]))
        column = {c: i for i, c in enumerate(names)}
        counts = cluster_weights(names, n_bootstrap=n_bootstrap, seed=seed)      # [n_bootstrap, clusters]
        per_judge = []
        for name, v in verdicts.items():
            w = counts[:, [column[c] for c in clusters[name]]]
            total = w.sum(axis=1)
            scores = w @ np.array([SCORE[x] for x in v])
            per_judge.append(np.where(total > 0, scores / np.where(total > 0, total, 1.0), np.nan))
        lows = np.nanmin(np.stack(per_judge), axis=0)
        tail = (1.0 - level) / 2 * 100
        ci = (float(np.percentile(lows, tail)), float(np.percentile(lows, 100 - tail)))
    return {"name": worst, "win_rate": rates[worst], "ci": ci}


def count(n: float, word: str, plural: str | None = None) -> str:
    """"1 pair", "2 pairs", "2.5 ties": a number with its noun in the right number."""
    return f"{n:g} {word if n == 1 else plural or word + 's'}"
