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
6. dpo, orpo    preference-tuned policies (`train dpo` with loss dpo / orpo)
7. evaluate     A/B/C completions per held-out prefix from every model; `compare` against SFT under
                the ground-truth judge and under the learned reward model
8. report       report.md, report.html, summary.json
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.experiments.demo import corpus as corpus_mod
from preftune.experiments.demo.settings import RECIPE_VERSION, DemoSettings

GROUND_TRUTH = "preftune.experiments.demo.reward:shakespeare_reward"


def default_cache_dir() -> Path:
    root = os.environ.get("PREFTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "preftune"
    return Path(root)


class Demo:
    """One demo run in ``output`` with ``settings``; ``run()`` executes the stages not yet finished."""

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

    def _train(self, command: str, output: Path, **keys: Any) -> Path:
        from preftune.train import run

        base = {"output_dir": str(output), "seed": self.settings.seed, "report_to": "none", "log_every": 5}
        if command in ("sft", "reward", "dpo"):
            base["group_by_length"] = True  # less padding (offline methods only)
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
                    corpus.lines(line.work), line.index, n_lines=rng.randint(1, s.sft_max_lines)),
                "source": f"{line.work}:{line.index + 1}"} for line in lines[:s.sft_examples]]
        pref = [line.text for line in lines[s.sft_examples:s.sft_examples + s.pref_prompts]]
        val = [line.text for line in lines[s.sft_examples + s.pref_prompts:need]]
        data = self.out / "data"
        data.mkdir(parents=True, exist_ok=True)
        _write_jsonl(data / "sft.jsonl", sft)
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
        recipe = {k: v for k, v in s.to_dict().items() if k.startswith(("vocab", "hidden", "num_layers", "base_"))}
        key = _hash({"corpus": corpus_fp, "recipe": recipe, "seed": s.seed, "version": RECIPE_VERSION})
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
            heads = max(1, s.hidden_size // 32)
            model = build_tiny_model(tokenizer, hidden_size=s.hidden_size, num_layers=s.num_layers, seed=s.seed,
                                     num_heads=heads, num_kv_heads=heads, intermediate_size=s.hidden_size * 3,
                                     max_positions=512)
            model.save_pretrained(root / "init")
            tokenizer.save_pretrained(root / "init")
            rows = _text_rows(blocks, s.base_block_chars)
            _write_jsonl(root / "lm.jsonl", rows)
            self.log(f"base model: {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary "
                     f"{len(tokenizer)}, {len(rows)} rows of text")
            self._train("sft", root / "run", model=str(root / "init"), data=str(root / "lm.jsonl"),
                        learning_rate=s.base_learning_rate, batch_size=s.base_batch_size, max_steps=s.base_steps,
                        max_length=s.base_max_length, warmup_steps=max(1, s.base_steps // 20), weight_decay=0.1,
                        save_every=max(1, s.base_steps // 4), keep_checkpoints=1)
            shutil.rmtree(root / "run" / "checkpoints", ignore_errors=True)
        (self.out / "base").mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "run" / "metrics.jsonl", self.out / "base" / "metrics.jsonl")
        samples = self._generate(final, corpus_mod.heldout_prefixes()[:3], num=2, name="base")
        _write_jsonl(self.out / "base" / "samples.jsonl", samples)
        return {"model": str(final), "cached": cached}

    # ------------------------------------------------------------------------------------------ 3. sft
    def stage_sft(self) -> dict[str, Any]:
        s = self.settings
        final = self._train("sft", self.out / "sft", model=self.marker("base")["model"],
                            data=str(self.out / "data" / "sft.jsonl"), eval_fraction=0.05,
                            learning_rate=s.sft_learning_rate, batch_size=16, max_steps=s.sft_steps,
                            max_length=128, warmup_steps=max(1, s.sft_steps // 10))
        return {"model": str(final)}

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
        for split, file, seed in (("train", "preference_prompts", s.seed), ("heldout", "validation_prompts", s.seed + 1)):
            prompts = _read_lines(self.out / "data" / f"{file}.txt")
            records = self._generate(sft, prompts, num=s.completions_per_prompt, name="sft", seed=seed)
            _write_jsonl(out / f"{split}_completions.jsonl", records)
            pairs = _pairs_per_prompt(records, s.pairs_per_prompt, seed=seed)
            if split == "train":  # the same pairs for people to label in the browser
                _write_jsonl(out / "pairs.jsonl", [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in pairs])
            judgements = annotate_pairs(pairs, second_opinion=s.second_opinion, seed=seed)
            for j in judgements:
                j["true_choice"] = int(shakespeare_reward(j["prompt"], j["second"]) >
                                       shakespeare_reward(j["prompt"], j["first"]))
            _write_jsonl(out / f"{split}_judgements.jsonl", judgements)
            _write_jsonl(out / f"{split}.jsonl", preference_rows(judgements))
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
                            max_steps=s.reward_steps, max_length=128, warmup_steps=max(1, s.reward_steps // 10))
        # accuracy on the held-out pairs: against the annotators' labels and against the ground truth
        judgements = _read_jsonl(prefs / "heldout_judgements.jsonl")
        pairs = list({j["pair"]: j for j in judgements}.values())
        tokenizer = load_tokenizer(str(final))
        model = load_reward_model(str(final), tokenizer=tokenizer)
        scores = score_texts(model, tokenizer, [j["prompt"] for j in pairs] * 2,
                             [j["first"] for j in pairs] + [j["second"] for j in pairs])
        prefers_second = {j["pair"]: int(b > a) for j, a, b in zip(pairs, scores[:len(pairs)], scores[len(pairs):],
                                                                    strict=True)}
        evals = [r for r in _read_jsonl(self.out / "reward" / "metrics.jsonl") if "eval/accuracy" in r]
        return {"model": str(final), "heldout_pairs": len(pairs), "heldout_labels": len(judgements),
                "accuracy_vs_labels": _mean(prefers_second[j["pair"]] == j["choice"] for j in judgements),
                "accuracy_vs_ground_truth": _mean(prefers_second[j["pair"]] == j["true_choice"] for j in pairs),
                "eval_accuracy": evals[-1]["eval/accuracy"] if evals else None}

    # ------------------------------------------------------------------------------------------ 6. methods
    def _method_stage(self, method: str) -> Callable[[], dict[str, Any]]:
        def stage() -> dict[str, Any]:
            return {"model": str(self.train_method(method))}
        return stage

    def train_method(self, method: str) -> Path:
        s, prefs = self.settings, self.out / "preferences"
        common = {"model": self.marker("sft")["model"], "data": str(prefs / "train.jsonl"),
                  "eval_data": str(prefs / "heldout.jsonl"), "batch_size": s.pref_batch_size,
                  "epochs": s.pref_epochs, "max_length": 128, "warmup_ratio": 0.1,
                  "ref_cache_dir": str(self.cache / "ref_logps")}
        if method == "dpo":
            return self._train("dpo", self.out / "dpo", loss="dpo", beta=s.dpo_beta,
                               learning_rate=s.dpo_learning_rate, **common)
        if method == "orpo":
            return self._train("dpo", self.out / "orpo", loss="orpo", beta=s.orpo_beta,
                               learning_rate=s.orpo_learning_rate, **common)
        if method in ("ppo", "rloo"):
            # RLHF proper: the policy is scored by the learned reward model, never by the ground truth
            online = {"model": self.marker("sft")["model"], "data": str(self.out / "data" / "preference_prompts.txt"),
                      "reward": self.marker("reward")["model"], "num_samples": s.rl_num_samples,
                      "batch_size": s.rl_batch_size, "max_steps": s.rl_steps, "max_new_tokens": s.max_new_tokens,
                      "max_length": 128, "temperature": s.temperature, "kl_coef": s.rl_kl_coef,
                      "lr_scheduler": "constant", "warmup_steps": max(1, s.rl_steps // 10), "sample_every": 10,
                      "learning_rate": s.ppo_learning_rate if method == "ppo" else s.rloo_learning_rate}
            if method == "ppo":
                online.update(update_epochs=2, num_mini_batches=2)
            return self._train(method, self.out / method, **online)
        raise PreftuneError(f"the demo has no recipe for method {method!r}", field="methods")

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
            _write_jsonl(files[name], self._generate(path, prompts, num=s.eval_completions, name=name,
                                                     seed=s.seed + 1000, temperature=s.eval_temperature))
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


def _hash(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _quiet_libraries() -> None:
    """No per-file progress bars and warnings from transformers and datasets between the demo's own lines."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
