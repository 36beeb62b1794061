"""Prompts -> N sampled completions per prompt, written as JSONL and as a readable text file.

Completions of prompt ``i`` (1-based ``prompt_id``) are named A, B, C, ... (``completion_id``), as in
the course exercise's table (``COMPLETION 1-A``).

Reproducibility: Hugging Face ``generate`` samples from the global RNG, so the same seed gives
different completions when the batch size or the order of prompts changes. Here each row of a batch,
i.e. each (prompt, completion) pair, owns a ``torch.Generator`` seeded from
``(seed, prompt_id, completion index)``; a logits processor draws that row's next token with its own
generator (temperature, top-k, top-p applied first) and hands ``generate`` a one-hot distribution, so
the completions depend on the seed and the prompt's position in the file only, not on the batch size.
(Different hardware, dtypes or library versions can still change the logits and hence the draws.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

Prompt = str | list[dict[str, Any]]  # a plain prompt, or chat messages [{"role": ..., "content": ...}]

TEMPLATES = {"raw": "{prompt}", "tldr": "{prompt}\n\nTL;DR:"}
BACKENDS = ("transformers", "vllm")


@dataclass
class GenerationSettings:
    """How completions are sampled; written into every output record."""

    temperature: float = 1.0      # softmax temperature; 0 = greedy decoding
    top_p: float = 1.0            # nucleus sampling: keep the smallest set of tokens with mass >= top_p
    top_k: int = 0                # keep the k most likely tokens; 0 = no limit
    max_new_tokens: int = 64      # completion length limit, in tokens
    min_new_tokens: int = 0       # end-of-sequence is not sampled before this many new tokens
    seed: int = 0                 # same seed -> same completions (see the module docstring)
    template: str = "raw"         # raw | chat | tldr | a format string containing {prompt}
    stop: list[str] = field(default_factory=list)  # cut a completion before the first of these strings
    backend: str = "transformers"  # transformers | vllm

    def check(self) -> None:
        """Raise a PreftuneError naming the first invalid setting."""
        if self.temperature < 0:
            raise PreftuneError(f"temperature must be >= 0, got {self.temperature}", field="temperature")
        if not 0 < self.top_p <= 1:
            raise PreftuneError(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")
        if self.top_k < 0:
            raise PreftuneError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}", field="top_k")
        if self.max_new_tokens < 1:
            raise PreftuneError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}", field="max_new_tokens")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise PreftuneError(f"min_new_tokens must be in [0, max_new_tokens = {self.max_new_tokens}], "
                                f"got {self.min_new_tokens}", field="min_new_tokens")
        if self.template not in ("raw", "chat", "tldr") and "{prompt}" not in self.template:
            raise PreftuneError(f"unknown template {self.template!r}", field="template",
                                hint="use raw, chat, tldr or a format string containing {prompt}")
        if self.backend not in BACKENDS:
            raise PreftuneError(f"unknown backend {self.backend!r}", field="backend",
                                hint=f"use one of: {', '.join(BACKENDS)}")
        if any(not s for s in self.stop):
            raise PreftuneError("stop strings must not be empty", field="stop")


# ----------------------------------------------------------------------------- names and prompts


def completion_name(index: int) -> str:
    """0 -> A, 1 -> B, ..., 25 -> Z, 26 -> AA, 27 -> AB (spreadsheet column names)."""
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(ord("A") + rem) + name
    return name


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: chat messages become their single user message, else ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return str(prompt[0].get("content", ""))
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)


def load_prompts(path: str | Path, *, from_preferences: bool = False) -> list[Prompt]:
    """Read prompts from a text file (one per line; blank lines are not prompts), from JSONL records
    with ``prompt`` or ``messages``, or from a preference dataset (its unique prompts, in order of first
    appearance; detected by ``chosen``/``rejected`` fields, a .parquet file, or ``from_preferences``)."""
    path = Path(path)
    is_json = path.suffix.lower() in (".jsonl", ".json")
    if from_preferences or path.suffix.lower() == ".parquet":
        return _preference_prompts(path)
    if not path.exists():
        raise PreftuneError("file not found", path=str(path), hint="check the path to the prompts file")
    text = path.read_text(encoding="utf-8-sig")
    if not is_json:
        prompts: list[Prompt] = [line for line in text.splitlines() if line.strip()]
    else:
        prompts = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PreftuneError(f"not valid JSON ({exc.msg})", path=str(path), line=lineno,
                                    hint="write one JSON object per line") from None
            if not isinstance(record, dict):
                raise PreftuneError("expected a JSON object", path=str(path), line=lineno)
            if "chosen" in record or "rejected" in record:
                return _preference_prompts(path)
            prompts.append(_record_prompt(record, path=str(path), line=lineno))
    if not prompts:
        raise PreftuneError("no prompts found", path=str(path), hint="write one prompt per line")
    return prompts


def _record_prompt(record: dict[str, Any], *, path: str, line: int) -> Prompt:
    for key in ("prompt", "messages"):
        if key not in record:
            continue
        value = record[key]
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
            return value
        raise PreftuneError("expected a non-empty string or a list of {role, content} messages",
                            path=path, line=line, field=key)
    raise PreftuneError("the record has neither 'prompt' nor 'messages'", path=path, line=line, field="prompt",
                        hint='write {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}')


def _preference_prompts(path: Path) -> list[Prompt]:
    from preftune.data import load_preferences

    items, _report = load_preferences(path)
    seen: set[str] = set()
    prompts: list[Prompt] = []
    for item in items:
        key = json.dumps(item.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(item.prompt)
    if not prompts:
        raise PreftuneError("the preference dataset has no prompts", path=str(path))
    return prompts


def format_prompt(prompt: Prompt, template: str, tokenizer: Any = None) -> str:
    """Apply a template: raw (as is), tldr (``{prompt}\\n\\nTL;DR:``), chat (the tokenizer's chat
    template with the generation prompt added) or a format string containing ``{prompt}``."""
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise PreftuneError("the tokenizer has no chat template", field="template",
                                hint="use --template raw, tldr or a format string such as 'Q: {prompt}\\nA:'")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    fmt = TEMPLATES.get(template, template)
    return fmt.replace("{prompt}", prompt_text(prompt))


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string (the stop string itself is dropped)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def row_seed(seed: int, prompt_id: int, completion_index: int) -> int:
    """A 63-bit seed for one (prompt, completion) row, mixed by numpy's SeedSequence (no collisions by
    addition: (1, 2) and (2, 1) give unrelated seeds)."""
    import numpy as np

    state = np.random.SeedSequence([seed & 0xFFFFFFFF, prompt_id, completion_index]).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


# ----------------------------------------------------------------------------- sampling


def sample_next_tokens(logits: Any, *, generators: Sequence[Any], temperature: float, top_k: int = 0,
                       top_p: float = 1.0) -> Any:
    """Draw one token per row of ``logits`` [B, V] with that row's generator.

    p = softmax(logits / temperature) restricted to the top-k tokens and then to the nucleus (the
    smallest set of most likely tokens whose mass is >= top_p; Holtzman et al. 2020, sec. 3.1);
    temperature 0 is greedy (argmax). Tokens already at -inf (banned by other processors) stay banned.
    """
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p  # the first token has mass_before 0 and is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return torch.stack([torch.multinomial(probs[r], 1, generator=generators[r])[0] for r in range(len(probs))])


class RowSampler:
    """A logits processor that samples each row with its own generator and returns a one-hot choice,
    so that ``generate(do_sample=False)`` (argmax) takes exactly the token drawn here."""

    def __init__(self, seeds: Sequence[int], settings: GenerationSettings) -> None:
        self.seeds, self.settings = list(seeds), settings
        self.generators: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if not self.generators:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        s = self.settings
        chosen = sample_next_tokens(scores, generators=self.generators, temperature=s.temperature,
                                    top_k=s.top_k, top_p=s.top_p)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(1, chosen[:, None], 0.0)


class _StopOnStrings:
    """A stopping criterion: a row is done once its decoded new text contains a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_len: int) -> None:
        self.tokenizer, self.stop, self.prompt_len = tokenizer, list(stop), prompt_len

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


# ----------------------------------------------------------------------------- generation


def generate_completions(model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, num: int,
                         settings: GenerationSettings, batch_size: int = 16, model_name: str | None = None,
                         progress: bool = True) -> list[dict[str, Any]]:
    """``num`` completions for each prompt with a Hugging Face causal LM (batched, left padding).

    Returns records ``{prompt_id, prompt, completion_id, completion, model, settings}`` ordered by
    prompt then completion; the prompt (and the template around it) is stripped from the completion,
    and each completion is cut before its first stop string. ``batch_size`` counts rows (prompt x
    completion) per ``generate`` call and does not change the completions.
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    settings.check()
    if num < 1:
        raise PreftuneError(f"num must be >= 1, got {num}", field="num")
    if batch_size < 1:
        raise PreftuneError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    texts = [format_prompt(p, settings.template, tokenizer) for p in prompts]
    rows = [(i, k) for i in range(len(prompts)) for k in range(num)]  # (prompt index, completion index)
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or "model"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise PreftuneError("the tokenizer has neither a pad nor an eos token",
                            hint="set tokenizer.pad_token before generating")
    old_pad = tokenizer.pad_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # for padding only; masked out by the attention mask
    add_special = settings.template != "chat"  # a chat template already writes its special tokens
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    completions: list[str] = []
    model.eval()
    try:
        with _progress(len(rows), "generating", enabled=progress) as advance, torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                enc = tokenizer([texts[i] for i, _ in batch], return_tensors="pt", padding=True,
                                add_special_tokens=add_special, return_token_type_ids=False)
                enc = {k: v.to(model.device) for k, v in enc.items()}
                prompt_len = enc["input_ids"].shape[1]
                config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False,
                                          min_new_tokens=settings.min_new_tokens or None,
                                          pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
                seeds = [row_seed(settings.seed, i + 1, k) for i, k in batch]
                stopping = StoppingCriteriaList([_StopOnStrings(tokenizer, settings.stop, prompt_len)]
                                                if settings.stop else [])
                out = model.generate(**enc, generation_config=config, stopping_criteria=stopping,
                                     logits_processor=LogitsProcessorList([RowSampler(seeds, settings)]))
                decoded = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
                completions.extend(cut_at_stop(t, settings.stop) for t in decoded)
                advance(len(batch))
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
    return _records(prompts, rows, completions, name=name, settings=settings)


def _records(prompts: Sequence[Prompt], rows: Sequence[tuple[int, int]], completions: Sequence[str], *,
             name: str, settings: GenerationSettings) -> list[dict[str, Any]]:
    return [{"prompt_id": i + 1, "prompt": prompts[i], "completion_id": completion_name(k), "completion": c,
             "model": name, "settings": asdict(settings)} for (i, k), c in zip(rows, completions, strict=True)]


def generate_with_vllm(model_path: str, prompts: Sequence[Prompt], *, num: int,
                       settings: GenerationSettings) -> list[dict[str, Any]]:
    """The same records from vLLM (``pip install vllm``). Each prompt's request is seeded from
    ``(seed, prompt_id)``; vLLM samples differently from transformers, so the same seed gives other
    completions than the transformers backend."""
    settings.check()
    try:
        import vllm
    except ImportError:
        raise PreftuneError("the vllm backend needs the vllm package, which is not installed",
                            field="backend", hint="pip install vllm, or use --backend transformers") from None
    llm = vllm.LLM(model=model_path, seed=settings.seed)
    tokenizer = llm.get_tokenizer()
    texts = [format_prompt(p, settings.template, tokenizer) for p in prompts]
    params = [vllm.SamplingParams(n=num, temperature=settings.temperature, top_p=settings.top_p,
                                  top_k=settings.top_k if settings.top_k > 0 else -1,
                                  max_tokens=settings.max_new_tokens, min_tokens=settings.min_new_tokens,
                                  stop=list(settings.stop) or None,
                                  seed=row_seed(settings.seed, i + 1, 0) % (2**31))
              for i in range(len(prompts))]
    outputs = llm.generate(texts, params)
    rows, completions = [], []
    for i, out in enumerate(outputs):
        for k, choice in enumerate(out.outputs[:num]):
            rows.append((i, k))
            completions.append(cut_at_stop(choice.text, settings.stop))
    return _records(prompts, rows, completions, name=model_path, settings=settings)


class _progress:
    """A rich progress bar over ``total`` rows (silent when disabled); yields ``advance(n)``."""

    def __init__(self, total: int, label: str, *, enabled: bool) -> None:
        self.total, self.label, self.enabled, self.bar = total, label, enabled, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------- output files


def write_generations(records: Sequence[dict[str, Any]], path: str | Path) -> tuple[Path, Path]:
    """Write ``path`` (JSONL, one record per completion) and a readable ``path`` with suffix .txt::

        PREFIX 1: <prompt>
        COMPLETION 1-A: <completion>
        COMPLETION 1-B: <completion>
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        raise PreftuneError("the output must be a .jsonl file (the .txt file is written beside it)",
                            path=str(path), hint="e.g. --output completions.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    txt = path.with_suffix(".txt")
    txt.write_text(readable_text(records), encoding="utf-8")
    return path, txt


def readable_text(records: Sequence[dict[str, Any]]) -> str:
    """The course's layout: one ``PREFIX i`` line per prompt followed by its ``COMPLETION i-X`` lines."""
    lines: list[str] = []
    last = None
    for r in records:
        if r["prompt_id"] != last:
            if last is not None:
                lines.append("")
            lines.append(f"PREFIX {r['prompt_id']}: {_one_line(prompt_text(r['prompt']))}")
            last = r["prompt_id"]
        lines.append(f"COMPLETION {r['prompt_id']}-{r['completion_id']}: {_one_line(r['completion'])}")
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", " / ")
