"""Load the models of the flow of work: tokenizer, policy, reference, reward model (hub id or local dir).

Everything goes through ``from_pretrained``, so a Hugging Face hub id and a local directory (for example
the output of ``preftune train sft``) are the same thing to this module. Which one a string is decides
what a mistake is called (``model_source``): a path that does not exist is "no such directory", a hub id
that cannot be had is "not in the local cache" (offline) or "no model ... on the hub"; each error names
the config key the string came from (``field``: model, ref_model, reward, value_model).

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
import difflib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from preftune import timing
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


# ---------------------------------------------------------------------------------------------- where a model is
# A hub repo id is `name` or `org/name`: letters, digits, - _ . (no -- or .., not starting or ending with - or .)
_REPO_PART = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
_MODEL_FILES = ("config.json", "adapter_config.json")
_TOKENIZER_FILES = (*_MODEL_FILES, "tokenizer_config.json", "tokenizer.json")


def is_repo_id(text: str) -> bool:
    """True for a well-formed Hugging Face repo id: ``gpt2``, ``org/model`` (not ``runs/sft/final``, ``./x``)."""
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(_REPO_PART.match(part) for part in parts)


def looks_like_path(text: str) -> bool:
    """True when ``text`` can only mean a local path, never a hub id. The rule: it starts with ``/``,
    ``./``, ``../`` or ``~`` (or is ``.`` / ``..``), holds a backslash or a drive letter, ends with ``/``,
    has more than two parts (``runs/sft/final``: a hub id is ``name`` or ``org/name``), is no well-formed
    repo id at all, or its first part is an existing local directory (``runs/x`` where ``./runs`` exists)."""
    if text in (".", "..") or text.startswith(("/", "./", "../", "~")) or "\\" in text or text.endswith("/"):
        return True
    if re.match(r"^[A-Za-z]:", text) or not is_repo_id(text):
        return True
    return "/" in text and Path(text.split("/")[0]).is_dir()


def model_source(name: str, *, field: str = "model", files: tuple[str, ...] = _MODEL_FILES) -> str:
    """``"dir"`` for a local model directory, ``"hub"`` for a hub id; a path that is no model directory
    is an error naming ``field``: no such directory (with the nearest existing folder and names in it), a
    file, or a directory with none of ``files`` (a run directory: its model is in ``final/``)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if any((path / f).is_file() for f in files):
            return "dir"
        inner = [p for p in (path / "final", path / "final-merged") if (p / "config.json").is_file()]
        hint = (f"did you mean {inner[0]}? A run directory keeps its model in final/" if inner else
                "give a directory a model was saved to with save_pretrained (e.g. runs/sft/final)")
        raise PreftuneError(f"{name!r} is not a model directory (it has no config.json)", field=field, hint=hint)
    if path.exists():
        raise PreftuneError(f"{name!r} is a file, not a model directory", field=field,
                            hint="give the directory the model was saved to (with config.json and the weights)")
    if looks_like_path(name):
        raise PreftuneError(f"no such directory: {name!r}", field=field,
                            hint=missing_path_hint(path, "train the model first or fix the path"))
    return "hub"


def missing_path_hint(path: Path, advice: str) -> str:
    """For a path that does not exist: the nearest existing folder above it, the name in that folder
    closest to the missing one, and ``advice``."""
    parent = next((p for p in path.parents if p.is_dir()), Path("."))
    missing = path.relative_to(parent).parts[0] if path.is_relative_to(parent) else path.name
    try:
        names = sorted(p.name for p in parent.iterdir())
    except OSError:
        names = []
    close = difflib.get_close_matches(missing, names, n=1, cutoff=0.6)
    shown = "the current directory" if str(parent) == "." else f"{parent}/"
    found = f"did you mean {parent / close[0]}? " if close else ""
    relative = "" if path.is_absolute() else f" (a relative path is read from {Path.cwd()})"
    return f"{found}{shown} has no {missing!r}; {advice}{relative}"


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model(name: str, *, field: str = "model", files: tuple[str, ...] = _MODEL_FILES) -> str:
    """``model_source`` and, for a hub id while offline (HF_HUB_OFFLINE=1), that the local cache has it:
    said before anything loads. Returns ``"dir"`` or ``"hub"``."""
    kind = model_source(name, field=field, files=files)
    if kind == "hub" and _offline():
        from huggingface_hub import try_to_load_from_cache

        if not any(isinstance(try_to_load_from_cache(name, f), str) for f in files):
            raise _not_cached(name, field, reason="HF_HUB_OFFLINE is set")
    return kind


def _not_cached(name: str, field: str, *, reason: str) -> PreftuneError:
    from huggingface_hub import constants

    local = f" (and there is no local directory {name!r})" if "/" in name else ""
    return PreftuneError(f"{name!r} is not in the local Hugging Face cache and cannot be downloaded ({reason})",
                         field=field, hint=f"download it where there is internet (`hf download {name}`) into "
                         f"{constants.HF_HUB_CACHE} (or $HF_HOME), or give a local model directory{local}")


def _load_error(name: str, exc: Exception, *, field: str, what: str) -> PreftuneError:
    """A loader's exception as one line naming ``field``: unreachable hub, unknown repo, or the loader's words."""
    text = " ".join(str(exc).split())
    if model_source(name, field=field, files=_TOKENIZER_FILES) == "hub":
        if "connect" in text or "offline" in text.lower() or "cached files" in text:
            return _not_cached(name, field, reason="the hub cannot be reached; set HF_HUB_OFFLINE=1 to "
                               "skip the retries")
        if "not a valid model identifier" in text or "Repository Not Found" in text or "404" in text:
            return PreftuneError(f"no model {name!r} on the Hugging Face hub and no local directory of that name",
                                 field=field, hint="check the id (https://huggingface.co/models) or the path; a "
                                 "private or gated model needs `hf auth login`")
    return PreftuneError(f"cannot load a {what} from {name!r}: {text}", field=field,
                         hint="give a Hugging Face hub id or a local model directory")


# ---------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, padding_side: str = "right",
                   field: str = "model") -> Any:
    """Load a tokenizer and make sure it has a pad token (EOS when it exists, else a new ``<pad>``).
    ``field`` is the config key ``name_or_path`` came from, for errors."""
    timing.mark("model")  # the start-up clock of a training run (preftune.timing)
    from transformers import AutoTokenizer

    check_model(name_or_path, field=field, files=_TOKENIZER_FILES)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(name_or_path, exc, field=field, what="tokenizer") from None
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


def _from_pretrained(auto_class: Any, name: str, *, field: str = "model", **kwargs: Any) -> Any:
    check_model(name, field=field)
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc, field=field, what="model") from None


def load_policy(name: str, *, dtype: str | torch.dtype | None = "auto", lora: dict[str, Any] | None = None,
                gradient_checkpointing: bool = False, trust_remote_code: bool = False,
                tokenizer: Any | None = None, field: str = "model") -> Any:
    """The trainable causal LM (``AutoModelForCausalLM``), wrapped in a peft LoRA model when ``lora`` is given."""
    timing.mark("model")
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name, field=field, dtype=resolve_dtype(dtype),
                             trust_remote_code=trust_remote_code)
    _fit_to_tokenizer(model, tokenizer)
    return _finish(model, lora=lora, gradient_checkpointing=gradient_checkpointing, task_type="CAUSAL_LM")


def freeze(model: Any) -> Any:
    """Put a model in eval mode with no parameter requiring a gradient (a reference is never trained)."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_reference(name: str, *, dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False,
                   tokenizer: Any | None = None, field: str = "ref_model") -> Any:
    """A frozen causal LM (eval mode, no gradients) to serve as the DPO/KL reference pi_ref."""
    timing.mark("reference")
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name, field=field, dtype=resolve_dtype(dtype),
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
    else a frozen copy of the policy as it is now (pi_ref = pi_SFT at step 0). The start-up clock counts
    from here to the end of the set-up as ``reference`` (the methods' reference pass follows)."""
    timing.mark("reference")
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
                      tokenizer: Any | None = None, field: str = "model") -> Any:
    """A scalar reward model r_phi(x, y): ``AutoModelForSequenceClassification`` with ``num_labels=1``.

    Works from any causal-LM checkpoint (typically the SFT model, as in InstructGPT, Ouyang et al. 2022,
    Sec. 3.5): the backbone weights load, the new ``score`` head is initialised, and the config's
    ``pad_token_id`` is set from the tokenizer so the model saves and reloads as a complete classifier.
    """
    timing.mark("model")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected here
    try:
        model = _from_pretrained(AutoModelForSequenceClassification, name, field=field, num_labels=1,
                                 dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    finally:
        hf_logging.set_verbosity(verbosity)
    _fit_to_tokenizer(model, tokenizer)
    if model.config.pad_token_id is None and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    score_head(model)  # fail early with a clear message on an unsupported architecture
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


def score_head(model: Any) -> torch.nn.Module:
    head = getattr(hf_model(model), "score", None)
    if not isinstance(head, torch.nn.Module):
        raise PreftuneError(f"{type(hf_model(model)).__name__} has no per-token `score` head", field="model",
                            hint="use a decoder-only checkpoint (Llama, Mistral, Qwen, GPT-2, ...)")
    return head


def token_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The score head's output at every position, [B, T] (PPO's per-token values V(x, y_<=t)).

    The model is called as a whole (so DDP and peft wrappers work) with positions from the mask (or
    ``position_ids`` when given: packed rows, whose 4D mask says nothing of positions); a hook on the
    ``score`` head captures its per-token output [B, T, 1] before the model pools it.
    """
    head = score_head(model)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _inp, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask,
              position_ids=position_ids_from_mask(attention_mask) if position_ids is None else position_ids,
              use_cache=False)
    finally:
        handle.remove()
    return captured[-1][..., 0]


def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward r(x, y) of each row: the score head applied to the hidden state of the last real token.

    The index comes from ``attention_mask`` (``last_token_index``), not from searching for the pad id as
    the Hugging Face head does, so it is right for left and right padding and when pad == EOS
    (``token_scores`` at that index). Returns [B] in float32, or float64 for a float64 model.
    """
    per_token = token_scores(model, input_ids, attention_mask)  # [B, T]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return at_least_float32(per_token[rows, last_token_index(attention_mask).to(input_ids.device)])


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is in a narrower float type (bf16, fp16); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
