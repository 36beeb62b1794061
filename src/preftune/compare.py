"""Compare the completions of two or more models with a judge: win / tie / loss, win rates with
clustered bootstrap intervals, a length-controlled win rate, and a Bradley-Terry ranking.

Conventions (stated once, used everywhere): the FIRST file is the baseline (e.g. the SFT model) and
every verdict is for the candidate (the second file) against it: W = the candidate won, L = the
baseline won, T = a tie. Completions are paired by (prompt_id, completion_id): 1-A with 1-A, ...

Several judges at once (a mapping name -> judge, e.g. one judge per group of annotators) judge the same
pairs; the result (:class:`GroupComparison`) holds each judge's comparison and the worst (lowest) win rate.

Statistics: see ``preftune.core.winrate`` (win rate, cluster bootstrap, length-controlled win rate, the
worst of several win rates).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune.core.winrate import (  # noqa: F401  (part of this module's interface)
    MAX_DEGENERATE,
    MIN_EVENTS,
    RIDGE,
    SCORE,
    bootstrap_interval,
    cluster_weights,
    count,
    fit_logistic,
    length_controlled_interval,
    length_controlled_win_rate,
    length_problem,
    win_rate,
    worst_win_rate,
)
from preftune.data.jsonl import read_jsonl
from preftune.data.prompts import prompt_text
from preftune.errors import PreftuneError
from preftune.report import Doc

VERDICT = {1: "W", 0: "L", None: "T"}  # judge choice (pairs are (baseline, candidate)) -> verdict letter


# ----------------------------------------------------------------------------- reading generations


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """Read completions: a ``preftune generate`` JSONL file, checking each record's fields, or the readable
    text layout (``PREFIX n`` / ``POST n`` blocks with ``COMPLETION n-A`` / ``SUMMARY n-A``: the .txt file
    beside generate's JSONL, or the course's ``output_*_MODEL.txt``; ``preftune.data.completions_text``).
    A .txt file, or a file whose first line is a ``PREFIX n`` / ``POST n`` header, is read as text.
    Errors name the file and line (and the block)."""
    from preftune.data.completions_text import looks_like_completions_text, read_completions_text

    path = Path(path)
    if path.is_file() and (path.suffix.lower() == ".txt" or (path.suffix.lower() not in (".jsonl", ".ndjson", ".json")
                                                             and looks_like_completions_text(path))):
        return read_completions_text(path)
    records: list[dict[str, Any]] = []
    seen: dict[tuple[int, str], int] = {}
    for lineno, rec in read_jsonl(path, missing_hint="give a JSONL (or .txt) file written by preftune generate"):
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
                           "length_controlled": "sigmoid(b0) of logistic fit on length difference / its std; "
                                                "None with a reason when the data cannot support the fit"}
        return d


@dataclass
class GroupComparison:
    """Candidate vs baseline under several judges (e.g. one per group of annotators), on the same pairs."""

    baseline: str
    candidate: str
    by_judge: dict[str, ComparisonResult]  # judge name -> its comparison (its ``judge`` is that name)
    worst_judge_win_rate: dict[str, Any]   # {"name", "win_rate", "ci"}: the lowest win rate and its interval
    specs: dict[str, str] = field(default_factory=dict)  # judge name -> what the judge is (its spec)

    @property
    def pairs(self) -> list[ComparisonResult]:
        return list(self.by_judge.values())

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "candidate": self.candidate, "judges": self.specs,
                "worst_judge": self.worst_judge_win_rate,
                "by_judge": {name: res.to_dict() for name, res in self.by_judge.items()},
                "statistics": {"worst_judge": "the lowest win rate over the judges; its 95% interval is the "
                                              "percentile interval of the minimum over the same prompt resamples"}}


def compare_generations(baseline: str | Path | Sequence[dict[str, Any]],
                        candidate: str | Path | Sequence[dict[str, Any]], judge: Any, *, n_bootstrap: int = 1000,
                        seed: int = 0, baseline_name: str | None = None,
                        candidate_name: str | None = None) -> ComparisonResult | GroupComparison:
    """Judge each candidate completion against the baseline completion with the same (prompt_id,
    completion_id); count W/T/L for the candidate, the win rate with a prompt-clustered bootstrap 95%
    interval and the length-controlled win rate. Inputs are JSONL paths or lists of records.

    ``judge`` may be a mapping name -> judge: then every judge judges the same pairs and the result is a
    :class:`GroupComparison` with ``by_judge[name]`` and ``worst_judge_win_rate``."""
    base_name, base = _load(baseline, baseline_name)
    cand_name, cand = _load(candidate, candidate_name)
    if isinstance(judge, Mapping):
        if not judge or not all(isinstance(k, str) and k for k in judge):
            raise PreftuneError("several judges are given as a mapping of non-empty names to judges", field="judge")
        by_judge = {name: compare_generations(base, cand, j, n_bootstrap=n_bootstrap, seed=seed,
                                              baseline_name=base_name, candidate_name=cand_name)
                    for name, j in judge.items()}
        for name, res in by_judge.items():
            res.judge = name
        worst = worst_win_rate({n: [r["verdict"] for r in res.rows] for n, res in by_judge.items()},
                               {n: [r["prompt_id"] for r in res.rows] for n, res in by_judge.items()},
                               n_bootstrap=n_bootstrap, seed=seed)
        return GroupComparison(base_name, cand_name, by_judge, worst,
                               {n: str(getattr(j, "name", n)) for n, j in judge.items()})
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
        raise PreftuneError(f"the judge decided none of the {count(len(pairs), 'pair')}",
                            hint="a human judge needs labels on these very pairs (1-A of the baseline against "
                                 "1-A of the candidate): `preftune annotate serve --generations BASELINE.jsonl "
                                 "--generations CANDIDATE.jsonl --db DB`, label them, then compare again")
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
    lc["ci"], lc["degenerate_resamples"] = None, None
    if n_bootstrap > 0:
        ci = bootstrap_interval([SCORE[v] for v in verdicts], clusters, n_bootstrap=n_bootstrap, seed=seed)
    if n_bootstrap > 0 and lc["win_rate"] is not None:
        boot = length_controlled_interval(verdicts, diffs, clusters, scale=lc["scale"], n_bootstrap=n_bootstrap,
                                          seed=seed)
        lc["ci"], lc["degenerate_resamples"] = boot["ci"], boot["degenerate"]
        if boot["reason"] is not None:  # nearly separated: the point fit rests on a few pairs
            lc.update(win_rate=None, intercept=None, slope=None,
                      reason=f"the verdicts are nearly separated by length: {boot['reason']}")
    lc["length_unit"] = "characters"
    lc["mean_length_baseline"] = float(np.mean([len(r["baseline"]) for r in rows]))
    lc["mean_length_candidate"] = float(np.mean([len(r["candidate"]) for r in rows]))
    notes = []
    if missing:
        notes.append(f"{count(len(missing), 'pair')} {'was' if len(missing) == 1 else 'were'} not judged "
                     "(no judgement available) and left out of the counts")
    n_unmatched = sum(len(v) for v in unmatched.values())
    if n_unmatched:
        notes.append(f"{count(n_unmatched, 'completion')} could not be paired and {'is' if n_unmatched == 1 else 'are'} "
                     "left out: "
                     + ", ".join(f"{k} {len(v)}" for k, v in unmatched.items() if v))
    if len(set(clusters)) < 2 and n_bootstrap > 0:
        notes.append("only one prompt: the clustered bootstrap interval is degenerate")
    if lc["degenerate_resamples"]:
        notes.append(f"{lc['degenerate_resamples']} of {n_bootstrap} bootstrap resamples admit no finite "
                     "length-controlled fit and are left out of its interval")
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
    if isinstance(judge, Mapping):
        raise PreftuneError("several judges compare two files at a time", field="judge",
                            hint="compare each candidate with the baseline in its own run")
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
             f"W {res.wins} / T {res.ties} / L {res.losses} over {count(res.n, 'pair')}",
             f"win rate {res.win_rate:.3f}, 95% CI {_fmt_ci(res.win_rate_ci)} "
             f"(ties count half; bootstrap resampling prompts, n={res.n_bootstrap})",
             length_line(lc)]
    return lines + res.notes


def length_line(lc: dict[str, Any]) -> str:
    """The length-controlled win rate in words, or "not enough data" and why."""
    lengths = f"mean length {lc['mean_length_candidate']:.1f} vs {lc['mean_length_baseline']:.1f} characters"
    if lc["win_rate"] is None:
        return f"length-controlled win rate: not enough data ({lc['reason']}; {lengths})"
    return (f"length-controlled win rate {lc['win_rate']:.3f}, 95% CI {_fmt_ci(lc.get('ci'))} "
            f"({lengths}; slope {lc['slope']:+.3f} per std of the length difference)")


def judge_rows(result: GroupComparison) -> tuple[list[str], list[list[str]]]:
    """The judges side by side: header and one row per judge (W, T, L, n, win rate, its interval, the
    length-controlled win rate), then the worst judge's row."""
    rows = []
    for name, r in result.by_judge.items():
        lc = r.length_controlled["win_rate"]
        rows.append([name, str(r.wins), str(r.ties), str(r.losses), str(r.n), f"{r.win_rate:.3f}",
                     _fmt_ci(r.win_rate_ci), "not enough data" if lc is None else f"{lc:.3f}"])
    w = result.worst_judge_win_rate
    rows.append([f"worst: {w['name']}", "", "", "", "", f"{w['win_rate']:.3f}", _fmt_ci(w["ci"]), ""])
    return ["judge", "W", "T", "L", "n", "win rate", "95% CI", "length-controlled"], rows


def worst_line(result: GroupComparison) -> str:
    """The worst judge's win rate in words."""
    w = result.worst_judge_win_rate
    return (f"worst judge {w['name']}: win rate {w['win_rate']:.3f}, 95% CI {_fmt_ci(w['ci'])} (the lowest of "
            f"{count(len(result.by_judge), 'judge')}; the interval is that of the minimum over the same prompt "
            "resamples)")


def _pairs(result: ComparisonResult | MultiComparison | GroupComparison) -> list[ComparisonResult]:
    return result.pairs if isinstance(result, (MultiComparison, GroupComparison)) else [result]


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


def report_doc(result: ComparisonResult | MultiComparison | GroupComparison, directory: Path) -> Doc:
    """The comparison report: conventions, the ranking (several models) or the judges side by side (several
    judges), then per pair of models (and judge) the headline numbers, the verdict table and the plots."""
    pairs = _pairs(result)
    group = isinstance(result, GroupComparison)
    doc = Doc()
    doc.h(1, "Comparison")
    doc.p("The first file is the baseline. Each verdict is for the candidate: W = the candidate won, "
          "T = tie, L = the baseline won. Win rate = (W + T/2) / n; its 95% interval is a percentile "
          "bootstrap that resamples prompts (clustered). The length-controlled win rate is sigmoid(b0) of "
          "a logistic fit of the verdicts on the standardised length difference: the predicted win rate "
          "at equal lengths; it says \"not enough data\" (and why) when the verdicts are too few or "
          "separated by length for that fit.")
    if isinstance(result, MultiComparison):
        doc.h(2, "Bradley-Terry ranking")
        players = result.ranking.to_dict()["players"]
        doc.table(["rank", "model", "strength", "95% CI", "W", "T", "L"], [
            [p["rank"], p["name"], f"{p['strength']:.3f}",
             _fmt_ci((p["ci_low"], p["ci_high"]) if p["ci_low"] is not None else None), p["wins"], p["ties"],
             p["losses"]] for p in players])
    if group:
        doc.h(2, f"{result.candidate} vs {result.baseline}, judge by judge")
        header, rows = judge_rows(result)
        rows[-1][0], rows[-1][5] = f"**{rows[-1][0]}**", f"**{rows[-1][5]}**"
        doc.table(header, rows)
        doc.p(worst_line(result))
    for res in pairs:
        doc.h(2, f"{res.candidate} vs {res.baseline}" + (f", judge {res.judge}" if group else ""))
        doc.ul(summary_lines(res))
        _verdict_table(doc, res)
        doc.image(directory / wtl_name(res, judge=group), "win/tie/loss per prompt")
    doc.image(directory / "lengths.png", "completion lengths")
    if isinstance(result, MultiComparison):
        doc.image(directory / "ranking.png", "ranking")
    return doc


def wtl_name(res: ComparisonResult, *, judge: bool = False) -> str:
    name = f"{res.candidate}_vs_{res.baseline}" + (f"_{res.judge}" if judge else "")
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return f"wtl_{safe}.png"


def write_report(result: ComparisonResult | MultiComparison | GroupComparison, out_dir: str | Path) -> list[Path]:
    """Write comparison.json (everything, unrounded), the PNG plots, and comparison.md and comparison.html
    (one report, ``preftune.report``); return the paths."""
    from preftune import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs, group = _pairs(result), isinstance(result, GroupComparison)
    written = [out / "comparison.json"]
    written[0].write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for res in pairs:
        per = res.per_prompt()
        written.append(plots.wtl_bars([f"{p['prompt_id']}: {_short(p['prompt'], 28)}" for p in per],
                                      [p["wins"] for p in per], [p["ties"] for p in per], [p["losses"] for p in per],
                                      out / wtl_name(res, judge=group), title=f"{res.candidate} vs {res.baseline}"
                                      + (f", judge {res.judge}" if group else ""),
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
