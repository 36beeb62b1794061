"""Per-token log-probabilities of a causal LM without a full fp32 log-softmax over [batch, time, vocab].

Every preference method needs ``log pi(y_t | x, y_<t)`` for the tokens of a response, summed per sequence
(DPO, Rafailov et al. 2023, Eq. 7 uses ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)``). The naive way,
``logits.float().log_softmax(-1).gather(-1, labels)``, materialises two [B, T, V] fp32 tensors and keeps
one alive for backward: at B*T = 8k positions and V = 150k that is ~5 GB per copy.

Here the log-softmax is computed in row chunks by a custom autograd function:

    forward, per chunk of rows r:  lse_r = logsumexp_v(z_rv)   (fp32),   out_r = z_{r, y_r} - lse_r
    backward, per chunk:           dL/dz_rv = g_r * (1[v = y_r] - exp(z_rv - lse_r))

so autograd keeps only the logits (which already exist) and the (B*T,) fp32 ``lse``; the peak extra
memory is one chunk in fp32. :func:`token_logps_from_hidden` goes one step further and never builds the
logits at all: the lm_head projection ``z = h W^T (+ b)`` is done per chunk and recomputed in backward.

From a batch: ``preftune.core.forward.model_label_logps`` (per token) and ``batch_logps`` (per sequence)
are the one path the trainers take (the model's forward pass, padded or packed rows); their ``fused``
option (the ``fused_lm_head`` key of ``train sft`` and ``train dpo``) applies
:func:`token_logps_from_hidden` to the final hidden states instead of :func:`token_logps` to the logits.

Shapes: ``B`` batch, ``T`` time (sequence length), ``V`` vocabulary, ``H`` hidden size. Labels use the
Hugging Face convention: ``-100`` marks a position to ignore, whose log-prob is reported as 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "auto_chunk_size",
    "fused_lm_head_applies",
    "lm_head_parts",
    "sharded_launch",
    "sequence_logps",
    "next_token_labels",
    "position_ids_from_mask",
    "label_logps",
    "token_logps",
    "token_logps_from_hidden",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision and fp32 inputs; fp64 stays fp64 (so gradcheck can run in double)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


CPU_CHUNK_ELEMENTS = 2**20   # fp32 values per chunk on CPU (4 MiB: stays in cache; measured ~2x faster)
CPU_FUSED_MIN_ROWS = 128     # fused lm_head on CPU: enough rows per chunk to reuse each weight read
ACCELERATOR_CHUNK_ROWS = 4096  # rows per chunk on GPUs, where fewer, larger kernels win


def auto_chunk_size(vocab: int, device: torch.device | str, *, fused: bool = False) -> int:
    """Rows per chunk when none is given: on CPU ``max(1, 2**20 // V)`` (one chunk is 4 MiB of fp32,
    which keeps the logsumexp / softmax passes in cache: at V = 8192 this measured ~2x faster forward +
    backward than 4096-row chunks on a 2-core CPU); elsewhere 4096 rows.

    ``fused`` (:func:`token_logps_from_hidden`): on CPU at least 128 rows, since each chunk's lm_head
    matmul reads the whole [V, H] weight: at V = 151,936, H = 256 the 6 rows of the rule above made the
    fused forward + backward ~4x slower than 128 rows (128 and 256 measured alike; 256 slower at V = 32k)."""
    if torch.device(device).type == "cpu":
        rows = max(1, CPU_CHUNK_ELEMENTS // max(1, vocab))
        return max(rows, CPU_FUSED_MIN_ROWS) if fused else rows
    return ACCELERATOR_CHUNK_ROWS


def _check_shapes(scores: Tensor, labels: Tensor, what: str) -> None:
    if scores.dim() != 3:
        raise ValueError(f"{what} must be [B, T, {'V' if what == 'logits' else 'H'}], got shape {tuple(scores.shape)}")
    if labels.shape != scores.shape[:2]:
        raise ValueError(f"labels must be [B, T] = {tuple(scores.shape[:2])}, got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor (long), got {labels.dtype}")


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(z)[y] over rows of a [N, V] logits matrix, chunk by chunk (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
        n = logits.shape[0]
        cdtype = _compute_dtype(logits.dtype)
        valid = labels != IGNORE_INDEX
        safe = labels.masked_fill(~valid, 0).unsqueeze(-1)
        out = torch.zeros(n, dtype=cdtype, device=logits.device)
        lse = torch.zeros(n, dtype=cdtype, device=logits.device)
        for s in range(0, n, chunk_size):
            z = logits[s : s + chunk_size].to(cdtype)
            lse[s : s + chunk_size] = torch.logsumexp(z, dim=-1)
            target = z.gather(-1, safe[s : s + chunk_size]).squeeze(-1)
            out[s : s + chunk_size] = target - lse[s : s + chunk_size]
        out.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        logits, labels, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        chunk_size = ctx.chunk_size
        valid = labels != IGNORE_INDEX
        g = grad_out.to(lse.dtype).masked_fill(~valid, 0.0)
        safe = labels.masked_fill(~valid, 0).unsqueeze(-1)
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk_size):
            e = s + chunk_size
            # -g * softmax(z), built in place on one fp32 chunk; then + g at the target (the one-hot term).
            # When logits are already in the compute dtype, write straight into the gradient (no copy).
            into = grad[s:e] if grad.dtype == lse.dtype else None
            d = torch.sub(logits[s:e].to(lse.dtype), lse[s:e, None], out=into).exp_().mul_(-g[s:e, None])
            d.scatter_add_(-1, safe[s:e], g[s:e, None])
            if into is None:
                grad[s:e] = d
        return grad, None, None


def token_logps(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """``log softmax(logits)[labels]`` per position, without a full fp32 [B, T, V] log-softmax.

    Args:
        logits: [B, T, V] scores in any float dtype (bf16 / fp16 / fp32 / fp64); not copied.
        labels: [B, T] long, already aligned with ``logits`` (see :func:`next_token_labels`);
            ``-100`` = ignore.
        chunk_size: rows (of the B*T positions) processed at once; extra memory is ``chunk_size * V``
            fp32 values in forward and in backward. ``None``: :func:`auto_chunk_size`.

    Returns:
        [B, T] float32 (float64 for float64 logits): ``z_{b,t,y} - logsumexp_v z_{b,t,v}``, 0 where
        ``labels == -100``. Differentiable w.r.t. ``logits``; the gradient has the logits' dtype.
    """
    _check_shapes(logits, labels, "logits")
    if chunk_size is None:
        chunk_size = auto_chunk_size(logits.shape[-1], logits.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, t, v = logits.shape
    flat = _ChunkedTokenLogps.apply(logits.reshape(b * t, v), labels.reshape(b * t).long(), chunk_size)
    return flat.view(b, t)


class _ChunkedHeadLogps(torch.autograd.Function):
    """log softmax(cap * tanh((h W^T + b) / cap))[y] per row of [N, H] hidden states, chunk by chunk;
    also, not differentiable, whether y is the arg-max of the row (SFT's token accuracy without logits)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                chunk_size: int, softcap: float | None, want_hits: bool) -> tuple[Tensor, Tensor | None]:
        n = hidden.shape[0]
        cdtype = _compute_dtype(hidden.dtype)
        valid = labels != IGNORE_INDEX
        safe = labels.masked_fill(~valid, 0).unsqueeze(-1)
        out = torch.zeros(n, dtype=cdtype, device=hidden.device)
        lse = torch.zeros(n, dtype=cdtype, device=hidden.device)
        hits = torch.zeros(n, dtype=torch.bool, device=hidden.device) if want_hits else None
        for s in range(0, n, chunk_size):
            e = s + chunk_size
            z = _project(hidden[s:e], weight, bias, softcap, cdtype)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            out[s:e] = z.gather(-1, safe[s:e]).squeeze(-1) - lse[s:e]
            if hits is not None:  # an extra pass over the chunk: only when asked
                hits[s:e] = z.argmax(-1) == safe[s:e, 0]
        out.masked_fill_(~valid, 0.0)
        if hits is not None:
            hits &= valid
            ctx.mark_non_differentiable(hits)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size, ctx.softcap = chunk_size, softcap
        ctx.mm_dtype = _autocast_dtype(hidden.device.type) or weight.dtype  # backward recomputes alike
        return out, hits

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_hits: Tensor | None) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        softcap, chunk_size = ctx.softcap, ctx.chunk_size
        valid = labels != IGNORE_INDEX
        g = grad_out.to(lse.dtype).masked_fill(~valid, 0.0)
        safe = labels.masked_fill(~valid, 0).unsqueeze(-1)
        grad_h = torch.empty_like(hidden) if need_h else None
        # Weight / bias gradients accumulate over chunks: keep them in the compute dtype, cast once.
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=lse.dtype, device=bias.device) if need_b else None
        # Under autocast the forward projected in the autocast dtype; backward (which runs outside
        # autocast) recomputes and multiplies in that same dtype.
        mm = ctx.mm_dtype
        w_mm = weight.to(mm)
        b_mm = None if bias is None else bias.to(mm)
        for s in range(0, hidden.shape[0], chunk_size):
            e = s + chunk_size
            raw = _project(hidden[s:e], w_mm, b_mm, None, lse.dtype)
            if softcap is not None:
                th = torch.tanh(raw / softcap)
                z = th * softcap
            else:
                z = raw
            d = z.sub_(lse[s:e, None]).exp_().mul_(-g[s:e, None])   # dL/dz = g (onehot - softmax)
            d.scatter_add_(-1, safe[s:e], g[s:e, None])
            if softcap is not None:
                d.mul_(1.0 - th * th)                                  # d/dx cap*tanh(x/cap) = 1 - tanh^2
            if need_h:
                grad_h[s:e] = (d.to(mm) @ w_mm).to(hidden.dtype)
            if need_w and mm == lse.dtype:
                grad_w.addmm_(d.t(), hidden[s:e].to(mm))
            elif need_w:
                grad_w.add_(d.t().to(mm) @ hidden[s:e].to(mm))
            if need_b:
                grad_b.add_(d.sum(0))
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type`` (e.g. bf16 inside ``torch.autocast``), else None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: no device_type argument
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def _project(h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None,
             cdtype: torch.dtype) -> Tensor:
    """Logits of one chunk, ``h W^T + b`` in the weights' dtype, softcapped, returned in ``cdtype``."""
    z = torch.nn.functional.linear(h.to(weight.dtype), weight, bias).to(cdtype)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def token_logps_from_hidden(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, *,
                            lm_head_bias: Tensor | None = None, softcap: float | None = None,
                            chunk_size: int | None = None, hits: bool = False) -> tuple[Tensor, Tensor | None]:
    """Like :func:`token_logps` of ``logits = hidden @ W^T + b`` but without ever building [B, T, V].

    The projection is done per chunk of ``chunk_size`` rows and recomputed in backward (one extra
    lm_head matmul traded for never holding the logits). ``softcap`` applies Gemma-2 style final logit
    soft-capping ``cap * tanh(z / cap)`` (``config.final_logit_softcapping``; ``None`` when absent).

    Args:
        hidden: [B, T, H] final hidden states (after the last norm), any float dtype.
        lm_head_weight: [V, H] output projection (possibly tied to the input embedding).
        labels: [B, T] long aligned with ``hidden``; ``-100`` = ignore.
        chunk_size: rows per chunk; ``None``: :func:`auto_chunk_size` with ``fused=True``.
        hits: also report, per position, whether the label is the arg-max of its logits.

    Returns:
        ``(logps, hits)``: ``logps`` [B, T] float32 (float64 for float64 inputs), 0 at ignored positions,
        differentiable w.r.t. ``hidden``, ``lm_head_weight`` and ``lm_head_bias``; ``hits`` [B, T] bool,
        not differentiable, what ``logits.argmax(-1) == labels`` gives on the full logits (False where
        ignored), or ``None`` unless asked for.
    """
    _check_shapes(hidden, labels, "hidden")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be [V, H={hidden.shape[-1]}], got {tuple(lm_head_weight.shape)}")
    if chunk_size is None:
        chunk_size = auto_chunk_size(lm_head_weight.shape[0], hidden.device, fused=True)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, t, h = hidden.shape
    flat, is_max = _ChunkedHeadLogps.apply(hidden.reshape(b * t, h), lm_head_weight, lm_head_bias,
                                           labels.reshape(b * t).long(), chunk_size, softcap, hits)
    return flat.view(b, t), (None if is_max is None else is_max.view(b, t))


def next_token_labels(labels: Tensor) -> Tensor:
    """Targets aligned with a causal LM's logits: ``targets[b, t] = labels[b, t+1]``; the last position
    scores nothing (``-100``).

    ``labels`` hold the token id at every position whose log-prob counts (a completion's tokens) and
    ``-100`` elsewhere, as ``preftune.data.tokenize`` and the rollouts build them. The logits at position
    t predict token t+1, so shifting the *labels* (not the logits) lets :func:`token_logps` use the
    model's [B, T, V] logits as they are, without a sliced copy. This is the one label shift.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got shape {tuple(labels.shape)}")
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def sequence_logps(token_logps: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence sum of token log-probs over valid (aligned) labels, and the number of valid labels.

    ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)`` (Rafailov et al. 2023, Eq. 7 uses this sum; SimPO,
    Meng et al. 2024, Eq. 4 divides it by the count for a length-normalised reward).

    Args:
        token_logps: [B, T] from :func:`token_logps`.
        labels: [B, T]; positions with ``-100`` are excluded.

    Returns:
        ``(sums, counts)``: both [B]; ``sums`` in ``token_logps``' dtype, ``counts`` as the same float dtype.
    """
    if token_logps.shape != labels.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and labels {tuple(labels.shape)} differ")
    valid = labels != IGNORE_INDEX
    sums = (token_logps * valid).sum(-1)
    return sums, valid.sum(-1).to(token_logps.dtype)


# ------------------------------------------------------------------------------------------------ a batch


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions 0, 1, 2, ... of the real tokens, whatever the padding side (pads get 0).

    left-padded mask [0, 0, 1, 1, 1] -> [0, 0, 0, 1, 2]; right-padded [1, 1, 1, 0, 0] -> [0, 1, 2, 0, 0].
    Hugging Face decoders number positions 0..T-1 whatever the mask says, so every forward pass of
    preftune passes these.
    """
    mask = attention_mask.long()
    return ((mask.cumsum(-1) - 1) * mask).clamp(min=0)


def label_logps(logits: Tensor, labels: Tensor, *, temperature: float = 1.0,
                chunk_size: int | None = None) -> Tensor:
    """[B, T] log-probs of the labelled tokens under ``softmax(logits / temperature)``, each at the
    position that predicts it (``next_token_labels``); 0 where nothing is scored. ``labels`` are the
    batch's unshifted labels (-100 = not scored)."""
    if temperature != 1.0:
        logits = logits / temperature
    return token_logps(logits, next_token_labels(labels), chunk_size=chunk_size)


# ------------------------------------------------------------------------------------------------ fused lm_head


def sharded_launch() -> bool:
    """True when the launcher shards the parameters (accelerate's FSDP, DeepSpeed ZeRO-3; its environment says
    so before the model is sharded): a head read outside the model's own forward would see one shard."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() == "true":
        return True
    return (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").strip().lower() == "true"
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")


def lm_head_parts(model: torch.nn.Module) -> tuple[Tensor, Tensor | None, float | None] | None:
    """``(weight, bias, softcap)`` of a Hugging Face causal LM's output head if the fused path applies.

    Returns ``None`` (use the full logits instead) when the head is not a plain ``nn.Linear`` (a head
    that LoRA adapts, or that peft's ``modules_to_save`` wraps; LoRA on the other layers leaves it a
    plain, frozen ``nn.Linear``), when the parameters are sharded (FSDP), or when the model scales its
    logits in a way not reproduced here (``logit_scale``).
    """
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):  # DDP / accelerate wrappers
        inner = inner.module
    if type(inner).__name__.startswith("FullyShardedDataParallel") or sharded_launch():
        return None
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not torch.nn.Linear:
        return None
    if type(head.weight).__name__ == "DTensor" or head.weight.dim() != 2 or head.weight.numel() == 0:
        return None
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "logit_scale", None) not in (None, 1.0):
        return None
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return head.weight, head.bias, (float(softcap) if softcap else None)


def fused_lm_head_applies(model: torch.nn.Module, log: Callable[[str], None]) -> bool:
    """Whether ``fused=True`` fuses ``model``'s lm_head (:func:`lm_head_parts`); when it does not, says
    why through ``log``: training then computes the full logits, the same numbers without the saving."""
    if lm_head_parts(model) is not None:
        return True
    get_head = getattr(model, "get_output_embeddings", None)
    head = type(get_head() if callable(get_head) else None)
    log(f"fused_lm_head: the model's lm_head ({head.__module__}.{head.__qualname__}) cannot be fused: it "
        "must be a plain torch.nn.Linear (no LoRA or modules_to_save on lm_head), unsharded, with no "
        "logit_scale; computing the full logits instead")
    return False
