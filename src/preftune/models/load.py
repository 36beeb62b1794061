"""Load the models of the flow of work: tokenizer, policy, reference, reward model (hub id or local dir).

Everything goes through ``from_pretrained``, so a Hugging Face hub id and a local directory (for example
the output of ``preftune train sft``) are the same thing to this module.

Two details matter for correctness and are handled here once:

* **Padding.** Many causal-LM tokenizers have no pad token. ``load_tokenizer`` then uses the EOS token
  as the pad token (no new embedding row, so the checkpoint loads unchanged). That is safe because
  nothing in preftune finds a sequence's end by looking for the pad id: last-token indexing and loss
  masks always come from the ``attention_mask`` and the ``labels`` that ``preftune.data.tokenize``
  builds, so an appended EOS that equals the pad id is still attended to and still trained on. Only
  when there is no EOS either is a new ``<pad>`` token added; the loaders then resize the embeddings.
* **Positions under left padding.** Hugging Face decoders number positions ``0..T-1`` whatever the mask
  says, so a left-padded sequence would get shifted positions. ``position_ids_from_mask`` numbers the
  real tokens from 0 in both padding sides, and every forward pass here passes it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from preftune.core.logprobs import position_ids_from_mask
from preftune.errors import PreftuneError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def default_device(device: str | None = None) -> str:
    """``device`` when given, else ``cuda`` when a GPU is available, else ``cpu``."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """Map a config string ("auto", "float32", "bf16", ...) to what ``from_pretrained(dtype=...)`` takes."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise PreftuneError(f"unknown dtype {dtype!r}", field="dtype",
                            hint="use one of auto, float32, bfloat16, float16") from None


# ---------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, padding_side: str = "right") -> Any:
    """Load a tokenizer and make sure it has a pad token (EOS when it exists, else a new ``<pad>``)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PreftuneError(f"cannot load a tokenizer from {name_or_path!r}: {exc}", field="model",
                            hint="give a Hugging Face hub id or a local model directory") from None
    return ensure_pad_token(tokenizer, padding_side=padding_side)


def ensure_pad_token(tokenizer: Any, *, padding_side: str = "right") -> Any:
    """Set ``tokenizer.pad_token`` when missing: the EOS token, or a new ``<pad>`` if there is no EOS."""
    if padding_side not in ("left", "right"):
        raise PreftuneError(f"padding side must be 'left' or 'right', not {padding_side!r}", field="padding_side")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = padding_side
    return tokenizer


def _fit_to_tokenizer(model: Any, tokenizer: Any | None) -> None:
    """Resize the embeddings when the tokenizer gained tokens (a new ``<pad>``) and record the pad id."""
    if tokenizer is None:
        return
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


# ---------------------------------------------------------------------------------------------- models
def _lora_config(lora: dict[str, Any], *, task_type: str) -> Any:
    from peft import LoraConfig

    options = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear", **lora}
    try:
        return LoraConfig(task_type=task_type, **options)
    except TypeError as exc:
        raise PreftuneError(f"invalid LoRA option: {exc}", field="lora",
                            hint="keys are peft.LoraConfig fields, e.g. r, lora_alpha, target_modules") from None


def _finish(model: Any, *, lora: dict[str, Any] | None, gradient_checkpointing: bool, task_type: str) -> Any:
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(lora, task_type=task_type))
    return model


def _from_pretrained(auto_class: Any, name: str, **kwargs: Any) -> Any:
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise PreftuneError(f"cannot load a model from {name!r}: {exc}", field="model",
                            hint="give a Hugging Face hub id or a local model directory") from None


def load_policy(name: str, *, dtype: str | torch.dtype | None = "auto", lora: dict[str, Any] | None = None,
                gradient_checkpointing: bool = False, trust_remote_code: bool = False,
                tokenizer: Any | None = None) -> Any:
    """The trainable causal LM (``AutoModelForCausalLM``), wrapped in a peft LoRA model when ``lora`` is given."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name, dtype=resolve_dtype(dtype),
                             trust_remote_code=trust_remote_code)
    _fit_to_tokenizer(model, tokenizer)
    return _finish(model, lora=lora, gradient_checkpointing=gradient_checkpointing, task_type="CAUSAL_LM")


def freeze(model: Any) -> Any:
    """Put a model in eval mode with no parameter requiring a gradient (a reference is never trained)."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_reference(name: str, *, dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False,
                   tokenizer: Any | None = None) -> Any:
    """A frozen causal LM (eval mode, no gradients) to serve as the DPO/KL reference pi_ref."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name, dtype=resolve_dtype(dtype),
                             trust_remote_code=trust_remote_code)
    _fit_to_tokenizer(model, tokenizer)
    return freeze(model)


def reference_from(model: Any) -> Any:
    """A frozen copy of ``model`` as it is now (the usual pi_ref = pi_SFT at step 0)."""
    return freeze(copy.deepcopy(unwrap(model)))


def build_reference(policy: Any, *, ref_model: str | None, lora: Any, dtype: str | torch.dtype | None = "auto",
                    tokenizer: Any | None = None, trust_remote_code: bool = False) -> Any:
    """pi_ref of the DPO loss and of the KL penalty: the model ``ref_model`` when given; None with LoRA
    (the policy with its adapter disabled is the reference: no extra memory, see ``adapter_disabled``);
    else a frozen copy of the policy as it is now (pi_ref = pi_SFT at step 0)."""
    if ref_model:
        return load_reference(ref_model, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    if lora:
        return None
    return reference_from(policy)


def is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def adapter_disabled(model: Any) -> Iterator[Any]:
    """Run a LoRA model as its frozen base (the reference), in eval mode and without gradients.

    With LoRA the reference model costs no memory: it is the same weights with the adapter switched off.
    """
    inner = unwrap(model)
    if not is_peft(inner):
        raise PreftuneError("adapter_disabled needs a LoRA (peft) model", field="lora")
    was_training = inner.training
    inner.eval()
    try:
        with inner.disable_adapter(), torch.no_grad():
            yield inner
    finally:
        inner.train(was_training)


def load_reward_model(name: str, *, dtype: str | torch.dtype | None = "auto", lora: dict[str, Any] | None = None,
                      gradient_checkpointing: bool = False, trust_remote_code: bool = False,
                      tokenizer: Any | None = None) -> Any:
    """A scalar reward model r_phi(x, y): ``AutoModelForSequenceClassification`` with ``num_labels=1``.

    Works from any causal-LM checkpoint (typically the SFT model, as in InstructGPT, Ouyang et al. 2022,
    Sec. 3.5): the backbone weights load, the new ``score`` head is initialised, and the config's
    ``pad_token_id`` is set from the tokenizer so the model saves and reloads as a complete classifier.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected here
    try:
        model = _from_pretrained(AutoModelForSequenceClassification, name, num_labels=1,
                                 dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    finally:
        hf_logging.set_verbosity(verbosity)
    _fit_to_tokenizer(model, tokenizer)
    if model.config.pad_token_id is None and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    _score_head(model)  # fail early with a clear message on an unsupported architecture
    return _finish(model, lora=lora, gradient_checkpointing=gradient_checkpointing, task_type="SEQ_CLS")


def unwrap(model: Any) -> Any:
    """The model inside a DistributedDataParallel / compile wrapper (peft models are kept)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def hf_model(model: Any) -> Any:
    """The transformers model inside any DDP / peft wrapping."""
    model = unwrap(model)
    if is_peft(model):
        model = model.get_base_model()
    return model


# ---------------------------------------------------------------------------------------------- forward helpers
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row, for left or right padding: max_t (t * mask_t)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def _score_head(model: Any) -> torch.nn.Module:
    head = getattr(hf_model(model), "score", None)
    if not isinstance(head, torch.nn.Module):
        raise PreftuneError(f"{type(hf_model(model)).__name__} has no per-token `score` head", field="model",
                            hint="use a decoder-only checkpoint (Llama, Mistral, Qwen, GPT-2, ...)")
    return head


def token_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score head's output at every position, [B, T] (PPO's per-token values V(x, y_<=t)).

    The model is called as a whole (so DDP and peft wrappers work) with positions from the mask; a
    hook on the ``score`` head captures its per-token output [B, T, 1] before the model pools it.
    """
    head = _score_head(model)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _inp, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask,
              position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    finally:
        handle.remove()
    return captured[-1][..., 0]


def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward r(x, y) of each row: the score head applied to the hidden state of the last real token.

    The index comes from ``attention_mask`` (``last_token_index``), not from searching for the pad id as
    the Hugging Face head does, so it is right for left and right padding and when pad == EOS
    (``token_scores`` at that index). Returns float32 [B].
    """
    per_token = token_scores(model, input_ids, attention_mask)  # [B, T]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return per_token[rows, last_token_index(attention_mask).to(input_ids.device)].float()


@torch.no_grad()
def score_texts(model: Any, tokenizer: Any, prompts: Sequence[Any], responses: Sequence[Any], *,
                batch_size: int = 8, max_length: int | None = None, progress: bool = False) -> list[float]:
    """Score each (prompt, response) with a reward model; prompts/responses are strings or message lists.

    Tokenised exactly as in reward-model training (``preftune.data.tokenize.tokenize_prompt_response``:
    prompt + response + EOS), truncated to ``max_length`` keeping the end of the prompt. Returns one
    float per pair, in order.
    """
    from preftune.data.collate import pad_sequences
    from preftune.data.tokenize import tokenize_prompt_response

    if len(prompts) != len(responses):
        raise PreftuneError(f"{len(prompts)} prompts but {len(responses)} responses")
    limit = max_length or getattr(tokenizer, "model_max_length", None) or 2048
    limit = min(limit, 1_000_000)
    sequences = [
        tokenize_prompt_response(tokenizer, p, r, max_length=limit, max_prompt_length=max(1, limit // 2),
                                 truncation="keep_end").input_ids
        for p, r in zip(prompts, responses, strict=True)
    ]
    was_training = model.training
    model.eval()
    device = next(unwrap(model).parameters()).device
    scores: list[float] = []
    batches = range(0, len(sequences), batch_size)
    try:
        for start in _progress(batches, enabled=progress, description="scoring"):
            chunk = sequences[start:start + batch_size]
            input_ids, attention_mask = pad_sequences(chunk, pad_value=tokenizer.pad_token_id, padding_side="right")
            scores.extend(sequence_scores(model, input_ids.to(device), attention_mask.to(device)).tolist())
    finally:
        model.train(was_training)
    return scores


def _progress(iterable: Any, *, enabled: bool, description: str) -> Any:
    if not enabled:
        return iterable
    from rich.progress import track

    return track(iterable, description=description, transient=True)
