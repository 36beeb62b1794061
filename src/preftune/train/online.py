"""Online RLHF, the steps every online method shares (ppo, rloo, raft), inside the one training loop.

Each rollout, on each process (``OnlineMethod.make_rollout``)::

    (1) generate    K completions per prompt with the current policy       rollout.sample_responses
                    (rollout_backend vllm: a colocated vLLM engine)          train.vllm_rollout
    (2) score       each (prompt, completion): reward model or function      models.rewards.load_scorer
                    (several rewards: standardised, then mean, min, maxmin    train.multireward.RewardSet
                    or weighted; maxmin: the lowest group's, MaxMin-RLHF)
    (3) KL-shape    r(x, y) - beta * KL_t per token against the frozen        core.rl.kl_penalty, shaped_rewards
                    reference (k1 or k3; beta fixed or adaptive); a recipe
                    may load no reference (GRPO with kl_coef 0): KL 0
    (4) advantages  the method's own: GAE with a value network (PPO), leave-one-out (RLOO), best of K
                    (RAFT), group-relative (GRPO); each completion becomes a training item
    (6) log         rollout statistics (``objective/*``, ``completions/*``) and OUTPUT_DIR/samples.jsonl

and each optimizer step (``OnlineMethod.loss``)::

    (5) update      the step's completions under the current policy (and value network): the method's
                    loss, summed over its units (tokens or completions), plus PPO-ptx

A method differs from the others only by data, its ``OnlineRecipe``: whether it trains a value network,
its advantage function (4), its loss (5) and its unit. Its file holds that recipe and its config.

Schedule. The loop's step ``s`` is step ``within = s mod (E*M)`` of rollout ``s // (E*M)`` (E =
``update_epochs``, M = ``num_mini_batches``): pass ``within // M`` over the rollout, mini-batch
``within mod M`` of a permutation seeded by (seed, rollout, pass). A rollout's prompts are M consecutive
global batches of the loop's seeded epoch order, so ``epochs`` counts passes over the prompts.

Resume. The current rollout (its items), the KL coefficient and the rewards' state (their standardisation
statistics, MaxMin's counts) are the method's ``state_dict``, saved in every checkpoint; generation is seeded per (seed, rollout, row), so a resumed run makes the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from preftune.errors import PreftuneError
from preftune.train.base import OnlineConfig, RunContext, StepOutput, save_with_tokenizer

if TYPE_CHECKING:
    import torch

    from preftune.train.rollout import Rollout


@dataclass(frozen=True)
class OnlineRecipe:
    """What makes one online method itself; everything else is ``OnlineMethod``'s numbered steps.
    ``unit`` and ``reference`` may be functions of the config (GRPO: its loss_type, its kl_coef)."""

    unit: str | Callable[[Any], str]  # "token" or "sequence": the loss is a mean over response tokens or completions
    value_network: bool          # train a value network beside the policy (PPO)
    advantages: Callable[[Rollout, Any], tuple[list[dict[str, Any]], dict[str, float]]]  # (4) items, logs
    # (5) loss(logps [B, R], values [B, R] or None, batch, config) -> per-unit losses, metric sums
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    loss_at_temperature: bool = True  # log-probs of the loss under softmax(logits / temperature)
    reference: bool | Callable[[Any], bool] = True  # load pi_ref; without it the rollout's KL is 0 and not logged
    entropy: bool = False        # (5) also give the loss the policy's per-token entropy, batch["entropy"] [B, R]


class OnlineMethod:
    """The online methods' shared steps, specialised by the class's ``recipe`` (see the module docstring).

    ``prompts`` (strings or message lists) replaces reading ``config.data``; ``reward_fn`` (a callable
    ``fn(prompt_text, completion) -> float``) replaces ``config.reward``, or, a mapping name -> callable
    (or reward spec), replaces ``config.rewards`` and ``config.reward_names``.
    """

    recipe: ClassVar[OnlineRecipe]
    vllm_api: Any = None  # rollout_backend vllm: a stand-in for the vllm module (tests); None = import vllm

    def __init__(self, *, prompts: list[Any] | None = None, reward_fn: Any = None) -> None:
        self._prompts, self._reward_fn = prompts, reward_fn
        self.model: torch.nn.Module
        self.tokenizer: Any = None
        self.train_items: list[Any] = []
        self.eval_items: list[Any] = []
        self.buffer: dict[str, Any] | None = None
        self.updates_per_batch = 1
        self.packing = ""  # "shared", "rows" or "" (padded rows): the packing key, once setup has checked the model
        self.vllm: Any = None  # the vLLM rollout engine (train.vllm_rollout.VLLMRollout) with rollout_backend vllm

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, ctx: RunContext) -> None:
        import torch

        from preftune.core.packing import packing_applies, packing_unsupported
        from preftune.core.rl import AdaptiveKLController, FixedKLController
        from preftune.data.prompts import load_prompts
        from preftune.models import load_policy, load_tokenizer
        from preftune.models.load import build_reference
        from preftune.models.rewards import is_function_spec
        from preftune.models.sampling import GenerationSettings
        from preftune.models.value import PolicyWithValue, load_value_network
        from preftune.train.multireward import RewardSet
        from preftune.train.ptx import PtxRows
        from preftune.train.rollout import SamplesFile, encode_prompts
        from preftune.train.vllm_rollout import VLLMRollout, check_backend

        c: OnlineConfig = ctx.config
        self.config, self.accelerator = c, ctx.accelerator
        if self._prompts is None and not c.data:
            raise PreftuneError("is required: a prompts file (one per line, or JSONL with prompt / messages)",
                                field="data")
        if self._reward_fn is None and not c.reward and not c.rewards:
            raise PreftuneError("is required: a reward-model directory or hub id, or module:function",
                                field="reward", hint="e.g. reward: runs/reward/final or reward: my_rewards.py:score "
                                "(or several: rewards: [a.py:score, runs/rm_b/final])")
        vllm_api = check_backend(c, ctx.accelerator, self.vllm_api)  # before anything loads
        if c.ptx_coef > 0 and ctx.accelerator.num_processes > 1:
            raise PreftuneError("PPO-ptx runs a second forward pass per micro-batch, which DDP does not allow",
                                field="ptx_coef", hint="train with one process, or set ptx_coef: 0")
        self.tokenizer = load_tokenizer(c.model, trust_remote_code=c.trust_remote_code)
        policy = load_policy(c.model, dtype=c.dtype, lora=c.lora, gradient_checkpointing=c.gradient_checkpointing,
                             trust_remote_code=c.trust_remote_code, tokenizer=self.tokenizer)
        reference = build_reference(policy, ref_model=c.ref_model, lora=c.lora, dtype=c.dtype, tokenizer=self.tokenizer,
                                    trust_remote_code=c.trust_remote_code) if self.with_reference else None
        self.reference = reference.to(ctx.accelerator.device) if reference is not None else None
        self.rewards = RewardSet.load(c, self._reward_fn, device=str(ctx.accelerator.device),
                                      batch_size=self._generation_batch())
        self.output_dir, self.log = ctx.output_dir, ctx.log
        value = None
        if self.recipe.value_network:  # from value_model, else the reward model, else the policy's start
            value = load_value_network(c.value_model or (c.reward if c.reward and self._reward_fn is None and not
                                                         is_function_spec(c.reward) else c.model), config=c,
                                       tokenizer=self.tokenizer, log=ctx.log)
        self.model = PolicyWithValue(policy, value)
        if vllm_api is not None:  # the engine itself starts at the first rollout
            self.vllm = VLLMRollout(vllm_api, c, self.tokenizer, ctx.accelerator, log=ctx.log,
                                    real=self.vllm_api is None)
        self.packing = packing_applies(c, policy, ctx.log, share_prompt=c.share_prompt)
        if self.packing and value is not None and packing_unsupported(value):
            ctx.log(f"packing: off: the value network uses {packing_unsupported(value)}")
            self.packing = ""
        self.prompts = list(self._prompts) if self._prompts is not None else load_prompts(c.data)
        queries, cut = encode_prompts(self.tokenizer, self.prompts, template=c.template,
                                      max_tokens=c.max_length - c.max_new_tokens)
        self.train_items = [torch.tensor(q, dtype=torch.long) for q in queries]
        ctx.log(f"{len(self.prompts)} prompts; {cut} cut from the left to max_length - max_new_tokens = "
                f"{c.max_length - c.max_new_tokens} tokens")
        self.ptx = PtxRows(c, self.tokenizer, ctx.accelerator, ctx.log) if c.ptx_coef > 0 else None
        self.kl_controller = (AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon)
                              if c.kl_target is not None else FixedKLController(c.kl_coef))
        self.settings = GenerationSettings(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                           max_new_tokens=c.max_new_tokens, seed=c.seed, template=c.template)
        self.updates_per_batch = c.update_epochs
        self.samples = SamplesFile(ctx.output_dir / "samples.jsonl", enabled=ctx.accelerator.is_main_process,
                                   every=c.sample_every, steps_per_rollout=c.update_epochs * c.num_mini_batches,
                                   log=ctx.log)

    @property
    def with_reference(self) -> bool:
        """Whether a reference model is loaded: the recipe's ``reference``, for this config."""
        r = self.recipe
        return r.reference(self.config) if callable(r.reference) else r.reference

    @property
    def unit(self) -> str:
        """The loss's unit, "token" or "sequence": the recipe's ``unit``, for this config."""
        r = self.recipe
        return r.unit(self.config) if callable(r.unit) else r.unit

    def _generation_batch(self) -> int:
        c = self.config
        return c.generation_batch_size or c.batch_size * c.num_samples

    # ------------------------------------------------------------------------------------------ each step's items
    def before_step(self, model: torch.nn.Module, step: int) -> list[Any]:
        """The step's items: make rollout ``step // (E*M)`` when it is not the buffered one, then return
        mini-batch ``within mod M`` of pass ``within // M`` over it (plus PPO-ptx rows)."""
        import torch

        from preftune.train.plan import split_for_process
        from preftune.train.rollout import rollout_seed

        c = self.config
        rollout, within = divmod(step, c.update_epochs * c.num_mini_batches)
        if self.samples.enabled and not self.samples.started:
            self.samples.start(keep_before=step)
        if self.buffer is None or self.buffer["rollout"] != rollout:
            self.buffer = self.make_rollout(model, rollout, step)
        epoch, mini = divmod(within, c.num_mini_batches)
        items = self.buffer["items"]
        generator = torch.Generator().manual_seed(rollout_seed(c.seed, rollout, epoch, stream=1))
        order = torch.randperm(len(items), generator=generator).tolist()
        chosen = [items[i] for i in split_for_process(order, micro_batches=c.num_mini_batches, process=0,
                                                      num_processes=1)[mini]]
        return self.ptx.attach(chosen, step) if self.ptx else chosen

    def _share(self, num_items: int, batch: int) -> list[int]:
        from preftune.train.plan import process_share

        return process_share(num_items, batch, config=self.config, process=self.accelerator.process_index,
                             num_processes=self.accelerator.num_processes)

    # ------------------------------------------------------------------------------------------ a rollout
    def make_rollout(self, model: Any, rollout: int, step: int) -> dict[str, Any]:
        """Steps (1)-(4) and (6) for rollout ``rollout`` on this process; returns the buffer."""
        import torch

        from preftune.core.rl import kl_penalty, shaped_rewards
        from preftune.models import unwrap
        from preftune.train.rollout import (
            Rollout,
            pad_rows,
            policy_and_reference_logps,
            response_lengths_mask,
            rollout_seed,
            rollout_statistics,
            sample_responses,
        )
        from preftune.train.sharded import unsharded

        c, k, acc, tok = self.config, self.config.num_samples, self.accelerator, self.tokenizer

        def reduce(sums: torch.Tensor) -> torch.Tensor:  # a float64 sum over every process
            return acc.reduce(sums.to(acc.device), reduction="sum")

        prompt_index = [i for b in range(rollout * c.num_mini_batches, (rollout + 1) * c.num_mini_batches)
                        for i in self._share(len(self.train_items), b) for _ in range(k)]
        queries = [self.train_items[i] for i in prompt_index]
        first_row = acc.process_index * len(queries)
        seeds = [rollout_seed(c.seed, rollout, first_row + j) for j in range(len(queries))]
        policy, value = unwrap(model).policy, unwrap(model).value
        with acc.autocast(), unsharded(model):  # FSDP: the root's own weights, for calls that bypass its forward
            # (1) generate K completions per prompt with the current policy (KV cache, left padding; or
            #     the vLLM engine, its weights synced when updates ran since its last rollout)
            responses = (self.vllm.sample(policy, queries, seeds=seeds, settings=self.settings, step=step)
                         if self.vllm is not None else
                         sample_responses(policy, tok, queries, seeds=seeds, settings=self.settings,
                                          batch_size=self._generation_batch()))
            logps, values, ref_logps = policy_and_reference_logps(
                policy, self.reference, queries, responses, value=value, pad_token_id=tok.pad_token_id,
                temperature=c.temperature, batch_size=self._generation_batch(), with_reference=self.with_reference,
                packing=self.packing)
        # the per-token KL against the reference (shapes the rewards in (3); maxmin's objectives use it in (2))
        mask = response_lengths_mask([len(r) for r in responses])
        old, ref = pad_rows(logps), pad_rows(ref_logps) if ref_logps is not None else None
        kl = kl_penalty(old, ref, estimator=c.kl_estimator) * mask if ref is not None else torch.zeros_like(old)
        beta = self.kl_controller.value
        # (2) score every (prompt, completion); several rewards become one (standardised on the starting
        #     policy's samples, drawn before the first update; maxmin: the group lowest on this rollout)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        ended = torch.tensor([len(r) > 0 and int(r[-1]) == tok.eos_token_id for r in responses])
        if self.rewards.needs_statistics:
            self.rewards.fit_statistics(policy=policy, tokenizer=tok, queries=self.train_items, prompts=self.prompts,
                                        settings=self.settings, accelerator=acc, batch_size=self._generation_batch(),
                                        output_dir=self.output_dir, log=self.log)
        scores, reward_logs, per_reward = self.rewards.score([self.prompts[i] for i in prompt_index], texts,
                                                             seq_kl=kl.sum(-1), kl_coef=beta, reduce=reduce)
        if c.missing_eos_penalty is not None:
            scores = scores - c.missing_eos_penalty * (~ended).float()
        # (3) KL-shaped rewards against the reference: r(x, y) at the last token, -beta * KL_t on every token
        ro = Rollout(prompt_index, queries, responses, texts, mask, old, ref,
                     pad_rows(values) if values is not None else None, scores, kl,
                     shaped_rewards(scores, kl, mask, kl_coef=beta), ended, k, per_reward, reduce)
        # (4) advantages, the method's own: each completion becomes a training item
        items, extra = self.recipe.advantages(ro, c)
        # (6) log: global rollout statistics; the adaptive controller moves beta for the next rollout
        logs = {**rollout_statistics(ro, beta, reduce), **reward_logs, **extra}
        self.kl_controller.update(logs.get("objective/kl", 0.0), n_steps=int(logs.pop("_sequences")))
        if self.samples.due(rollout, step):
            self.samples.write(step, ro, self.prompts, limit=c.sample_rows)
        return {"rollout": rollout, "items": items, "logs": logs}

    # ------------------------------------------------------------------------------------------ per batch
    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from preftune.train.rollout import collate_items, pack_same_queries

        batch = collate_items(items, pad_token_id=self.tokenizer.pad_token_id)
        if not self.packing:
            return batch
        # the completions of one prompt (GRPO's and RLOO's K samples) share their query's computation
        return pack_same_queries(batch, [i["query"] for i in items], shared=self.packing == "shared")

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Response tokens (unit "token") or completions (unit "sequence") in the batch."""
        mask = batch["response_mask"]
        return int(mask.sum()) if self.unit == "token" else int(mask.shape[0])

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, normaliser: float) -> StepOutput:
        """(5) update: the step's completions under the current policy (and value network), the method's
        loss summed over its units / normaliser, plus PPO-ptx."""
        from preftune.core.logprobs import position_ids_from_mask
        from preftune.core.packing import is_packed, packed_inputs
        from preftune.train.rollout import (
            packed_response_outputs,
            response_columns,
            response_entropy,
            response_logps,
        )

        r, c, mask = self.recipe, self.config, batch["attention_mask"]
        temperature = c.temperature if r.loss_at_temperature else 1.0
        if is_packed(batch):  # padding-free rows; outputs back in the rollout layout
            out = model(**packed_inputs(model, batch), with_values=r.value_network)
            logps, values, entropy = packed_response_outputs(out.logits, out.values, batch, temperature=temperature,
                                                             entropy_temperature=c.temperature if r.entropy else None)
            if r.entropy:
                batch = {**batch, "entropy": entropy}
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        with_values=r.value_network)
            logps = response_logps(out.logits, batch, temperature=temperature)
            values = response_columns(out.values.float(), batch) if r.value_network else None
            if r.entropy:
                batch = {**batch, "entropy": response_entropy(out.logits, batch, temperature=c.temperature)}
        losses, metric_sums = r.loss(logps, values, batch, c)
        ptx, ptx_metrics = self.ptx.loss(model, batch) if self.ptx else (0.0, {})
        return StepOutput(loss=losses.sum() / normaliser + ptx, metric_sums=metric_sums, metric_shares=ptx_metrics,
                          logs=dict(self.buffer["logs"]))

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What the next steps depend on besides the model and optimizer: the current rollout, beta and the
        rewards' state (standardisation statistics, MaxMin's counts)."""
        return {"buffer": self.buffer, "kl_coef": self.kl_controller.value, "rewards": self.rewards.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = state["buffer"]
        self.kl_controller.value = float(state["kl_coef"])
        if "rewards" in state:
            self.rewards.load_state_dict(state["rewards"])

    def save(self, model: torch.nn.Module, path: Path, *, state_dict: dict[str, Any] | None = None) -> None:
        """The policy only (``save_pretrained`` + tokenizer): loads with AutoModelForCausalLM."""
        save_with_tokenizer(model, self.tokenizer, path, state_dict=state_dict)
