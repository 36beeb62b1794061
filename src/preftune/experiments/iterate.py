"""``preftune iterate``: rounds of sample -> label -> train from the newest model -> evaluate against SFT.

The course's "steps 2-5 can be repeated with the new model", as iterative DPO (Xiong et al. 2024,
"Iterative Preference Learning from Human Feedback"; Dong et al. 2024, "RLHF Workflow"): offline DPO
learns from pairs of someone else's completions, while here every round's pairs are completions of the
model being trained. Round r = 1..N, in ``OUTPUT_DIR/round_r/`` (model 0 is the SFT model ``model``):

1. generate  ``samples_per_prompt`` (K) completions per prompt of the round with model r-1
             -> ``completions.jsonl`` (+ ``.txt``); rows seeded by (seed, r, prompt, completion);
2. label     the judge makes preference pairs of them (``iterate_label``: best vs worst by score, a round
             robin of pairwise verdicts for an LLM judge, or people in ``annotations.db``) -> ``pairs.jsonl``;
3. reward    (``method: reward_then_ppo | reward_then_rloo``) a reward model on those pairs -> ``reward/``;
4. train     from model r-1: DPO on the pairs, or PPO / RLOO on the round's prompts against that reward
             model -> ``train/final`` = model r; an interrupted run resumes from its checkpoints;
5. evaluate  model r against SFT on ``eval_prompts``: ``eval_samples`` completions each (the same seeds as
             SFT's), win / tie / loss under ``eval_judge`` with the win rate's prompt-clustered bootstrap
             interval (``compare.compare_generations``), the sequence KL to SFT and, with ``eval_reward``,
             the mean reward (``train.rollout.evaluate_policy``).

Each step writes ``round_r/stages/<step>.json`` when it is done (its figures and seconds); a rerun skips
finished steps, so an interrupted run goes on where it stopped, and a larger ``rounds`` adds rounds. The
keys are recorded in ``OUTPUT_DIR/iterate.json``; a rerun with other keys (``rounds`` aside) is refused
with the differing keys. With ``judge: human`` the label step loads the pairs into the round's store, prints
the ``preftune annotate serve`` command and stops; the same command continues once they are labelled.

Outputs: ``OUTPUT_DIR/rounds.json`` (the keys, SFT's figures and one record per round) and
``rounds.png`` (``plots.rounds_plot``). The reference of DPO and of the KL penalty is the SFT model by
default (``reference: initial``), as in the two papers' KL-regularised objective: every round then
optimises the same objective, ``max E[r] - beta KL(pi || pi_SFT)``, whose optimum does not move from round
to round; with ``reference: previous`` (model r-1, a per-round trust region) each round's KL is measured
from where the last one ended, so the distance from SFT can add up over the rounds.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.config import Config, check_fields, fail, opt, require, to_dict
from preftune.errors import PreftuneError
from preftune.experiments.iterate_label import HUMAN, NO_JUDGE, LabelsNeeded, check_judge_spec, judge_label

# method -> (the reward-model command or None, the policy's training command)
METHODS = {"dpo": (None, "dpo"), "reward_then_ppo": ("reward", "ppo"), "reward_then_rloo": ("reward", "rloo")}
SET_HERE = ("model", "data", "output_dir", "ref_model", "reward")  # keys every round's training gets from iterate
IN_MEMORY = ("prompts", "eval_prompts", "judge", "eval_judge", "eval_reward")
MAY_CHANGE = ("rounds", "output_dir")  # a rerun may change these; any other key is refused once a step is done


@dataclass
class IterateConfig(Config):
    """`preftune iterate`: rounds of sampling from the newest model, labelling, training from it, and a
    comparison with SFT (iterative DPO)."""

    @classmethod
    def label(cls) -> str:
        return "iterate"

    model: str = opt("", "the SFT model: round 1 samples and trains from it; every round is compared with it "
                     "(required)")
    prompts: str = opt("", "the prompts rounds sample from: a text file (one per line) or JSONL with prompt "
                       "(required)")
    prompts_per_round: int | None = opt(None, "prompts per round: round r takes the r-th slice of this many "
                                        "(wrapping around); null = every prompt in every round", ge=1)
    rounds: int = opt(3, "rounds N; a rerun with a larger N goes on after the last finished round", ge=1)
    samples_per_prompt: int = opt(4, "completions K per prompt from model r-1 (with judge: human, 2 = one pair "
                                  "per prompt)", ge=2,
                                  why="a preference pair needs two completions")
    judge: str = opt("", "who labels them: a reward-model directory, module:function or file.py:function (best "
                     "vs worst by score), llm:PATH (an LLM judge, both orders), or human (the annotation app) "
                     "(required)")
    method: str = opt("dpo", "dpo = DPO from model r-1 on the round's pairs; reward_then_ppo / reward_then_rloo "
                      "= a reward model on them, then PPO / RLOO from model r-1", choices=tuple(METHODS))
    train: dict[str, Any] = opt({}, "keys of `train dpo` (or ppo / rloo) for each round (beta, learning_rate, "
                                "epochs, batch_size, save_every, ...)")
    reward_train: dict[str, Any] = opt({}, "reward_then_*: keys of `train reward` (model: default `model`)")
    reference: str = opt("initial", "reference of DPO and of the KL: initial = the SFT model; previous = model "
                         "r-1", choices=("initial", "previous"))
    eval_prompts: str = opt("", "held-out prompts on which each round's model is compared with SFT (required)")
    eval_judge: str | None = opt(None, "judge of the win rate against SFT (as judge, not human; none = no win "
                                 "rate); null = the judge (with judge: human, eval_reward)")
    eval_reward: str | None = opt(None, "a ground-truth reward (module:function, file.py:function or reward "
                                  "model) for a mean-reward column; null = none")
    eval_samples: int = opt(4, "completions per eval prompt from SFT and from each round's model", ge=1)
    max_new_tokens: int = opt(64, "completion length in tokens (sampling, online training, evaluation)", ge=1)
    min_new_tokens: int = opt(0, "completions of the rounds and of the evaluation have at least this many tokens "
                              "(EOS is held back until then); 0 = none. Empty completions are never paired", ge=0)
    max_length: int = opt(512, "prompt + completion tokens at most (training's default; the KL's prompts are "
                          "cut from the left)", ge=2)
    temperature: float = opt(1.0, "sampling temperature of the rounds' and the evaluation's completions", gt=0)
    template: str = opt("raw", "prompt template: raw, chat, tldr or a format string containing {prompt}")
    generation_batch_size: int = opt(32, "completions per generate call", ge=1)
    seed: int = opt(0, "seed of the samples (round r: (seed, r)), the evaluation and its bootstrap", ge=0)
    output_dir: str = opt("runs/iterate", "round_R/ per round, iterate.json, rounds.json, rounds.png")

    def validate(self) -> None:
        from preftune.data.prompts import check_template

        check_fields(self)
        require(self, "model", bool(self.model), "is required")
        require(self, "output_dir", bool(self.output_dir), "is required")
        require(self, "max_new_tokens", self.max_new_tokens < self.max_length, "must be < max_length")
        require(self, "template", check_template(self.template), "must be raw, chat, tldr or contain {prompt}")
        for key, allowed in (("train", ()), ("reward_train", ("model",))):
            taken = [k for k in getattr(self, key) if k in SET_HERE and k not in allowed]
            if taken:
                fail(self, key, f"sets {', '.join(taken)}, which iterate sets for every round",
                     "each round trains from model r-1 on its own data into round_r/; `reference` picks the "
                     "reference model")
        if self.reward_train and METHODS[self.method][0] is None:
            fail(self, "reward_train", f"is used by method reward_then_ppo / reward_then_rloo, not {self.method}")
        for key, human in (("judge", True), ("eval_judge", False), ("eval_reward", False)):
            value = getattr(self, key)
            if value and value != NO_JUDGE:
                try:
                    check_judge_spec(value, field=key, human=human)
                except PreftuneError as exc:
                    fail(self, key, exc.message, exc.hint)
        if self.eval_reward is not None and (self.eval_reward == NO_JUDGE or self.eval_reward.startswith("llm:")):
            fail(self, "eval_reward", "is a reward (module:function, file.py:function or a reward model), or null "
                 "for none")
        if self.judge == HUMAN and self.eval_judge is None and self.eval_reward is None:
            fail(self, "eval_judge", "is needed with judge: human (people label the training pairs only)",
                 "give a reward model, module:function or llm:PATH, or eval_reward, or none (no win rate)")

    def preflight(self) -> None:
        """The model and every judge or reward the keys name exist (a model directory, a function that
        imports), said before anything loads."""
        from preftune.models.load import model_source
        from preftune.models.rewards import is_function_spec, load_function

        for key in ("model", "judge", "eval_judge", "eval_reward"):
            value = getattr(self, key)
            if not value or value in (HUMAN, NO_JUDGE):
                continue
            kind, sep, target = value.partition(":")
            try:
                if key == "model" or kind in ("llm", "reward"):
                    model_source(value if key == "model" else target, field=key)
                elif kind == "function" or is_function_spec(value):
                    load_function(target if kind == "function" else value, field=key)
                else:
                    model_source(value, field=key)
            except PreftuneError as exc:
                fail(self, key, exc.message, exc.hint)


class _Waiting(Exception):
    def __init__(self, needed: LabelsNeeded) -> None:
        super().__init__(needed.message())
        self.needed = needed


# ------------------------------------------------------------------------------------------------ the loop


def iterate(config: IterateConfig | dict[str, Any] | str | Path, *, log: Callable[[str], None] = print,
            **in_memory: Any) -> dict[str, Any]:
    """Run the rounds not yet finished (see the module docstring); returns what ``rounds.json`` holds:
    ``config``, ``sft`` (its figures on the eval prompts), ``rounds`` (one record per finished round) and
    ``waiting`` (None, or where people have pairs left to label). Keyword arguments override keys; the
    ``prompts`` and ``eval_prompts`` may be lists, ``judge``, ``eval_judge`` a ``judges.Judge`` or a function
    ``(prompt, completion) -> float``, ``eval_reward`` such a function."""
    config, given = _resolve(config, in_memory)
    config.preflight()
    out = Path(config.output_dir)
    run = _Run(config, given, out, log)
    run.check_train_keys()
    keys = _record_keys(config, given)
    _claim(out, keys)
    result: dict[str, Any] = {"config": keys, "sft": run.stage(out, "sft", "sft", run.sft_eval), "rounds": [],
                              "waiting": None}
    try:
        for r in range(1, config.rounds + 1):
            result["rounds"].append(run.round(r))
    except _Waiting as wait:
        log(wait.needed.message())
        result["waiting"] = wait.needed.to_dict()
    (out / "rounds.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if result["rounds"]:
        from preftune.plots import rounds_plot

        rounds_plot(result["rounds"], out / "rounds.png", sft_reward=result["sft"].get("reward"),
                    title=f"rounds from {Path(config.model).name or config.model}")
        log(f"wrote {out / 'rounds.json'} and {out / 'rounds.png'}")
    return result


def _resolve(config: Any, in_memory: dict[str, Any]) -> tuple[IterateConfig, dict[str, Any]]:
    """The validated config and what was given in memory (lists of prompts, judges, functions)."""
    from preftune.config import from_mapping, load_config

    given = {k: in_memory.pop(k) for k in IN_MEMORY if k in in_memory and not isinstance(in_memory[k], (str, type(None)))}
    if isinstance(config, (str, Path)):
        config = load_config(IterateConfig, config)
    if isinstance(config, dict):
        config = from_mapping(IterateConfig, config)
    if in_memory:
        config = from_mapping(IterateConfig, {**to_dict(config), **in_memory})
    for key in ("prompts", "eval_prompts", "judge"):
        if key not in given and not getattr(config, key):
            raise PreftuneError("is required (or pass it to iterate() in memory)", field=key)
    return config, given


def _record_keys(config: IterateConfig, given: dict[str, Any]) -> dict[str, Any]:
    keys = to_dict(config)
    for key, value in given.items():
        if isinstance(value, (list, tuple)):
            digest = hashlib.sha256(json.dumps(list(value), sort_keys=True).encode()).hexdigest()[:12]
            keys[key] = f"<in memory: {len(value)} prompts, sha256 {digest}>"
        else:
            keys[key] = judge_label(value)
    return json.loads(json.dumps(keys, default=str))


def _claim(out: Path, keys: dict[str, Any]) -> None:
    """Record the keys in iterate.json; refuse other keys once any step has finished."""
    from preftune.train.rundir import config_differences

    path = out / "iterate.json"
    done = list(out.glob("stages/*.json")) + list(out.glob("round_*/stages/*.json"))
    if path.is_file() and done:
        differences = config_differences(json.loads(path.read_text(encoding="utf-8"))["keys"], keys, set(MAY_CHANGE))
        if differences:
            raise PreftuneError(f"{out} holds rounds run with other keys: {'; '.join(differences)}", path=str(path),
                                hint="rerun with the keys it was started with (only rounds may change), or use a "
                                     "new output_dir")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"keys": keys}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class _Run:
    """The state of one ``iterate`` call: prompts, judges and models, each loaded when first needed."""

    def __init__(self, config: IterateConfig, given: dict[str, Any], out: Path, log: Callable[[str], None]) -> None:
        from preftune.data.prompts import load_prompts

        self.config, self.given, self.out, self.log = config, given, out, log
        self.prompts = list(given.get("prompts") or load_prompts(config.prompts))
        self.eval_prompts = list(given.get("eval_prompts") or load_prompts(config.eval_prompts))
        self._judges: dict[str, Any] = {}
        self._models: dict[str, tuple[Any, Any]] = {}
        self.dtype = config.train.get("dtype", "auto")

    # ------------------------------------------------------------------------------------------ stages
    def stage(self, directory: Path, name: str, label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn`` unless its marker ``directory/stages/name.json`` exists; write the marker after it."""
        marker = directory / "stages" / f"{name}.json"
        if marker.is_file():
            info = json.loads(marker.read_text(encoding="utf-8"))
            self.log(f"{label}: done in an earlier run: {info.get('summary', '')} ({info['seconds']:.1f} s)")
            return info
        self.log(f"{label} ...")
        started = time.perf_counter()
        info = fn()
        info["seconds"] = time.perf_counter() - started
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(marker)
        self.log(f"{label}: {info.get('summary', 'done')} ({info['seconds']:.1f} s)")
        return info

    def round(self, r: int) -> dict[str, Any]:
        """Round ``r``'s steps (each skipped when done); its record."""
        c, rdir = self.config, self.out / f"round_{r}"
        start = c.model if r == 1 else str(self.out / f"round_{r - 1}" / "train" / "final")
        label = f"round {r}/{c.rounds}"
        steps = {"generate": self.stage(rdir, "generate", f"{label} generate", lambda: self.generate(r, start))}
        steps["label"] = self.stage(rdir, "label", f"{label} label", lambda: self.label(r))
        reward_command, _ = METHODS[c.method]
        if reward_command:
            steps["reward"] = self.stage(rdir, "reward", f"{label} reward", lambda: self.train_reward(r))
        steps["train"] = self.stage(rdir, "train", f"{label} train", lambda: self.train(r, start))
        steps["evaluate"] = self.stage(rdir, "evaluate", f"{label} evaluate", lambda: self.evaluate(r))
        ev = steps["evaluate"]
        record = {"round": r, "model": steps["train"]["model"], "start_model": start,
                  "pairs": steps["label"]["pairs"], **{k: ev[k] for k in ("wins", "ties", "losses", "win_rate",
                                                                          "win_rate_ci", "kl", "kl_se", "length")}}
        if "reward" in ev:
            record.update(reward=ev["reward"], reward_se=ev["reward_se"])
        record["seconds"] = sum(s["seconds"] for s in steps.values())
        return record

    def round_prompts(self, r: int) -> list[Any]:
        n, size = len(self.prompts), self.config.prompts_per_round
        if size is None:
            return self.prompts
        return [self.prompts[((r - 1) * size + i) % n] for i in range(size)]

    def generate(self, r: int, start: str) -> dict[str, Any]:
        from preftune.generate import write_generations
        from preftune.models.sampling import row_seed

        c, prompts = self.config, self.round_prompts(r)
        seed = row_seed(c.seed, r) & 0xFFFFFFFF
        records = self.sample(start, prompts, num=c.samples_per_prompt, seed=seed, name=f"model_{r - 1}")
        path, _ = write_generations(records, self.out / f"round_{r}" / "completions.jsonl")
        self.release()
        wrapped = c.prompts_per_round is not None and r * c.prompts_per_round > len(self.prompts)
        return {"completions": len(records), "prompts": len(prompts), "seed": seed, "model": start,
                "summary": f"{len(records)} completions ({len(prompts)} prompts x {c.samples_per_prompt}) from "
                           f"{start} -> {path}" + (" (the prompts file ran out: prompts reused)" if wrapped else "")}

    def label(self, r: int) -> dict[str, Any]:
        from preftune.data.jsonl import read_records, write_jsonl
        from preftune.experiments.iterate_label import Labelled, human_labels, label_completions

        rdir = self.out / f"round_{r}"
        if self.config.judge == HUMAN and "judge" not in self.given:
            labelled = human_labels(rdir / "completions.jsonl", rdir / "annotations.db", r, self.log)
            if not isinstance(labelled, Labelled):
                raise _Waiting(labelled)
        else:
            labelled = label_completions(read_records(rdir / "completions.jsonl"), self.judge("judge"))
        if not labelled.rows:
            raise PreftuneError(f"round {r}: the judge made no preference pair ({_counts(labelled.counts)})",
                                field="judge", hint="raise samples_per_prompt, max_new_tokens or temperature")
        path = write_jsonl(rdir / "pairs.jsonl", labelled.rows)
        dropped = _counts(labelled.counts)
        return {**labelled.counts, "summary": f"{len(labelled.rows)} pairs from {labelled.counts['prompts']} prompts "
                                              f"-> {path}" + (f"; left out: {dropped}" if dropped else "")}

    def train_keys(self, r: int, start: str) -> tuple[str | None, dict[str, Any] | None, str, dict[str, Any]]:
        """Round ``r``'s training: (reward command, its keys) (None, None for DPO) and (command, its keys)."""
        c, rdir = self.config, self.out / f"round_{r}"
        reward_command, command = METHODS[c.method]
        reference = c.model if c.reference == "initial" and r > 1 else None  # None: the starting model itself
        fixed = {"model": start, "output_dir": str(rdir / "train"), "ref_model": reference}
        if reward_command is None:
            return None, None, command, {"max_length": c.max_length, "ref_cache_dir": str(self.out / "ref_cache"),
                                         **c.train, **fixed, "data": str(rdir / "pairs.jsonl")}
        reward_keys = {"model": c.model, "max_length": c.max_length, **c.reward_train,
                       "data": str(rdir / "pairs.jsonl"), "output_dir": str(rdir / "reward")}
        return reward_command, reward_keys, command, {
            "max_length": c.max_length, "max_new_tokens": c.max_new_tokens, "temperature": c.temperature,
            "template": c.template, **c.train, **fixed, "reward": str(rdir / "reward" / "final")}

    def check_train_keys(self) -> None:
        """Resolve round 1's training configs before anything runs: a wrong key in ``train`` or ``reward_train``
        is reported now, not after the sampling and the labelling."""
        from preftune.train import resolve_config

        reward_command, reward_keys, command, keys = self.train_keys(1, self.config.model)
        for key, cmd, values in (("reward_train", reward_command, reward_keys), ("train", command, keys)):
            if cmd is None:
                continue
            try:
                resolve_config(cmd, values)
            except PreftuneError as exc:
                raise PreftuneError(exc.message, field=f"{key}.{exc.field}" if exc.field else key,
                                    hint=exc.hint) from None

    def train_reward(self, r: int) -> dict[str, Any]:
        from preftune.train import run

        command, keys, _, _ = self.train_keys(r, "")
        final = run(command, keys)
        return {"model": str(final), "summary": f"`train {command}` on the round's pairs -> {final}"}

    def train(self, r: int, start: str) -> dict[str, Any]:
        from preftune.train import METHODS as TRAINERS
        from preftune.train import run

        reward_command, _, command, keys = self.train_keys(r, start)
        method = None if reward_command is None else TRAINERS[command].method(prompts=self.round_prompts(r))
        final = run(command, keys, method=method)
        return {"model": str(final), "command": command, "reference": keys["ref_model"] or start,
                "summary": f"`train {command}` from {start} -> {final}"}

    def sft_eval(self) -> dict[str, Any]:
        """SFT's completions of the eval prompts (every round is compared with them) and, with eval_reward,
        its mean reward."""
        from preftune.generate import write_generations

        c = self.config
        records = self.sample(c.model, self.eval_prompts, num=c.eval_samples, seed=c.seed, name="sft")
        write_generations(records, self.out / "eval_sft.jsonl")
        info: dict[str, Any] = {"completions": len(records)}
        if self.reward_spec() is not None:
            measured = self.measure(c.model)
            info.update(reward=measured["reward"], reward_se=measured["reward_se"])
        return {**info, "summary": f"{len(records)} completions of the eval prompts"
                + (f"; mean reward {info['reward']:.4f}" if "reward" in info else "")}

    def evaluate(self, r: int) -> dict[str, Any]:
        from preftune.compare import compare_generations
        from preftune.data.jsonl import read_records
        from preftune.generate import write_generations

        c, rdir = self.config, self.out / f"round_{r}"
        model = str(rdir / "train" / "final")
        records = self.sample(model, self.eval_prompts, num=c.eval_samples, seed=c.seed, name=f"round_{r}")
        write_generations(records, rdir / "eval_completions.jsonl")
        info: dict[str, Any] = dict.fromkeys(("wins", "ties", "losses", "win_rate", "win_rate_ci"))
        judge = self.judge("eval_judge")
        if judge is not None:
            res = compare_generations(read_records(self.out / "eval_sft.jsonl"), records, judge, seed=c.seed,
                                      baseline_name="sft", candidate_name=f"round_{r}")
            (rdir / "comparison.json").write_text(json.dumps(res.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
            info.update(wins=res.wins, ties=res.ties, losses=res.losses, win_rate=res.win_rate,
                        win_rate_ci=list(res.win_rate_ci) if res.win_rate_ci else None)
        info.update(self.measure(model))
        self.release()
        win = ("no win rate" if judge is None else f"W {info['wins']} / T {info['ties']} / L {info['losses']}, "
               f"win rate {info['win_rate']:.3f}")
        return {**info, "summary": f"against SFT: {win}; KL {info['kl']:.3f}"
                + (f"; reward {info['reward']:.4f}" if "reward" in info else "")}

    # ------------------------------------------------------------------------------------------ helpers
    def judge(self, key: str) -> Any:
        """The judge of ``key`` (``judge`` or ``eval_judge``), built once; None for ``eval_judge: none``."""
        from preftune.experiments.iterate_label import make_judge

        if key not in self._judges:
            spec = self.given.get(key, getattr(self.config, key))
            if key == "eval_judge" and spec is None:  # the training judge; with people, the eval reward
                if self.given.get("judge", self.config.judge) != HUMAN:
                    return self.judge("judge")
                spec = self.reward_spec()
            self._judges[key] = None if spec in (None, NO_JUDGE) else make_judge(
                spec, field=key, batch_size=self.config.generation_batch_size)
        return self._judges[key]

    def reward_spec(self) -> Any:
        """eval_reward as ``models.rewards.load_scorer`` reads it (a ``reward:`` / ``function:`` prefix dropped)."""
        spec = self.given.get("eval_reward", self.config.eval_reward)
        kind, sep, target = spec.partition(":") if isinstance(spec, str) else ("", "", "")
        return target if sep and kind in ("reward", "function") else spec

    def model(self, path: str) -> tuple[Any, Any]:
        from preftune.models import load_policy, load_tokenizer
        from preftune.models.load import default_device

        if path not in self._models:
            tokenizer = load_tokenizer(path)
            model = load_policy(path, dtype=self.dtype, tokenizer=tokenizer).to(default_device())
            self._models[path] = (model.eval(), tokenizer)
        return self._models[path]

    def release(self) -> None:
        """Keep only the SFT model loaded (it serves every evaluation)."""
        for path in [p for p in self._models if p != self.config.model]:
            del self._models[path]

    def sample(self, path: str, prompts: list[Any], *, num: int, seed: int, name: str) -> list[dict[str, Any]]:
        from preftune.generate import GenerationSettings, generate_completions

        c = self.config
        model, tokenizer = self.model(path)
        settings = GenerationSettings(temperature=c.temperature, max_new_tokens=c.max_new_tokens,
                                      min_new_tokens=c.min_new_tokens, seed=seed, template=c.template)
        return generate_completions(model, tokenizer, prompts, num=num, settings=settings,
                                    batch_size=c.generation_batch_size, model_name=name)

    def measure(self, path: str) -> dict[str, float]:
        """KL(model || SFT) and (with eval_reward) the mean reward of eval_samples samples per eval prompt."""
        from preftune.models.rewards import load_scorer
        from preftune.train.rollout import evaluate_policy

        c = self.config
        spec = self.reward_spec()
        scorer = load_scorer(spec, field="eval_reward") if spec is not None else (
            lambda prompts, completions: [0.0] * len(completions))
        (policy, _), (sft, tokenizer) = self.model(path), self.model(c.model)
        measured = evaluate_policy(policy, sft, tokenizer, self.eval_prompts, scorer, num_samples=c.eval_samples,
                                   max_new_tokens=c.max_new_tokens, temperature=c.temperature, template=c.template,
                                   max_length=c.max_length, seed=c.seed, batch_size=c.generation_batch_size)
        keep = ("kl", "kl_se", "length") + (("reward", "reward_se") if spec is not None else ())
        return {k: measured[k] for k in keep}


def _counts(counts: dict[str, int]) -> str:
    """What was left out, in words: ``prompts undecided 2, empty completions 1``."""
    shown = ("empty_completions", "prompts_under_two_completions", "prompts_undecided", "pairs_only_skipped",
             "pairs_tied_or_empty")
    return ", ".join(f"{k.replace('_', ' ')} {counts[k]}" for k in shown if counts.get(k))
