"""Prompts: reading them from files, and turning a prompt into the text a model continues.

A prompt is a plain string or a list of chat messages ``[{"role": ..., "content": ...}]``. Files: a text
file (one prompt per line; blank lines are not prompts), JSONL records with ``prompt`` or ``messages``,
or a preference dataset (its unique prompts). Templates: ``raw`` (as is), ``tldr``, ``chat`` (the
tokenizer's chat template with the generation prompt) or a format string containing ``{prompt}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.data.jsonl import parse_jsonl, read_text, split_lines
from preftune.errors import PreftuneError

Prompt = str | list[dict[str, Any]]  # a plain prompt, or chat messages [{"role": ..., "content": ...}]

TEMPLATES = {"raw": "{prompt}", "tldr": "{prompt}\n\nTL;DR:"}


def check_template(template: str) -> bool:
    """True for raw, chat, tldr or a format string containing ``{prompt}``."""
    return template in TEMPLATES or template == "chat" or "{prompt}" in template


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
    text = read_text(path, missing_hint="check the path to the prompts file")
    if not is_json:
        prompts: list[Prompt] = [line for line in split_lines(text) if line.strip()]  # U+2028 is no break
    else:
        prompts = []
        for lineno, record in parse_jsonl(text, path=str(path)):
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
