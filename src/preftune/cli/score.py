"""`preftune score`: score (prompt, response) pairs with a reward model, one JSON line each.

Two kinds of input, told apart by the first record:

* generations (JSONL records with ``completion``, as `preftune generate` writes): each record is copied
  to the output with a ``score`` field added;
* preference data (any format `preftune.data.load_preferences` reads): the chosen and rejected
  response of each pair (every response of a ranking) get one line each, and the accuracy (share of
  pairs whose chosen response scores higher) is printed.

``--normalize-on REF`` subtracts the mean score over the reference set's responses, so that set has
mean 0 (InstructGPT normalises its reward model this way, Ouyang et al. 2022, Sec. 3.5); the line then
also carries ``raw_score``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from preftune.cli._common import console, handle_errors, plural, show_progress
from preftune.errors import PreftuneError


def read_rows(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """("generations" | "preferences", rows): each row has prompt, response and what to write with it.
    A JSONL file whose first record has ``completion`` (and no ``label``) is generations."""
    from preftune.data.jsonl import read_jsonl

    records = read_jsonl(path) if path.suffix.lower() in (".jsonl", ".ndjson") else []
    if records and "completion" in records[0][1] and "label" not in records[0][1]:
        rows = []
        for number, record in records:
            for key in ("prompt", "completion"):
                if key not in record:
                    raise PreftuneError(f"missing field '{key}'", path=str(path), line=number, field=key,
                                        hint="generations need prompt and completion (preftune generate)")
                if not _is_text(record[key]):
                    raise PreftuneError(f"expected a string or a list of {{role, content}} messages, got "
                                        f"{type(record[key]).__name__}", path=str(path), line=number, field=key,
                                        hint="generations need prompt and completion (preftune generate)")
            rows.append({"prompt": record["prompt"], "response": record["completion"], "out": record})
        return "generations", rows
    from preftune.data import load_preferences

    items, _report = load_preferences(str(path), rankings="keep")
    rows = []
    for index, item in enumerate(items):
        if hasattr(item, "responses"):
            for rank, response in enumerate(item.responses, start=1):
                rows.append({"prompt": item.prompt, "response": response, "out": {
                    "item": index, "prompt": item.prompt, "rank": rank, "response": response, "source": item.source}})
        elif hasattr(item, "chosen"):
            for role in ("chosen", "rejected"):
                response = getattr(item, role)
                rows.append({"prompt": item.prompt, "response": response, "out": {
                    "item": index, "prompt": item.prompt, "role": role, "response": response, "source": item.source}})
        else:  # unpaired (prompt, completion, label)
            rows.append({"prompt": item.prompt, "response": item.completion, "out": {
                "item": index, "prompt": item.prompt, "response": item.completion, "label": item.label,
                "source": item.source}})
    return "preferences", rows


def _is_text(value: Any) -> bool:
    """A string (an empty completion is one), or chat messages [{"role": ..., "content": ...}]."""
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in value))


def accuracy(rows: list[dict[str, Any]], scores: list[float]) -> tuple[int, int]:
    """(correct, total) over ordered pairs of each item: chosen above rejected, rank i above rank j > i."""
    by_item: dict[int, list[tuple[int, float]]] = {}
    for row, score in zip(rows, scores, strict=True):
        out = row["out"]
        if "role" in out:
            by_item.setdefault(out["item"], []).append((0 if out["role"] == "chosen" else 1, score))
        elif "rank" in out:
            by_item.setdefault(out["item"], []).append((out["rank"], score))
    correct = total = 0
    for entries in by_item.values():
        entries.sort()
        for i in range(len(entries)):
            for j in range(i + 1, len(entries)):
                total += 1
                correct += entries[i][1] > entries[j][1]
    return correct, total


@handle_errors
def score_command(
    model: str = typer.Option(..., "--model", help="Reward model: a local directory or a hub id."),
    data: Path = typer.Option(..., "--data", help="Generations JSONL (prompt, completion) or preference data."),
    output: Path = typer.Option(..., "--output", help="Where to write one JSON line per scored response."),
    normalize_on: Path | None = typer.Option(None, "--normalize-on",
                                             help="Shift scores so this reference set has mean 0."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Responses per forward pass."),
    max_length: int = typer.Option(2048, "--max-length", min=2, help="Tokens per prompt + response."),
) -> None:
    """Score responses with a reward model; prints the accuracy for preference data."""
    import torch

    from preftune.data.jsonl import write_jsonl
    from preftune.models import load_reward_model, load_tokenizer, score_texts
    from preftune.models.rewards import check_finite, check_reward_checkpoint

    for path in (data, normalize_on):
        if path is not None and not path.exists():
            raise PreftuneError("file not found", path=str(path))
    inputs = {path: read_rows(path) for path in (data, normalize_on) if path is not None}  # before the model loads
    for path, (_kind, rows) in inputs.items():
        if not rows:
            raise PreftuneError("nothing to score", path=str(path))
    tokenizer = load_tokenizer(model)  # a bad path or hub id fails here, in the loader's words
    check_reward_checkpoint(model, field="model")  # before the weights: a causal LM has no trained score head
    reward_model = load_reward_model(model, tokenizer=tokenizer)
    reward_model.to("cuda" if torch.cuda.is_available() else "cpu")

    def run(path: Path) -> tuple[str, list[dict[str, Any]], list[float]]:
        kind, rows = inputs[path]
        scores = score_texts(reward_model, tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                             batch_size=batch_size, max_length=max_length, progress=show_progress())
        check_finite(scores, [r["prompt"] for r in rows], [r["response"] for r in rows],
                     source=f"the reward model {model}", field="model")
        return kind, rows, scores

    kind, rows, scores = run(data)
    offset = 0.0
    if normalize_on is not None:
        _, _, reference = run(normalize_on)
        offset = sum(reference) / len(reference)
    write_jsonl(output, [{**row["out"], "score": score - offset, **({"raw_score": score} if normalize_on else {})}
                         for row, score in zip(rows, scores, strict=True)])
    shifted = [s - offset for s in scores]
    mean = sum(shifted) / len(shifted)
    console.print(f"scored {plural(len(rows), 'response')} ({kind}) -> {output}; mean score {mean:.4f}"
                  + (f" (shifted by {-offset:+.4f} so {normalize_on} has mean 0)" if normalize_on else ""),
                  highlight=False, markup=False, soft_wrap=True)
    if kind == "preferences":
        correct, total = accuracy(rows, scores)
        if total:
            console.print(f"accuracy {correct / total:.4f} ({correct:,} of {plural(total, 'pair')} ranked right)",
                          highlight=False)


def register(app: typer.Typer) -> None:
    """Add `preftune score` to the root app."""
    app.command(name="score", help="Score (prompt, response) pairs with a reward model.")(score_command)
