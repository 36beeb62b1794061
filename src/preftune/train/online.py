"""What PPO, RLOO and RAFT share: the six steps of a rollout and the schedule of optimizer steps over it.

Each rollout, on each process (``make_rollout``)::

    (1) generate    K completions per prompt with the current policy       rollout.sample_responses
    (2) score       each (prompt, completion): reward model or function      rollout.load_scorer
    (3) KL-shape    r(x, y) - beta * KL_t per token against the frozen        rl.kl_penalty, rl.shaped_rewards
                    reference (k1 or k3; beta fixed or adaptive)              rl.AdaptiveKLController
    (4) advantages  the method's ``advantages``: GAE with a value head (PPO), leave-one-out (RLOO),
                    best of K (RAFT); each completion becomes one training item
    (5) update      the loop's optimizer steps on the rollout's items, through the method's ``loss``
    (6) log         rollout statistics (``objective/*``, ``completions/*``) and OUTPUT_DIR/samples.jsonl

Schedule. The loop's step ``s`` is step ``within = s mod (E*M)`` of rollout ``s // (E*M)`` (E =
``update_epochs``, M = ``num_mini_batches``): pass ``within // M`` over the rollout, mini-batch
``within mod M`` of a permutation seeded by (seed, rollout, pass). A rollout's prompts are M consecutive
global batches (``batch_size * grad_accum * processes`` prompts each) of the loop's seeded epoch order,
so ``epochs`` counts passes over the prompts and ``updates_per_batch = E`` tells the loop's plan.

Resume. The current rollout (its items) and the KL coefficient are the method's ``state_dict``, saved in
every checkpoint, so a run stopped in the middle of a rollout continues on the same rollout with the
same numbers; generation is seeded per (seed, rollout, row), so later rollouts are the same too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune.config_online import OnlineConfig
from preftune.errors import PreftuneError
from preftune.train.base import RunContext

_RESERVED = ("query", "response", "ptx")  # item keys that collate handles itself


@dataclass
class Rollout:
    """One process's rollout of N = P x K completions (the K samples of a prompt adjacent); token
    tensors are [N, R] over response tokens, right-padded, ``mask`` 1 on real tokens."""

    prompt_index: list[int]         # index into the method's prompts, per row
    queries: list[torch.Tensor]     # prompt token ids per row
    responses: list[torch.Tensor]   # response token ids per row (ending with EOS when it stopped)
    texts: list[str]                # decoded responses
    mask: torch.Tensor              # [N, R]
    logps: torch.Tensor             # [N, R] log pi_old(y_t), the policy that sampled
    ref_logps: torch.Tensor         # [N, R] log pi_ref(y_t)
    values: torch.Tensor | None     # [N, R] V(s_t) of the value network (PPO)
    scores: torch.Tensor            # [N] r(x, y) (minus missing_eos_penalty)
    kl: torch.Tensor                # [N, R] per-token KL estimate
    rewards: torch.Tensor           # [N, R] KL-shaped rewards (rl.shaped_rewards)
    ended: torch.Tensor             # [N] bool: stopped with EOS
    num_samples: int                # K

    def items(self, rows: list[int] | None = None, **fields: torch.Tensor) -> list[dict[str, Any]]:
        """Training items of ``rows`` (all by default): query, response and each field, [N, R] tensors
        cut to the row's response length and [N] tensors as 0-d tensors."""
        rows = list(range(len(self.queries))) if rows is None else rows
        lengths = self.mask.sum(-1).long().tolist()
        out = []
        for i in rows:
            item: dict[str, Any] = {"query": self.queries[i], "response": self.responses[i]}
            for name, value in fields.items():
                item[name] = value[i, :lengths[i]].clone() if value.dim() == 2 else value[i].clone()
            out.append(item)
        return out


class OnlineMethod:
    """The shared half of ppo / rloo / raft. Subclasses set ``unit`` ("token" or "sequence": what their
    loss is a mean over) and implement ``advantages(rollout) -> (items, logs)`` and ``loss``.

    ``prompts`` (strings or message lists) replaces reading ``config.data``; ``reward_fn`` (a callable
    ``fn(prompt_text, completion) -> float``) replaces ``config.reward``.
    """

    unit = "token"

    def __init__(self, *, prompts: list[Any] | None = None, reward_fn: Any = None) -> None:
        self._prompts, self._reward_fn = prompts, reward_fn
        self.model: torch.nn.Module
        self.tokenizer: Any = None
        self.train_items: list[Any] = []
        self.eval_items: list[Any] = []
        self.buffer: dict[str, Any] | None = None
        self.updates_per_batch = 1

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, ctx: RunContext) -> None:
        from preftune.core.rl import AdaptiveKLController, FixedKLController
        from preftune.generate import GenerationSettings, load_prompts
        from preftune.models import load_policy, load_tokenizer
        from preftune.train.rollout import encode_prompts

        config: OnlineConfig = ctx.config
        self.config, self.accelerator, self.log = config, ctx.accelerator, ctx.log
        if self._prompts is None and not config.data:
            raise PreftuneError("is required: a prompts file (one per line, or JSONL with prompt / messages)",
                                field="data")
        if self._reward_fn is None and not config.reward:
            raise PreftuneError("is required: a reward-model directory or hub id, or module:function",
                                field="reward", hint="e.g. reward: runs/reward/final or reward: my_rewards.py:score")
        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        policy = load_policy(config.model, dtype=config.dtype, lora=config.lora,
                             gradient_checkpointing=config.gradient_checkpointing,
                             trust_remote_code=config.trust_remote_code, tokenizer=self.tokenizer)
        self.reference = self._build_reference(config, policy)
        self.score = self._build_scorer(config)
        self.model = self.build_model(policy, config, ctx)
        self.prompts = list(self._prompts) if self._prompts is not None else load_prompts(config.data)
        queries, cut = encode_prompts(self.tokenizer, self.prompts, template=config.template,
                                      max_tokens=config.max_length - config.max_new_tokens)
        self.train_items = [torch.tensor(q, dtype=torch.long) for q in queries]
        ctx.log(f"{len(self.prompts)} prompts; {cut} cut from the left to max_length - max_new_tokens = "
                f"{config.max_length - config.max_new_tokens} tokens")
        if config.ptx_coef > 0 and ctx.accelerator.num_processes > 1:
            raise PreftuneError("PPO-ptx runs a second forward pass per micro-batch, which DDP does not allow",
                                field="ptx_coef", hint="train with one process, or set ptx_coef: 0")
        self.ptx_items = self._load_ptx(config, ctx.log) if config.ptx_coef > 0 else []
        self.kl_controller = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
                              if config.kl_target is not None else FixedKLController(config.kl_coef))
        self.settings = GenerationSettings(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                           max_new_tokens=config.max_new_tokens, seed=config.seed,
                                           template=config.template)
        self.updates_per_batch = config.update_epochs
        self.samples = SamplesFile(ctx.output_dir / "samples.jsonl", enabled=ctx.accelerator.is_main_process)

    def build_model(self, policy: Any, config: OnlineConfig, ctx: RunContext) -> torch.nn.Module:
        """The trained module (PPO wraps the policy with its value network)."""
        return policy

    def generation_model(self, model: Any) -> Any:
        """The causal LM inside the trained module (unwrapped from DDP), for generate and log-probs."""
        from preftune.models import unwrap

        return unwrap(model)

    def value_model(self, model: Any) -> Any:
        """The scalar-head value network inside the trained module, or None (only PPO has one)."""
        return None

    def _build_reference(self, config: OnlineConfig, policy: Any) -> Any:
        """pi_ref: ``ref_model``; else None with LoRA (the adapter disabled); else a frozen copy."""
        from preftune.models import load_reference, reference_from

        if config.ref_model:
            reference = load_reference(config.ref_model, dtype=config.dtype, tokenizer=self.tokenizer,
                                       trust_remote_code=config.trust_remote_code)
        elif config.lora:
            return None
        else:
            reference = reference_from(policy)
        return reference.to(self.accelerator.device)

    def _build_scorer(self, config: OnlineConfig) -> Any:
        from preftune.train.rollout import load_scorer

        return load_scorer(self._reward_fn if self._reward_fn is not None else config.reward,
                           device=str(self.accelerator.device), batch_size=self._generation_batch())

    def _generation_batch(self) -> int:
        c = self.config
        return c.generation_batch_size or c.batch_size * c.num_samples

    def _load_ptx(self, config: OnlineConfig, log: Any) -> list[Any]:
        """PPO-ptx: the SFT rows of ``ptx_data``, tokenised as ``train sft`` does (completion tokens only)."""
        from preftune.train.sft import SFTMethod, _read

        sft = SFTMethod()
        sft.tokenizer, sft.completion_only_loss = self.tokenizer, True
        return sft._tokenize(_read(config.ptx_data, config, log), config, log, name="ptx")

    # ------------------------------------------------------------------------------------------ schedule
    def _plan(self, num_items: int) -> Any:
        from preftune.train.checkpoint import TrainerState

        c, world = self.config, self.accelerator.num_processes
        global_batch = c.batch_size * c.grad_accum * world
        return TrainerState(num_items=num_items, global_batch=global_batch,
                            steps_per_epoch=max(1, num_items // global_batch))

    def _batch_share(self, num_items: int, batch: int) -> list[int]:
        """This process's share of global batch ``batch`` (0-based) of ``num_items`` in the seeded order."""
        from preftune.train.plan import batch_indices

        per_process = self.config.batch_size * self.config.grad_accum
        indices = batch_indices(self._plan(num_items), batch, seed=self.config.seed)
        p = self.accelerator.process_index
        return indices[p * per_process:(p + 1) * per_process]

    def before_step(self, model: torch.nn.Module, step: int) -> list[Any]:
        """The step's items: make rollout ``step // (E*M)`` when it is not the buffered one, then return
        mini-batch ``within mod M`` of pass ``within // M`` over it (plus PPO-ptx rows)."""
        from preftune.train.plan import split_for_process
        from preftune.train.rollout import rollout_seed

        c = self.config
        per_rollout = c.update_epochs * c.num_mini_batches
        rollout, within = divmod(step, per_rollout)
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
        if self.ptx_items:
            chosen = self._attach_ptx(chosen, step)
        return chosen

    def _attach_ptx(self, items: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
        """Spread this step's SFT rows over the step's items (round robin) and all-reduce their token count."""
        rows = [self.ptx_items[i] for i in self._batch_share(len(self.ptx_items), step)]
        items = [{**item, "ptx": []} for item in items]
        for k, row in enumerate(rows):
            items[k % len(items)]["ptx"].append(row)
        tokens = sum(sum(1 for label in row.labels[1:] if label != -100) for row in rows)
        total = torch.tensor(float(tokens), dtype=torch.float64, device=self.accelerator.device)
        self.ptx_tokens = max(self.accelerator.reduce(total, reduction="sum").item(), 1.0)
        return items

    # ------------------------------------------------------------------------------------------ the rollout
    def make_rollout(self, model: Any, rollout: int, step: int) -> dict[str, Any]:
        """Steps (1)-(4) and (6) for rollout ``rollout`` on this process; returns the buffer."""
        from preftune.core.rl import kl_penalty, shaped_rewards
        from preftune.train.rollout import (
            pad_rows,
            response_lengths_mask,
            rollout_logps,
            rollout_seed,
            sample_responses,
        )

        c, k, acc, tok = self.config, self.config.num_samples, self.accelerator, self.tokenizer
        prompt_index = [i for b in range(rollout * c.num_mini_batches, (rollout + 1) * c.num_mini_batches)
                        for i in self._batch_share(len(self.train_items), b) for _ in range(k)]
        queries = [self.train_items[i] for i in prompt_index]
        first_row = acc.process_index * len(queries)
        seeds = [rollout_seed(c.seed, rollout, first_row + j) for j in range(len(queries))]
        policy, batch = self.generation_model(model), self._generation_batch()
        with acc.autocast():
            # (1) generate K completions per prompt with the current policy (KV cache, left padding)
            responses = sample_responses(policy, tok, queries, seeds=seeds, settings=self.settings, batch_size=batch)
            logps, values = rollout_logps(policy, queries, responses, pad_token_id=tok.pad_token_id,
                                          temperature=c.temperature, batch_size=batch, values=self.value_model(model))
            ref_logps = self._reference_logps(policy, queries, responses)
        # (2) score every (prompt, completion)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        ended = torch.tensor([len(r) > 0 and int(r[-1]) == tok.eos_token_id for r in responses])
        scores = torch.tensor(self.score([self.prompts[i] for i in prompt_index], texts), dtype=torch.float32)
        if c.missing_eos_penalty is not None:
            scores = scores - c.missing_eos_penalty * (~ended).float()
        # (3) KL-shaped rewards against the reference: r(x, y) at the last token, -beta * KL_t on every token
        mask = response_lengths_mask([len(r) for r in responses])
        old, ref = pad_rows(logps), pad_rows(ref_logps)
        kl = kl_penalty(old, ref, estimator=c.kl_estimator) * mask
        beta = self.kl_controller.value
        ro = Rollout(prompt_index, queries, responses, texts, mask, old, ref,
                     pad_rows(values) if values is not None else None, scores, kl,
                     shaped_rewards(scores, kl, mask, kl_coef=beta), ended, k)
        # (4) advantages (the method's own): each completion becomes a training item
        items, extra = self.advantages(ro)
        # (6) log: global rollout statistics; the adaptive controller moves beta for the next rollout
        logs = {**self._statistics(ro, beta), **extra}
        self.kl_controller.update(logs["objective/kl"], n_steps=int(logs.pop("_sequences")))
        if self._sample_due(rollout, step):
            self.samples.write(step, ro, self.prompts, limit=c.sample_rows)
        return {"rollout": rollout, "items": items, "logs": logs}

    def _reference_logps(self, policy: Any, queries: list[torch.Tensor],
                         responses: list[torch.Tensor]) -> list[torch.Tensor]:
        from preftune.models import adapter_disabled
        from preftune.train.rollout import rollout_logps

        kwargs = {"pad_token_id": self.tokenizer.pad_token_id, "temperature": self.config.temperature,
                  "batch_size": self._generation_batch()}
        if self.reference is not None:
            return rollout_logps(self.reference, queries, responses, **kwargs)[0]
        with adapter_disabled(policy) as base:
            return rollout_logps(base, queries, responses, **kwargs)[0]

    def _statistics(self, ro: Rollout, beta: float) -> dict[str, float]:
        """Means over every process's rollout: sequence KL, entropy estimate, scores, length, EOS rate."""
        from preftune.core.rl import sequence_entropy_estimate

        seq_kl = ro.kl.sum(-1)
        sums = torch.stack([seq_kl.sum(), sequence_entropy_estimate(ro.logps, ro.mask).sum(), ro.scores.sum(),
                            ro.mask.sum(), ro.ended.float().sum(), torch.tensor(float(len(ro.queries)))]).double()
        kl, entropy, scores, length, eos, n = self.accelerator.reduce(
            sums.to(self.accelerator.device), reduction="sum").tolist()
        return {"objective/kl": kl / n, "objective/entropy": entropy / n, "objective/non_score_reward": -beta * kl / n,
                "objective/rlhf_reward": (scores - beta * kl) / n, "objective/scores": scores / n,
                "objective/kl_coef": beta, "completions/mean_length": length / n, "completions/eos_rate": eos / n,
                "_sequences": n}

    def _sample_due(self, rollout: int, step: int) -> bool:
        every = self.config.sample_every
        per_rollout = self.config.update_epochs * self.config.num_mini_batches
        return bool(every) and (rollout == 0 or step // every != (step - per_rollout) // every)

    def advantages(self, ro: Rollout) -> tuple[list[dict[str, Any]], dict[str, float]]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ per batch
    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Rollout rows -> the rollout layout (``rollout.collate_rollout``); per-token fields [B, R],
        per-sequence fields [B]; PPO-ptx rows as ``ptx_input_ids`` / ``ptx_attention_mask`` / ``ptx_labels``."""
        from preftune.data.collate import collate_sft
        from preftune.train.rollout import collate_rollout, pad_rows

        pad = self.tokenizer.pad_token_id
        batch = collate_rollout([i["query"] for i in items], [i["response"] for i in items], pad_token_id=pad)
        for name in (n for n in items[0] if n not in _RESERVED):
            values = [i[name] for i in items]
            batch[name] = pad_rows(values) if values[0].dim() == 1 else torch.stack(values)
        ptx = [row for i in items for row in i.get("ptx", [])]
        if ptx:
            batch.update({f"ptx_{k}": v for k, v in collate_sft(ptx, pad_token_id=pad, padding_side="right").items()})
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Response tokens (``unit = "token"``) or completions (``unit = "sequence"``) in the batch."""
        if self.unit == "token":
            return int(batch["response_mask"].sum())
        return int(batch["response_mask"].shape[0])

    def lm_logits(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of the policy through the trained module (so DDP sees the forward)."""
        from preftune.train.rollout import policy_logits

        return policy_logits(model, {"input_ids": input_ids, "attention_mask": attention_mask})

    def ptx_loss(self, model: Any, batch: dict[str, torch.Tensor], *,
                 normaliser: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PPO-ptx: ``ptx_coef * NLL(SFT tokens) / (the step's SFT tokens)`` (Ouyang et al. 2022, Eq. 2,
        the gamma * E[log pi(x)] term); 0 when the batch has no SFT rows."""
        if "ptx_input_ids" not in batch:
            return torch.zeros((), device=batch["input_ids"].device), {}
        from preftune.core.logprobs import token_logps
        from preftune.train.sft import next_token_labels

        logits = self.lm_logits(model, batch["ptx_input_ids"], batch["ptx_attention_mask"])
        nll = -token_logps(logits, next_token_labels(batch["ptx_labels"])).sum()
        # the loop divides metric sums by `normaliser`; this makes loss/ptx the mean NLL per SFT token
        return self.config.ptx_coef * nll / self.ptx_tokens, {"loss/ptx": nll.detach() * normaliser / self.ptx_tokens}

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What the next steps depend on besides the model and optimizer: the current rollout and beta."""
        return {"buffer": self.buffer, "kl_coef": self.kl_controller.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = state["buffer"]
        self.kl_controller.value = float(state["kl_coef"])

    def save(self, model: torch.nn.Module, path: Path) -> None:
        """The policy only (``save_pretrained`` + tokenizer): loads with AutoModelForCausalLM."""
        getattr(model, "policy", model).save_pretrained(path)
        self.tokenizer.save_pretrained(path)


class SamplesFile:
    """``OUTPUT_DIR/samples.jsonl``: rows of rollouts (step, prompt, completion, score, reward, kl, ...).
    On resume, rows written after the checkpoint's step are dropped (they are written again)."""

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path, self.enabled, self.started = path, enabled, False

    def start(self, *, keep_before: int) -> None:
        kept = []
        if self.path.is_file():
            kept = [line + "\n" for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] < keep_before]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(kept), encoding="utf-8")
        self.started = True

    def write(self, step: int, ro: Rollout, prompts: list[Any], *, limit: int) -> None:
        if not self.enabled:
            return
        seq_kl, reward = ro.kl.sum(-1), ro.rewards.sum(-1)
        with self.path.open("a", encoding="utf-8") as f:
            for i in range(min(limit, len(ro.texts))):
                record = {"step": step, "prompt": prompts[ro.prompt_index[i]], "sample": i % ro.num_samples,
                          "completion": ro.texts[i], "score": float(ro.scores[i]), "kl": float(seq_kl[i]),
                          "rlhf_reward": float(reward[i]), "length": int(ro.mask[i].sum()),
                          "eos": bool(ro.ended[i])}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
