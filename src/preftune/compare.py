"""Compare the completions of two or more models with a judge: win / tie / loss, win rates with
clustered bootstrap intervals, a length-controlled win rate, and a Bradley-Terry ranking.

Conventions (stated once, used everywhere): the FIRST file is the baseline (e.g. the SFT model) and
every verdict is for the candidate (the second file) against it: W = the candidate won, L = the
baseline won, T = a tie. Completions are paired by (prompt_id, completion_id): 1-A with 1-A, ...

Statistics:

* win rate = (W + T / 2) / (W + T + L): a tie counts half a win.
* 95% interval: percentile bootstrap that resamples PROMPTS with replacement (all completions of a
  drawn prompt come along), because completions of one prompt are not independent; a cluster
  bootstrap (Field & Welsh 2007), which gives wider, honest intervals when prompts differ in difficulty.
* length-controlled win rate (the idea of AlpacaEval 2.0, Dubois et al. 2024): fit the logistic model
  P(candidate wins) = sigmoid(b0 + b1 * d / s), where d = len(candidate) - len(baseline) in characters
  and s = the standard deviation of d (scaled, not centred), to the verdicts (win = 1, loss = 0, a tie
  counts as half a win and half a loss); report sigmoid(b0), the predicted win rate when both
  completions have the same length. AlpacaEval uses tanh(d / s) and more covariates; the idea is the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.jsonl import read_jsonl
from preftune.data.prompts import prompt_text
from preftune.errors import PreftuneError
from preftune.report import Doc

VERDICT = {1: "W", 0: "L", None: "T"}  # judge choice (pairs are (baseline, candidate)) -> verdict letter
SCORE = {"W": 1.0, "T": 0.5, "L": 0.0}
RIDGE = 1e-3  # keeps the logistic fit finite when one model wins every comparison


# ----------------------------------------------------------------------------- statistics


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
    Newton's method: gradient X^T w (y - p) - ridge b, Hessian -X^T diag(w p (1 - p)) X - ridge I."""
    import numpy as np

    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    w = np.ones_like(xs) if weights is None else np.asarray(weights, dtype=float)
    design = np.stack([np.ones_like(xs), xs], axis=1)
    beta = np.zeros(2)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(design @ beta)))
        grad = design.T @ (w * (ys - p)) - ridge * beta
        hess = design.T @ (design * (w * p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if np.max(np.abs(step)) < tol:
            break
    return float(beta[0]), float(beta[1])


def length_controlled_win_rate(verdicts: Sequence[str], length_diffs: Sequence[float], *,
                               weights: Sequence[float] | None = None, scale: float | None = None) -> dict[str, float]:
    """sigmoid(b0) of the logistic fit of the verdicts on d / s (see the module docstring).

    Returns ``{"win_rate", "intercept", "slope", "scale"}``; ``slope`` is per standard deviation of the
    length difference. When all length differences are equal (s = 0) only the intercept is fitted.
    """
    import numpy as np

    d = np.asarray(length_diffs, dtype=float)
    s = float(np.std(d)) if scale is None else scale
    x = d / s if s > 0 else np.zeros_like(d)
    b0, b1 = fit_logistic(x, [SCORE[v] for v in verdicts], weights=weights)
    return {"win_rate": 1.0 / (1.0 + math.exp(-b0)), "intercept": b0, "slope": b1 if s > 0 else 0.0, "scale": s}


# ----------------------------------------------------------------------------- reading generations


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``preftune generate`` JSONL file, checking each record's fields (errors name file and line)."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    seen: dict[tuple[int, str], int] = {}
    for lineno, rec in read_jsonl(path, missing_hint="give a JSONL file written by preftune generate"):
        for key, kind in (("prompt_id", int), ("completion_id", str), ("completion", str), ("prompt", (str, list))):
            if key not in rec:
                raise PreftuneError("missing field", path=str(path), line=lineno, field=key,
                                    hint="records need prompt_id, prompt, completion_id and completion")
            if not isinstance(rec[key], kind) or isinstance(rec[key], bool):
                raise PreftuneError(f"wrong type {type(rec[key]).__name__}", path=str(path), line=lineno, field=key)
        key = (rec["prompt_id"], rec["completion_id"])
        if key in seen:
            raise PreftuneError(f"completion {key[0]}-{key[1]} appears twice (first on line {seen[key]})",
                                path=str(path), line=lineno, field="completion_id")
        seen[key] = lineno
        records.append(rec)
    if not records:
        raise PreftuneError("no completions in the file", path=str(path))
    return records


def _load(source: str | Path | Sequence[dict[str, Any]], name: str | None) -> tuple[str, list[dict[str, Any]]]:
    if isinstance(source, (str, Path)):
        return name or Path(source).stem, read_generations(source)
    records = list(source)
    if not records:
        raise PreftuneError("no completions given")
    return name or str(records[0].get("model", "model")), records


# ----------------------------------------------------------------------------- one pairwise comparison


@dataclass
class ComparisonResult:
    """Candidate vs baseline under one judge; verdicts are for the candidate (W = candidate won)."""

    baseline: str
    candidate: str
    judge: str
    rows: list[dict[str, Any]]             # prompt_id, prompt, completion_id, verdict, both completions, details
    missing: list[dict[str, Any]]          # pairs the judge could not decide (e.g. no human label)
    unmatched: dict[str, list[str]]        # only_in_baseline, only_in_candidate, prompt_mismatch ("1-A", ...)
    wins: int
    ties: int
    losses: int
    win_rate: float
    win_rate_ci: tuple[float, float] | None
    length_controlled: dict[str, Any]
    n_bootstrap: int
    seed: int
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def per_prompt(self) -> list[dict[str, Any]]:
        """Per prompt: its verdicts by completion id and its W / T / L counts."""
        out: dict[int, dict[str, Any]] = {}
        for r in self.rows:
            p = out.setdefault(r["prompt_id"], {"prompt_id": r["prompt_id"], "prompt": r["prompt"],
                                                "verdicts": {}, "wins": 0, "ties": 0, "losses": 0})
            p["verdicts"][r["completion_id"]] = r["verdict"]
            p[{"W": "wins", "T": "ties", "L": "losses"}[r["verdict"]]] += 1
        return [out[k] for k in sorted(out)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n"] = self.n
        d["per_prompt"] = self.per_prompt()
        d["verdict_meaning"] = f"W: {self.candidate} (candidate) won; L: {self.baseline} (baseline) won; T: tie"
        d["statistics"] = {"win_rate": "(W + T/2) / n",
                           "interval": "95% percentile bootstrap resampling prompts (clustered)",
                           "length_controlled": "sigmoid(b0) of logistic fit on length difference / its std"}
        return d


def compare_generations(baseline: str | Path | Sequence[dict[str, Any]],
                        candidate: str | Path | Sequence[dict[str, Any]], judge: Any, *, n_bootstrap: int = 1000,
                        seed: int = 0, baseline_name: str | None = None,
                        candidate_name: str | None = None) -> ComparisonResult:
    """Judge each candidate completion against the baseline completion with the same (prompt_id,
    completion_id); count W/T/L for the candidate, the win rate with a prompt-clustered bootstrap 95%
    interval and the length-controlled win rate. Inputs are JSONL paths or lists of records."""
    base_name, base = _load(baseline, baseline_name)
    cand_name, cand = _load(candidate, candidate_name)
    by_key = {(r["prompt_id"], r["completion_id"]): r for r in cand}
    base_keys = {(r["prompt_id"], r["completion_id"]) for r in base}
    pairs, unmatched = [], {"only_in_baseline": [], "only_in_candidate": [], "prompt_mismatch": []}
    for r in base:
        key = (r["prompt_id"], r["completion_id"])
        other = by_key.get(key)
        if other is None:
            unmatched["only_in_baseline"].append(f"{key[0]}-{key[1]}")
        elif prompt_text(other["prompt"]) != prompt_text(r["prompt"]):
            unmatched["prompt_mismatch"].append(f"{key[0]}-{key[1]}")
        else:
            pairs.append((r, other))
    unmatched["only_in_candidate"] = [f"{r['prompt_id']}-{r['completion_id']}" for r in cand
                                      if (r["prompt_id"], r["completion_id"]) not in base_keys]
    if not pairs:
        raise PreftuneError(f"no completion of {cand_name} matches one of {base_name} by prompt and completion id",
                            hint="compare files generated from the same prompts file")
    prompts = [prompt_text(b["prompt"]) for b, _ in pairs]
    result = judge.judge_pairs(prompts, [(b["completion"], c["completion"]) for b, c in pairs])
    missing_idx = set(result.missing)
    rows, missing = [], []
    for k, ((b, c), choice) in enumerate(zip(pairs, result.choices, strict=True)):
        row = {"prompt_id": b["prompt_id"], "prompt": prompts[k], "completion_id": b["completion_id"],
               "baseline": b["completion"], "candidate": c["completion"],
               "details": result.details[k] if result.details else {}}
        if k in missing_idx:
            missing.append(row)
        else:
            rows.append({**row, "verdict": VERDICT[choice]})
    if not rows:
        raise PreftuneError(f"the judge decided none of the {len(pairs)} pairs", hint="label the pairs first")
    return _summarise(base_name, cand_name, getattr(judge, "name", "judge"), rows, missing, unmatched,
                      n_bootstrap=n_bootstrap, seed=seed)


def _summarise(base_name: str, cand_name: str, judge_name: str, rows: list[dict[str, Any]],
               missing: list[dict[str, Any]], unmatched: dict[str, list[str]], *, n_bootstrap: int,
               seed: int) -> ComparisonResult:
    import numpy as np

    verdicts = [r["verdict"] for r in rows]
    clusters = [r["prompt_id"] for r in rows]
    diffs = [len(r["candidate"]) - len(r["baseline"]) for r in rows]
    ci = None
    lc = length_controlled_win_rate(verdicts, diffs)
    if n_bootstrap > 0:
        ci = bootstrap_interval([SCORE[v] for v in verdicts], clusters, n_bootstrap=n_bootstrap, seed=seed)
        w = cluster_weights(clusters, n_bootstrap=n_bootstrap, seed=seed)
        draws = [length_controlled_win_rate(verdicts, diffs, weights=wi, scale=lc["scale"])["win_rate"] for wi in w]
        lc["ci"] = (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)))
    lc["length_unit"] = "characters"
    lc["mean_length_baseline"] = float(np.mean([len(r["baseline"]) for r in rows]))
    lc["mean_length_candidate"] = float(np.mean([len(r["candidate"]) for r in rows]))
    notes = []
    if missing:
        notes.append(f"{len(missing)} pairs were not judged (no judgement available) and are left out of the counts")
    n_unmatched = sum(len(v) for v in unmatched.values())
    if n_unmatched:
        notes.append(f"{n_unmatched} completions could not be paired and are left out: "
                     + ", ".join(f"{k} {len(v)}" for k, v in unmatched.items() if v))
    if len(set(clusters)) < 2 and n_bootstrap > 0:
        notes.append("only one prompt: the clustered bootstrap interval is degenerate")
    return ComparisonResult(baseline=base_name, candidate=cand_name, judge=judge_name, rows=rows, missing=missing,
                            unmatched=unmatched, wins=verdicts.count("W"), ties=verdicts.count("T"),
                            losses=verdicts.count("L"), win_rate=win_rate(verdicts), win_rate_ci=ci,
                            length_controlled=lc, n_bootstrap=n_bootstrap, seed=seed, notes=notes)


# ----------------------------------------------------------------------------- several models


@dataclass
class MultiComparison:
    """Every pair of models judged (earlier file = baseline of the pair) and a Bradley-Terry ranking."""

    models: list[str]
    pairs: list[ComparisonResult]
    ranking: Any  # preftune.core.bt_fit.BTFit

    def to_dict(self) -> dict[str, Any]:
        return {"models": self.models, "pairs": [p.to_dict() for p in self.pairs], "ranking": self.ranking.to_dict()}


def compare_models(sources: Sequence[str | Path | Sequence[dict[str, Any]]], judge: Any, *, n_bootstrap: int = 1000,
                   seed: int = 0, names: Sequence[str] | None = None) -> MultiComparison:
    """Judge all pairs (i < j: model i is the baseline) and fit Bradley-Terry strengths with bootstrap
    intervals (``preftune.core.bt_fit.fit_bradley_terry``) to all judged comparisons, a tie counting half."""
    from preftune.core.bt_fit import fit_bradley_terry

    if len(sources) < 2:
        raise PreftuneError("compare needs at least two generation files")
    loaded = [_load(s, names[i] if names else None) for i, s in enumerate(sources)]
    unique = _unique_names([n for n, _ in loaded])
    pairs = [compare_generations(loaded[i][1], loaded[j][1], judge, n_bootstrap=n_bootstrap, seed=seed,
                                 baseline_name=unique[i], candidate_name=unique[j])
             for i in range(len(loaded)) for j in range(i + 1, len(loaded))]
    games = [(p.baseline, p.candidate, {"W": p.candidate, "L": p.baseline, "T": "tie"}[r["verdict"]])
             for p in pairs for r in p.rows]
    ranking = fit_bradley_terry(games, n_bootstrap=n_bootstrap, seed=seed)
    return MultiComparison(models=unique, pairs=pairs, ranking=ranking)


def _unique_names(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        name = "tie-model" if n == "tie" else n  # "tie" is reserved in Bradley-Terry comparisons
        k = 2
        while name in out:
            name, k = f"{n}-{k}", k + 1
        out.append(name)
    return out


# ----------------------------------------------------------------------------- report files


def _short(text: str, width: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt_ci(ci: Sequence[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "(no bootstrap)"


def summary_lines(res: ComparisonResult) -> list[str]:
    """The headline numbers in words, shared by the terminal and the markdown report."""
    lc = res.length_controlled
    lines = [f"{res.candidate} (candidate) vs {res.baseline} (baseline), judge {res.judge}: "
             f"W {res.wins} / T {res.ties} / L {res.losses} over {res.n} pairs",
             f"win rate {res.win_rate:.3f}, 95% CI {_fmt_ci(res.win_rate_ci)} "
             f"(ties count half; bootstrap resampling prompts, n={res.n_bootstrap})",
             f"length-controlled win rate {lc['win_rate']:.3f}, 95% CI {_fmt_ci(lc.get('ci'))} "
             f"(mean length {lc['mean_length_candidate']:.1f} vs {lc['mean_length_baseline']:.1f} characters; "
             f"slope {lc['slope']:+.3f} per std of the length difference)"]
    return lines + res.notes


def _verdict_table(doc: Doc, res: ComparisonResult) -> None:
    """The course's table: one row per prompt, one column per completion id, then the counts."""
    ids = sorted({r["completion_id"] for r in res.rows}, key=lambda c: (len(c), c))
    rows = [[p["prompt_id"], _short(p["prompt"]), *(p["verdicts"].get(c, "") for c in ids), p["wins"], p["ties"],
             p["losses"]] for p in res.per_prompt()]
    rows.append(["", "**total**", *("" for _ in ids), res.wins, res.ties, res.losses])
    doc.table(["#", "prompt", *ids, "W", "T", "L"], rows)


def markdown_table(res: ComparisonResult) -> str:
    """The verdict table alone, as Markdown."""
    doc = Doc()
    _verdict_table(doc, res)
    return doc.markdown(Path(".")).rstrip("\n")


def report_doc(result: ComparisonResult | MultiComparison, directory: Path) -> Doc:
    """The comparison report: conventions, the ranking (several models), then per pair of models the
    headline numbers, the verdict table and the plots written beside it."""
    pairs = result.pairs if isinstance(result, MultiComparison) else [result]
    doc = Doc()
    doc.h(1, "Comparison")
    doc.p("The first file is the baseline. Each verdict is for the candidate: W = the candidate won, "
          "T = tie, L = the baseline won. Win rate = (W + T/2) / n; its 95% interval is a percentile "
          "bootstrap that resamples prompts (clustered). The length-controlled win rate is sigmoid(b0) of "
          "a logistic fit of the verdicts on the standardised length difference: the predicted win rate "
          "at equal lengths.")
    if isinstance(result, MultiComparison):
        doc.h(2, "Bradley-Terry ranking")
        players = result.ranking.to_dict()["players"]
        doc.table(["rank", "model", "strength", "95% CI", "W", "T", "L"], [
            [p["rank"], p["name"], f"{p['strength']:.3f}",
             _fmt_ci((p["ci_low"], p["ci_high"]) if p["ci_low"] is not None else None), p["wins"], p["ties"],
             p["losses"]] for p in players])
    for res in pairs:
        doc.h(2, f"{res.candidate} vs {res.baseline}")
        doc.ul(summary_lines(res))
        _verdict_table(doc, res)
        doc.image(directory / wtl_name(res), "win/tie/loss per prompt")
    doc.image(directory / "lengths.png", "completion lengths")
    if isinstance(result, MultiComparison):
        doc.image(directory / "ranking.png", "ranking")
    return doc


def wtl_name(res: ComparisonResult) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{res.candidate}_vs_{res.baseline}")
    return f"wtl_{safe}.png"


def write_report(result: ComparisonResult | MultiComparison, out_dir: str | Path) -> list[Path]:
    """Write comparison.json (everything, unrounded), the PNG plots, and comparison.md and comparison.html
    (one report, ``preftune.report``); return the paths."""
    from preftune import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = result.pairs if isinstance(result, MultiComparison) else [result]
    written = [out / "comparison.json"]
    written[0].write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for res in pairs:
        per = res.per_prompt()
        written.append(plots.wtl_bars([f"{p['prompt_id']}: {_short(p['prompt'], 28)}" for p in per],
                                      [p["wins"] for p in per], [p["ties"] for p in per], [p["losses"] for p in per],
                                      out / wtl_name(res), title=f"{res.candidate} vs {res.baseline}",
                                      legend=(f"{res.candidate} wins", "tie", f"{res.baseline} wins")))
    lengths: dict[str, list[int]] = {}
    for res in pairs:
        lengths.setdefault(res.baseline, [len(r["baseline"]) for r in res.rows])
        lengths.setdefault(res.candidate, [len(r["candidate"]) for r in res.rows])
    written.append(plots.length_histograms(lengths, out / "lengths.png"))
    if isinstance(result, MultiComparison):
        fit = result.ranking
        written.append(plots.interval_plot(fit.names, fit.strengths, fit.ci_low, fit.ci_high, out / "ranking.png",
                                           xlabel="Bradley-Terry log-strength", title="Ranking"))
    return written + report_doc(result, out).write(out, "comparison", title="preftune comparison")
