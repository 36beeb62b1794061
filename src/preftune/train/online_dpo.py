"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", Alg. 1): DPO on
pairs the current policy has just sampled and a judge has just labelled, inside the online loop.

Steps (1) and (6) are ``preftune.train.online``'s; there is no KL-shaped reward (``kl_coef`` must be 0):
the loss's beta holds the policy near the reference, as in offline DPO. Each rollout, per prompt x:

    (1) generate   K = ``num_samples`` completions y_1..y_K ~ pi_theta(. | x), the CURRENT policy, and the
                   log-probs of each under pi_ref (the rollout computes them per token; summed here)
    (2) judge      ``reward`` (a reward model or module:function; ``rewards`` several, as the other online
                   methods take them) scores each y_i; or ``judge_model``, an LLM, judges every pair
                   (y_i, y_j), i < j, in both orders (``preftune.models.llm_judge``: a verdict stands only
                   when the orders agree), and y_i's score is its points in that round robin: 1 per win,
                   1/2 per tie (``tournament_points``)
    (4) pairs      y+ = the best of the K by score, y- = the worst (``best_and_worst``; ties broken by
                   sampling order: the FIRST of the equal best, the FIRST of the equal worst). A prompt
                   whose K scores are all equal has no pair: it is skipped, counted as ``pairs/tied`` (and
                   said in the log); it stays in the batch with weight 0, so every process runs the same
                   micro-batches, but adds nothing to the loss, the metrics or the unit count

and each optimizer step, per pair (``pair_loss``; the unit is the pair)::

    (5) update     loss(x, y+, y-) = LOSSES[loss](log pi(y+|x), log pi(y-|x), log pi_ref(y+|x), log pi_ref(y-|x))
                   e.g. dpo: -log sigma(beta log pi(y+)/pi_ref(y+) - beta log pi(y-)/pi_ref(y-))
                   (Rafailov et al. 2023, Eq. 7; Guo et al. 2024, Alg. 1 step 5), summed over the step's
                   pairs with a winner, divided by their number (over every micro-batch and process)

Log-probs are sums over the response tokens of ``softmax(logits / temperature)``, the distribution that was
sampled, for the policy and the reference alike (at temperature 1 this is plain DPO). Any loss of
``core.losses.LOSSES`` works: the reference-based ones (dpo, ipo, cdpo, hinge, robust) use the rollout's
reference log-probs, the reference-free ones (orpo, simpo, unlikelihood) the token counts. A step whose
pairs all tie (on every process) has nothing to learn: its loss and gradient are 0 (the optimizer still
steps). ``update_epochs`` passes over each rollout's pairs in ``num_mini_batches`` steps each.

Logs: per step the DPO metrics (means over its pairs with a winner): ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``; per
rollout (every process) ``objective/scores``, ``objective/kl``, ``objective/entropy``, ``completions/*``,
``pairs/kept``, ``pairs/tied``. Every kept pair of the main process is written to OUTPUT_DIR/pairs.jsonl
(step, prompt, chosen, rejected, score_chosen, score_rejected, judge), truncated on resume as samples.jsonl.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from preftune.config import opt, require
from preftune.errors import PreftuneError
from preftune.train.base import MethodSpec, OnlineConfig
from preftune.train.dpo import DPOConfig
from preftune.train.online import OnlineMethod, OnlineRecipe

if TYPE_CHECKING:
    import torch

    from preftune.train.rollout import Rollout

PAIRS_FILE = "pairs.jsonl"
PAIR_FIELDS = ("ref_chosen_logps", "ref_rejected_logps", "weight")  # per pair, [B] in a batch
SHAPING_LOGS = ("objective/kl_coef", "objective/rlhf_reward", "objective/non_score_reward")  # no KL-shaped reward
Verdicts = Callable[[list[str], list[tuple[str, str]]], Sequence[int | None]]  # 0: first better, 1: second, None: tie


@dataclass
class OnlineDPOConfig(OnlineConfig):
    """`preftune train online-dpo`: DPO on pairs sampled from the current policy and labelled by a judge."""

    command: ClassVar[str] = "online-dpo"
    aliases: ClassVar[dict[str, str]] = {  # beta is DPO's own key here, not the KL coefficient's
        **{k: v for k, v in OnlineConfig.aliases.items() if k != "beta"}, "loss_type": "loss", "judge": "judge_model",
    }
    alias_notes: ClassVar[dict[str, str]] = {
        **{k: v for k, v in OnlineConfig.alias_notes.items() if k != "beta"},
        "loss_type": "TRL's sigmoid is loss: dpo; its ipo is loss: ipo",
        "judge": "an LLM judge's directory or hub id; a reward model or function goes in reward",
    }
    model_keys: ClassVar[tuple[str, ...]] = ("model", "ref_model", "reward", "judge_model")

    output_dir: str = opt("runs/online-dpo", "run directory: config.yaml, metrics.jsonl, pairs.jsonl, samples.jsonl, "
                          "final/")
    learning_rate: float = opt(5e-7, "peak learning rate of AdamW", gt=0)
    num_samples: int = opt(2, "completions sampled per prompt in each rollout (K >= 2); the pair is the best and "
                           "the worst of them", ge=1)
    loss: str = opt("dpo", "the loss of each pair: dpo, ipo, cdpo, hinge, robust (against the reference) or orpo, "
                    "simpo, unlikelihood (reference-free)")
    beta: float | None = opt(None, "DPO's beta (the loss's temperature, NOT a KL coefficient); null = the loss's "
                             "default (0.1 for dpo)", gt=0, why="beta scales the preference term of every loss (ipo's "
                             "target is 1/(2 beta)); 0 removes it and a negative beta reverses it")
    label_smoothing: float | None = opt(None, "label-flip rate eps of cdpo / robust; null = their default",
                                        ge=0, lt=0.5, why="eps is the probability that a label is wrong; at 0.5 "
                                        "the labels carry no preference and above it they reverse it")
    gamma: float | None = opt(None, "SimPO target margin gamma; null = its default (0.5)", ge=0,
                              why="gamma is the reward margin the chosen response should win by")
    alpha: float | None = opt(None, "unlikelihood weight alpha; null = its default (1.0)", ge=0,
                              why="a negative weight would pull the rejected response up")
    loss_kwargs: dict[str, Any] = opt({}, "any other keyword hyperparameters of the loss function")
    kl_coef: float = opt(0.0, "not used by online DPO (must be 0): no KL-shaped reward; the loss's beta holds the "
                         "policy near the reference", ge=0,
                         why="a negative beta would reward moving away from the reference")
    judge_model: str | None = opt(None, "an LLM judge (directory or hub id) instead of reward: it judges every pair "
                                  "of the K completions in both orders; the most wins are chosen, the fewest rejected")
    judge_template: str | None = opt(None, "the LLM judge's prompt, with {prompt}, {response_1} and {response_2}; "
                                     "null = the built-in one (as `preftune compare --judge llm:PATH`)")
    judge_labels: list[str] = opt([" 1", " 2"], "the LLM judge's two answers (response 1 better, response 2 "
                                  "better): their log-probabilities after the filled template are compared")

    loss_hparams = DPOConfig.loss_hparams  # the same keys and checks as `train dpo` (beta, ..., loss_kwargs)

    def validate(self) -> None:
        require(self, "kl_coef", self.kl_coef == 0, "is not used by online DPO: there is no KL-shaped reward; the "
                "loss's beta (DPO's beta) holds the policy near the reference: set beta")
        require(self, "kl_target", self.kl_target is None, "is not used by online DPO: its beta is fixed (set beta)")
        super().validate()
        self.loss_hparams()
        require(self, "num_samples", self.num_samples >= 2, "must be >= 2: the pair is the best and the worst of "
                "the K completions of a prompt")
        require(self, "whiten_advantages", not self.whiten_advantages, "is not used by online DPO: it has no "
                "advantages, only pairs")
        require(self, "judge_model", not (self.judge_model and (self.reward or self.rewards)),
                "cannot be used together with reward or rewards: give one judge (a reward scores each completion; "
                "the LLM judge compares them)")
        require(self, "judge_template", self.judge_template is None or bool(self.judge_model),
                "is used only with judge_model")
        if self.judge_template is not None:
            from preftune.models.llm_judge import missing_placeholder

            missing = missing_placeholder(self.judge_template)
            require(self, "judge_template", missing is None, f"lacks {missing}: the template needs {{prompt}}, "
                    "{response_1} and {response_2}")
        require(self, "judge_labels", len(self.judge_labels) == 2 and all(self.judge_labels)
                and self.judge_labels[0] != self.judge_labels[1], "must be two different, non-empty answers")

    def check_required(self, keys: tuple[str, ...]) -> None:
        """As OnlineConfig's; ``judge_model`` stands in for ``reward``."""
        super().check_required(tuple(k for k in keys if not (k == "reward" and self.judge_model)))


# ------------------------------------------------------------------------------------------------ (2) the judges


def round_robin(k: int) -> list[tuple[int, int]]:
    """Every pair (i, j), i < j, of K completions, in order: (0, 1), (0, 2), ..., (K-2, K-1)."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def tournament_points(verdicts: Sequence[int | None], k: int) -> list[float]:
    """Each completion's points from the verdicts on ``round_robin(k)`` (0: i better, 1: j better, None: a
    tie): 1 per win, 1/2 per tie to each, so a tie leaves the two where they stand."""
    points = [0.0] * k
    for (i, j), verdict in zip(round_robin(k), verdicts, strict=True):
        if verdict is None:
            points[i] += 0.5
            points[j] += 0.5
        elif verdict in (0, 1):
            points[j if verdict else i] += 1.0
        else:
            raise PreftuneError(f"the judge answered {verdict!r} for a pair", field="judge_model",
                                hint="a pairwise judge answers 0 (first better), 1 (second better) or None (tie)")
    return points


def judge_scores(judge: Verdicts, prompts: Sequence[Any], texts: Sequence[str], *, k: int) -> list[float]:
    """Step (2) with a pairwise judge: the rows are groups of K completions of one prompt; every pair of each
    group is judged (one call for the whole rollout) and each completion scores its ``tournament_points``."""
    from preftune.data.prompts import prompt_text

    games = round_robin(k)
    firsts = range(0, len(texts), k)
    pairs = [(texts[g + i], texts[g + j]) for g in firsts for i, j in games]
    verdicts = list(judge([prompt_text(prompts[g]) for g in firsts for _ in games], pairs))
    if len(verdicts) != len(pairs):
        raise PreftuneError(f"the judge gave {len(verdicts)} verdicts for {len(pairs)} pairs", field="judge_model")
    return [p for n, _ in enumerate(firsts)
            for p in tournament_points(verdicts[n * len(games):(n + 1) * len(games)], k)]


def pairwise(judge: Any) -> Verdicts:
    """A judge given in memory as ``judge(prompts, pairs) -> [0 | 1 | None]``: an object with that method
    (``preftune.judges.LLMJudge``, any ``Judge``) or a callable."""
    if hasattr(judge, "judge"):
        return judge.judge
    if callable(judge):
        return judge
    raise PreftuneError(f"a judge must be callable or have judge(prompts, pairs), not {type(judge).__name__}",
                        field="judge_model")


def _stand_in(prompt: str, completion: str) -> float:
    raise AssertionError("online DPO's judge replaces the reward; this stand-in is never called")


# ------------------------------------------------------------------------------------------------ (4) the pairs


def best_and_worst(scores: Sequence[Sequence[float]]) -> tuple[list[int], list[int], list[bool]]:
    """Per group of K scores: the chosen sample (the FIRST with the highest score), the rejected one (the FIRST
    with the lowest) and whether the group ties (all K equal: no pair; then chosen = rejected = 0)."""
    chosen, rejected, tied = [], [], []
    for row in scores:
        row = [float(s) for s in row]
        high, low = max(row), min(row)
        chosen.append(row.index(high))
        rejected.append(row.index(low))
        tied.append(high == low)
    return chosen, rejected, tied


def select_pairs(ro: Rollout, c: OnlineDPOConfig) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """(4) one pair per prompt, best vs worst of its K completions by score, with the reference's summed
    log-probs; a tied prompt's item has weight 0. Logs ``pairs/kept`` and ``pairs/tied`` (every process)."""
    import torch

    k = ro.num_samples
    chosen, rejected, tied = best_and_worst(ro.scores.reshape(-1, k).tolist())
    ref = (ro.ref_logps * ro.mask).sum(-1)  # log pi_ref(y|x), summed over the response tokens
    items = []
    for g, (i, j, tie) in enumerate(zip(chosen, rejected, tied, strict=True)):
        a, b = g * k + i, g * k + j
        items.append({"query": ro.queries[a], "chosen": ro.responses[a], "rejected": ro.responses[b],
                      "ref_chosen_logps": ref[a].clone(), "ref_rejected_logps": ref[b].clone(),
                      "weight": torch.tensor(0.0 if tie else 1.0, dtype=ref.dtype),
                      "prompt_index": torch.tensor(ro.prompt_index[a]),
                      "score_chosen": ro.scores[a].clone(), "score_rejected": ro.scores[b].clone()})
    kept, ties = ro.total(torch.tensor([len(tied) - sum(tied), sum(tied)], dtype=torch.float64)).tolist()
    return items, {"pairs/kept": kept, "pairs/tied": ties}


# ------------------------------------------------------------------------------------------------ (5) the loss


def pair_loss(logps: torch.Tensor, values: None, batch: dict[str, torch.Tensor],
              c: OnlineDPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses x weight and the DPO metric sums. ``logps`` [2B, R]: the B chosen rows, then the B
    rejected ones (``OnlineDPOMethod.collate``), 0 on padding."""
    from preftune.core.losses import preference_loss

    n = logps.shape[0] // 2
    sums, counts = logps.sum(-1), batch["response_mask"].sum(-1)
    chosen, rejected = sums[:n], sums[n:]
    out = preference_loss(c.loss, policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                          ref_chosen_logps=batch["ref_chosen_logps"].to(sums.dtype),
                          ref_rejected_logps=batch["ref_rejected_logps"].to(sums.dtype),
                          chosen_lengths=counts[:n], rejected_lengths=counts[n:], **c.loss_hparams())
    w = batch["weight"].to(sums.dtype)  # 0 for a tied prompt: no loss, no metric
    rc, rr = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    metrics = {"rewards/chosen": (w * rc).sum(), "rewards/rejected": (w * rr).sum(),
               "rewards/margins": (w * (rc - rr)).sum(), "rewards/accuracies": (w * (rc > rr).to(w.dtype)).sum(),
               "logps/chosen": (w * chosen.detach()).sum(), "logps/rejected": (w * rejected.detach()).sum()}
    return out.losses * w, metrics


# ------------------------------------------------------------------------------------------------ the method


class OnlineDPOMethod(OnlineMethod):
    """Online DPO (see the module docstring). ``judge`` (a pairwise judge in memory: ``judge(prompts, pairs)
    -> [0 | 1 | None]``, or an object with that method, e.g. ``preftune.judges.LLMJudge``) replaces
    ``judge_model``; ``prompts`` and ``reward_fn`` are as for every online method."""

    recipe = OnlineRecipe(unit="sequence", value_network=False, advantages=select_pairs, loss=pair_loss)

    def __init__(self, *, prompts: list[Any] | None = None, reward_fn: Any = None, judge: Any = None) -> None:
        super().__init__(prompts=prompts, reward_fn=reward_fn)
        self._judge = judge
        self.step_has_pairs = True  # whether the current step has a pair with a winner on some process
        self._tied_said = 0.0  # the last rollout's pairs/tied (a tie count is logged when it changes)

    def setup(self, ctx: Any) -> None:
        """OnlineMethod's setup; with an LLM judge (``judge_model`` or ``judge``), step (2)'s scores are the
        round robin's points instead of a reward's."""
        from functools import partial

        from preftune.train.multireward import RewardSet
        from preftune.train.rollout import SamplesFile

        c: OnlineDPOConfig = ctx.config
        judged = self._judge is not None or bool(c.judge_model)
        if judged and (self._reward_fn is not None or c.reward or c.rewards):
            raise PreftuneError("give one judge: a reward (reward, rewards, reward_fn) or a pairwise judge "
                                "(judge_model, judge), not both", field="judge_model")
        given = self._reward_fn
        if judged:  # OnlineMethod.setup loads a reward; a stand-in, replaced by the judge below
            self._reward_fn = _stand_in
        try:
            super().setup(ctx)
        finally:
            self._reward_fn = given
        if judged:
            judge = self._judge
            if judge is None:
                from preftune.models.llm_judge import LLM_TEMPLATE, PairwiseLLM

                llm = PairwiseLLM(c.judge_model, template=c.judge_template or LLM_TEMPLATE,
                                  labels=tuple(c.judge_labels), batch_size=self._generation_batch(),
                                  device=str(ctx.accelerator.device), field="judge_model")
                llm.model.requires_grad_(False)
                judge = lambda prompts, pairs: llm.verdicts(prompts, pairs)[0]  # noqa: E731
            self.rewards = RewardSet(["judge"], [partial(judge_scores, pairwise(judge), k=c.num_samples)],
                                     config=c, named=False)
        self.judge_name = self._judge_name(c)
        self.pairs = SamplesFile(ctx.output_dir / PAIRS_FILE, enabled=ctx.accelerator.is_main_process, log=ctx.log)

    def _judge_name(self, c: OnlineDPOConfig) -> str:
        """The judge as pairs.jsonl names it: llm:PATH, reward:PATH, function:SPEC or rewards:AGG(names)."""
        from preftune.models.rewards import is_function_spec

        if self._judge is not None:
            return str(getattr(self._judge, "name", None) or getattr(self._judge, "__name__", "judge"))
        if c.judge_model:
            return f"llm:{c.judge_model}"
        if len(self.rewards.names) > 1 or self.rewards.named:
            return f"rewards:{c.reward_aggregation}({', '.join(self.rewards.names)})"
        if self._reward_fn is not None:
            return f"function:{getattr(self._reward_fn, '__name__', 'function')}"
        return f"{'function' if is_function_spec(c.reward) else 'reward'}:{c.reward}"

    # ------------------------------------------------------------------------------------------ each step
    def before_step(self, model: torch.nn.Module, step: int) -> list[Any]:
        """OnlineMethod's (the step's pairs, a rollout made when due); also whether any process's pairs of
        this step have a winner (one all-reduce): if none has, every pair counts as a unit of weight 0."""
        import torch

        if self.pairs.enabled and not self.pairs.started:
            self.pairs.start(keep_before=step)
        items = super().before_step(model, step)
        acc = self.accelerator
        kept = torch.tensor(sum(float(i["weight"]) for i in items), dtype=torch.float64, device=acc.device)
        self.step_has_pairs = acc.reduce(kept, reduction="sum").item() > 0
        return items

    def make_rollout(self, model: Any, rollout: int, step: int) -> dict[str, Any]:
        """OnlineMethod's steps (1)-(4), (6), then the tied prompts said in the log (when their count changes) and
        the pairs written."""
        buffer = super().make_rollout(model, rollout, step)
        logs = buffer["logs"]
        for key in SHAPING_LOGS:
            logs.pop(key, None)
        if logs["pairs/tied"] and logs["pairs/tied"] != self._tied_said:  # said again when the count changes
            self.log(f"rollout {rollout + 1} (step {step + 1}): {logs['pairs/tied']:g} of "
                     f"{logs['pairs/kept'] + logs['pairs/tied']:g} prompts skipped, their {self.config.num_samples} "
                     "completions all tie (pairs/tied)")
        self._tied_said = logs["pairs/tied"]
        if self.pairs.enabled:
            from preftune.data.jsonl import append_jsonl

            decode = self.tokenizer.decode
            append_jsonl(self.pairs.path, [
                {"step": step, "prompt": self.prompts[int(i["prompt_index"])],
                 "chosen": decode(i["chosen"], skip_special_tokens=True),
                 "rejected": decode(i["rejected"], skip_special_tokens=True),
                 "score_chosen": float(i["score_chosen"]), "score_rejected": float(i["score_rejected"]),
                 "judge": self.judge_name}
                for i in buffer["items"] if float(i["weight"]) > 0])
        return buffer

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The rollout layout (``rollout.collate_items``) of 2B rows, the B chosen then the B rejected
        completions, plus ``ref_chosen_logps``, ``ref_rejected_logps`` and ``weight`` [B] (and PPO-ptx rows)."""
        import torch

        from preftune.core.packing import pack_pairs
        from preftune.train.rollout import collate_items

        rows = ([{"query": i["query"], "response": i["chosen"], **({"ptx": i["ptx"]} if "ptx" in i else {})}
                 for i in items] + [{"query": i["query"], "response": i["rejected"]} for i in items])
        batch = collate_items(rows, pad_token_id=self.tokenizer.pad_token_id)
        batch.update({name: torch.stack([i[name] for i in items]) for name in PAIR_FIELDS})
        return pack_pairs(batch, self.packing)  # chosen and rejected continue one query: shared when packing

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs with a winner; every pair (each of weight 0) when the step has none on any process."""
        weight = batch["weight"]
        return int(weight.sum()) if self.step_has_pairs else int(weight.numel())


SPEC = MethodSpec("online-dpo", OnlineDPOConfig, OnlineDPOMethod,
                  "Online DPO: sample K per prompt from the current policy, a judge picks best and worst, a DPO step.")
