"""`preftune demo --scenario rounds`: does DPO gain from learning on the policy's own samples, and what
happens to RLHF when the reward model it climbs is not perfect? (The course's "steps 2-5 can be repeated
with the new model"; docs/rounds.md tells the story. The course's quiz on an imperfect reward model is
``preftune experiment overoptimization`` on the default scenario's outputs, docs/rlhf.md.)

The default scenario's pipeline (``pipeline.Demo``) with other stages after the reward model; every
arrow is one of preftune's own commands or functions, run the way a user would run them:

1. corpus           the default scenario's prefixes and SFT data
2. base             the default scenario's base model (cached in ``$PREFTUNE_CACHE/demo-base/HASH``)
3. sft              the default scenario's SFT model, cached in ``$PREFTUNE_CACHE/demo-sft/HASH``
4. preferences      K completions per prefix from SFT, pairs labelled by the simulated annotators
5. reward           `train reward` on those labels: the learned (imperfect) reward model
6. dpo              offline DPO on the annotators' labels (`train dpo`)
7. online_dpo       `train online-dpo`: every step samples K completions per prefix from the current
                    policy, the reward model picks best and worst, a DPO step on those pairs
8. iterative_dpo    `preftune iterate`: rounds of (sample with model r - 1, label with the reward model,
                    DPO from model r - 1), each round evaluated against SFT under the ground truth
9. grpo, rloo, ppo  online RL against the same reward model (`train grpo | rloo | ppo`)
10. evaluate        A/B/C completions per held-out prefix from every model; `compare` against SFT under the
                    ground truth and under the reward model (as the default scenario)
11. frontier        ground-truth reward and KL to SFT of every model (and of each round) on held-out prefixes
12. report          report.md, report.html, summary.json (``rounds_report.py``)

The ground truth (``demo.reward.shakespeare_reward``) is never seen in training: the annotators' labels
and the reward model learned from them are all the methods get.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from preftune.data.jsonl import write_jsonl
from preftune.errors import PreftuneError
from preftune.experiments.demo.pipeline import GROUND_TRUTH, METHODS, Demo, MethodRecipe, _read_lines, _warmup
from preftune.experiments.demo.rounds_report import FRONTIER_METHOD
from preftune.experiments.demo.settings import RoundsSettings

# Every method the scenario can train as one `preftune train` run (iterative_dpo is its own stage).
RECIPES: dict[str, MethodRecipe] = {
    "dpo": METHODS["dpo"],
    "online_dpo": MethodRecipe("online-dpo", online=True, fixed={"loss": "dpo"},
                               settings={"beta": "online_dpo_beta", "learning_rate": "online_dpo_learning_rate",
                                         "num_samples": "online_dpo_num_samples", "max_steps": "online_dpo_steps"}),
    "grpo": MethodRecipe("grpo", online=True, settings={"learning_rate": "grpo_learning_rate",
                                                        "kl_coef": "grpo_kl_coef"}),
    "rloo": METHODS["rloo"],
    "ppo": METHODS["ppo"],
}

class RoundsDemo(Demo):
    """One run of the rounds scenario in ``output``; ``run()`` executes the stages not yet finished."""

    recipes = RECIPES

    def __init__(self, output: str | Path, settings: RoundsSettings, *, cache_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        known = (*RECIPES, "iterative_dpo")
        for method in settings.methods:
            if method not in known:
                raise PreftuneError(f"the rounds scenario has no recipe for method {method!r}", field="methods",
                                    hint=f"methods: {', '.join(known)}")
        super().__init__(output, settings, cache_dir=cache_dir, log=log)
        self.settings: RoundsSettings = settings
        self.stages = [
            ("corpus", self.stage_corpus), ("base", self.stage_base), ("sft", self.stage_sft_cached),
            ("preferences", self.stage_preferences), ("reward", self.stage_reward),
            *((m, self._method_stage(m)) for m in settings.methods),
            ("evaluate", self.stage_evaluate),
            ("frontier", self.stage_frontier), ("report", self.stage_report),
        ]

    def _method_stage(self, method: str) -> Callable[[], dict[str, Any]]:
        return self.stage_iterative if method == "iterative_dpo" else super()._method_stage(method)

    def method_keys(self, method: str) -> dict[str, Any]:
        keys = super().method_keys(method)
        if method == "online_dpo":  # its KL is DPO's (beta, against the reference), not a shaped reward
            keys.pop("kl_coef", None)
            keys["warmup_steps"] = _warmup(self.settings.online_dpo_steps, self.settings.warmup_fraction)
        return keys

    # ------------------------------------------------------------------------------------------ 8. iterative DPO
    def stage_iterative(self) -> dict[str, Any]:
        from preftune.experiments.iterate import iterate

        s, data = self.settings, self.out / "data"
        prompts = _read_lines(data / "preference_prompts.txt")
        if s.rounds * s.round_prompts > len(prompts):
            raise PreftuneError(f"rounds x round_prompts = {s.rounds * s.round_prompts} prefixes, the preference "
                                f"prefixes are {len(prompts)}", field="round_prompts")
        eval_prompts = _read_lines(data / "eval_prompts.txt")[:s.round_eval_prompts]
        (data / "round_eval_prompts.txt").write_text("\n".join(eval_prompts) + "\n", encoding="utf-8")
        result = iterate({
            "model": self.marker("sft")["model"], "prompts": str(data / "preference_prompts.txt"),
            "rounds": s.rounds, "prompts_per_round": s.round_prompts, "samples_per_prompt": s.round_samples,
            "judge": self.marker("reward")["model"], "method": "dpo",
            "train": {"beta": s.dpo_beta, "learning_rate": s.dpo_learning_rate, "epochs": s.round_epochs,
                      "batch_size": s.pref_batch_size, "max_length": s.max_length, "warmup_ratio": s.warmup_fraction,
                      "seed": s.seed, "report_to": "none", "log_every": s.log_every,
                      "ref_cache_dir": str(self.cache / "ref_logps")},
            "eval_prompts": str(data / "round_eval_prompts.txt"), "eval_judge": GROUND_TRUTH,
            "eval_reward": GROUND_TRUTH, "eval_samples": s.frontier_samples, "max_new_tokens": s.max_new_tokens,
            "min_new_tokens": s.min_new_tokens,
            "max_length": s.max_length, "generation_batch_size": s.generate_batch_size, "temperature": s.temperature,
            "seed": s.seed, "output_dir": str(self.out / "iterative_dpo")},
            log=lambda message: self.log(f"  {message}"))
        rounds = result["rounds"]
        return {"model": rounds[-1]["model"], "rounds": rounds}

    # ------------------------------------------------------------------------------------------ 11. frontier
    def frontier_models(self) -> dict[str, str]:
        """Every model measured on the frontier: SFT, each method's, and each round's of iterative DPO."""
        out = {"sft": self.marker("sft")["model"]}
        for method in self.settings.methods:
            if method == "iterative_dpo":
                out.update({f"iterative_dpo_round{r['round']}": r["model"] for r in self.marker(method)["rounds"]})
            else:
                out[method] = self.marker(method)["model"]
        return out

    def stage_frontier(self) -> dict[str, Any]:
        from preftune.models import load_policy, load_tokenizer
        from preftune.models.rewards import load_scorer
        from preftune.plots import frontier_plot
        from preftune.train.rollout import evaluate_policy

        s = self.settings
        prompts = _read_lines(self.out / "data" / "eval_prompts.txt")
        scorer = load_scorer(GROUND_TRUTH)
        models = self.frontier_models()
        tokenizer = load_tokenizer(models["sft"])
        reference = load_policy(models["sft"], tokenizer=tokenizer)
        points = []
        for name, path in models.items():
            policy = reference if name == "sft" else load_policy(path, tokenizer=tokenizer)
            method = FRONTIER_METHOD[name.split("_round")[0]]
            round_number = int(name.rsplit("round", 1)[1]) if "_round" in name else None
            point = {"name": name, "method": method, "param": "round" if round_number else None,
                     "value": round_number,
                     **evaluate_policy(policy, reference, tokenizer, prompts, scorer, num_samples=s.frontier_samples,
                                       max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                       max_length=s.max_length, seed=s.seed + s.eval_seed_offset,
                                       batch_size=s.generate_batch_size)}
            self.log(f"  {name}: ground-truth reward {point['reward']:.4f} +- {point['reward_se']:.4f}, "
                     f"KL {point['kl']:.2f} +- {point['kl_se']:.2f}")
            points.append(point)
        plot = self.out / "plots" / "frontier.png"
        frontier_plot(points, plot, title="ground-truth reward vs KL to SFT (held-out prefixes)")
        write_jsonl(self.out / "eval" / "frontier.jsonl", points)
        return {"points": points, "plot": str(plot)}

    # ------------------------------------------------------------------------------------------ 12. report
    def stage_report(self) -> dict[str, Any]:
        from preftune.experiments.demo.rounds_report import write_rounds_report

        return {"files": [str(p) for p in write_rounds_report(self)]}
