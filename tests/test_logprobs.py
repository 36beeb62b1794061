"""Chunked log-probs equal the naive log_softmax + gather, in value and gradient, without fp32 [B,T,V];
the fused lm_head path (the fused_lm_head key) equals the one over the full logits."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.core.forward import batch_logps, model_label_logps
from preftune.core.logprobs import (
    IGNORE_INDEX,
    auto_chunk_size,
    fused_lm_head_applies,
    lm_head_parts,
    next_token_labels,
    sequence_logps,
    token_logps,
    token_logps_from_hidden,
)


def naive(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    lp = logits.double().log_softmax(-1)
    out = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(labels == IGNORE_INDEX, 0.0)


def make(b=3, t=5, v=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[-1, -1] = IGNORE_INDEX
    return logits, labels


def test_hand_computed_two_token_vocab():
    """logits [0, ln 3] -> softmax [1/4, 3/4]: log p(1) = ln(3/4), log p(0) = ln(1/4); -100 -> 0."""
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)], [5.0, 1.0]]])
    labels = torch.tensor([[1, 0, IGNORE_INDEX]])
    out = token_logps(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.25), 0.0]]))


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 15, 4096])
def test_forward_and_grad_match_naive_across_chunk_sizes(chunk_size):
    """B*T = 15 rows: chunk 4 and 7 do not divide 15 (ragged last chunk), 1 is row by row, 4096 one chunk."""
    logits, labels = make()
    weights = torch.randn(3, 5)
    x = logits.clone().requires_grad_(True)
    out = token_logps(x, labels, chunk_size=chunk_size)
    (out * weights).sum().backward()
    y = logits.double().clone().requires_grad_(True)
    ref = naive(y, labels)
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-6)
    # ignored positions receive no gradient at all
    assert torch.all(x.grad[labels == IGNORE_INDEX] == 0)


def test_gradcheck_float64():
    logits, labels = make(b=2, t=3, v=5, dtype=torch.float64)
    x = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: token_logps(z, labels, chunk_size=4), (x,))


def test_gradcheck_from_hidden_float64_with_bias_and_softcap():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 5, IGNORE_INDEX], [0, 2, 3]])
    assert torch.autograd.gradcheck(
        lambda h, w, b: token_logps_from_hidden(h, w, labels, lm_head_bias=b, softcap=2.0, chunk_size=4)[0],
        (hidden, weight, bias),
    )


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_from_hidden_equals_full_logits(softcap):
    """token_logps_from_hidden(h, W) == naive(log_softmax(cap*tanh(h W^T / cap))) incl. grads of h and W."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 7, 8, generator=g)
    weight = torch.randn(13, 8, generator=g)
    labels = torch.randint(0, 13, (2, 7), generator=g)
    labels[1, 3:] = IGNORE_INDEX
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out, hits = token_logps_from_hidden(h1, w1, labels, softcap=softcap, chunk_size=3)
    assert hits is None  # only when asked for
    out.sum().backward()
    h2, w2 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    z = h2 @ w2.T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ref = naive(z, labels)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w1.grad.double(), w2.grad, rtol=1e-4, atol=1e-5)


def test_frozen_head_gets_no_grad_but_hidden_does():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    weight = torch.randn(10, 8)  # frozen (e.g. LoRA training leaves lm_head alone)
    labels = torch.tensor([[1, 2, 3, IGNORE_INDEX]])
    token_logps_from_hidden(hidden, weight, labels)[0].sum().backward()
    assert weight.grad is None and hidden.grad is not None and hidden.grad[0, 3].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """Half inputs: output fp32 computed from the half values exactly (compare with fp64 on the same
    rounded values), gradient in the input dtype and within half-precision rounding of the fp64 gradient."""
    logits, labels = make(b=2, t=6, v=50, dtype=dtype)
    x = logits.clone().requires_grad_(True)
    out = token_logps(x, labels, chunk_size=5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive(logits, labels), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad.dtype == dtype
    y = logits.double().requires_grad_(True)
    naive(y, labels).sum().backward()
    eps = 2**-8 if dtype == torch.bfloat16 else 2**-11  # relative rounding unit of the grad's dtype
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=eps, atol=eps)


def test_saved_tensors_hold_no_fp32_btv():
    """Memory property: with bf16 logits [B,T,V], nothing autograd saves for backward is an fp32 tensor
    of B*T*V elements (the naive path saves log_softmax output in fp32: exactly B*T*V elements).
    The largest fp32 saved tensor must be the (B*T,) logsumexp."""
    b, t, v = 4, 16, 512

    def largest_fp32_saved(fn):
        sizes = []

        def pack(x):
            if x.dtype == torch.float32:
                sizes.append(x.numel())
            return x

        logits = torch.randn(b, t, v).to(torch.bfloat16).requires_grad_(True)
        labels = torch.randint(0, v, (b, t))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(logits, labels).sum()
        return max(sizes, default=0)

    ours = largest_fp32_saved(lambda z, y: token_logps(z, y, chunk_size=8))
    naive_fp32 = largest_fp32_saved(
        lambda z, y: z.float().log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    )
    assert naive_fp32 >= b * t * v  # the check can fail: the naive path does hold one
    assert ours < b * t * v
    assert ours == b * t


def test_from_hidden_saves_no_logits():
    b, t, h, v = 2, 8, 24, 1000
    saved = []
    hidden = torch.randn(b, t, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (b, t))
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        token_logps_from_hidden(hidden, weight, labels, chunk_size=4)
    # saved: hidden (b*t*h), weight (v*h), labels and lse (b*t each); nothing of size b*t*v
    assert sorted(saved) == sorted([b * t * h, v * h, b * t, b * t])


def test_next_token_labels():
    """labels [-100, -100, 7, 8] (the response tokens 7, 8 of ids [5, 6, 7, 8]) -> targets
    [-100, 7, 8, -100]: logits at position 1 predict token 7 (t+1 = 2), at 2 predict 8, the last
    predicts nothing."""
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 2, 3, -100]])
    assert next_token_labels(labels).tolist() == [[-100, 7, 8, -100], [2, 3, -100, -100]]
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        next_token_labels(labels[0])


def test_sequence_logps_sums_and_counts():
    """Row 0: -1 + -2 (third is ignored) = -3 over 2 tokens; row 1: -0.5 over 1 token."""
    lp = torch.tensor([[-1.0, -2.0, -9.0], [0.0, -0.5, 0.0]])
    labels = torch.tensor([[3, 4, -100], [-100, 1, -100]])
    sums, counts = sequence_logps(lp, labels)
    assert sums.tolist() == [-3.0, -0.5] and counts.tolist() == [2.0, 1.0]


def test_auto_chunk_size():
    """CPU: 2**20 // V rows (4 MiB of fp32 per chunk), at least 1; other devices 4096 rows."""
    assert auto_chunk_size(8192, "cpu") == 128
    assert auto_chunk_size(151936, "cpu") == 6
    assert auto_chunk_size(2**21, "cpu") == 1
    assert auto_chunk_size(8192, "cuda") == 4096
    # fused: at least 128 rows on CPU (each chunk's matmul reads the whole [V, H] lm_head weight)
    assert auto_chunk_size(151936, "cpu", fused=True) == 128
    assert auto_chunk_size(4096, "cpu", fused=True) == 256
    assert auto_chunk_size(8192, "cuda", fused=True) == 4096
    logits, labels = make(b=2, t=40, v=2**16)  # auto: 16 rows per chunk -> 5 chunks over 80 rows
    torch.testing.assert_close(token_logps(logits, labels).double(), naive(logits, labels), rtol=1e-6, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="labels must be"):
        token_logps(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        token_logps(torch.zeros(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="lm_head_weight"):
        token_logps_from_hidden(torch.zeros(1, 2, 4), torch.zeros(5, 3), torch.zeros(1, 2, dtype=torch.long))


def test_hits_are_the_argmax_of_the_full_logits_ties_included():
    """hits == (logits.argmax(-1) == labels) on the full logits: vocabulary rows 3 and 5 of W are equal, so
    logits 3 and 5 tie everywhere; where they are the maximum, argmax (the first index) says 3, so label 3
    is a hit and label 5 is not. Ignored positions are never hits."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 6, 4, generator=g)
    weight = torch.randn(8, 4, generator=g)
    weight[5] = weight[3] = 4 * hidden[0, 0] / hidden[0, 0].norm()  # both rows win at position (0, 0)
    logits = hidden @ weight.T
    labels = logits.argmax(-1)                # every label the arg-max ...
    labels[0, 0] = 5                          # ... except the tie's second index
    labels[1, :2] = torch.tensor([0, 1])      # and whatever these are
    labels[1, 5] = IGNORE_INDEX
    assert logits[0, 0].argmax() == 3 and logits[0, 0, 3] == logits[0, 0, 5]
    _, hits = token_logps_from_hidden(hidden, weight, labels, chunk_size=5, hits=True)
    expected = (logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)
    assert hits.dtype == torch.bool and not hits.requires_grad
    assert hits.tolist() == expected.tolist() and not hits[0, 0] and not hits[1, 5]


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def _batch(seed: int, *, right_pad: bool = True) -> dict[str, torch.Tensor]:
    """Two rows of 9 tokens; labels (the scored tokens, unshifted) from position 4 on; row 1 padded."""
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(seed))
    attn = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    if right_pad:
        attn[1, 7:] = 0
        labels[1, 7:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _both_ways(model, batch, **kwargs):
    """model_label_logps unfused then fused: (log-probs, hits, every parameter's gradient) of each."""
    results = []
    for fused in (False, True):
        model.zero_grad()
        logps, hits = model_label_logps(model, batch, fused=fused, hits=True, **kwargs)
        logps.sum().backward()
        results.append((logps.detach(), hits, {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}))
    return results


@pytest.mark.parametrize("tie", [False, True])
def test_fused_equals_unfused_on_tiny_llama(tie):
    """Both paths give the HF model's own log_softmax(logits).gather at the shifted labels, the same hits
    (logits.argmax == target) and the same gradient for every parameter, tied embeddings or not."""
    model = _tiny_llama(tie)
    batch = _batch(3)
    assert lm_head_parts(model) is not None
    (lp0, hits0, g0), (lp1, hits1, g1) = _both_ways(model, batch, chunk_size=5)
    targets = next_token_labels(batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(lp0.double(), naive(logits, targets), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-6)
    assert hits1.tolist() == hits0.tolist()
    assert hits0.tolist() == ((logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)).tolist()
    assert g1.keys() == g0.keys() == {n for n, _ in model.named_parameters()}
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_batch_logps_fused_equals_unfused():
    """Summed log-probs and counts of the one path from a batch, both ways (auto chunk size)."""
    model = _tiny_llama(False)
    batch = _batch(6)
    with torch.no_grad():
        sums0, counts0 = batch_logps(model, batch)
        sums1, counts1 = batch_logps(model, batch, fused=True)
    torch.testing.assert_close(sums1, sums0, rtol=1e-6, atol=1e-5)
    assert counts1.tolist() == counts0.tolist() == [5.0, 3.0]  # labels at 4..8; row 1 padded from 7


def test_lm_head_parts_declines_wrapped_head():
    model = _tiny_llama(False)
    model.lm_head = torch.nn.Sequential(model.lm_head)  # not a plain Linear (like a LoRA-wrapped head)
    assert lm_head_parts(model) is None


def test_lora_fuses_a_plain_head_and_falls_back_on_a_lora_head():
    """LoRA on the other layers (peft's default all-linear leaves the output layer out) keeps lm_head a
    plain, frozen nn.Linear: the fused path applies and gives the same values and gradients. LoRA on
    lm_head wraps it: fused_lm_head_applies says why, and fused=True computes the full logits (the very
    same numbers as fused=False)."""
    from peft import LoraConfig, get_peft_model

    batch = _batch(7)
    plain = get_peft_model(_tiny_llama(False), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          init_lora_weights=False))
    assert type(plain.get_output_embeddings()) is torch.nn.Linear
    log: list[str] = []
    assert fused_lm_head_applies(plain, log.append) and log == []
    (lp0, hits0, g0), (lp1, hits1, g1) = _both_ways(plain, batch)
    assert not any("lm_head" in n for n in g0) and any("lora_" in n for n in g0)
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-6)
    assert hits1.tolist() == hits0.tolist()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)

    wrapped = get_peft_model(_tiny_llama(False), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                            target_modules=["q_proj", "lm_head"]))
    assert lm_head_parts(wrapped) is None
    assert not fused_lm_head_applies(wrapped, log.append)
    assert len(log) == 1 and "fused_lm_head" in log[0] and "cannot be fused" in log[0]
    (lp0, hits0, g0), (lp1, hits1, g1) = _both_ways(wrapped, batch)
    assert torch.equal(lp1, lp0) and torch.equal(hits1, hits0)
    assert all(torch.equal(g1[n], g0[n]) for n in g0)


def test_fused_under_bf16_autocast_matches_unfused():
    """Under CPU bf16 autocast both paths project with bf16 matmuls (the fused backward recomputes in
    the autocast dtype too), so values agree to fp32-from-bf16 rounding and gradients to bf16 rounding
    (2**-8 relative per value; 2e-2 of the largest gradient entry allows for the sums over V and T)."""
    model = _tiny_llama(False)
    batch = _batch(4, right_pad=False)
    batch["labels"] = batch["input_ids"].clone()
    outs, grads = [], []
    for fused in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = model_label_logps(model, batch, chunk_size=4, fused=fused)
        out.sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-3)
    for name in grads[0]:
        scale = grads[0][name].abs().max().item()
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=2e-2 * scale, msg=name)
