"""A mixture of reward models fitted by hard EM over annotators: the pure math.

MaxMin-RLHF (Chakraborty et al. 2024, "MaxMin-RLHF: Alignment with Diverse Human Preferences", ICML),
Algorithm 2. Annotator ``a`` gave labels ``(x_n, y_w, y_l)``, n in N(a); component ``k`` is a
Bradley-Terry reward model ``r_k``. Under component k a label has the log-likelihood
``log sigma(r_k(x, y_w) - r_k(x, y_l))`` (logsigmoid: stable for any margin, never the log of a ratio),
and an annotator the sum over its labels::

    L[a, k] = sum_{n in N(a)} log sigma(r_k(x_n, y_w) - r_k(x_n, y_l))          (E-step's table)
    z(a)    = argmax_k L[a, k]                                                   (hard assignment)
    log-likelihood of the assignment = sum_a L[a, z(a)]

The M-step (in ``preftune.train.reward_mixture``) trains each r_k on the labels of the annotators with
z(a) = k. ``purity`` and ``adjusted_rand_index`` compare an assignment with known groups (reporting only).
torch is imported inside the functions that need it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from math import comb
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def annotator_log_likelihoods(margins: torch.Tensor, annotator_index: torch.Tensor,
                              n_annotators: int) -> torch.Tensor:
    """[A, K] table L[a, k] = sum over annotator a's labels of log sigma(margin under component k).

    ``margins`` [N, K]: r_k(x, y_w) - r_k(x, y_l) of each label under each component (minus the pair's
    margin m when training with ``margin: true``); ``annotator_index`` [N]: the labeller of each row,
    in 0..n_annotators-1. Computed in float64 (sums over many labels).
    """
    import torch
    import torch.nn.functional as F

    log_lik = F.logsigmoid(margins.double())  # Chakraborty et al. 2024, Alg. 2: log sigma(r_k(y_w) - r_k(y_l))
    table = torch.zeros(n_annotators, margins.shape[1], dtype=torch.float64, device=margins.device)
    return table.index_add_(0, annotator_index.to(margins.device).long(), log_lik)


def e_step(log_likelihoods: torch.Tensor) -> torch.Tensor:
    """[A] assignment: each annotator to the component with the highest log-likelihood (ties: the lower index)."""
    return log_likelihoods.argmax(dim=1)  # torch.argmax returns the first maximal index


def assignment_log_likelihood(log_likelihoods: torch.Tensor, assignment: torch.Tensor) -> float:
    """sum_a L[a, z(a)]: the log-likelihood of all labels under the assignment."""
    return float(log_likelihoods.gather(1, assignment.long()[:, None]).sum())


def reseed_empty(assignment: list[int], fit: Sequence[float], k: int) -> list[tuple[int, int]]:
    """Give every empty component one annotator, in place; return the moves as (annotator, component).

    An empty component would never be trained again. It takes the annotator whose labels its own component
    explains worst (lowest ``fit[a]`` = L[a, z(a)]) among the components that keep at least one other
    annotator (as k-means re-seeds an empty cluster with the farthest point). Needs len(assignment) >= k.
    """
    if len(assignment) < k:
        raise ValueError(f"{len(assignment)} annotators cannot fill {k} components")
    moves = []
    for empty in range(k):
        sizes = Counter(assignment)
        if sizes[empty]:
            continue
        donors = [a for a in range(len(assignment)) if sizes[assignment[a]] > 1]
        worst = min(donors, key=lambda a: (fit[a], a))
        assignment[worst] = empty
        moves.append((worst, empty))
    return moves


def random_assignment(n_annotators: int, k: int, *, seed: int) -> list[int]:
    """A seeded random assignment with every component non-empty (needs n_annotators >= k): a random
    permutation of the annotators dealt to the components in turn."""
    import torch

    order = torch.randperm(n_annotators, generator=torch.Generator().manual_seed(seed)).tolist()
    assignment = [0] * n_annotators
    for position, annotator in enumerate(order):
        assignment[annotator] = position % k
    return assignment


def group_assignment(groups: Sequence[Hashable], k: int) -> list[int]:
    """The assignment that follows known groups: groups by size (largest first, then by name) take
    components 0, 1, ...; with more groups than components, group i goes to component i mod k."""
    sizes = Counter(groups)
    order = sorted(sizes, key=lambda g: (-sizes[g], str(g)))
    component = {g: i % k for i, g in enumerate(order)}
    return [component[g] for g in groups]


def purity(assignment: Sequence[Hashable], truth: Sequence[Hashable]) -> float:
    """Share of annotators whose component's most common true group is their own:
    (1/n) sum_k max_g |{a : z(a) = k, g(a) = g}|. 1 = every component holds one group (it does not
    penalise splitting a group over several components; the adjusted Rand index does)."""
    _check_lengths(assignment, truth)
    if not assignment:
        return float("nan")
    table = Counter(zip(assignment, truth, strict=True))
    best: dict[Hashable, int] = {}
    for (component, _), count in table.items():
        best[component] = max(best.get(component, 0), count)
    return sum(best.values()) / len(assignment)


def adjusted_rand_index(assignment: Sequence[Hashable], truth: Sequence[Hashable]) -> float:
    """The adjusted Rand index (Hubert & Arabie 1985): the Rand index corrected for chance, 1 for the same
    partition (whatever the labels), about 0 for an unrelated one, negative below chance.

    With n_ij the contingency table, a_i its row sums, b_j its column sums and C(m) = m(m-1)/2::

        ARI = (sum_ij C(n_ij) - E) / ((sum_i C(a_i) + sum_j C(b_j)) / 2 - E),
        E   = sum_i C(a_i) * sum_j C(b_j) / C(n)

    When the denominator is 0 (both partitions put everyone together, or everyone apart) they are the
    same partition: 1.0.
    """
    _check_lengths(assignment, truth)
    n = len(assignment)
    index = sum(comb(c, 2) for c in Counter(zip(assignment, truth, strict=True)).values())
    rows = sum(comb(c, 2) for c in Counter(assignment).values())
    cols = sum(comb(c, 2) for c in Counter(truth).values())
    expected = rows * cols / comb(n, 2) if n > 1 else 0.0
    best = (rows + cols) / 2
    if best == expected:
        return 1.0
    return (index - expected) / (best - expected)


def agreement(assignment: Sequence[int], groups: Sequence[Hashable | None]) -> dict[str, float]:
    """``purity`` and ``ari`` of the assignment against the known groups (annotators without one left
    out); empty when no annotator has a group."""
    known = [(z, g) for z, g in zip(assignment, groups, strict=True) if g is not None]
    if not known:
        return {}
    mixtures, truth = [z for z, _ in known], [g for _, g in known]
    return {"purity": purity(mixtures, truth), "ari": adjusted_rand_index(mixtures, truth)}


@dataclass
class Annotators:
    """The annotators of N labels: ``names`` sorted, ``index[n]`` the position of label n's annotator,
    ``groups[a]`` annotator a's group (the most common among its labels; None without one),
    ``labels[a]`` its number of labels, ``mixed`` how many annotators have labels in several groups."""

    names: list[str]
    index: list[int]
    groups: list[str | None]
    labels: list[int]
    mixed: int


def index_annotators(annotators: Sequence[Hashable], groups: Sequence[Hashable | None]) -> Annotators:
    """``Annotators`` of labels given by ``annotators[n]`` (compared as strings) with ``groups[n]``."""
    who = [str(a) for a in annotators]
    names = sorted(set(who))
    position = {name: i for i, name in enumerate(names)}
    seen: list[Counter[str]] = [Counter() for _ in names]
    for name, group in zip(who, groups, strict=True):
        if group is not None:
            seen[position[name]][str(group)] += 1
    counts = Counter(who)
    return Annotators(names, [position[name] for name in who], [c.most_common(1)[0][0] if c else None for c in seen],
                      [counts[name] for name in names], sum(1 for c in seen if len(c) > 1))


@dataclass
class EStep:
    """What one E-step did to one restart."""

    changed: int                      # annotators whose component changed
    log_likelihood: float             # sum_a L[a, z(a)] under the E-step's assignment
    stop: str | None                  # "converged" (nothing changed), "at em_iterations", or None: EM goes on
    moves: list[tuple[int, int]] = field(default_factory=list)  # re-seeded (annotator, empty component)
    empty: list[int] = field(default_factory=list)              # components left empty by a stopping restart


class EMState:
    """The state of R restarts of hard EM over A annotators and K components, as tensors (a checkpoint's
    ``state_dict``): ``assignment`` [R, A], ``running`` [R], ``iterations`` [R] (E-steps done),
    ``changed`` [R] (at the last E-step; -1 before the first), ``log_likelihood`` [R], ``tables`` [R, A, K]
    (the last E-step's L)."""

    NAMES = ("assignment", "running", "iterations", "changed", "log_likelihood", "tables")

    def __init__(self, starts: list[list[int]], k: int) -> None:
        import torch

        r, a = len(starts), len(starts[0])
        self.k = k
        self.assignment = torch.tensor(starts, dtype=torch.long)
        self.running = torch.ones(r, dtype=torch.bool)
        self.iterations = torch.zeros(r, dtype=torch.long)
        self.changed = torch.full((r,), -1, dtype=torch.long)
        self.log_likelihood = torch.full((r,), float("nan"), dtype=torch.float64)
        self.tables = torch.full((r, a, k), float("nan"), dtype=torch.float64)

    def update(self, restart: int, table: torch.Tensor, *, max_iterations: int) -> EStep:
        """The E-step of ``restart`` given its table L [A, K]: the new assignment (an emptied component
        re-seeded with ``reseed_empty`` unless EM stops here), its log-likelihood, whether it stops."""
        import torch

        new = e_step(table)
        changed = int((new != self.assignment[restart]).sum())
        self.iterations[restart] += 1
        stop = ("converged" if changed == 0 else
                "at em_iterations" if int(self.iterations[restart]) >= max_iterations else None)
        assignment = new.tolist()
        moves = [] if stop else reseed_empty(assignment, table[range(len(assignment)), new].tolist(), self.k)
        self.assignment[restart] = torch.tensor(assignment, dtype=torch.long)
        self.changed[restart], self.running[restart] = changed, stop is None
        self.log_likelihood[restart] = assignment_log_likelihood(table, new)
        self.tables[restart] = table
        return EStep(changed, float(self.log_likelihood[restart]), stop, moves,
                     sorted(set(range(self.k)) - set(assignment)))

    def best(self) -> int:
        """The restart with the highest log-likelihood (ties and NaN: the first)."""
        values = [v if v == v else float("-inf") for v in self.log_likelihood.tolist()]
        return max(range(len(values)), key=lambda r: (values[r], -r))

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).clone() for name in self.NAMES}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state; shapes must match this run's (same restarts, annotators, components)."""
        for name in self.NAMES:
            mine = getattr(self, name)
            if tuple(state[name].shape) != tuple(mine.shape):
                raise ValueError(f"{name} has shape {tuple(state[name].shape)}, this run's {tuple(mine.shape)}")
            setattr(self, name, state[name].to(mine.dtype).clone())


def _check_lengths(assignment: Sequence[Hashable], truth: Sequence[Hashable]) -> None:
    if len(assignment) != len(truth):
        raise ValueError(f"{len(assignment)} assignments but {len(truth)} true groups")
