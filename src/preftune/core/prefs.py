"""Preference models you can compute by hand: Bradley-Terry, Plackett-Luce, MaxMin choice.

* Bradley-Terry (Bradley & Terry 1952): P(y_i > y_j) = sigmoid(r_i - r_j) for ratings on a logit
  scale (the form used for reward models, Ouyang et al. 2022 eq. 1), or r_i / (r_i + r_j) for
  positive strengths on a ratio scale (the 1952 form).
* MaxMin / egalitarian choice (Chakraborty et al. 2024, MaxMin-RLHF): the response whose worst
  rating over the groups is highest, next to the utilitarian choice (highest mean rating).
* Plackett-Luce (Plackett 1975, Luce 1959): the probability of a ranking is a product of softmaxes.
* Fitting Bradley-Terry strengths to pairwise comparisons is ``preftune.core.bt_fit``.

Only the standard library and numpy are imported, so this module loads fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from preftune.errors import PreftuneError

SCALES = ("logit", "ratio")
TIE = "tie"


# ----------------------------------------------------------------------------- ratings tables


@dataclass(frozen=True)
class Ratings:
    """Ratings of the same responses by several groups: ``values[group][response]``.

    ``path``, ``lines`` (group -> line of the file) and ``cell_lines`` ((group, response) -> line, where
    it differs) only serve error messages.
    """

    responses: tuple[str, ...]
    values: dict[str, dict[str, float]]
    path: str | None = None
    lines: dict[str, int] = field(default_factory=dict)
    cell_lines: dict[tuple[str, str], int] = field(default_factory=dict)

    def line_of(self, group: str, response: str) -> int | None:
        return self.cell_lines.get((group, response), self.lines.get(group))

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.values)


def as_ratings(ratings: Ratings | Mapping[str, Mapping[str, float]]) -> Ratings:
    """Accept a ``Ratings`` or a plain ``{group: {response: rating}}`` mapping (checked)."""
    if isinstance(ratings, Ratings):
        return ratings
    return ratings_from_mapping(ratings)


def ratings_from_mapping(obj: Mapping[str, Any], *, path: str | None = None,
                         line_of: Callable[..., int | None] | None = None) -> Ratings:
    """A checked ``Ratings`` from ``{group: {response: rating}}``: every group rates the same responses
    (at least two), every rating is a finite number. ``path`` and ``line_of(key, after=None)`` (the line
    of a key in the file the mapping came from) only serve error messages."""
    line_of = line_of or (lambda key, after=None: None)
    responses: tuple[str, ...] | None = None
    values: dict[str, dict[str, float]] = {}
    lines: dict[str, int] = {}
    cell_lines: dict[tuple[str, str], int] = {}
    for group, row in obj.items():
        group = str(group)
        line = line_of(group)
        if not isinstance(row, Mapping) or not row:
            raise PreftuneError("expected an object {response: rating}", path=path, line=line, field=group)
        row = {str(k): v for k, v in row.items()}
        if responses is None:
            responses = tuple(str(r) for r in row)
            if len(responses) < 2:
                raise PreftuneError("at least two responses are needed", path=path, line=line, field=group)
        if set(row) != set(responses):
            raise PreftuneError(f"group '{group}' rates {sorted(row)} but the first group rates "
                                f"{sorted(responses)}", path=path, line=line, field=group,
                                hint="every group must rate the same responses")
        values[group] = {}
        for r in responses:
            cell = line_of(r, after=group)
            values[group][r] = rating_value(row[r], path=path, line=cell or line, field=r, group=group)
            if cell is not None:
                cell_lines[group, r] = cell
        if line is not None:
            lines[group] = line
    if responses is None:
        raise PreftuneError("no groups", path=path, line=1)
    return Ratings(responses, values, path, lines, cell_lines)


def rating_value(value: Any, *, path: str | None, line: int | None, field: str, group: str | None = None) -> float:
    where = f" for group '{group}'" if group else ""
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError(value)
        number = float(value)
    except (TypeError, ValueError):
        raise PreftuneError(f"rating {value!r}{where} is not a number", path=path, line=line, field=field,
                            hint="ratings are numbers such as 1, 0.5 or -2") from None
    if not math.isfinite(number):
        raise PreftuneError(f"rating {value!r}{where} is not finite", path=path, line=line, field=field)
    return number


# ----------------------------------------------------------------------------- Bradley-Terry table


def sigmoid(x: float) -> float:
    """sigma(x) = 1 / (1 + e^-x), computed without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def pairwise_probability(r_i: float, r_j: float, *, scale: str = "logit") -> float:
    """Bradley-Terry P(y_i > y_j): sigmoid(r_i - r_j) (logit scale) or r_i / (r_i + r_j) (ratio scale)."""
    if scale == "logit":
        return sigmoid(r_i - r_j)
    if scale == "ratio":
        return r_i / (r_i + r_j)
    raise PreftuneError(f"unknown scale '{scale}'", field="scale", hint=f"use one of {', '.join(SCALES)}")


def argmax_all(scores: Mapping[str, float]) -> list[str]:
    """Every key whose score equals the maximum (exact equality), in the mapping's order."""
    best = max(scores.values())
    return [k for k, v in scores.items() if v == best]


def bradley_terry_table(ratings: Ratings | Mapping[str, Mapping[str, float]], *,
                        scale: str = "logit") -> dict[str, Any]:
    """P(y_i > y_j) for every pair of responses in every group, and each group's favourite(s).

    Returns ``{"scale", "responses", "groups": {group: {"pairwise": {"P(y1>y2)": p, ...} (i before j
    in file order), "matrix": {y_i: {y_j: P(y_i > y_j)}} (every ordered pair), "most_preferred":
    [responses with the highest rating, ties together]}}}``. The ratio scale needs ratings > 0.
    """
    ratings = as_ratings(ratings)
    if scale not in SCALES:
        raise PreftuneError(f"unknown scale '{scale}'", field="scale", hint=f"use one of {', '.join(SCALES)}")
    groups: dict[str, Any] = {}
    for group, row in ratings.values.items():
        if scale == "ratio":
            for resp, r in row.items():
                if r <= 0:
                    raise PreftuneError(f"rating {r:g} of group '{group}' must be > 0 on the ratio scale",
                                        path=ratings.path, line=ratings.line_of(group, resp), field=resp,
                                        hint="use --scale logit for ratings that can be 0 or negative")
        matrix = {a: {b: pairwise_probability(row[a], row[b], scale=scale)
                      for b in ratings.responses if b != a} for a in ratings.responses}
        pairwise = {f"P({a}>{b})": matrix[a][b] for a, b in combinations(ratings.responses, 2)}
        groups[group] = {"pairwise": pairwise, "matrix": matrix, "most_preferred": argmax_all(row)}
    return {"scale": scale, "responses": list(ratings.responses), "groups": groups}


# ----------------------------------------------------------------------------- MaxMin aggregation


def aggregate(ratings: Ratings | Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """MaxMin (egalitarian) choice argmax_y min_g r_g(y), utilitarian choice argmax_y mean_g r_g(y),
    and each group's favourite argmax_y r_g(y) (Chakraborty et al. 2024, MaxMin-RLHF, sec. 4).

    Ties are listed together. ``summary`` is one sentence contrasting MaxMin with the utilitarian
    choice and naming the groups whose favourite the MaxMin choice is not.
    """
    ratings = as_ratings(ratings)
    rows = ratings.values.values()
    min_rating = {y: min(row[y] for row in rows) for y in ratings.responses}
    mean_rating = {y: sum(row[y] for row in rows) / len(rows) for y in ratings.responses}
    maxmin, utilitarian = argmax_all(min_rating), argmax_all(mean_rating)
    favourites = {g: argmax_all(row) for g, row in ratings.values.items()}
    result = {"responses": list(ratings.responses), "min_rating": min_rating, "mean_rating": mean_rating,
              "maxmin": maxmin, "utilitarian": utilitarian, "favourites": favourites}
    result["summary"] = _aggregate_sentence(result)
    return result


def _names(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _aggregate_sentence(res: dict[str, Any]) -> str:
    maxmin, util = res["maxmin"], res["utilitarian"]
    worst, mean = res["min_rating"][maxmin[0]], res["mean_rating"][util[0]]
    if set(maxmin) == set(util):
        head = (f"MaxMin and the utilitarian rule agree on {_names(maxmin)} "
                f"(worst rating {worst:g}, mean rating {mean:g})")
    else:
        head = (f"MaxMin picks {_names(maxmin)}, whose worst rating over the groups is {worst:g}, "
                f"while the utilitarian choice is {_names(util)} with the highest mean rating {mean:g}")
    not_fav = [g for g, fav in res["favourites"].items() if not set(maxmin) & set(fav)]
    if not not_fav:
        tail = "and the MaxMin choice is a favourite of every group"
    elif len(not_fav) == len(res["favourites"]):
        tail = "although no group ranks the MaxMin choice first"
    else:
        tail = f"and the MaxMin choice is not the favourite of {_names(not_fav)}"
    return f"{head}, {tail}."


# ----------------------------------------------------------------------------- Plackett-Luce


def _logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def plackett_luce(rewards: Mapping[str, float], ranking: Sequence[str] | None = None, *,
                  top_k: int | None = None) -> dict[str, Any]:
    """Plackett-Luce probabilities for rewards ``{response: r}`` (Plackett 1975, eq. 1).

    P(ranking s_1 > ... > s_m) = prod_{k=1..m} exp(r_{s_k}) / sum_{j>=k} exp(r_{s_j}), where the
    sums run over every response not yet placed; a ranking of m < n responses is the probability that
    they take the first m places in that order. ``first_place`` is softmax(r). ``top_k`` adds, for
    each response, the marginal probability of being among the first k (exact, summing over the
    ways to fill the first k places; at most 16 responses).
    """
    if len(rewards) < 2:
        raise PreftuneError("Plackett-Luce needs at least two responses", field="rewards")
    rewards = {str(k): float(v) for k, v in rewards.items()}
    if ranking is None:
        ranking = sorted(rewards, key=lambda y: -rewards[y])
    ranking = list(ranking)
    for y in ranking:
        if y not in rewards:
            raise PreftuneError(f"'{y}' in the ranking has no reward", field="ranking",
                                hint=f"rank only {', '.join(rewards)}")
    if len(set(ranking)) != len(ranking):
        raise PreftuneError("a response appears twice in the ranking", field="ranking")
    remaining = list(rewards)
    log_p = 0.0
    for y in ranking:
        log_p += rewards[y] - _logsumexp([rewards[z] for z in remaining])
        remaining.remove(y)
    norm = _logsumexp(list(rewards.values()))
    result: dict[str, Any] = {"rewards": rewards, "ranking": ranking, "probability": math.exp(log_p),
                              "log_probability": log_p,
                              "first_place": {y: math.exp(r - norm) for y, r in rewards.items()}}
    if top_k is not None:
        result["top_k"] = top_k
        result["top_k_probability"] = plackett_luce_top_k(rewards, top_k)
    return result


def plackett_luce_top_k(rewards: Mapping[str, float], k: int) -> dict[str, float]:
    """P(y is among the first k places) under Plackett-Luce, by dynamic programming over the set S of
    responses already placed: P(S + {y}) += P(S) * w_y / (W - w(S)), with w = exp(r - max r)."""
    names = list(rewards)
    n = len(names)
    if not 1 <= k <= n:
        raise PreftuneError(f"top-k must be between 1 and {n}, got {k}", field="top_k")
    if n > 16:
        raise PreftuneError(f"top-k marginals are computed exactly for at most 16 responses, got {n}",
                            field="top_k")
    top = max(rewards.values())
    w = [math.exp(rewards[y] - top) for y in names]
    total = sum(w)
    layer = {0: 1.0}  # bitmask of placed responses -> probability they fill the first |S| places
    for _ in range(k):
        nxt: dict[int, float] = {}
        for mask, p in layer.items():
            left = total - sum(w[i] for i in range(n) if mask >> i & 1)
            for i in range(n):
                if not mask >> i & 1:
                    nxt[mask | 1 << i] = nxt.get(mask | 1 << i, 0.0) + p * w[i] / left
        layer = nxt
    return {y: sum(p for mask, p in layer.items() if mask >> i & 1) for i, y in enumerate(names)}
