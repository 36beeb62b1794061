"""The workloads of ``benchmarks/vs_trl.py``: models, preference pairs and their token statistics.

Everything is built locally from the Shakespeare corpus the demo ships (``preftune.experiments.demo``):
a byte-level BPE tokenizer trained on it (``preftune.models.tiny.build_tiny_tokenizer``), a randomly
initialised policy and a *different* reference (a second init, so the first-step DPO loss is not the
trivial log 2), each saved as a Hugging Face directory with the tokenizer, and JSONL pairs of
``{"prompt", "chosen", "rejected"}`` made so that preftune's tokenisation (prompt and response apart)
and TRL's (together, split where the ids diverge) give the same ids (``check_tokenisation``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class ModelSpec:
    kind: str                      # "llama" or "qwen2"
    vocab: int                     # tokenizer vocabulary (BPE trained on the corpus)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    model_vocab: int | None = None  # the model's vocabulary when larger than the tokenizer's (qwen2 shape)
    tied: bool = False


@dataclass(frozen=True)
class Workload:
    name: str
    about: str
    model: ModelSpec
    data: str                      # "short-chosen", "hh" or "demo" (see make_pairs)
    pairs: int
    batch: int
    max_length: int
    beta: float = 0.1
    learning_rate: float = 5e-6
    data_args: dict[str, Any] = field(default_factory=dict)


LLAMA_5M = ModelSpec("llama", vocab=8192, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=600)
DEMO_MODEL = ModelSpec("llama", vocab=4096, hidden=128, layers=4, heads=4, kv_heads=4, intermediate=384)
QWEN2_05B = ModelSpec("qwen2", vocab=8192, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                      model_vocab=151936, tied=True)

WORKLOADS = {w.name: w for w in (
    Workload("short-chosen", "half a verse line -> the next line (chosen) vs the next 3-6 lines (rejected)",
             LLAMA_5M, "short-chosen", pairs=256, batch=8, max_length=256),
    Workload("long-prompt", "multi-turn Human/Assistant prompt about 4x the response (HH style)",
             LLAMA_5M, "hh", pairs=256, batch=8, max_length=512,
             data_args={"prompt_ratio": 4.0, "response_tokens": (20, 60), "prompt_max": 250}),
    Workload("demo", "the demo's DPO stage: its model, 600 prompts x 6 pairs of 4 completions of <= 64 tokens",
             DEMO_MODEL, "demo", pairs=3600, batch=16, max_length=128, beta=0.3, learning_rate=2e-4),
    Workload("qwen2-0.5b-shape", "random Qwen2-0.5B-shaped model (vocab 151,936), ~500-token pairs: memory",
             QWEN2_05B, "hh", pairs=6, batch=2, max_length=512,
             data_args={"prompt_tokens": (200, 250), "response_tokens": (150, 250), "prompt_max": 250}),
)}


# ------------------------------------------------------------------------------------------- data
def cut_to_tokens(text: str, max_tokens: int, count: Callable[[str], int]) -> str:
    """The longest prefix of ``text`` ending at a whitespace boundary with at most ``max_tokens`` tokens
    (binary search; ``count`` is monotone in the prefix length for a BPE tokenizer, near enough)."""
    if count(text) <= max_tokens:
        return text
    cuts = [m.start() for m in re.finditer(r"\s", text)]
    lo, hi, best = 0, len(cuts) - 1, ""
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = text[:cuts[mid]].rstrip()
        if count(candidate) <= max_tokens:
            best, lo = candidate, mid + 1
        else:
            hi = mid - 1
    return best


def short_chosen_pairs(corpus: Any, n: int, *, seed: int) -> list[dict[str, str]]:
    """The second half of a verse line (ending with a newline) -> chosen: the next line; rejected: the next
    3-6 lines (a prompt of half a line makes it ~20% of all tokens, as in the issue's workload). The prompt
    ends with "\\n" after a non-space and each response starts with a non-space, so tokenising prompt and
    response apart (preftune) or together (TRL) gives the same ids (see check_tokenisation)."""
    from preftune.experiments.demo import corpus as C

    rng = random.Random(seed)
    rows = []
    for line in C.prefix_lines(corpus, exclude=[], seed=seed):
        lines = corpus.lines(line.work)
        chosen = C.continuation(lines, line.index, n_lines=1).strip()
        rejected = C.continuation(lines, line.index, n_lines=rng.randint(3, 6)).strip()
        if chosen and rejected.count("\n") >= 2:
            words = line.text.split()
            rows.append({"prompt": " ".join(words[len(words) // 2:]) + "\n", "chosen": chosen, "rejected": rejected})
        if len(rows) == n:
            break
    return rows


def speeches(corpus: Any) -> list[str]:
    """Every speech of the corpus in order, its verse lines joined by spaces (speaker and directions dropped)."""
    from preftune.experiments.demo import corpus as C

    out = []
    for block in corpus.blocks():
        lines = block.splitlines()
        if len(lines) >= 2 and C.is_speaker(lines[0]):
            text = " ".join(x.strip() for x in lines[1:] if x.strip() and not C.is_stage_direction(x))
            if len(text.split()) >= 3:
                out.append(text)
    return out


def hh_pairs(texts: Sequence[str], n: int, *, count: Callable[[str], int], seed: int,
             response_tokens: tuple[int, int], prompt_ratio: float | None = None,
             prompt_tokens: tuple[int, int] | None = None, prompt_max: int = 250,
             turn_max: int = 80) -> list[dict[str, str]]:
    """Human/Assistant conversations in the HH-RLHF format: the prompt is the turns before speech i
    ("\\n\\nHuman: ...\\n\\nAssistant: ..." ending with "\\n\\nAssistant:"), chosen is " " + speech i and
    rejected " " + a speech from elsewhere (each joined with the speeches after it when shorter than a random
    length in ``response_tokens``, and cut to it). Turns are
    added (most recent first, each cut to ``turn_max`` tokens) until the prompt reaches ``prompt_ratio``
    x the chosen response's tokens (or a random length in ``prompt_tokens``), never past ``prompt_max``."""
    rng = random.Random(seed)

    def response(start: int) -> str:  # speeches from ``start`` on, joined until long enough, then cut
        target, k, text = rng.randint(*response_tokens), start + 1, texts[start]
        while count(text) < target and k < len(texts):
            text, k = f"{text} {texts[k]}", k + 1
        return " " + cut_to_tokens(text, target, count)

    rows = []
    while len(rows) < n:
        i = rng.randrange(8, len(texts))
        chosen, rejected = response(i), response(rng.randrange(len(texts)))
        target = prompt_ratio * count(chosen) if prompt_ratio else rng.randint(*prompt_tokens)
        turns: list[tuple[str, str]] = []
        for k in range(i - 1, -1, -1):
            role = "Human" if (i - 1 - k) % 2 == 0 else "Assistant"
            candidate = [*turns, (role, cut_to_tokens(texts[k], turn_max, count))]
            if count(_render(candidate[::-1])) > prompt_max:
                break
            turns = candidate
            if role == "Human" and count(_render(turns[::-1])) >= target:
                break
        while turns and turns[-1][0] != "Human":  # the conversation starts with the human
            turns.pop()
        if turns and count(_render(turns[::-1])) <= prompt_max:
            rows.append({"prompt": _render(turns[::-1]), "chosen": chosen, "rejected": rejected})
    return rows


def _render(turns: Sequence[tuple[str, str]]) -> str:
    return "".join(f"\n\n{role}: {text}" for role, text in turns) + "\n\nAssistant:"


def demo_pairs(corpus: Any, n: int, *, count: Callable[[str], int], seed: int, completions: int = 4,
               max_tokens: int = 64) -> list[dict[str, str]]:
    """The demo's preference data shape: a verse line as the prompt (no trailing newline, as the demo's),
    ``completions`` completions of it (each "\\n" + 1-6 following lines of this place or of a random one,
    cut to ``max_tokens`` tokens as the SFT model's samples are), and every pair of them (6 of 4)."""
    from preftune.experiments.demo import corpus as C

    rng = random.Random(seed)
    lines = C.prefix_lines(corpus, exclude=[], seed=seed)
    rows = []
    for line in lines:
        texts = []
        for _ in range(completions):
            where = line if rng.random() < 0.5 else rng.choice(lines)
            text = C.continuation(corpus.lines(where.work), where.index, n_lines=rng.randint(1, 6)).rstrip()
            texts.append("\n" + cut_to_tokens(text[1:], max_tokens - 1, count))
        for a, b in combinations(texts, 2):
            if a != b:
                chosen, rejected = (a, b) if rng.random() < 0.5 else (b, a)
                rows.append({"prompt": line.text.strip(), "chosen": chosen, "rejected": rejected})
        if len(rows) >= n:
            return rows[:n]
    return rows


def make_pairs(workload: Workload, corpus: Any, tokenizer: Any, n: int, seed: int = 0) -> list[dict[str, str]]:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    if workload.data == "short-chosen":
        return short_chosen_pairs(corpus, n, seed=seed)
    if workload.data == "hh":
        return hh_pairs(speeches(corpus), n, count=count, seed=seed, **workload.data_args)
    if workload.data == "demo":
        return demo_pairs(corpus, n, count=count, seed=seed)
    raise ValueError(f"unknown data kind {workload.data!r}")


# ------------------------------------------------------------------------------------------- tokens
def preftune_ids(tokenizer: Any, row: dict[str, str]) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids as preftune makes them: apart, EOS after each response."""
    from preftune.data.tokenize import render_prompt_response

    prompt, chosen = render_prompt_response(tokenizer, row["prompt"], row["chosen"])
    _, rejected = render_prompt_response(tokenizer, row["prompt"], row["rejected"])
    return prompt, chosen, rejected


def trl_ids(tokenizer: Any, row: dict[str, str]) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids as TRL 1.16's DPOTrainer makes them for plain text: EOS appended to
    each response *as text*, prompt + response tokenised together, split where the ids diverge from the
    prompt's own ids (``common_prefix_length``)."""
    eos = tokenizer.eos_token

    def ids(text: str) -> list[int]:
        return list(tokenizer(text)["input_ids"])

    prompt = ids(row["prompt"])
    full = [ids(row["prompt"] + (r if r.endswith(eos) else r + eos)) for r in (row["chosen"], row["rejected"])]
    cut = min(next((k for k, (a, b) in enumerate(zip(prompt, f, strict=False)) if a != b), min(len(prompt), len(f)))
              for f in full)
    return prompt[:cut], full[0][cut:], full[1][cut:]


def check_tokenisation(tokenizer: Any, rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Token counts of both tools' tokenisations and the pairs on which they differ (must be none)."""
    totals = {"preftune": [0, 0, 0], "trl": [0, 0, 0]}
    differ = []
    for i, row in enumerate(rows):
        a, b = preftune_ids(tokenizer, row), trl_ids(tokenizer, row)
        for name, ids in (("preftune", a), ("trl", b)):
            totals[name] = [t + len(x) for t, x in zip(totals[name], ids, strict=True)]
        if a != b:
            differ.append(i)
    names = ("prompt", "chosen", "rejected")
    return {"preftune": dict(zip(names, totals["preftune"], strict=True)),
            "trl_emulated": dict(zip(names, totals["trl"], strict=True)),
            "pairs_that_differ": len(differ), "first_differing": differ[:5]}


def token_shares(lengths: Sequence[tuple[int, int, int]], order: Sequence[int], batch: int) -> dict[str, float]:
    """Shares of one epoch padded as both tools pad without packing: each step's [2B, T] batch (chosen and
    rejected rows) padded to its longest row. ``real`` = real tokens / padded positions; ``prompt`` =
    prompt tokens (counted in both rows of a pair) / real tokens. ``lengths``: (prompt, chosen, rejected)."""
    real = padded = prompt = 0
    steps = len(order) // batch
    for s in range(steps):
        items = [lengths[i] for i in order[s * batch:(s + 1) * batch]]
        longest = max(p + max(c, r) for p, c, r in items)
        padded += 2 * len(items) * longest
        real += sum(2 * p + c + r for p, c, r in items)
        prompt += sum(2 * p for p, _, _ in items)
    return {"real_share": real / max(padded, 1), "prompt_share": prompt / max(real, 1), "real_tokens": real,
            "padded_positions": padded, "steps": steps}


def epoch_order(n: int, seed: int) -> list[int]:
    """preftune's epoch-0 order of ``n`` items (``preftune.train.plan``): the TRL file is written in it."""
    from preftune.train.plan import epoch_order as order

    return order(n, seed=seed, epoch=0)


# ------------------------------------------------------------------------------------------- models
def build_models(spec: ModelSpec, tokenizer: Any, root: Path, progress: Log) -> dict[str, Any]:
    """``root/policy`` and ``root/reference`` (seed 0 and seed 1 inits, each with the tokenizer), cached by
    the spec: a second call with the same spec and root reuses them."""
    import gc

    stamp = root / "spec.json"
    if stamp.is_file() and json.loads(stamp.read_text())["spec"] == asdict(spec):
        return json.loads(stamp.read_text())["params"]
    shutil.rmtree(root, ignore_errors=True)
    params: dict[str, int] = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        model = _init_model(spec, tokenizer, seed)
        params = {"total": sum(p.numel() for p in model.parameters())}
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        progress(f"  built {name} ({params['total']:,} parameters) in {root / name}")
        del model
        gc.collect()  # the qwen2 shape is 2 GB a copy: free one before the next
    stamp.write_text(json.dumps({"spec": asdict(spec), "params": params}))
    return params


def _init_model(spec: ModelSpec, tokenizer: Any, seed: int) -> Any:
    import torch

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if spec.kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(vocab_size=spec.model_vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                             num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                             intermediate_size=spec.intermediate, tie_word_embeddings=spec.tied,
                             max_position_embeddings=32768, **ids)
        cls = Qwen2ForCausalLM
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=spec.model_vocab or len(tokenizer), hidden_size=spec.hidden,
                             num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                             num_key_value_heads=spec.kv_heads, intermediate_size=spec.intermediate,
                             tie_word_embeddings=spec.tied, max_position_embeddings=1024, **ids)
        cls = LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ------------------------------------------------------------------------------------------- a workload
def prepare(workload: Workload, *, work: Path, corpus: Any, n_pairs: int, seed: int,
            progress: Log) -> dict[str, Any]:
    """Tokenizer, models and data files of ``workload``; what the report says about them."""
    tokenizer = _tokenizer(workload.model.vocab, work / "tokenizers", corpus, progress)
    spec = workload.model
    params = build_models(spec, tokenizer, work / "models" / _hash(asdict(spec)), progress)
    rows = make_pairs(workload, corpus, tokenizer, n_pairs, seed=seed)[:n_pairs]
    rows = rows[:len(rows) // workload.batch * workload.batch]
    if not rows:
        raise SystemExit(f"{workload.name}: fewer pairs than one batch ({workload.batch})")
    order = epoch_order(len(rows), seed)
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    data = data_dir / f"{workload.name}-{len(rows)}.jsonl"
    trl_data = data_dir / f"{workload.name}-{len(rows)}-trl-order.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    trl_data.write_text("".join(json.dumps(rows[i]) + "\n" for i in order), encoding="utf-8")
    tokens = check_tokenisation(tokenizer, rows)
    lengths = [tuple(map(len, preftune_ids(tokenizer, r))) for r in rows]
    over = sum(p > workload.max_length // 2 or p + max(c, r) > workload.max_length for p, c, r in lengths)
    model_dir = work / "models" / _hash(asdict(spec))
    kind = (f"{spec.kind}, hidden {spec.hidden}, {spec.layers} layers, {spec.heads} heads / {spec.kv_heads} KV, "
            f"MLP {spec.intermediate}, vocab {spec.model_vocab or spec.vocab:,}{', tied' if spec.tied else ''}")
    return {"about": workload.about, "model": kind, "params": params["total"], "pairs": len(rows),
            "batch": workload.batch, "max_length": workload.max_length, "beta": workload.beta,
            "learning_rate": workload.learning_rate, "tokens": {**tokens, "trl": tokens["trl_emulated"],
                                                                "trl_source": "emulated"},
            "shares": token_shares(lengths, order, workload.batch), "over_limits": over,
            "policy": str(model_dir / "policy"), "reference": str(model_dir / "reference"),
            "data": str(data), "trl_data": str(trl_data)}


def _tokenizer(vocab: int, root: Path, corpus: Any, progress: Log) -> Any:
    from transformers import AutoTokenizer

    from preftune.models.tiny import build_tiny_tokenizer

    path = root / str(vocab)
    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(path)
    progress(f"  training a byte-level BPE tokenizer of {vocab:,} tokens on the corpus")
    tokenizer = build_tiny_tokenizer(vocab_size=vocab, texts=corpus.blocks())
    tokenizer.save_pretrained(path)
    return tokenizer


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]
