"""Benchmark one DPO optimizer step through preftune's own code path, and compare it with the machine.

Builds a few-million-parameter Llama-style model and a few hundred synthetic preference pairs (random
token ids), precomputes the reference log-probs once, then times N steps of
forward (chosen + rejected in one batch) -> DPO loss -> backward -> AdamW step. It prints the median step
time, tokens per second, peak memory, and the achieved model FLOP/s as a fraction of a dense matmul peak
measured in the same run, on the same machine, with the same dtype and thread count.

FLOP count (Kaplan et al. 2020, Sec. 2.1; Chinchilla, Hoffmann et al. 2022, App. F): a trained token
costs 6 N FLOPs (forward 2 N, backward 4 N), a reference (forward-only) token 2 N, counted for the work a
DPO step needs: N_decoder (the decoder layers' matmul parameters) for every real token the forward
computes (a shared prompt once), N_head (the [H, V] lm_head) only for the scored positions (the response
tokens: DPO needs no logits at prompt positions, and preftune computes none there). The token embedding
is a lookup, not a matmul. Attention's T-dependent term (2 * n_layer * T * d per token forward) is not
counted, so the figure is conservative. Padding is not counted.

    python benchmarks/dpo_step.py --steps 10 --batch-size 8
    python benchmarks/dpo_step.py --dtype bf16 --steps 10
    python benchmarks/dpo_step.py --fused-lm-head               # the fused_lm_head key
    python benchmarks/dpo_step.py --compare-fused --repeats 3   # full logits vs fused, fresh process each
    OMP_NUM_THREADS=1 python benchmarks/dpo_step.py             # one thread (or --threads 1)

Threads: --threads N, else OMP_NUM_THREADS when it is set, else the physical cores. Progress (the
reference pass, each warmup and timed step, the matmul peaks, each run of --compare-fused) goes to
stderr as it happens; the table and the summary line to stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import PeakMemory, Progress, default_threads, dense_matmul_peak, sync  # noqa: E402 - after the path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def build_model(*, vocab: int, hidden: int, layers: int, heads: int, intermediate: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=1024, tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def count_params(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    return {"total": total, "embedding": embed, "lm_head": head, "non_embedding": total - embed - head}


def scored_positions(batch: dict) -> int:
    """The positions whose logits DPO needs: one per response token (labels not -100)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def synthetic_pairs(n: int, *, vocab: int, prompt_len: tuple[int, int], response_len: tuple[int, int],
                    seed: int) -> list[Pair]:
    rng = random.Random(seed)

    def toks(lo: int, hi: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]

    return [Pair(toks(*prompt_len), toks(*response_len), toks(*response_len)) for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step (2x sequences)")
    ap.add_argument("--pairs", type=int, default=256, help="synthetic pairs in the fixture")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="fp32: plain; bf16/fp16: autocast (weights and optimizer in fp32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--group-by-length", action="store_true",
                    help="batches of similar length (preftune.data.collate.length_grouped_order): less padding")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads; 0 = OMP_NUM_THREADS when set, else the physical cores")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmuls for the peak")
    ap.add_argument("--profile", type=Path, default=None, help="write a torch.profiler table to this file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packing", choices=("shared", "rows", "off"), default="shared",
                    help="the packing keys: shared = packed rows, a pair's prompt once (the default); "
                    "rows = packed rows (share_prompt: false); off = padded rows (packing: false)")
    ap.add_argument("--prompt-len", default="48,80", help="prompt tokens: min,max (uniform)")
    ap.add_argument("--response-len", default="64,128", help="response tokens: min,max (uniform), each answer")
    ap.add_argument("--fused-lm-head", action="store_true",
                    help="the fused_lm_head key: lm_head applied chunk by chunk, no [B, T, V] logits")
    ap.add_argument("--compare-fused", action="store_true",
                    help="run full logits and --fused-lm-head alternately, each in a fresh process, "
                    "--repeats times, and print the medians side by side")
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant with --compare-fused")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary figures to this file")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)

    if args.compare_fused:
        compare_fused(args, argv if argv is not None else sys.argv[1:])
    else:
        run(args)


def compare_fused(args: argparse.Namespace, argv: list[str]) -> None:
    """Full logits vs the fused lm_head with otherwise the same arguments. Each run is a fresh process
    (so one variant's freed memory cannot hide the other's peak RSS); the variants alternate, so a
    change in the machine's load falls on both; the table shows the median of each figure."""
    from rich.console import Console
    from rich.table import Table

    progress = Progress(not args.no_progress)
    skip = {"--compare-fused", "--fused-lm-head", "--no-progress"}
    base, it = [], iter(argv)
    for a in it:
        if a in ("--repeats", "--json"):
            next(it, None)
        elif a.split("=")[0] not in skip | {"--repeats", "--json"}:
            base.append(a)
    results: dict[str, list[dict[str, float]]] = {"logits": [], "fused": []}
    total, done = args.repeats * len(results), 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in results:
                out = Path(tmp) / f"{name}-{r}.json"
                cmd = [sys.executable, __file__, *base, "--json", str(out), "--no-progress"]
                cmd += ["--fused-lm-head"] if name == "fused" else []
                progress(f"run {done + 1}/{total}: {name}, repeat {r + 1} of {args.repeats} (a fresh process) ...")
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                results[name].append(json.loads(out.read_text()))
                done += 1
                f = results[name][-1]
                progress(f"run {done}/{total}: {name}: {f['median_step_s'] * 1000:,.0f} ms/step, "
                         f"{f['tokens_per_s']:,.0f} tok/s, peak memory +{f['peak_memory_bytes'] / 2**20:,.0f} MiB")
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    table = Table(title=f"DPO step, full logits vs fused lm_head: vocab {args.vocab}, hidden {args.hidden}, "
                        f"{args.dtype}, medians of {args.repeats} runs each")
    for col in ("lm_head", "ms/step", "tokens/s", "peak memory", "fraction of peak", "ref. tokens/s"):
        table.add_column(col, justify="right")
    for name, m in med.items():
        table.add_row(name, f"{m['median_step_s'] * 1000:,.0f}", f"{m['tokens_per_s']:,.0f}",
                      f"{m['peak_memory_bytes'] / 2**20:,.0f} MiB", f"{m['fraction_of_peak']:.0%}",
                      f"{m['ref_tokens_per_s']:,.0f}")
    lo, fu = med["logits"], med["fused"]
    table.add_row("fused / logits", f"{fu['median_step_s'] / lo['median_step_s']:.2f}x",
                  f"{fu['tokens_per_s'] / lo['tokens_per_s']:.2f}x",
                  f"{(fu['peak_memory_bytes'] - lo['peak_memory_bytes']) / 2**20:+,.0f} MiB", "",
                  f"{fu['ref_tokens_per_s'] / lo['ref_tokens_per_s']:.2f}x")
    Console().print(table)
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": results, "medians": med}, indent=1))


def to_items(pairs: list[Pair]):
    """Synthetic pairs as preftune's tokenized pairs (labels -100 on the prompt, as data.tokenize makes)."""
    from preftune.data.tokenize import IGNORE_INDEX, TokenizedPair

    return [TokenizedPair(chosen_input_ids=p.prompt + p.chosen,
                          chosen_labels=[IGNORE_INDEX] * len(p.prompt) + p.chosen,
                          rejected_input_ids=p.prompt + p.rejected,
                          rejected_labels=[IGNORE_INDEX] * len(p.prompt) + p.rejected) for p in pairs]


def _span(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def computed_positions(batch: dict) -> tuple[int, int]:
    """(real tokens the forward computes, positions it computes): packed rows count a shared prompt once
    and only their tails as waste; padded rows count every padded position."""
    if "pack_index" in batch:
        return int((batch["pack_index"] >= 0).sum()), batch["pack_index"].numel()
    return int(batch["attention_mask"].sum()), batch["attention_mask"].numel()


def dpo_method(model, *, beta: float = 0.1, fused_lm_head: bool = False, packing: str = "shared"):
    """preftune's DPOMethod holding an in-memory model; what ``setup`` would load from a config."""
    from types import SimpleNamespace

    from preftune.train.dpo import DPOMethod

    method = DPOMethod()
    method.model = model
    method.tokenizer = SimpleNamespace(pad_token_id=0)
    method.loss_name, method.hparams, method.needs_reference = "dpo", {"beta": beta}, True
    method.fused_lm_head = fused_lm_head
    method.packing = packing
    return method


def make_step(method, *, device: str, autocast_dtype, lr: float = 1e-4, max_grad_norm: float = 1.0):
    """One optimizer step as ``train/loop.py`` does it: ``DPOMethod.collate`` -> ``DPOMethod.loss`` (one
    forward over chosen + rejected, preftune.core.logprobs, preference_loss('dpo')) -> backward -> clip ->
    AdamW step. Returns ``step(items) -> (loss, batch)``."""
    model = method.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(items) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = to_device(method.collate(items), device)
        with _autocast(device, autocast_dtype):
            out = method.loss(model, batch, normaliser=float(method.units(batch)))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach(), batch

    return step


def to_device(batch: dict, device: str) -> dict:
    """The batch's tensors on ``device``; other values (the annotator and group lists) as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fill_reference_logps(method, items, *, batch_size: int, device: str, autocast_dtype) -> tuple[int, float]:
    """Reference log-probs (the initial model, no grad) written into every item, as the DPO reference
    cache does; returns (real tokens, forward FLOPs needed: 2 N per token as in the module docstring, seconds)."""
    from preftune.core.forward import batch_logps

    decoder, head = count_params(method.model)["non_embedding"], count_params(method.model)["lm_head"]
    tokens = flops = 0
    method.model.eval()
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            batch = to_device(method.collate(chunk), device)
            with _autocast(device, autocast_dtype):
                logps = batch_logps(method.model, batch, fused=method.fused_lm_head)[0].float().cpu()
            for i, item in enumerate(chunk):
                item.ref_chosen_logps = float(logps[i])
                item.ref_rejected_logps = float(logps[len(chunk) + i])
            tokens += computed_positions(batch)[0]
            flops += 2 * (decoder * computed_positions(batch)[0] + head * scored_positions(batch))
    sync(device)
    method.model.train()
    return tokens, flops, time.perf_counter() - t0


def _autocast(device: str, dtype):
    if dtype is None:
        import contextlib

        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def run(args: argparse.Namespace) -> dict[str, float]:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    progress = Progress(not args.no_progress)
    threads, threads_from = (args.threads, "--threads") if args.threads else default_threads()
    torch.set_num_threads(threads)
    progress(f"{args.device}, {args.dtype}, {threads} threads (from {threads_from}); building the model ...")
    device = args.device
    dtype = DTYPES[args.dtype]
    autocast_dtype = None if dtype == torch.float32 else dtype

    model = build_model(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                        intermediate=args.intermediate, seed=args.seed).to(device)
    counts = count_params(model)
    console.print(f"model: Llama-style, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
                  f"intermediate {args.intermediate}, vocab {args.vocab}; parameters: total "
                  f"{counts['total']:,} = embedding {counts['embedding']:,} + decoder layers "
                  f"{counts['non_embedding']:,} + lm_head {counts['lm_head']:,}")
    console.print(f"FLOP count: 6 x {counts['non_embedding']:,} (decoder) per computed token + 6 x "
                  f"{counts['lm_head']:,} (lm_head) per scored response token (2x each for the reference pass)")

    pairs = synthetic_pairs(args.pairs, vocab=args.vocab, prompt_len=_span(args.prompt_len),
                            response_len=_span(args.response_len),
                            seed=args.seed)
    items = to_items(pairs)
    method = dpo_method(model, fused_lm_head=args.fused_lm_head, packing="" if args.packing == "off" else args.packing)
    progress(f"reference pass over {len(items)} pairs ...")
    ref_tokens, ref_needed, ref_time = fill_reference_logps(method, items, batch_size=args.batch_size, device=device,
                                                autocast_dtype=autocast_dtype)
    if args.compile:
        method.model = torch.compile(model)
    step = make_step(method, device=device, autocast_dtype=autocast_dtype)
    path = "preftune.train.dpo.DPOMethod.collate + .loss (loss dpo, beta 0.1), AdamW"
    if args.fused_lm_head:
        path += ", fused lm_head"
    if args.group_by_length:
        from preftune.data.collate import item_length, length_grouped_order

        order = length_grouped_order([item_length(i) for i in items], args.batch_size, args.seed + 1)
    else:
        order = list(range(len(items)))
        random.Random(args.seed + 1).shuffle(order)
    cursor = iter(range(0, 10**9))

    def next_batch():
        start = (next(cursor) * args.batch_size) % (len(order) - args.batch_size + 1)
        return [items[i] for i in order[start : start + args.batch_size]]

    progress(f"reference pass: {ref_tokens / ref_time:,.0f} tokens/s")
    for w in range(args.warmup):
        t0 = time.perf_counter()
        step(next_batch())
        progress(f"warmup step {w + 1}/{args.warmup}: {(time.perf_counter() - t0) * 1000:,.0f} ms")
    progress(f"matmul peak ({args.matmul_size}^2, {args.dtype}) ...")
    peak_before = dense_matmul_peak(dtype=dtype, device=device, size=args.matmul_size)
    progress(f"matmul peak before the steps: {peak_before / 1e9:,.1f} GFLOP/s")

    batches = [next_batch() for _ in range(args.steps)]
    memory = PeakMemory(device)
    memory.start()
    times, tokens, padded, losses, sequence_tokens, needed = [], [], [], [], [], []
    prof = None
    if args.profile is not None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        prof = profile(activities=acts)
        prof.__enter__()
    for batch in batches:
        sync(device)
        t0 = time.perf_counter()
        loss, collated = step(batch)
        sync(device)
        times.append(time.perf_counter() - t0)
        real, positions = computed_positions(collated)
        tokens.append(real)
        needed.append(6 * (counts["non_embedding"] * real + counts["lm_head"] * scored_positions(collated)))
        padded.append(positions)
        sequence_tokens.append(int(collated["attention_mask"].sum()))
        losses.append(float(loss))
        progress(f"step {len(times)}/{args.steps}: {times[-1] * 1000:,.0f} ms, {tokens[-1]:,} tokens, "
                 f"loss {losses[-1]:.4f}")
    mem = memory.delta_bytes()
    progress("matmul peak after the steps ...")
    peak = max(peak_before, dense_matmul_peak(dtype=dtype, device=device, size=args.matmul_size))
    if prof is not None:
        prof.__exit__(None, None, None)
        args.profile.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        console.print(f"profile written to {args.profile}")

    med = statistics.median(times)
    med_tokens = statistics.median(tokens)
    tok_per_s = sum(tokens) / sum(times)
    model_flops = sum(needed) / sum(times)  # FLOPs the steps needed (module docstring) per second
    ref_flops = ref_needed / ref_time
    table = Table(title=f"DPO step: {path}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("device / dtype / threads", f"{device} / {args.dtype} / {threads} (from {threads_from})"),
        ("batch (pairs) / sequences per step", f"{args.batch_size} / {2 * args.batch_size}"),
        ("torch.compile / group by length", f"{args.compile} / {args.group_by_length}"),
        ("fused lm_head / packing", f"{args.fused_lm_head} / {args.packing}"),
        ("prompt / response tokens (uniform)", f"{args.prompt_len} / {args.response_len}"),
        ("median step time", f"{med * 1000:.1f} ms"),
        ("min / max step time", f"{min(times) * 1000:.1f} / {max(times) * 1000:.1f} ms"),
        ("tokens per step: in the sequences / computed", f"{statistics.median(sequence_tokens):,.0f} / "
                                                         f"{med_tokens:,.0f}"),
        ("real tokens / computed positions", f"{sum(tokens) / sum(padded):.1%}"),
        ("computed tokens per second", f"{tok_per_s:,.0f}"),
        ("sequence tokens per second", f"{sum(sequence_tokens) / sum(times):,.0f}"),
        ("peak memory during steps", f"{mem / 2**20:,.0f} MiB"),
        ("model FLOP/s (6N: decoder per token, lm_head per response token)", f"{model_flops / 1e9:,.1f} GFLOP/s"),
        (f"dense matmul peak ({args.matmul_size}^2, best of 12)", f"{peak / 1e9:,.1f} GFLOP/s"),
        ("fraction of matmul peak (training)", f"{model_flops / peak:.1%}"),
        ("reference pass: tokens/s, fraction (2N, counted alike)", f"{ref_tokens / ref_time:,.0f}, {ref_flops / peak:.1%}"),
        ("loss first -> last", f"{losses[0]:.4f} -> {losses[-1]:.4f}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    console.print(f"memory: {memory.how}")
    console.print(f"summary: {med * 1000:.0f} ms/step, {sum(sequence_tokens) / sum(times):,.0f} sequence tok/s "
                  f"({tok_per_s:,.0f} computed), "
                  f"{model_flops / 1e9:.1f} GFLOP/s = {model_flops / peak:.0%} of a {peak / 1e9:.0f} GFLOP/s "
                  f"{args.dtype} matmul peak on {threads} threads, peak memory +{mem / 2**20:,.0f} MiB")
    result = {"median_step_s": med, "tokens_per_s": tok_per_s, "sequence_tokens_per_s": sum(sequence_tokens) / sum(times),
              "real_share": sum(tokens) / sum(padded), "fraction_of_peak": model_flops / peak,
              "peak_memory_bytes": mem, "matmul_peak_flops": peak, "ref_tokens_per_s": ref_tokens / ref_time}
    if args.json is not None:
        args.json.write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
