"""`preftune demo`: the whole of preference tuning on Shakespeare, offline, on a CPU.

Each stage is a function below, run in order; each writes plain files under the output directory and
then a marker ``stages/<name>.json`` (its time and figures). A second run skips every stage that has
its marker, so an interrupted run resumes from the last finished stage (the training stages also
resume from their own checkpoints). The base language model is cached outside the run directory, by
the hash of the corpus and its recipe, so a new run directory reuses it.

1. corpus       the shipped plays and poems -> SFT examples and prefix lists (data/)
2. base         a byte-level BPE tokenizer and a small Llama trained from scratch (`train sft`, {text})
3. sft          fine-tuned on (prefix -> continuation) pairs (`train sft`)
4. preferences  K completions per prefix from the SFT model, pairs labelled by simulated annotators
5. reward       a reward model on those labels (`train reward`), its held-out accuracy
6. methods      one stage per name of ``settings.methods``, each built from its row of ``METHODS``:
                dpo, orpo (`train dpo` on the labels), ppo, rloo, raft (online RL against the reward model)
7. evaluate     A/B/C completions per held-out prefix from every model; `compare` against SFT under
                the ground-truth judge and under the learned reward model
8. report       report.md, report.html, summary.json
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.jsonl import read_records, write_jsonl
from preftune.errors import PreftuneError
from preftune.experiments.demo import corpus as corpus_mod
from preftune.experiments.demo.settings import RECIPE_VERSION, DemoSettings

GROUND_TRUTH = "preftune.experiments.demo.reward:shakespeare_reward"


@dataclass(frozen=True)
class MethodRecipe:
    """How the demo trains one method from the SFT model: ``preftune train COMMAND`` with the keys
    shared by its kind (``Demo.method_keys``) and its own."""

    command: str                    # the `preftune train` command
    online: bool                    # RL on the prompts against the learned reward model (else on the labels)
    settings: dict[str, str]        # train key -> the DemoSettings field that holds its value
    fixed: dict[str, Any] = field(default_factory=dict)  # keys that make the method what it is (the loss)

    def keys(self, settings: DemoSettings) -> dict[str, Any]:
        return {**self.fixed, **{key: getattr(settings, name) for key, name in self.settings.items()}}


# Every method the demo can train: a name of settings.methods -> its recipe.
METHODS: dict[str, MethodRecipe] = {
    "dpo": MethodRecipe("dpo", online=False, fixed={"loss": "dpo"},
                        settings={"beta": "dpo_beta", "learning_rate": "dpo_learning_rate"}),
    "orpo": MethodRecipe("dpo", online=False, fixed={"loss": "orpo"},
                         settings={"beta": "orpo_beta", "learning_rate": "orpo_learning_rate"}),
    "ppo": MethodRecipe("ppo", online=True,
                        settings={"learning_rate": "ppo_learning_rate", "update_epochs": "ppo_update_epochs",
                                  "num_mini_batches": "ppo_num_mini_batches"}),
    "rloo": MethodRecipe("rloo", online=True, settings={"learning_rate": "rloo_learning_rate"}),
    "raft": MethodRecipe("raft", online=True, settings={"learning_rate": "raft_learning_rate"}),
}


def default_cache_dir() -> Path:
    root = os.environ.get("PREFTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "preftune"
    return Path(root)


class Demo:
    """One demo run in ``output`` with ``settings``; ``run()`` executes the stages not yet finished."""

    recipes: dict[str, MethodRecipe] = METHODS  # the methods this scenario can train (settings.methods)

    def __init__(self, output: str | Path, settings: DemoSettings, *, cache_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.out, self.settings = Path(output), settings
        self.cache = Path(cache_dir) if cache_dir else default_cache_dir()
        self.log = log or print
        self._models: dict[str, tuple[Any, Any]] = {}  # path -> (model, tokenizer) loaded for generation
        self.stages: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("corpus", self.stage_corpus), ("base", self.stage_base), ("sft", self.stage_sft),
            ("preferences", self.stage_preferences), ("reward", self.stage_reward),
            *((m, self._method_stage(m)) for m in settings.methods),
            ("evaluate", self.stage_evaluate), ("report", self.stage_report),
        ]

    # ------------------------------------------------------------------------------------------ driver
    def run(self, *, until: str | None = None) -> dict[str, Any] | None:
        """Run every unfinished stage (up to and including ``until``); return the summary (also in
        ``OUTPUT/summary.json``), or None when stopped before the report."""
        names = [name for name, _ in self.stages]
        if until is not None and until not in names:
            raise PreftuneError(f"unknown stage {until!r}", field="until", hint=f"stages: {', '.join(names)}")
        _quiet_libraries()
        self._claim_directory()
        total = len(self.stages)
        for number, (name, fn) in enumerate(self.stages, start=1):
            marker = self.out / "stages" / f"{name}.json"
            if marker.is_file():
                self.log(f"[{number}/{total}] {name}: done in an earlier run ({self.marker(name)['seconds']:.0f} s)")
                continue
            self.log(f"[{number}/{total}] {name} ...")
            started = time.perf_counter()
            info = fn()
            info["seconds"] = time.perf_counter() - started
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            self.log(f"[{number}/{total}] {name}: {info['seconds']:.1f} s")
            if name == until:
                self.log(f"stopped after stage {name}; run again without --until to finish")
                return None
        return json.loads((self.out / "summary.json").read_text(encoding="utf-8"))

    def marker(self, name: str) -> dict[str, Any]:
        return json.loads((self.out / "stages" / f"{name}.json").read_text(encoding="utf-8"))

    def _claim_directory(self) -> None:
        """Record the settings in ``demo.json``; refuse a directory that holds a run with other settings."""
        path = self.out / "demo.json"
        mine = {"fingerprint": self.settings.fingerprint, "settings": self.settings.to_dict()}
        if path.is_file():
            theirs = json.loads(path.read_text(encoding="utf-8"))
            if theirs.get("fingerprint") != mine["fingerprint"]:
                raise PreftuneError(f"{self.out} holds a demo run with other settings", path=str(path),
                                    hint="use another --output, or --fresh to delete that run and start again")
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=2) + "\n", encoding="utf-8")

    def _train(self, command: str, output: Path, *, online: bool = False, **keys: Any) -> Path:
        from preftune.train import run

        s = self.settings
        base = {"output_dir": str(output), "seed": s.seed, "report_to": "none", "log_every": s.log_every}
        if not online:  # an online step trains on the completions it has just sampled, as they come
            base["group_by_length"] = s.group_by_length
        return run(command, {**base, **keys})

    # ------------------------------------------------------------------------------------------ 1. corpus
    def stage_corpus(self) -> dict[str, Any]:
        s = self.settings
        corpus = corpus_mod.load_corpus(s.works or corpus_mod.WORKS)
        heldout = corpus_mod.heldout_prefixes()
        lines = corpus_mod.prefix_lines(corpus, exclude=heldout, seed=s.seed)
        need = s.sft_examples + s.pref_prompts + s.val_prompts
        if len(lines) < need:
            raise PreftuneError(f"the corpus has {len(lines)} usable prefix lines, the settings need {need}")
        rng = random.Random(s.seed)
        sft = [{"prompt": line.text, "completion": corpus_mod.continuation(
                    corpus.lines(line.work), line.index, n_lines=rng.randint(s.sft_min_lines, s.sft_max_lines)),
                "source": f"{line.work}:{line.index + 1}"} for line in lines[:s.sft_examples]]
        pref = [line.text for line in lines[s.sft_examples:s.sft_examples + s.pref_prompts]]
        val = [line.text for line in lines[s.sft_examples + s.pref_prompts:need]]
        data = self.out / "data"
        data.mkdir(parents=True, exist_ok=True)
        write_jsonl(data / "sft.jsonl", sft)
        for name, prompts in (("preference_prompts", pref), ("validation_prompts", val),
                              ("eval_prompts", heldout[:s.eval_prompts] if s.eval_prompts else heldout)):
            (data / f"{name}.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        return {"works": list(corpus.texts), "characters": sum(map(len, corpus.texts.values())),
                "fingerprint": corpus.fingerprint, "prefix_lines": len(lines), "sft_examples": len(sft),
                "preference_prompts": len(pref), "validation_prompts": len(val),
                "eval_prompts": len(heldout[:s.eval_prompts] if s.eval_prompts else heldout)}

    # ------------------------------------------------------------------------------------------ 2. base
    def base_dir(self) -> Path:
        s = self.settings
        corpus_fp = self.marker("corpus")["fingerprint"]
        key = _hash({"corpus": corpus_fp, "recipe": s.base_recipe(), "seed": s.seed, "version": RECIPE_VERSION})
        return self.cache / "demo-base" / key

    def stage_base(self) -> dict[str, Any]:
        from preftune.models.tiny import build_tiny_model, build_tiny_tokenizer

        s, root = self.settings, self.base_dir()
        final = root / "run" / "final"
        cached = (final / "config.json").is_file()
        if cached:
            self.log(f"base model: reusing {final} (cached by the hash of the corpus and recipe)")
        else:
            corpus = corpus_mod.load_corpus(s.works or corpus_mod.WORKS)
            blocks = corpus.blocks()
            tokenizer = build_tiny_tokenizer(vocab_size=s.vocab_size, texts=blocks)
            heads = max(1, s.hidden_size // s.base_head_dim)
            model = build_tiny_model(tokenizer, hidden_size=s.hidden_size, num_layers=s.num_layers, seed=s.seed,
                                     num_heads=heads, num_kv_heads=heads,
                                     intermediate_size=s.hidden_size * s.base_mlp_ratio,
                                     max_positions=s.base_max_positions)
            model.save_pretrained(root / "init")
            tokenizer.save_pretrained(root / "init")
            rows = _text_rows(blocks, s.base_block_chars)
            write_jsonl(root / "lm.jsonl", rows)
            self.log(f"base model: {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary "
                     f"{len(tokenizer)}, {len(rows)} rows of text")
            self._train("sft", root / "run", model=str(root / "init"), data=str(root / "lm.jsonl"),
                        learning_rate=s.base_learning_rate, batch_size=s.base_batch_size, max_steps=s.base_steps,
                        max_length=s.base_max_length, warmup_steps=_warmup(s.base_steps, s.base_warmup_fraction),
                        weight_decay=s.base_weight_decay, save_every=max(1, s.base_steps // s.base_saves),
                        keep_checkpoints=s.base_keep_checkpoints)
            shutil.rmtree(root / "run" / "checkpoints", ignore_errors=True)
        (self.out / "base").mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "run" / "metrics.jsonl", self.out / "base" / "metrics.jsonl")
        samples = self._generate(final, corpus_mod.heldout_prefixes()[:s.preview_prompts], num=s.preview_samples,
                                 name="base")
        write_jsonl(self.out / "base" / "samples.jsonl", samples)
        return {"model": str(final), "cached": cached}

    # ------------------------------------------------------------------------------------------ 3. sft
    def stage_sft(self) -> dict[str, Any]:
        return {"model": str(self.train_sft(self.out / "sft"))}

    def train_sft(self, output: Path) -> Path:
        """`train sft` from the base model on data/sft.jsonl into ``output``; the final model's path."""
        s = self.settings
        return self._train("sft", output, model=self.marker("base")["model"],
                           data=str(self.out / "data" / "sft.jsonl"), eval_fraction=s.sft_eval_fraction,
                           learning_rate=s.sft_learning_rate, batch_size=s.sft_batch_size, max_steps=s.sft_steps,
                           max_length=s.max_length, warmup_steps=_warmup(s.sft_steps, s.warmup_fraction))

    def sft_cache_dir(self) -> Path:
        """``$PREFTUNE_CACHE/demo-sft/HASH``: the SFT model of the other scenarios, keyed by the base model,
        the SFT data and the SFT settings (the default scenario trains its own in its run directory)."""
        data = hashlib.sha256((self.out / "data" / "sft.jsonl").read_bytes()).hexdigest()
        key = _hash({"base": self.base_dir().name, "data": data, "recipe": self.settings.sft_recipe(),
                     "version": RECIPE_VERSION})
        return self.cache / "demo-sft" / key

    def stage_sft_cached(self) -> dict[str, Any]:
        """The SFT stage of the other scenarios: the default's SFT run, cached (``sft_cache_dir``)."""
        root = self.sft_cache_dir()
        final = root / "final"
        cached = (final / "config.json").is_file()
        if cached:
            self.log(f"SFT model: reusing {final} (cached by the hash of the base model, the data and the recipe)")
        else:
            self.train_sft(root)
            shutil.rmtree(root / "checkpoints", ignore_errors=True)
        return {"model": str(final), "cached": cached}

    # ------------------------------------------------------------------------------------------ 4. preferences
    def stage_preferences(self) -> dict[str, Any]:
        from preftune.experiments.demo.reward import (
            PANEL,
            annotate_pairs,
            preference_rows,
            shakespeare_reward,
        )

        s, out = self.settings, self.out / "preferences"
        sft = self.marker("sft")["model"]
        result: dict[str, Any] = {}
        splits = (("train", "preference_prompts", s.seed),
                  ("heldout", "validation_prompts", s.seed + s.val_seed_offset))
        for split, file, seed in splits:
            prompts = _read_lines(self.out / "data" / f"{file}.txt")
            records = self._generate(sft, prompts, num=s.completions_per_prompt, name="sft", seed=seed)
            write_jsonl(out / f"{split}_completions.jsonl", records)
            pairs = _pairs_per_prompt(records, s.pairs_per_prompt, seed=seed)
            if split == "train":  # the same pairs for people to label in the browser
                write_jsonl(out / "pairs.jsonl", [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in pairs])
            judgements = annotate_pairs(pairs, second_opinion=s.second_opinion, seed=seed)
            for j in judgements:
                j["true_choice"] = int(shakespeare_reward(j["prompt"], j["second"]) >
                                       shakespeare_reward(j["prompt"], j["first"]))
            write_jsonl(out / f"{split}_judgements.jsonl", judgements)
            write_jsonl(out / f"{split}.jsonl", preference_rows(judgements))
            result[split] = {**_label_stats(judgements), "completions": len(records),
                             "empty_completions": sum(not r["completion"].strip() for r in records)}
        result["panel"] = [{"name": a.name, "group": a.group, "temperature": a.temperature, "emphasis": a.emphasis}
                           for a in PANEL]
        return result

    # ------------------------------------------------------------------------------------------ 5. reward
    def stage_reward(self) -> dict[str, Any]:
        from preftune.models import load_reward_model, load_tokenizer, score_texts

        s, prefs = self.settings, self.out / "preferences"
        final = self._train("reward", self.out / "reward", model=self.marker("sft")["model"],
                            data=str(prefs / "train.jsonl"), eval_data=str(prefs / "heldout.jsonl"),
                            learning_rate=s.reward_learning_rate, batch_size=s.pref_batch_size,
                            max_steps=s.reward_steps, max_length=s.max_length,
                            warmup_steps=_warmup(s.reward_steps, s.warmup_fraction))
        # accuracy on the held-out pairs: against the annotators' labels and against the ground truth
        judgements = read_records(prefs / "heldout_judgements.jsonl")
        pairs = list({j["pair"]: j for j in judgements}.values())
        tokenizer = load_tokenizer(str(final))
        model = load_reward_model(str(final), tokenizer=tokenizer)
        scores = score_texts(model, tokenizer, [j["prompt"] for j in pairs] * 2,
                             [j["first"] for j in pairs] + [j["second"] for j in pairs])
        prefers_second = {j["pair"]: int(b > a) for j, a, b in zip(pairs, scores[:len(pairs)], scores[len(pairs):],
                                                                    strict=True)}
        evals = [r for r in read_records(self.out / "reward" / "metrics.jsonl") if "eval/accuracy" in r]
        return {"model": str(final), "heldout_pairs": len(pairs), "heldout_labels": len(judgements),
                "accuracy_vs_labels": _mean(prefers_second[j["pair"]] == j["choice"] for j in judgements),
                "accuracy_vs_ground_truth": _mean(prefers_second[j["pair"]] == j["true_choice"] for j in pairs),
                "eval_accuracy": evals[-1]["eval/accuracy"] if evals else None}

    # ------------------------------------------------------------------------------------------ 6. methods
    def _method_stage(self, method: str) -> Callable[[], dict[str, Any]]:
        if method not in self.recipes:
            raise PreftuneError(f"the demo has no recipe for method {method!r}", field="methods",
                                hint=f"methods: {', '.join(self.recipes)}")

        def stage() -> dict[str, Any]:
            return {"model": str(self.train_method(method))}
        return stage

    def method_keys(self, method: str) -> dict[str, Any]:
        """The `preftune train` keys of ``method``: those of its kind, then its own from the settings."""
        s, recipe = self.settings, self.recipes[method]
        sft = self.marker("sft")["model"]
        if recipe.online:  # RLHF proper: the policy is scored by the learned reward model, never the ground truth
            common = {"model": sft, "data": str(self.out / "data" / "preference_prompts.txt"),
                      "reward": self.marker("reward")["model"], "num_samples": s.rl_num_samples,
                      "batch_size": s.rl_batch_size, "max_steps": s.rl_steps, "max_new_tokens": s.max_new_tokens,
                      "max_length": s.max_length, "temperature": s.temperature, "kl_coef": s.rl_kl_coef,
                      "lr_scheduler": s.rl_lr_scheduler, "warmup_steps": _warmup(s.rl_steps, s.warmup_fraction),
                      "sample_every": s.rl_sample_every}
        else:
            prefs = self.out / "preferences"
            common = {"model": sft, "data": str(prefs / "train.jsonl"), "eval_data": str(prefs / "heldout.jsonl"),
                      "batch_size": s.pref_batch_size, "epochs": s.pref_epochs, "max_length": s.max_length,
                      "warmup_ratio": s.warmup_fraction, "ref_cache_dir": str(self.cache / "ref_logps")}
        return {**common, **recipe.keys(s)}

    def train_method(self, method: str) -> Path:
        recipe = self.recipes[method]
        return self._train(recipe.command, self.out / method, online=recipe.online, **self.method_keys(method))

    # ------------------------------------------------------------------------------------------ 7. evaluate
    def models(self) -> dict[str, str]:
        return {"sft": self.marker("sft")["model"], **{m: self.marker(m)["model"] for m in self.settings.methods}}

    def stage_evaluate(self) -> dict[str, Any]:
        from preftune.compare import compare_generations, compare_models, write_report
        from preftune.judges import FunctionJudge, RewardModelJudge

        s, out = self.settings, self.out / "eval"
        prompts = _read_lines(self.out / "data" / "eval_prompts.txt")
        files = {}
        for name, path in self.models().items():
            files[name] = out / f"{name}.jsonl"
            write_jsonl(files[name], self._generate(path, prompts, num=s.eval_completions, name=name,
                                                     seed=s.seed + s.eval_seed_offset,
                                                     temperature=s.eval_temperature))
        judges = {"ground_truth": FunctionJudge(GROUND_TRUTH),
                  "reward_model": RewardModelJudge(self.marker("reward")["model"])}
        # every pair of models under the ground truth (a Bradley-Terry ranking); its pairs with the SFT model
        # (the first file, so the baseline) are the comparisons against SFT; the reward model judges those only
        ranking = compare_models([files[n] for n in files], judges["ground_truth"], n_bootstrap=s.n_bootstrap,
                                 seed=s.seed, names=list(files))
        write_report(ranking, out / "ranking_ground_truth")
        against_sft = {"ground_truth": {p.candidate: p for p in ranking.pairs if p.baseline == "sft"},
                       "reward_model": {m: compare_generations(files["sft"], files[m], judges["reward_model"],
                                                               n_bootstrap=s.n_bootstrap, seed=s.seed,
                                                               baseline_name="sft", candidate_name=m)
                                        for m in s.methods}}
        results: dict[str, Any] = {}
        for judge_name, by_method in against_sft.items():
            for method in s.methods:
                res = by_method[method]
                write_report(res, out / f"{method}_vs_sft_{judge_name}")
                results.setdefault(method, {})[judge_name] = {
                    "wins": res.wins, "ties": res.ties, "losses": res.losses, "win_rate": res.win_rate,
                    "win_rate_ci": list(res.win_rate_ci) if res.win_rate_ci else None,
                    "length_controlled_win_rate": res.length_controlled.get("win_rate")}
        return {"results": results, "files": {k: str(v) for k, v in files.items()}}

    # ------------------------------------------------------------------------------------------ 8. report
    def stage_report(self) -> dict[str, Any]:
        from preftune.experiments.demo.report import write_demo_report

        paths = write_demo_report(self)
        return {"files": [str(p) for p in paths]}

    # ------------------------------------------------------------------------------------------ helpers
    def _generate(self, model_path: str | Path, prompts: list[str], *, num: int, name: str,
                  seed: int | None = None, temperature: float | None = None) -> list[dict[str, Any]]:
        from preftune.generate import GenerationSettings, generate_completions
        from preftune.models import load_policy, load_tokenizer

        s, key = self.settings, str(model_path)
        if key not in self._models:  # each model is loaded once per run (the SFT model serves two stages)
            tokenizer = load_tokenizer(key)
            self._models[key] = (load_policy(key, tokenizer=tokenizer), tokenizer)
        model, tokenizer = self._models[key]
        settings = GenerationSettings(temperature=s.temperature if temperature is None else temperature,
                                      top_k=s.top_k, max_new_tokens=s.max_new_tokens,
                                      min_new_tokens=s.min_new_tokens, seed=s.seed if seed is None else seed)
        return generate_completions(model, tokenizer, prompts, num=num, settings=settings,
                                    batch_size=s.generate_batch_size, model_name=name)


def _pairs_per_prompt(records: list[dict[str, Any]], k: int, *, seed: int) -> list[tuple[str, str, str]]:
    """``k`` distinct pairs (first, second) of each prompt's completions, drawn at random (seeded).

    Pairs of two equal completions, and pairs with an empty completion (the model ended at once: a
    preference dataset cannot hold empty text), are not drawn; the preferences stage counts the empty
    completions in its figures."""
    rng = random.Random(seed)
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    pairs = []
    for group in by_prompt.values():
        options = [(a, b) for i, a in enumerate(group) for b in group[i + 1:]
                   if a["completion"] != b["completion"] and a["completion"].strip() and b["completion"].strip()]
        for a, b in rng.sample(options, min(k, len(options))):
            pairs.append((a["prompt"], a["completion"], b["completion"]))
    return pairs


def _mean(values: Any) -> float:
    values = list(values)
    return sum(map(float, values)) / len(values) if values else float("nan")


def _label_stats(judgements: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, agreement of doubly-labelled pairs, and agreement of the labels with the ground truth."""
    from preftune.annotate.stats import cohen_kappa, percent_agreement

    by_pair: dict[int, list[str]] = {}
    for j in judgements:
        by_pair.setdefault(j["pair"], []).append("a" if j["choice"] == 0 else "b")
    doubles = [v for v in by_pair.values() if len(v) == 2]
    x, y = [d[0] for d in doubles], [d[1] for d in doubles]
    return {"pairs": len(by_pair), "labels": len(judgements), "doubly_labelled": len(doubles),
            "percent_agreement": percent_agreement(x, y) if doubles else None,
            "cohen_kappa": cohen_kappa(x, y) if doubles else None,
            "agreement_with_ground_truth": sum(j["choice"] == j["true_choice"] for j in judgements) / len(judgements)}


def _text_rows(blocks: list[str], chars: int) -> list[dict[str, str]]:
    """Consecutive blocks joined (blank line between) into rows of at most about ``chars`` characters."""
    rows, current = [], ""
    for block in blocks:
        if current and len(current) + len(block) > chars:
            rows.append({"text": current})
            current = ""
        current = f"{current}\n\n{block}" if current else block
    if current:
        rows.append({"text": current})
    return rows


def _warmup(steps: int, fraction: float) -> int:
    """Warm-up steps: ``fraction`` of ``steps``, rounded down, at least 1."""
    return max(1, int(round(steps * fraction, 6)))


def _hash(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _quiet_libraries() -> None:
    """No per-file progress bars and warnings from transformers and datasets between the demo's own lines."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
