"""A mixture of K reward models fitted by EM over the annotators (``train reward`` with ``mixtures: K``).

MaxMin-RLHF (Chakraborty et al. 2024, ICML), Algorithm 2, with the annotator as the unit: one annotator's
labels all come from one of K Bradley-Terry reward models r_1..r_K, and which one is learnt.

1. Initialise the assignment z(a) of every annotator to a component: ``em_init: random`` (seeded, every
   component non-empty) or ``groups`` (the data's ``group``: then one run, it is deterministic).
2. M-step: train each r_k for ``em_epochs`` passes on the pairs of the annotators with z(a) = k
   (``reward.reward_losses``: -log sigma(r_k(x, y_w) - r_k(x, y_l)), as one reward model), warm-started
   from the previous iteration (weights and AdamW moments carry over).
3. E-step (``after_step``, once the M-step's steps are done): L[a, k] = sum over a's labels of
   log sigma(r_k(x, y_w) - r_k(x, y_l)); z(a) = argmax_k L[a, k] (``core.mixture``). A component left
   with no annotator takes the annotator its own component explains worst (logged, counted as
   ``em/reseeded``), unless EM stops here.
4. Repeat 2-3 until no annotator changes component (converged) or after ``em_iterations``.

Restarts. The ``em_restarts`` runs (different random starts) train side by side, on the same steps: the
module (``models.mixture.RewardMixture``) holds R x K reward models (copies, or LoRA adapters on one base),
one optimizer and schedule serve them all, a pair's loss is summed over the restarts still running (each
restart's component of its annotator), and a restart that has converged stops training. When every
restart has stopped the loop skips the remaining planned steps. The restart with the highest final
log-likelihood sum_a L[a, z(a)] is kept.

Schedule. The plan has em_iterations x em_epochs passes over the pairs (``updates_per_batch``); step s
is pass ``(s mod M) // P`` of M-step ``s // M`` (M = em_epochs x P steps, P = pairs // step's pairs),
taking the seeded epoch order of ``plan.epoch_order``. Resume: the assignments, log-likelihood tables,
iterations and which restarts still run are the method's ``state_dict`` (tensors only), so a run
interrupted mid-EM continues exactly.

Outputs: ``final/mixture-k/`` (k = 0..K-1; each an AutoModelForSequenceClassification directory),
``final/mixture.json`` (the restarts, the one kept, sizes, purity and ARI), ``OUTPUT_DIR/assignments.jsonl``
(one line per annotator) and metrics.jsonl lines ``em/*`` per restart and E-step.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import PreftuneError
from preftune.train import reward
from preftune.train.base import RunContext, StepOutput
from preftune.train.reward import RewardConfig, RewardMethod, item_rewards, reward_losses, reward_metrics

if TYPE_CHECKING:
    import torch

FEW_LABELS = 5  # an annotator with fewer labels gets a warning: its assignment rests on little evidence


class RewardMixtureMethod(RewardMethod):
    """K reward models by EM over annotators (see the module docstring). ``pairs`` (``PreferencePair``
    objects with ``annotator``) replace reading ``config.data``."""

    def setup(self, ctx: RunContext) -> None:
        from preftune.core.mixture import EMState
        from preftune.data.tokenize import TokenizedRanking
        from preftune.models import load_reward_model, load_tokenizer
        from preftune.models.mixture import RewardMixture
        from preftune.train.data import load_preference_items

        c: RewardConfig = ctx.config
        self.config, self.log, self.output_dir = c, ctx.log, ctx.output_dir
        if ctx.accelerator.num_processes > 1:
            raise PreftuneError("a reward mixture trains on one process (its E-step scores every pair on it)",
                                field="mixtures", hint="run it without torchrun / accelerate launch")
        self.tokenizer = load_tokenizer(c.model, trust_remote_code=c.trust_remote_code)
        self.train_items, _ = load_preference_items(c, self.tokenizer, ctx.log, rankings=c.rankings,
                                                    pairs=self._given, eval_pairs=self._given_eval)
        if any(isinstance(item, TokenizedRanking) for item in self.train_items):
            raise PreftuneError("a reward mixture's E-step scores pairs; the data has rankings", field="rankings",
                                hint="set rankings: pairs (each ranking becomes its pairs, labels of its annotator)")
        self._index_annotators(c)
        k, self.restarts = c.mixtures, (1 if c.em_init == "groups" else c.em_restarts)
        base = load_reward_model(c.model, dtype=c.dtype, lora=c.lora, gradient_checkpointing=c.gradient_checkpointing,
                                 trust_remote_code=c.trust_remote_code, tokenizer=self.tokenizer)
        self.model = RewardMixture(base, self.restarts * k)
        counts = self.model.parameter_counts()
        held = (f"LoRA adapters on one base: {counts['per_component']:,} + {self.restarts * k} x "
                f"{counts['adapter']:,}" if c.lora else f"full copies: {self.restarts * k} x {counts['per_component']:,}")
        ctx.log(f"{self.restarts} restart(s) x {k} mixtures = {self.restarts * k} reward models in memory "
                f"({held} = {counts['total']:,} parameters)")
        pairs_per_step = c.batch_size * c.grad_accum
        self.steps_per_pass = len(self.train_items) // pairs_per_step
        if self.steps_per_pass == 0:  # the loop's plan says it too, but the M-step length is needed first
            raise PreftuneError(f"only {len(self.train_items)} pairs, but one step needs {pairs_per_step}",
                                field="batch_size", hint="lower batch_size or grad_accum, or add pairs")
        self.m_step_steps = c.em_epochs * self.steps_per_pass
        self.updates_per_batch = c.em_iterations * c.em_epochs
        ctx.log(f"EM: each M-step is {self.m_step_steps} steps ({c.em_epochs} x {self.steps_per_pass} per pass over the "
                f"pairs), then an E-step; at most {c.em_iterations} iterations = {c.em_iterations * self.m_step_steps} "
                "steps (the plan below), fewer once every restart has converged")
        self.em = EMState([self._initial_assignment(r) for r in range(self.restarts)], k)

    def _index_annotators(self, c: RewardConfig) -> None:
        """Annotator ids (sorted), each pair's annotator index, each annotator's group; logs the label counts."""
        import torch

        from preftune.core.mixture import index_annotators

        missing = sum(1 for item in self.train_items if item.annotator is None)
        if missing:
            raise PreftuneError(f"{missing} of {len(self.train_items)} pairs have no annotator; EM assigns "
                                "annotators (not single pairs) to mixtures", path=c.data or None, field="mixtures",
                                hint="give every row an `annotator` (or user_id, annotator_id, worker_id), or set "
                                "mixtures: 1")
        found = index_annotators([i.annotator for i in self.train_items], [i.group for i in self.train_items])
        if len(found.names) < c.mixtures:
            raise PreftuneError(f"{len(found.names)} annotators cannot fill {c.mixtures} mixtures",
                                field="mixtures", hint="lower mixtures (at most the number of annotators)")
        self.annotators, self.groups, self.label_counts = found.names, found.groups, found.labels
        self.position = {name: i for i, name in enumerate(found.names)}
        self.pair_annotator = torch.tensor(found.index, dtype=torch.long)
        few = sum(1 for n in found.labels if n < FEW_LABELS)
        self.log(f"{len(found.names)} annotators; labels per annotator: min {min(found.labels)}, median "
                 f"{statistics.median(found.labels):g}, max {max(found.labels)}"
                 + (f"; {sum(g is not None for g in found.groups)} with a group" if any(found.groups) else ""))
        if few:
            self.log(f"warning: {few} annotators have fewer than {FEW_LABELS} labels: EM assigns them on little "
                     "evidence")
        if found.mixed:
            self.log(f"{found.mixed} annotators have labels in several groups: each counts in its most common one")

    def _initial_assignment(self, restart: int) -> list[int]:
        from preftune.core.mixture import group_assignment, random_assignment, reseed_empty
        from preftune.models.sampling import row_seed

        c = self.config
        if c.em_init == "random":
            return random_assignment(len(self.annotators), c.mixtures, seed=row_seed(c.seed, restart))
        if any(g is None for g in self.groups):
            raise PreftuneError(f"em_init: groups needs every annotator's group; {sum(g is None for g in self.groups)} "
                                f"of {len(self.groups)} have none", field="em_init",
                                hint="give every row a `group` (or group_id), or set em_init: random")
        start = group_assignment(self.groups, c.mixtures)
        for annotator, k in reseed_empty(start, [0.0] * len(start), c.mixtures):
            self.log(f"em_init: groups: {len(set(self.groups))} groups for {c.mixtures} mixtures; mixture {k} "
                     f"starts with annotator {self.annotators[annotator]!r}")
        return start

    # ------------------------------------------------------------------------------------------ M-step
    def before_step(self, model: torch.nn.Module, step: int) -> list[Any]:
        """The step's pairs: global batch ``within mod P`` of pass ``within // P`` of the current M-step."""
        from preftune.train.plan import epoch_order

        iteration, within = divmod(step, self.m_step_steps)
        passes, batch = divmod(within, self.steps_per_pass)
        size = self.config.batch_size * self.config.grad_accum
        order = epoch_order(len(self.train_items), seed=self.config.seed,
                            epoch=iteration * self.config.em_epochs + passes)
        return [self.train_items[i] for i in order[batch * size:(batch + 1) * size]]

    def collate(self, items: list[Any]) -> dict[str, Any]:
        return {**super().collate(items), "items": list(items)}

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], *, normaliser: float) -> StepOutput:
        """Each pair's Bradley-Terry loss under its annotator's component, summed over the running restarts;
        metrics are means over those restarts."""
        import torch

        from preftune.models import unwrap

        mixture, k = unwrap(model), self.config.mixtures
        items = batch["items"]
        who = [self.position[str(item.annotator)] for item in items]
        running = [r for r in range(self.restarts) if self.em.running[r]]
        total = torch.zeros((), device=batch["input_ids"].device)
        sums: dict[str, torch.Tensor] = {}
        for r in running:
            for component in range(k):
                rows = [j for j, a in enumerate(who) if int(self.em.assignment[r, a]) == component]
                if not rows:
                    continue
                sub = self._collate_to(batch["input_ids"].device, [items[j] for j in rows])
                rewards = item_rewards(mixture.component_scores(r * k + component, sub["input_ids"],
                                                                sub["attention_mask"]), sub)
                losses = reward_losses(rewards, sub, use_margin=self.config.margin,
                                       center_coefficient=self.config.center_rewards_coefficient)
                total = total + losses.sum()
                for name, value in reward_metrics(rewards, sub["response_mask"]).items():
                    sums[name] = sums.get(name, 0.0) + value / len(running)
        return StepOutput(loss=total / normaliser, metric_sums=sums, logs={"em/restarts_running": len(running)})

    def _collate_to(self, device: Any, items: list[Any]) -> dict[str, Any]:
        batch = super().collate(items)
        return {key: v.to(device) if hasattr(v, "to") else v for key, v in batch.items()}

    # ------------------------------------------------------------------------------------------ E-step
    def after_step(self, model: torch.nn.Module, step: int) -> tuple[list[dict[str, Any]], str | None]:
        """At the end of each M-step: the E-step of every running restart; metrics records; whether EM is done."""
        from preftune.core.mixture import agreement, annotator_log_likelihoods

        em = self.em
        if step % self.m_step_steps or not bool(em.running.any()):
            return [], None
        records = []
        for r in [r for r in range(self.restarts) if em.running[r]]:
            table = annotator_log_likelihoods(self._margins(model, r), self.pair_annotator, len(self.annotators))
            done = em.update(r, table, max_iterations=self.config.em_iterations)
            for annotator, component in done.moves:
                self.log(f"restart {r}: mixture {component} was left with no annotator; re-seeded with "
                         f"{self.annotators[annotator]!r}, the annotator its mixture explained worst")
            if done.empty:
                self.log(f"warning: restart {r} stops with mixtures {done.empty} holding no annotator (their models "
                         "are those of the last M-step); try fewer mixtures")
            fit = agreement(em.assignment[r].tolist(), self.groups)
            records.append({"em/restart": r, "em/iteration": int(em.iterations[r]),
                            "em/log_likelihood": done.log_likelihood, "em/changed": done.changed,
                            "em/reseeded": len(done.moves), **{f"em/{key}": v for key, v in fit.items()}})
            self.log(f"EM restart {r}, iteration {int(em.iterations[r])}: log-likelihood {done.log_likelihood:.4f}, "
                     f"{done.changed} annotator{'' if done.changed == 1 else 's'} changed mixture"
                     + (f"; purity {fit['purity']:.3f}, ARI {fit['ari']:.3f}" if fit else "")
                     + (f" ({done.stop})" if done.stop else ""))
        if bool(em.running.any()):
            return records, None
        return records, f"EM has finished: restart {em.best()} kept, log-likelihood {float(em.log_likelihood[em.best()]):.4f}"

    def _margins(self, model: torch.nn.Module, restart: int) -> torch.Tensor:
        """[N, K] r_k(x, y_w) - r_k(x, y_l) (minus the pair's margin with ``margin: true``) of every pair under
        every component of ``restart``, in eval mode and without gradients."""
        import torch

        from preftune.models import unwrap

        mixture, k, c = unwrap(model), self.config.mixtures, self.config
        size = c.eval_batch_size or c.batch_size
        device = next(mixture.parameters()).device
        columns = []
        was_training = mixture.training
        mixture.eval()
        with torch.no_grad():
            for component in range(k):
                column = []
                for start in range(0, len(self.train_items), size):
                    sub = self._collate_to(device, self.train_items[start:start + size])
                    rewards = item_rewards(mixture.component_scores(restart * k + component, sub["input_ids"],
                                                                    sub["attention_mask"]), sub)
                    margin = rewards[:, 0] - rewards[:, 1]
                    if c.margin:
                        margin = margin - torch.nan_to_num(sub["margin"].to(margin.dtype), nan=0.0)
                    column.append(margin.double().cpu())
                columns.append(torch.cat(column))
        mixture.train(was_training)
        return torch.stack(columns, dim=1)

    # ------------------------------------------------------------------------------------------ state and outputs
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EM state, tensors only (``core.mixture.EMState``): what a resumed run needs besides the weights."""
        return self.em.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.em.load_state_dict(state)

    def save(self, model: torch.nn.Module, path: Path) -> None:
        """``final/mixture-k/`` per component of the best restart, ``final/mixture.json`` and
        ``OUTPUT_DIR/assignments.jsonl``."""
        from preftune.core.mixture import agreement
        from preftune.data.jsonl import write_jsonl
        from preftune.models import unwrap

        mixture, k, em = unwrap(model), self.config.mixtures, self.em
        best = em.best()
        path.mkdir(parents=True, exist_ok=True)
        for component in range(k):
            mixture.save_component(best * k + component, path / f"mixture-{component}", self.tokenizer)
        assignment = em.assignment[best].tolist()
        rows = [{"annotator": name, "mixture": assignment[a], "log_likelihoods": em.tables[best, a].tolist(),
                 "labels": self.label_counts[a], **({"group": self.groups[a]} if self.groups[a] is not None else {})}
                for a, name in enumerate(self.annotators)]
        write_jsonl(self.output_dir / "assignments.jsonl", rows)
        summary = {"mixtures": k, "restart": best, "log_likelihood": float(em.log_likelihood[best]),
                   "sizes": [assignment.count(component) for component in range(k)],
                   "annotators": len(self.annotators), "pairs": len(self.train_items),
                   "restarts": [{"log_likelihood": float(em.log_likelihood[r]), "iterations": int(em.iterations[r]),
                                 "converged": int(em.changed[r]) == 0} for r in range(self.restarts)],
                   **agreement(assignment, self.groups)}
        (path / "mixture.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        self.log(f"mixture: restart {best} of {self.restarts}, sizes {summary['sizes']}"
                 + (f", purity {summary['purity']:.3f}, ARI {summary['ari']:.3f}" if "purity" in summary else ""))


def method_class(config: RewardConfig) -> type:
    """The method ``train reward`` runs: this EM mixture when mixtures > 1, else ``RewardMethod``."""
    return RewardMixtureMethod if config.mixtures > 1 else RewardMethod


# `train reward`'s registry entry (preftune.train.METHODS): reward.SPEC, dispatching on `mixtures`
SPEC = dataclasses.replace(reward.SPEC, method_for=method_class)
