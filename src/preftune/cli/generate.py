"""`preftune generate`: N sampled completions per prompt, as JSONL plus a readable text file."""

from __future__ import annotations

from pathlib import Path

import typer

from preftune.cli._common import console, handle_errors, plural
from preftune.errors import PreftuneError


@handle_errors
def generate(
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local model directory (a causal LM)."),
    prompts: Path = typer.Option(..., "--prompts", "-p",
                                 help="Prompts: a text file (one per line), JSONL with prompt/messages, "
                                      "or a preference dataset (its unique prompts)."),
    num: int = typer.Option(3, "--num", "-n", help="Completions per prompt (named A, B, C, ...)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output JSONL; a readable OUT.txt is written beside it."),
    temperature: float = typer.Option(1.0, help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Length limit of each completion, in tokens."),
    min_new_tokens: int = typer.Option(0, "--min-new-tokens", help="No end-of-sequence before this many new tokens."),
    seed: int = typer.Option(0, help="Same seed -> same completions, whatever the batch size."),
    template: str = typer.Option("raw", help="raw | chat | tldr | a format string such as 'Q: {prompt}\\nA:'."),
    stop: list[str] = typer.Option([], "--stop", help="Cut each completion before this string (repeatable)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Rows (prompt x completion) per generate call."),
    backend: str = typer.Option("transformers", help="transformers | vllm (needs `pip install vllm`)."),
    dtype: str = typer.Option("auto", help="Model dtype: auto, float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto (cuda when available), cpu, cuda, cuda:1, ..."),
    from_preferences: bool = typer.Option(False, "--from-preferences",
                                          help="Read --prompts as a preference dataset (file, dir or hub id)."),
) -> None:
    """Sample N completions for each prompt and write OUT.jsonl and OUT.txt.

    Example: preftune generate --model runs/sft/final --prompts prefixes.txt --num 3 --output sft.jsonl
    """
    from preftune.generate import (
        GenerationSettings,
        check_counts,
        check_output,
        generate_completions,
        load_prompts,
        write_generations,
    )

    # A shell gives "\n" as two characters; in a template it almost always means a newline.
    template = template.replace("\\n", "\n").replace("\\t", "\t")
    settings = GenerationSettings(temperature=temperature, top_p=top_p, top_k=top_k,
                                  max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, seed=seed,
                                  template=template,
                                  stop=[s.replace("\\n", "\n") for s in stop], backend=backend)
    # Every setting, the output path and the prompts are checked before a model loads (seconds to minutes).
    settings.check()
    check_counts(num, batch_size)
    check_output(output)
    prompt_list = load_prompts(prompts, from_preferences=from_preferences)
    console.print(f"{plural(len(prompt_list), 'prompt')} from {prompts}, "
                  f"{plural(num, 'completion')} each ({backend})", highlight=False, markup=False, soft_wrap=True)
    if backend == "vllm":
        from preftune.generate import generate_with_vllm

        records = generate_with_vllm(model, prompt_list, num=num, settings=settings)
    else:
        from preftune.models import load_policy, load_tokenizer

        target = _device(device)
        tokenizer = load_tokenizer(model, padding_side="left")
        lm = load_policy(model, dtype=dtype, tokenizer=tokenizer)
        lm.to(target)
        records = generate_completions(lm, tokenizer, prompt_list, num=num, settings=settings,
                                       batch_size=batch_size, model_name=model)
    jsonl, txt = write_generations(records, output)
    console.print(f"wrote {plural(len(records), 'completion')} to {jsonl} and {txt}", highlight=False, markup=False,
                  soft_wrap=True)


def _device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; any other name is checked (before the model loads)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError):
        raise PreftuneError(f"unknown device {device!r}", field="device",
                            hint="use auto, cpu, cuda or cuda:N") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise PreftuneError("CUDA is not available here", field="device", hint="use --device auto or cpu")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise PreftuneError(f"no GPU {target.index}: this machine has {torch.cuda.device_count()}",
                                field="device", hint="use --device cuda:0, or auto")
    return device


def register(app: typer.Typer) -> None:
    """Add `preftune generate` to the root app."""
    app.command(name="generate")(generate)
