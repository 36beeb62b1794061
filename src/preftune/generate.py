"""Prompts -> N sampled completions per prompt, written as JSONL and as a readable text file.

Completions of prompt ``i`` (1-based ``prompt_id``) are named A, B, C, ... (``completion_id``), as in
the course exercise's table (``COMPLETION 1-A``).

Reproducibility: each (prompt, completion) row samples with its own generator seeded from
``(seed, prompt_id, completion index)`` (``preftune.models.sampling``), so the completions depend on the
seed and the prompt's position in the file only, not on the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from preftune.data.jsonl import write_jsonl
from preftune.data.prompts import Prompt, format_prompt, load_prompts, prompt_text
from preftune.errors import PreftuneError
from preftune.models.sampling import GenerationSettings, RowSampler, row_seed

__all__ = ["GenerationSettings", "Prompt", "check_counts", "check_output", "completion_name", "cut_at_stop",
           "generate_completions", "generate_with_vllm", "load_prompts", "readable_text", "write_generations"]


# ----------------------------------------------------------------------------- names and prompts


def completion_name(index: int) -> str:
    """0 -> A, 1 -> B, ..., 25 -> Z, 26 -> AA, 27 -> AB (spreadsheet column names)."""
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(ord("A") + rem) + name
    return name


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string (the stop string itself is dropped)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


# ----------------------------------------------------------------------------- sampling


class _StopOnStrings:
    """A stopping criterion: a row is done once its decoded new text contains a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_len: int) -> None:
        self.tokenizer, self.stop, self.prompt_len = tokenizer, list(stop), prompt_len

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


# ----------------------------------------------------------------------------- checks (before any model loads)


def check_counts(num: int, batch_size: int = 1) -> None:
    """Raise a PreftuneError naming ``num`` or ``batch_size`` when it is below 1."""
    if num < 1:
        raise PreftuneError(f"num must be >= 1, got {num}", field="num",
                            hint="the number of completions per prompt, such as 3")
    if batch_size < 1:
        raise PreftuneError(f"batch_size must be >= 1, got {batch_size}", field="batch_size",
                            hint="rows (prompt x completion) per generate call, such as 16")


def check_output(path: str | Path) -> Path:
    """The output JSONL path, checked before anything is generated: a .jsonl file, not a .txt file (the
    readable .txt is written beside it) nor a directory."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        raise PreftuneError("the output must be a .jsonl file (the .txt file is written beside it)",
                            path=str(path), field="output", hint="e.g. --output completions.jsonl")
    if path.is_dir():
        raise PreftuneError("the output is a directory", path=str(path), field="output",
                            hint=f"name a file in it, e.g. --output {path / 'completions.jsonl'}")
    return path


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
    check_counts(num, batch_size)
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
        with progress_bar(len(rows), "generating", enabled=progress) as advance, torch.no_grad():
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
    check_counts(num)
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


class progress_bar:
    """A rich progress bar over ``total`` rows on stderr; yields ``advance(n)``. It draws only when enabled
    and stderr is a terminal: into a log or a pipe it writes nothing (not even a blank line)."""

    def __init__(self, total: int, label: str, *, enabled: bool) -> None:
        self.total, self.label, self.enabled, self.bar = total, label, enabled, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            return lambda n: None
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
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
    path = check_output(path)
    write_jsonl(path, records)
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
