"""`preftune demo --scenario groups`: whose preferences should the model follow when the annotators are two
groups who want different things? (The course's exercise E.1/E.2; MaxMin-RLHF, Chakraborty et al. 2024;
group-robust DPO, Ramesh et al. 2024. docs/diverse.md tells the whole story.)

The default scenario's pipeline (``pipeline.Demo``) with other stages after SFT; every arrow is one of
preftune's own commands or functions, run the way a user would run them:

1. corpus       the default scenario's: prefixes and SFT data
2. base         the default scenario's base model (cached in ``$PREFTUNE_CACHE/demo-base/HASH``)
3. sft          the default scenario's SFT model (same settings, same seed), cached in
                ``$PREFTUNE_CACHE/demo-sft/HASH`` so the next run of this scenario skips it
4. preferences  K completions per prefix from SFT, pairs labelled by a panel of annotators in two groups
                (``groups_reward.py``: 80% "concise", 20% "expansive"); how much the two ground truths
                conflict on these samples (correlation, pairs they order oppositely)
5. mixture      `train reward` with `mixtures: 2`: EM over the annotators from a random start; purity and
                adjusted Rand index of its assignment against the groups (which EM never sees)
6. reward       the pooled reward model: `train reward` on every label; its accuracy under each group
7. pooled_rloo  `train rloo` against the pooled reward model
8. maxmin_rloo  `train rloo` with `rewards` = the mixture's reward models, `reward_aggregation: maxmin`
9. pooled_dpo   `train dpo` on every label
10. grdpo       `train dpo` with `group_robust: true` over the labels' groups
11. evaluate    A/B/C completions per held-out prefix from every model; `compare` against SFT with one
                judge per group (each group's ground truth): per-group and worst-group win rates
12. report      report.md, report.html, summary.json (``groups_report.py``)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.data.jsonl import read_records, write_jsonl
from preftune.errors import PreftuneError
from preftune.experiments.demo.groups_reward import GROUND_TRUTHS, MAJORITY, MINORITY, REWARDS, verse_words
from preftune.experiments.demo.pipeline import (
    Demo,
    MethodRecipe,
    _label_stats,
    _mean,
    _pairs_per_prompt,
    _read_lines,
    _warmup,
)
from preftune.experiments.demo.settings import GroupsSettings


@dataclass(frozen=True)
class GroupMethod:
    """One method of the scenario: its `preftune train` recipe, and for an online method the reward it
    optimises: "pooled" (the reward model of every label) or "mixture" (the EM's reward models, one per group)."""

    title: str
    recipe: MethodRecipe
    reward: str | None = None


METHODS: dict[str, GroupMethod] = {
    "pooled_rloo": GroupMethod("pooled RLOO", MethodRecipe("rloo", online=True,
                                                         settings={"learning_rate": "rloo_learning_rate"}),
                               reward="pooled"),
    "maxmin_rloo": GroupMethod("MaxMin RLOO", MethodRecipe("rloo", online=True, settings={
        "learning_rate": "rloo_learning_rate", "reward_aggregation": "maxmin_aggregation"}), reward="mixture"),
    "pooled_dpo": GroupMethod("pooled DPO", MethodRecipe("dpo", online=False, fixed={"loss": "dpo"}, settings={
        "beta": "dpo_beta", "learning_rate": "dpo_learning_rate"})),
    "grdpo": GroupMethod("group-robust DPO", MethodRecipe("dpo", online=False, fixed={"loss": "dpo", "group_robust": True},
                                                          settings={"beta": "dpo_beta", "learning_rate": "dpo_learning_rate",
                                                                    "group_step_size": "grdpo_step_size"})),
}


class GroupsDemo(Demo):
    """One run of the groups scenario in ``output``; ``run()`` executes the stages not yet finished."""

    def __init__(self, output: str | Path, settings: GroupsSettings, *, cache_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        for method in settings.methods:
            if method not in METHODS:
                raise PreftuneError(f"the groups scenario has no recipe for method {method!r}", field="methods",
                                    hint=f"methods: {', '.join(METHODS)}")
        if len(settings.group_annotators) != 2 or min(settings.group_annotators) < 1:
            raise PreftuneError("group_annotators holds the sizes of the two groups, each at least 1",
                                field="group_annotators")
        super().__init__(output, settings, cache_dir=cache_dir, log=log)
        self.settings: GroupsSettings = settings
        self.table = METHODS  # the methods' recipes and titles (the report reads them here)
        self.stages = [
            ("corpus", self.stage_corpus), ("base", self.stage_base), ("sft", self.stage_sft_cached),
            ("preferences", self.stage_preferences), ("mixture", self.stage_mixture), ("reward", self.stage_reward),
            *((m, self._method_stage(m)) for m in settings.methods),
            ("evaluate", self.stage_evaluate), ("report", self.stage_report),
        ]

    def panel(self) -> tuple[Any, ...]:
        from preftune.experiments.demo.groups_reward import make_panel

        s = self.settings
        return make_panel(s.group_annotators, s.annotator_temperatures, seed=s.seed + s.panel_seed_offset)

    # ------------------------------------------------------------------------------------------ 4. preferences
    def stage_preferences(self) -> dict[str, Any]:
        from preftune.experiments.demo.groups_reward import annotate_pairs, reward_agreement
        from preftune.experiments.demo.reward import preference_rows

        s, out = self.settings, self.out / "preferences"
        sft, panel = self.marker("sft")["model"], self.panel()
        result: dict[str, Any] = {}
        splits = (("train", "preference_prompts", s.seed),
                  ("heldout", "validation_prompts", s.seed + s.val_seed_offset))
        for split, file, seed in splits:
            prompts = _read_lines(self.out / "data" / f"{file}.txt")
            records = self._generate(sft, prompts, num=s.completions_per_prompt, name="sft", seed=seed)
            write_jsonl(out / f"{split}_completions.jsonl", records)
            pairs = _pairs_per_prompt(records, s.pairs_per_prompt, seed=seed)
            if split == "train":
                write_jsonl(out / "pairs.jsonl", [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in pairs])
            judgements = annotate_pairs(pairs, panel, second_opinion=s.second_opinion, seed=seed)
            write_jsonl(out / f"{split}_judgements.jsonl", judgements)
            write_jsonl(out / f"{split}.jsonl", preference_rows(judgements))
            result[split] = {**_label_stats([{**j, "true_choice": j["true_choice"][j["group"]]} for j in judgements]),
                             **_group_stats(judgements), "completions": len(records)}
            if split == "train":  # do the two ground truths conflict on what the SFT model samples?
                index: dict[int, list[int]] = {}
                for i, r in enumerate(records):
                    index.setdefault(r["prompt_id"], []).append(i)
                result["conflict"] = reward_agreement(
                    [r["prompt"] for r in records], [r["completion"] for r in records],
                    [(a, b) for ids in index.values() for k, a in enumerate(ids) for b in ids[k + 1:]])
        result["panel"] = [{"name": a.name, "group": a.group, "temperature": a.temperature} for a in panel]
        return result

    # ------------------------------------------------------------------------------------------ 5. mixture
    def stage_mixture(self) -> dict[str, Any]:
        from preftune.core.mixture import adjusted_rand_index, purity

        s = self.settings
        keys = {k: v for k, v in self._reward_keys(s.reward_steps).items() if k not in ("max_steps", "eval_data")}
        # online=True: no group_by_length, which EM's M-steps (its own order of the pairs) do not take
        final = self._train("reward", self.out / "mixture", online=True, **keys, mixtures=s.mixtures, em_init=s.em_init,
                            em_restarts=s.em_restarts, em_iterations=s.em_iterations, em_epochs=s.em_epochs)
        rows = read_records(self.out / "mixture" / "assignments.jsonl")
        truth = {a.name: a.group for a in self.panel()}
        assigned = [int(r["mixture"]) for r in rows]
        groups = [truth[r["annotator"]] for r in rows]
        # which group each component serves (its annotators' most common group): for reporting only
        component_group = {}
        for k in range(s.mixtures):
            members = Counter(g for a, g in zip(assigned, groups, strict=True) if a == k)
            component_group[str(k)] = members.most_common(1)[0][0] if members else None
        models = [str(final / f"mixture-{k}") for k in range(s.mixtures)]
        em = [r for r in read_records(self.out / "mixture" / "metrics.jsonl") if "em/iteration" in r]
        return {"models": models, "component_group": component_group,
                "purity": float(purity(assigned, groups)), "ari": float(adjusted_rand_index(assigned, groups)),
                "assignments": {r["annotator"]: int(r["mixture"]) for r in rows},
                "em_iterations": len(em), "em_log_likelihood": em[-1].get("em/log_likelihood") if em else None,
                "heldout": {str(k): self._heldout_accuracy(Path(m)) for k, m in enumerate(models)}}

    # ------------------------------------------------------------------------------------------ 6. reward (pooled)
    def stage_reward(self) -> dict[str, Any]:
        final = self._train("reward", self.out / "reward", **self._reward_keys(self.settings.reward_steps))
        return {"model": str(final), **self._heldout_accuracy(final)}

    def _reward_keys(self, steps: int) -> dict[str, Any]:
        s, prefs = self.settings, self.out / "preferences"
        return {"model": self.marker("sft")["model"], "data": str(prefs / "train.jsonl"),
                "eval_data": str(prefs / "heldout.jsonl"), "learning_rate": s.reward_learning_rate,
                "batch_size": s.pref_batch_size, "max_steps": steps, "max_length": s.max_length,
                "warmup_steps": _warmup(steps, s.warmup_fraction)}

    def _heldout_accuracy(self, model_path: Path) -> dict[str, Any]:
        """A reward model on the held-out pairs: how often it orders a pair as each group's ground truth does
        (pairs the truth ties left out), and as each group's annotators labelled it."""
        from preftune.models import load_reward_model, load_tokenizer, score_texts

        judgements = read_records(self.out / "preferences" / "heldout_judgements.jsonl")
        pairs = list({j["pair"]: j for j in judgements}.values())
        tokenizer = load_tokenizer(str(model_path))
        model = load_reward_model(str(model_path), tokenizer=tokenizer)
        scores = score_texts(model, tokenizer, [j["prompt"] for j in pairs] * 2,
                             [j["first"] for j in pairs] + [j["second"] for j in pairs])
        second = {j["pair"]: int(b > a) for j, a, b in zip(pairs, scores[:len(pairs)], scores[len(pairs):], strict=True)}
        return {"heldout_pairs": len(pairs),
                "accuracy_vs_truth": {g: _mean(second[j["pair"]] == j["true_choice"][g] for j in pairs
                                               if j["true_choice"][g] is not None) for g in REWARDS},
                "accuracy_vs_labels": {g: _mean(second[j["pair"]] == j["choice"] for j in judgements if j["group"] == g)
                                       for g in REWARDS}}

    # ------------------------------------------------------------------------------------------ 7-10. methods
    def _method_stage(self, method: str) -> Callable[[], dict[str, Any]]:
        def stage() -> dict[str, Any]:
            return {"model": str(self.train_method(method))}
        return stage

    def method_keys(self, method: str) -> dict[str, Any]:
        s, spec = self.settings, METHODS[method]
        sft, recipe = self.marker("sft")["model"], spec.recipe
        if recipe.online:  # RLHF proper: learned reward models only, the ground truths are never seen in training
            common: dict[str, Any] = {
                "model": sft, "data": str(self.out / "data" / "preference_prompts.txt"),
                "num_samples": s.rl_num_samples, "batch_size": s.rl_batch_size, "max_steps": s.rl_steps,
                "max_new_tokens": s.max_new_tokens, "max_length": s.max_length, "temperature": s.temperature,
                "kl_coef": s.rl_kl_coef, "lr_scheduler": s.rl_lr_scheduler,
                "warmup_steps": _warmup(s.rl_steps, s.warmup_fraction), "sample_every": s.rl_sample_every}
            if spec.reward == "mixture":
                mixture = self.marker("mixture")
                common["rewards"] = mixture["models"]
                common["reward_names"] = [f"mixture-{k}" for k in range(len(mixture["models"]))]
            else:
                common["reward"] = self.marker("reward")["model"]
        else:
            prefs = self.out / "preferences"
            common = {"model": sft, "data": str(prefs / "train.jsonl"), "eval_data": str(prefs / "heldout.jsonl"),
                      "batch_size": s.pref_batch_size, "epochs": s.pref_epochs, "max_length": s.max_length,
                      "warmup_ratio": s.warmup_fraction, "ref_cache_dir": str(self.cache / "ref_logps")}
        return {**common, **recipe.keys(s)}

    def train_method(self, method: str) -> Path:
        recipe = METHODS[method].recipe
        return self._train(recipe.command, self.out / method, online=recipe.online, **self.method_keys(method))

    # ------------------------------------------------------------------------------------------ 11. evaluate
    def stage_evaluate(self) -> dict[str, Any]:
        from preftune.compare import compare_generations, write_report
        from preftune.judges import FunctionJudge

        s, out = self.settings, self.out / "eval"
        prompts = _read_lines(self.out / "data" / "eval_prompts.txt")
        files: dict[str, Path] = {}
        for name, path in self.models().items():
            files[name] = out / f"{name}.jsonl"
            write_jsonl(files[name], self._generate(path, prompts, num=s.eval_completions, name=name,
                                                     seed=s.seed + s.eval_seed_offset,
                                                     temperature=s.eval_temperature))
        judges = {group: FunctionJudge(spec) for group, spec in GROUND_TRUTHS.items()}
        results: dict[str, Any] = {}
        for method in s.methods:  # one judge per group on the same pairs (compare --judge NAME=SPEC ...)
            res = compare_generations(files["sft"], files[method], judges, n_bootstrap=s.n_bootstrap, seed=s.seed,
                                      baseline_name="sft", candidate_name=method)
            write_report(res, out / f"{method}_vs_sft")
            worst = res.worst_judge_win_rate
            results[method] = {
                "win_rate_by_group": {g: {"win_rate": r.win_rate, "ci": list(r.win_rate_ci) if r.win_rate_ci else None,
                                          "wins": r.wins, "ties": r.ties, "losses": r.losses}
                                      for g, r in res.by_judge.items()},
                "worst_group_win_rate": {"win_rate": worst["win_rate"], "group": worst["name"],
                                         "ci": list(worst["ci"]) if worst["ci"] else None}}
        profiles = {name: _profile(read_records(path)) for name, path in files.items()}
        return {"results": results, "profiles": profiles, "files": {k: str(v) for k, v in files.items()}}

    # ------------------------------------------------------------------------------------------ 12. report
    def stage_report(self) -> dict[str, Any]:
        from preftune.experiments.demo.groups_report import write_groups_report

        return {"files": [str(p) for p in write_groups_report(self)]}


def _group_stats(judgements: list[dict[str, Any]]) -> dict[str, Any]:
    """Per group: annotators, labels, agreement with its own ground truth and with the other group's; on the
    pairs labelled by one annotator of each group, how often the two agree."""
    out: dict[str, Any] = {"groups": {}}
    for g in REWARDS:
        mine = [j for j in judgements if j["group"] == g]
        out["groups"][g] = {
            "annotators": len({j["annotator"] for j in mine}), "labels": len(mine),
            "share_of_labels": len(mine) / len(judgements) if judgements else None,
            **{f"agreement_with_{h}": _mean(j["choice"] == j["true_choice"][h] for j in mine
                                            if j["true_choice"][h] is not None) for h in REWARDS}}
    by_pair: dict[int, dict[str, int]] = {}
    for j in judgements:
        by_pair.setdefault(j["pair"], {})[j["group"]] = j["choice"]
    across = [v for v in by_pair.values() if len(v) == 2]
    out["cross_group_pairs"] = len(across)
    out["cross_group_agreement"] = _mean(v[MAJORITY] == v[MINORITY] for v in across) if across else None
    out["annotators"] = dict(sorted(Counter(j["annotator"] for j in judgements).items()))
    return out


def _profile(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What a model writes on the held-out prefixes: mean ground-truth reward per group, words, and shares."""
    from preftune.experiments.demo.reward import terms

    texts = [(r["prompt"], r["completion"]) for r in records]
    parts = [terms(c) for _, c in texts]
    return {"mean_reward": {g: _mean(fn(p, c) for p, c in texts) for g, fn in REWARDS.items()},
            "verse_words": _mean(verse_words(c) for _, c in texts),
            "finished": _mean(t["finished"] for t in parts), "voices": _mean(t["interruptions"] for t in parts),
            "characters": _mean(len(c) for _, c in texts), "completions": len(texts)}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The lines ``preftune demo --scenario groups`` prints at the end (rich markup)."""
    em = summary["em"]
    lines = [f"[bold]EM[/] (K = {len(em['component_group'])}, random start): purity {em['purity']:.2f}, "
             f"adjusted Rand index {em['ari']:.2f}"]
    for name, m in summary["methods"].items():
        by = m["win_rate_by_group"]
        w = m["worst_group_win_rate"]
        lo, hi = w["ci"] or (float("nan"), float("nan"))
        lines.append(f"[bold]{METHODS[name].title:17}[/] vs SFT: " + ", ".join(
            f"{g} {r['win_rate']:.2f}" for g, r in by.items())
            + f"; worst group ({w['group']}) [bold]{w['win_rate']:.2f}[/] (95% CI {lo:.2f}-{hi:.2f})")
    return lines

