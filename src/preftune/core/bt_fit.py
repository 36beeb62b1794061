"""Bradley-Terry strengths fitted to pairwise comparisons (``a, b, winner``; a tie counts half).

Maximum likelihood with a small Gaussian prior on the log-strengths (Hunter 2004; Newton's method),
bootstrap 95% intervals, and the reader of comparison files. ``preftune prefs fit`` and the model ranking
of ``preftune compare`` use it. Only the standard library and numpy are imported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from preftune.core.prefs import TIE, sigmoid
from preftune.errors import PreftuneError

ELO_PER_NAT = 400.0 / math.log(10.0)  # Elo points per unit of log-strength: 10^(d/400) = e^theta


@dataclass
class BTFit:
    """Bradley-Terry log-strengths (mean 0), ordered from strongest to weakest.

    P(a beats b) = sigmoid(strength_a - strength_b). ``ci_low``/``ci_high`` are bootstrap 95%
    percentile intervals (None when ``n_bootstrap`` was 0).
    """

    names: list[str]
    strengths: list[float]
    ci_low: list[float] | None
    ci_high: list[float] | None
    n_comparisons: int
    wins: list[int]
    ties: list[int]
    losses: list[int]
    n_bootstrap: int = 0
    prior: float = 0.0

    def strength(self, name: str) -> float:
        return self.strengths[self.names.index(name)]

    def probability(self, a: str, b: str) -> float:
        """P(a beats b) = sigmoid(theta_a - theta_b)."""
        return sigmoid(self.strength(a) - self.strength(b))

    def elo(self, *, base: float = 1000.0) -> list[float]:
        """Strengths on an Elo-like scale: base + 400 / ln(10) * theta."""
        return [base + ELO_PER_NAT * s for s in self.strengths]

    def to_dict(self) -> dict[str, Any]:
        elo = self.elo()
        players = [{"rank": i + 1, "name": n, "strength": self.strengths[i], "elo": elo[i],
                    "ci_low": self.ci_low[i] if self.ci_low else None,
                    "ci_high": self.ci_high[i] if self.ci_high else None,
                    "wins": self.wins[i], "ties": self.ties[i], "losses": self.losses[i]}
                   for i, n in enumerate(self.names)]
        return {"players": players, "n_comparisons": self.n_comparisons, "n_bootstrap": self.n_bootstrap,
                "prior": self.prior}


def fit_bradley_terry(comparisons: Iterable[tuple[str, str, str]], *, n_bootstrap: int = 1000,
                      seed: int = 0, prior: float = 0.01) -> BTFit:
    """Maximum-likelihood Bradley-Terry fit of ``(a, b, winner)`` comparisons; winner is a, b or "tie".

    Maximises sum_c [s_c log sigmoid(t_a - t_b) + (1 - s_c) log sigmoid(t_b - t_a)] - prior/2 * |t|^2
    over log-strengths t, with s_c = 1 if a won, 0 if b won, 1/2 for a tie (a tie counts half a win to
    each; Hunter 2004 sec. 2 for the likelihood). The tiny Gaussian penalty ``prior`` keeps a player
    who never loses finite and fixes the mean at 0 (at the optimum prior * sum t = sum of the
    likelihood's gradient = 0). Solved by Newton's method with step halving. Intervals: refit on
    ``n_bootstrap`` resamples of the comparisons (with replacement), 2.5 and 97.5 percentiles.
    """
    import numpy as np

    comparisons = list(comparisons)
    if not comparisons:
        raise PreftuneError("no comparisons to fit", hint="give (a, b, winner) triples")
    if prior <= 0:
        raise PreftuneError(f"prior must be > 0, got {prior}", field="prior")
    index: dict[str, int] = {}
    ai, bi, score = [], [], []
    for k, (a, b, winner) in enumerate(comparisons):
        check_comparison(a, b, winner, where=f"comparison {k}")
        ai.append(index.setdefault(a, len(index)))
        bi.append(index.setdefault(b, len(index)))
        score.append(1.0 if winner == a else 0.0 if winner == b else 0.5)
    a_idx, b_idx, s = np.array(ai), np.array(bi), np.array(score)
    n_players = len(index)

    def win_matrix(weights: np.ndarray) -> np.ndarray:
        wins = np.zeros((n_players, n_players))
        np.add.at(wins, (a_idx, b_idx), weights * s)
        np.add.at(wins, (b_idx, a_idx), weights * (1.0 - s))
        return wins

    theta = _newton_bt(win_matrix(np.ones(len(s))), prior=prior)
    ci_low = ci_high = None
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = np.empty((n_bootstrap, n_players))
        for r in range(n_bootstrap):
            counts = rng.multinomial(len(s), np.full(len(s), 1.0 / len(s)))
            draws[r] = _newton_bt(win_matrix(counts.astype(float)), prior=prior, start=theta)
        ci_low, ci_high = np.percentile(draws, 2.5, axis=0), np.percentile(draws, 97.5, axis=0)
    names = list(index)
    tally = {n: [0, 0, 0] for n in names}  # wins, ties, losses
    for (a, b, _), sc in zip(comparisons, score, strict=True):
        if sc == 0.5:
            tally[a][1] += 1
            tally[b][1] += 1
        else:
            tally[a if sc == 1.0 else b][0] += 1
            tally[b if sc == 1.0 else a][2] += 1
    order = sorted(range(n_players), key=lambda i: -theta[i])

    def pick(arr: Any) -> list[float]:
        return [float(arr[i]) for i in order]

    return BTFit(names=[names[i] for i in order], strengths=pick(theta),
                 ci_low=pick(ci_low) if ci_low is not None else None,
                 ci_high=pick(ci_high) if ci_high is not None else None, n_comparisons=len(s),
                 wins=[tally[names[i]][0] for i in order], ties=[tally[names[i]][1] for i in order],
                 losses=[tally[names[i]][2] for i in order], n_bootstrap=n_bootstrap, prior=prior)


def _newton_bt(wins: Any, *, prior: float, start: Any = None, tol: float = 1e-10, max_iter: int = 100) -> Any:
    """Maximise the penalised BT log-likelihood for a win matrix wins[i, j] (i over j, ties as 1/2)."""
    import numpy as np

    games = wins + wins.T
    theta = np.zeros(len(wins)) if start is None else np.array(start, dtype=float)

    def objective(t: np.ndarray) -> float:
        diff = t[:, None] - t[None, :]
        return float(-(wins * np.logaddexp(0.0, -diff)).sum() - 0.5 * prior * t @ t)

    value = objective(theta)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # P(i beats j)
        grad = (wins - games * p).sum(axis=1) - prior * theta
        curv = games * p * (1.0 - p)
        hess = curv - np.diag(curv.sum(axis=1) + prior)  # negative definite
        step = -np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8:
            new_theta = theta + t * step
            new_value = objective(new_theta)
            if new_value >= value - 1e-12:
                break
            t *= 0.5
        theta, value = new_theta, new_value
        if np.max(np.abs(t * step)) < tol:
            break
    return theta


def check_comparison(a: Any, b: Any, winner: Any, *, where: str, path: str | None = None,
                     line: int | None = None) -> None:
    """Names of two different players and a winner that is one of them or ``tie``; errors say where."""
    loc = {"path": path, "line": line}
    for name, value in (("a", a), ("b", b), ("winner", winner)):
        if not isinstance(value, str) or not value.strip():
            raise PreftuneError(f"{where}: '{name}' must be a non-empty name, got {value!r}", field=name, **loc)
    if a == b:
        raise PreftuneError(f"{where}: a player cannot be compared with itself ('{a}')", field="b", **loc)
    if TIE in (a, b):
        raise PreftuneError(f"{where}: '{TIE}' is reserved for ties and cannot name a player", field="a", **loc)
    if winner not in (a, b, TIE):
        raise PreftuneError(f"{where}: winner '{winner}' is neither a ('{a}'), b ('{b}') nor '{TIE}'",
                            field="winner", hint="write the winner's name, or 'tie'", **loc)
