"""Turn one raw record into a PreferencePair, Ranking, UnpairedExample or SFTExample, checking every field.

Every error names the file, the line (or row), the field and what to do. Non-fatal findings that
belong to a single record (a ranking whose scores disagree with its order) are returned as problems.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from preftune.data.formats import (
    ASSISTANT_TAG,
    FORMAT_EXAMPLES,
    REQUIRED_FIELDS,
    PreferencePair,
    Problem,
    Ranking,
    SFTExample,
    Text,
    UnpairedExample,
    _guess_format,
    split_implicit_prompt,
    split_shared_messages,
)
from preftune.errors import PreftuneError

_DROP_HINT = "fix the row, or pass drop_invalid=True (--drop-invalid) to drop such rows and count them"
_LIST_FIELDS = ("responses", "ranking", "ranks", "scores", "messages")


@dataclass
class RecordContext:
    """Where a record came from and how its format was chosen (for error messages)."""

    path: str
    line: int
    format: str
    format_from: str                      # "detected from file:line" or "forced"
    auto: bool = True                     # format detected (then a record of another format is an error)
    assistant_tag: str = ASSISTANT_TAG

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def error(self, message: str, *, field: str | None = None, hint: str | None = None) -> PreftuneError:
        return PreftuneError(message, path=self.path, line=self.line, field=field, hint=hint)


def parse_record(record: dict[str, Any], ctx: RecordContext) -> tuple[Any, list[Problem]]:
    """Check ``record`` against ``ctx.format`` and build its example; return (example, problems)."""
    if not isinstance(record, dict):
        raise ctx.error(f"expected an object with named fields, got {type(record).__name__}")
    fmt = ctx.format
    _require(record, REQUIRED_FIELDS[fmt], ctx)
    if ctx.auto:
        other = _guess_format(record)
        if other != fmt:
            raise ctx.error(f"this record looks like format '{other}', but the data's format is '{fmt}' "
                            f"({ctx.format_from})",
                            hint="keep one format per file, or force one with format= (--format)")
    record = _decode_list_fields(record, ctx)
    return _PARSERS[fmt](record, ctx)


def _example_hint(fmt: str) -> str:
    article = "an" if fmt[:1] in "aeiou" else "a"
    return f"{article} '{fmt}' record looks like {FORMAT_EXAMPLES[fmt]}"


def _require(record: dict[str, Any], fields: tuple[str, ...], ctx: RecordContext) -> None:
    for name in fields:
        if record.get(name) is None:
            # null (JSON null, a Parquet/Arrow null) is named as such: the column exists but this row is empty
            what = f"field '{name}' is null" if name in record else f"missing field '{name}'"
            present = ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"
            raise ctx.error(f"{what}; fields present: {present}; format '{ctx.format}' "
                            f"({ctx.format_from}) needs {', '.join(fields)}", field=name,
                            hint=_example_hint(ctx.format))


def _decode_list_fields(record: dict[str, Any], ctx: RecordContext) -> dict[str, Any]:
    """CSV cells hold list-valued fields (responses, ranking, scores, messages) as JSON text; decode them."""
    out = record
    for name in _LIST_FIELDS:
        value = record.get(name)
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ctx.error(f"malformed JSON list in the cell: {exc.msg} (column {exc.colno})",
                                field=name, hint="write list fields as JSON arrays, e.g. [\"a\", \"b\"]") from None
            except (RecursionError, ValueError):  # nested too deeply, an integer too long
                raise ctx.error("unreadable JSON list in the cell: nested too deeply or a number too long",
                                field=name, hint="write list fields as flat JSON arrays, e.g. [\"a\", \"b\"]") from None
            out = dict(out) if out is record else out
            out[name] = decoded
    return out


def check_text(value: Any, name: str, ctx: RecordContext, *, strings: bool = True, messages: bool = True) -> Text:
    """Return ``value`` if it is a non-empty string or a well-formed list of {role, content} messages."""
    if isinstance(value, str):
        if not strings:
            raise ctx.error(f"expected a list of {{role, content}} messages, got a string "
                            f"(format '{ctx.format}')", field=name,
                            hint=_example_hint(ctx.format))
        if not value.strip():
            raise ctx.error("empty text", field=name, hint=_DROP_HINT)
        return value
    if isinstance(value, list) and messages:
        if not value:
            raise ctx.error("empty list of messages", field=name, hint=_DROP_HINT)
        for i, msg in enumerate(value, start=1):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                got = sorted(msg) if isinstance(msg, dict) else type(msg).__name__
                raise ctx.error(f"message {i} must be an object with 'role' and 'content', got {got}",
                                field=name, hint='write messages as [{"role": "user", "content": "..."}]')
            if not isinstance(msg["role"], str) or not msg["role"]:
                raise ctx.error(f"message {i} has no role (a non-empty string)", field=name)
            if not isinstance(msg["content"], str):
                raise ctx.error(f"message {i} content must be a string, got {type(msg['content']).__name__}",
                                field=name)
        if not any(m["content"].strip() for m in value):
            raise ctx.error("every message is empty", field=name, hint=_DROP_HINT)
        return value
    kinds = " or ".join(k for k, ok in (("a string", strings), ("a list of {role, content} messages", messages))
                        if ok)
    raise ctx.error(f"expected {kinds}, got {type(value).__name__}", field=name,
                    hint=_example_hint(ctx.format))


def _optional_str(record: dict[str, Any], name: str) -> str | None:
    value = record.get(name)
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _number(value: Any, name: str, ctx: RecordContext) -> float:
    if isinstance(value, bool):
        raise ctx.error(f"expected a number, got {value!r}", field=name)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ctx.error(f"expected a number, got {value!r}", field=name) from None
    if not math.isfinite(out):
        raise ctx.error(f"expected a finite number, got {value!r}", field=name)
    return out


def _margin(record: dict[str, Any], ctx: RecordContext) -> float | None:
    value = record.get("margin")
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    return _number(value, "margin", ctx)


# Other names datasets give the annotator and the group columns (PRISM's ``user_id``, crowd-sourcing's
# ``worker_id``, ...); read as ``annotator`` and ``group`` on every preference format.
ALIASES: dict[str, tuple[str, ...]] = {"annotator": ("user_id", "annotator_id", "worker_id"),
                                       "group": ("group_id",)}


def _aliased(record: dict[str, Any], name: str, ctx: RecordContext) -> str | None:
    """``record[name]`` or, when absent, the value of one of its aliases; two that disagree are an error."""
    value, found = _optional_str(record, name), name
    for alias in ALIASES[name]:
        other = _optional_str(record, alias)
        if other is None:
            continue
        if value is not None and other != value:
            raise ctx.error(f"'{alias}' is {other!r} but '{found}' is {value!r}; both name the {name}",
                            field=alias, hint=f"keep one of {', '.join((name, *ALIASES[name]))}, "
                                              "or make them agree")
        if value is None:
            value, found = other, alias
    return value


def _extras(record: dict[str, Any], ctx: RecordContext) -> dict[str, Any]:
    return {"annotator": _aliased(record, "annotator", ctx), "group": _aliased(record, "group", ctx),
            "id": _optional_str(record, "id"), "source": ctx.where}


def _standard(record: dict[str, Any], ctx: RecordContext) -> tuple[PreferencePair, list[Problem]]:
    prompt = check_text(record["prompt"], "prompt", ctx, messages=False)
    chosen = check_text(record["chosen"], "chosen", ctx, messages=False)
    rejected = check_text(record["rejected"], "rejected", ctx, messages=False)
    return PreferencePair(prompt, chosen, rejected, margin=_margin(record, ctx), **_extras(record, ctx)), []


def _implicit(record: dict[str, Any], ctx: RecordContext) -> tuple[PreferencePair, list[Problem]]:
    chosen = check_text(record["chosen"], "chosen", ctx, messages=False)
    rejected = check_text(record["rejected"], "rejected", ctx, messages=False)
    split = split_implicit_prompt(chosen, rejected, tag=ctx.assistant_tag)
    if split is None:
        raise ctx.error(f"chosen and rejected share no prefix ending in the assistant tag "
                        f"{ctx.assistant_tag!r}, so the prompt cannot be found", field="chosen",
                        hint="give an explicit 'prompt' field (standard format), or set the assistant tag "
                             "(assistant_tag= / --assistant-tag)")
    prompt, chosen, rejected = split
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise ctx.error(f"nothing follows the last assistant tag in {name}", field=name, hint=_DROP_HINT)
    return PreferencePair(prompt, chosen, rejected, margin=_margin(record, ctx), **_extras(record, ctx)), []


def _conversational(record: dict[str, Any], ctx: RecordContext) -> tuple[PreferencePair, list[Problem]]:
    """Explicit prompt messages, or full conversations sharing a prefix (UltraFeedback-style)."""
    chosen = check_text(record["chosen"], "chosen", ctx, strings=False)
    rejected = check_text(record["rejected"], "rejected", ctx, strings=False)
    raw_prompt = record.get("prompt")
    if isinstance(raw_prompt, list):
        prompt = check_text(raw_prompt, "prompt", ctx, strings=False)
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
            chosen, rejected = chosen[n:], rejected[n:]          # conversations that repeat the prompt
    else:
        prefix, chosen, rejected = split_shared_messages(chosen, rejected)
        if prefix:
            prompt = prefix                                       # a string prompt is then redundant
        elif raw_prompt is not None:
            prompt = [{"role": "user", "content": check_text(raw_prompt, "prompt", ctx, messages=False)}]
        else:
            raise ctx.error("chosen and rejected share no leading messages and there is no prompt field",
                            field="chosen", hint="give a 'prompt' list of messages, or full conversations "
                                                 "that start with the same prompt messages")
    return PreferencePair(prompt, chosen, rejected, margin=_margin(record, ctx), **_extras(record, ctx)), []


def _int_list(value: Any, name: str, ctx: RecordContext, k: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ctx.error(f"expected a list of integers, got {value!r}", field=name)
    if len(value) != k:
        raise ctx.error(f"has {len(value)} entries but there are {k} responses", field=name)
    return value


def _ranking(record: dict[str, Any], ctx: RecordContext) -> tuple[Ranking, list[Problem]]:
    """``ranking``: response indices, best first (0-based); ``ranks``: each response's rank (1 = best);
    ``scores``: higher is better. With both an order and scores, the scores are reordered with it."""
    prompt = check_text(record["prompt"], "prompt", ctx)
    raw = record["responses"]
    if not isinstance(raw, list) or len(raw) < 2:
        raise ctx.error("expected a list of at least two responses", field="responses")
    responses = [check_text(r, f"responses[{i}]", ctx) for i, r in enumerate(raw)]
    k = len(responses)
    scores = None
    if record.get("scores") is not None:
        if not isinstance(record["scores"], list) or len(record["scores"]) != k:
            raise ctx.error(f"expected a list of {k} numbers (one per response), got {record['scores']!r}",
                            field="scores")
        scores = [_number(s, "scores", ctx) for s in record["scores"]]
    if record.get("ranking") is not None:
        order = _int_list(record["ranking"], "ranking", ctx, k)
        bad = [i for i in order if not 0 <= i < k]
        if bad:
            raise ctx.error(f"index {bad[0]} is out of range for {k} responses (indices are 0..{k - 1})",
                            field="ranking", hint="'ranking' lists 0-based response indices, best first; to give "
                                                  "each response's rank (1 = best) use a 'ranks' field")
        if len(set(order)) != k:
            raise ctx.error(f"must list every response index exactly once, got {order}", field="ranking")
    elif record.get("ranks") is not None:
        ranks = _int_list(record["ranks"], "ranks", ctx, k)
        if sorted(ranks) != list(range(1, k + 1)):
            raise ctx.error(f"ranks must be 1..{k} (1 = best), each once, got {ranks}", field="ranks",
                            hint="ties are not supported in ranks; give 'scores' instead")
        order = sorted(range(k), key=lambda i: ranks[i])
    else:
        order = sorted(range(k), key=lambda i: -scores[i])       # type: ignore[index]  # stable for ties
    problems = []
    if scores is not None:
        scores = [scores[i] for i in order]
        if any(a < b for a, b in zip(scores, scores[1:], strict=False)):
            problems.append(Problem("ranking_disagrees_with_scores", ctx.where, "scores",
                                    f"the order best-first has scores {scores}, which are not decreasing"))
    ex = Ranking(prompt, [responses[i] for i in order], scores=scores, **_extras(record, ctx))
    return ex, problems


_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def _label(value: Any, ctx: RecordContext) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ctx.error(f"expected a boolean (true/false or 1/0), got {value!r}", field="label")


def _unpaired(record: dict[str, Any], ctx: RecordContext) -> tuple[UnpairedExample, list[Problem]]:
    prompt = check_text(record["prompt"], "prompt", ctx)
    completion = check_text(record["completion"], "completion", ctx)
    extras = _extras(record, ctx)
    return UnpairedExample(prompt, completion, _label(record["label"], ctx), **extras), []


def _sft_prompt_completion(record: dict[str, Any], ctx: RecordContext) -> tuple[SFTExample, list[Problem]]:
    prompt = check_text(record["prompt"], "prompt", ctx)
    completion = check_text(record["completion"], "completion", ctx)
    return SFTExample(prompt, completion, id=_optional_str(record, "id"), source=ctx.where), []


def _sft_messages(record: dict[str, Any], ctx: RecordContext) -> tuple[SFTExample, list[Problem]]:
    messages = check_text(record["messages"], "messages", ctx, strings=False)
    if messages[-1]["role"] != "assistant":
        raise ctx.error(f"the last message must be the assistant's reply, got role '{messages[-1]['role']}'",
                        field="messages", hint="end each conversation with the assistant turn to learn")
    ex = SFTExample(messages[:-1] or None, [messages[-1]], messages=messages, id=_optional_str(record, "id"),
                    source=ctx.where)
    return ex, []


def _sft_text(record: dict[str, Any], ctx: RecordContext) -> tuple[SFTExample, list[Problem]]:
    text = check_text(record["text"], "text", ctx, messages=False)
    return SFTExample(None, text, id=_optional_str(record, "id"), source=ctx.where), []


_PARSERS = {
    "standard": _standard,
    "implicit_prompt": _implicit,
    "conversational": _conversational,
    "ranking": _ranking,
    "unpaired": _unpaired,
    "sft_prompt_completion": _sft_prompt_completion,
    "sft_messages": _sft_messages,
    "sft_text": _sft_text,
}
