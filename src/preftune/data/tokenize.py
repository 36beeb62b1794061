"""Token ids, loss masks and truncation for preference pairs, rankings and SFT examples.

**The prompt/response boundary is exact by construction**: the prompt and the response are tokenised
*separately* and their ids concatenated, so every response token (and only those) gets a label and the
prompt tokens get -100. (Tokenising the joined string and searching for the boundary can merge the last
prompt characters with the first response characters into one token; we never do that.) The texts are
joined as given, with no separator added: put the space or newline you want at the end of the prompt.

* Plain strings: prompt ids = ``tokenizer(prompt)`` with the tokenizer's special tokens (a BOS, for
  example; a trailing EOS that some post-processors append is removed); response ids =
  ``tokenizer(response, add_special_tokens=False)`` followed by EOS.
* Message lists ``[{"role", "content"}]`` (either side): rendered with the tokenizer's chat template;
  prompt text = template(prompt, add_generation_prompt=True), response text = template(prompt + response)
  minus that prefix; whitespace after a final EOS is dropped and EOS appended if the template did not
  end the turn with it. The response therefore always ends with EOS, and EOS is trained on.

**Truncation never cuts a response silently** (``truncation``):

* ``keep_end``: the prompt is cut from the *left* to ``max_prompt_length`` tokens (keeping its end, the
  part next to the response), then the response from the right so prompt + response fits ``max_length``
  (a cut response loses its EOS, as it should). Both cuts are counted in ``TruncationStats``.
* ``error``: stop with an error naming the example. ``drop``: leave the example out, counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from preftune.core.logprobs import IGNORE_INDEX
from preftune.errors import PreftuneError

TRUNCATION_MODES = ("keep_end", "error", "drop")

Text = str | list[dict[str, Any]]


@dataclass
class TruncationStats:
    """How many examples were seen, kept, cut and dropped (the trainer logs ``summary()``)."""

    total: int = 0
    kept: int = 0
    prompt_truncated: int = 0      # examples whose prompt lost tokens on the left
    response_truncated: int = 0    # examples with a response that lost tokens on the right
    dropped: int = 0               # examples left out (truncation: drop)

    def summary(self) -> str:
        return (f"{self.kept}/{self.total} example{'' if self.total == 1 else 's'} kept; "
                f"prompt truncated in {self.prompt_truncated}, "
                f"response truncated in {self.response_truncated}, dropped {self.dropped}")


@dataclass
class TokenizedSequence:
    input_ids: list[int]
    labels: list[int]               # -100 on prompt tokens
    prompt_truncated: bool = False
    response_truncated: bool = False


@dataclass
class TokenizedPair:
    """One preference pair: prompt+chosen and prompt+rejected (same prompt ids), optional margin."""

    chosen_input_ids: list[int]
    chosen_labels: list[int]
    rejected_input_ids: list[int]
    rejected_labels: list[int]
    margin: float | None = None
    ref_chosen_logps: float | None = None      # filled by the DPO reference pass (train/refcache.py)
    ref_rejected_logps: float | None = None
    annotator: str | None = None               # who labelled the pair, and their group (collated as lists)
    group: str | None = None

    @property
    def length(self) -> int:
        return max(len(self.chosen_input_ids), len(self.rejected_input_ids))


@dataclass
class TokenizedRanking:
    """One prompt with K >= 2 responses, best first (the order of ``preftune.data``'s ``Ranking``)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    scores: list[float] = field(default_factory=list)
    annotator: str | None = None
    group: str | None = None

    @property
    def length(self) -> int:
        return max(len(ids) for ids in self.input_ids)


@dataclass
class TokenizedUnpaired:
    """One unpaired example (KTO): prompt + completion with its label, and the same prompt with ANOTHER
    example's completion (the mismatched pair of KTO's KL estimate z0, ``kl_*``)."""

    input_ids: list[int]
    labels: list[int]
    desirable: bool
    kl_input_ids: list[int]
    kl_labels: list[int]
    ref_logps: float | None = None             # filled by the KTO reference pass (train/kto.py)
    ref_kl_logps: float | None = None
    annotator: str | None = None
    group: str | None = None

    @property
    def length(self) -> int:
        return max(len(self.input_ids), len(self.kl_input_ids))


# ---------------------------------------------------------------------------------------------- rendering
@dataclass
class _Encoded:
    """What ``pre_encoded`` computed ahead for one tokenizer: ids per (text, add_special_tokens), the EOS id."""

    tokenizer: Any
    ids: dict[tuple[str, bool], list[int]]
    eos_id: int | None


_ENCODED: ContextVar[_Encoded | None] = ContextVar("preftune_encoded", default=None)


def _ahead(tokenizer: Any) -> _Encoded | None:
    ahead = _ENCODED.get()
    return ahead if ahead is not None and ahead.tokenizer is tokenizer else None


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    ahead = _ahead(tokenizer)
    ids = ahead.ids.get((text, special)) if ahead is not None else None
    return list(ids if ids is not None else tokenizer(text, add_special_tokens=special)["input_ids"])


@contextlib.contextmanager
def pre_encoded(tokenizer: Any, items: Sequence[Any]) -> Iterator[None]:
    """Inside: the plain-string prompts (with special tokens) and responses (without) of ``items`` come from
    one batched tokenizer call each, made here, instead of one call per text. The ids are the same (a batch
    is encoded text by text); a fast tokenizer encodes a batch in Rust with one Python round trip instead of
    thousands, a prompt shared by a pair's two responses (or several pairs) is encoded once, and the EOS id
    is looked up once: tokenising 2,048 distinct pairs took 1.7 s one by one, 1.06 s so (2 busy cores).
    Message lists are rendered with the chat template and encoded one by one as before."""
    prompts = {p for item in items if isinstance(p := getattr(item, "prompt", None), str)}
    responses = {r for item in items for r in _responses(item) if isinstance(r, str)}
    encoded: dict[tuple[str, bool], list[int]] = {}
    for texts, special in ((list(prompts), True), (list(responses), False)):
        if texts:
            encoded.update(zip(((t, special) for t in texts),
                               tokenizer(texts, add_special_tokens=special)["input_ids"], strict=True))
    token = _ENCODED.set(_Encoded(tokenizer, encoded, tokenizer.eos_token_id))  # eos_token_id: a lookup per call
    try:
        yield
    finally:
        _ENCODED.reset(token)


def _responses(item: Any) -> list[Any]:
    if hasattr(item, "responses"):
        return list(item.responses)
    return [getattr(item, "chosen", None), getattr(item, "rejected", None)]


def _eos_id(tokenizer: Any) -> int:
    ahead = _ahead(tokenizer)
    if ahead is not None and ahead.eos_id is not None:
        return ahead.eos_id
    if tokenizer.eos_token_id is None:
        raise PreftuneError("the tokenizer has no EOS token; responses must end with one", field="tokenizer",
                            hint="use a tokenizer with an eos_token (or set tokenizer.eos_token)")
    return int(tokenizer.eos_token_id)


def _as_messages(text: Text, role: str) -> list[dict[str, Any]]:
    return [{"role": role, "content": text}] if isinstance(text, str) else list(text)


def _template(tokenizer: Any, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise PreftuneError("message lists need a tokenizer with a chat template", field="tokenizer",
                            hint="use an instruct model's tokenizer, or give prompts/responses as plain strings")
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _strip_after_eos(tokenizer: Any, text: str) -> str:
    eos = tokenizer.eos_token
    stripped = text.rstrip()
    return stripped if eos and stripped.endswith(eos) else text


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else [*ids, eos]


def render_prompt_response(tokenizer: Any, prompt: Text, response: Text) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids ending with EOS), tokenised separately (see the module docstring)."""
    eos = _eos_id(tokenizer)
    if isinstance(prompt, str) and isinstance(response, str):
        prompt_ids = _encode(tokenizer, prompt, special=True)
        if prompt_ids and prompt_ids[-1] == eos and not prompt.endswith(tokenizer.eos_token or "\0"):
            prompt_ids = prompt_ids[:-1]  # a post-processor that appends EOS to every text
        return prompt_ids, _with_eos(_encode(tokenizer, response, special=False), eos)
    prompt_messages = _as_messages(prompt, "user")
    head = _template(tokenizer, prompt_messages, generation_prompt=True)
    full = _template(tokenizer, prompt_messages + _as_messages(response, "assistant"), generation_prompt=False)
    if not full.startswith(head):
        raise PreftuneError("the chat template renders the prompt differently with and without the response",
                            field="tokenizer", hint="give prompt and response as plain strings instead")
    response_text = _strip_after_eos(tokenizer, full[len(head):])
    return (_encode(tokenizer, head, special=False),
            _with_eos(_encode(tokenizer, response_text, special=False), eos))


# ---------------------------------------------------------------------------------------------- truncation
def _check_limits(max_length: int, max_prompt_length: int | None, truncation: str) -> int:
    if truncation not in TRUNCATION_MODES:
        raise PreftuneError(f"unknown truncation {truncation!r}", field="truncation",
                            hint=f"use one of {', '.join(TRUNCATION_MODES)}")
    limit = max_length // 2 if max_prompt_length is None else max_prompt_length
    if not 0 < limit < max_length:
        raise PreftuneError(f"max_prompt_length ({limit}) must be between 1 and max_length - 1 ({max_length - 1})",
                            field="max_prompt_length", hint="lower max_prompt_length or raise max_length")
    return limit


def _fit(prompt_ids: list[int], responses: Sequence[list[int]], *, max_length: int,
         max_prompt_length: int) -> tuple[list[int], list[list[int]], bool, bool]:
    """keep_end: prompt cut from the left to max_prompt_length, each response cut from the right to fit."""
    prompt_cut = len(prompt_ids) > max_prompt_length
    if prompt_cut:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    response_cut = any(len(r) > room for r in responses)
    return prompt_ids, [r[:room] for r in responses], prompt_cut, response_cut


def _where(example: Any, index: int | None) -> dict[str, Any]:
    """Where an example came from: its ``source`` ("file:line") if it has one, else its position."""
    source = getattr(example, "source", None)
    if source:
        return {"path": str(source)}
    return {"field": f"example {index}"} if index is not None else {}


def _sequence(prompt_ids: list[int], response_ids: list[int], *, mask_prompt: bool = True) -> tuple[list, list]:
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if mask_prompt else list(prompt_ids)
    return prompt_ids + response_ids, prompt_labels + response_ids


def _truncate(tokenizer: Any, prompt: Text, responses: Sequence[Text], *, max_length: int,
              max_prompt_length: int | None, truncation: str, stats: TruncationStats | None,
              example: Any = None, index: int | None = None) -> list[tuple[list[int], list[int]]] | None:
    """Tokenise prompt + each response; apply the truncation mode; None when dropped."""
    limit = _check_limits(max_length, max_prompt_length, truncation)
    rendered = [render_prompt_response(tokenizer, prompt, r) for r in responses]
    prompt_ids = rendered[0][0]
    if any(p != prompt_ids for p, _ in rendered[1:]):
        raise PreftuneError("the prompt tokenises differently next to different responses",
                            **{"field": "prompt", **_where(example, index)})
    new_prompt, new_responses, prompt_cut, response_cut = _fit(
        prompt_ids, [r for _, r in rendered], max_length=max_length, max_prompt_length=limit)
    if stats is not None:
        stats.total += 1
    if prompt_cut or response_cut:
        longest = len(prompt_ids) + max(len(r) for _, r in rendered)
        if truncation == "error":
            raise PreftuneError(f"prompt + response is {longest} tokens (prompt {len(prompt_ids)}), over "
                                f"max_length {max_length} / max_prompt_length {limit}", **_where(example, index),
                                hint="raise max_length / max_prompt_length, or set truncation: keep_end or drop")
        if truncation == "drop":
            if stats is not None:
                stats.dropped += 1
            return None
    if stats is not None:
        stats.kept += 1
        stats.prompt_truncated += prompt_cut
        stats.response_truncated += response_cut
    return [_sequence(new_prompt, r) for r in new_responses]


def tokenize_prompt_response(tokenizer: Any, prompt: Text, response: Text, *, max_length: int,
                             max_prompt_length: int | None = None, truncation: str = "keep_end") -> TokenizedSequence:
    """One prompt + response -> ids and labels (prompt masked), keep_end or error truncation."""
    if truncation == "drop":
        raise PreftuneError("truncation 'drop' needs a list of examples", field="truncation")
    stats = TruncationStats()
    ((ids, labels),) = _truncate(tokenizer, prompt, [response], max_length=max_length,
                                 max_prompt_length=max_prompt_length, truncation=truncation, stats=stats)
    return TokenizedSequence(ids, labels, bool(stats.prompt_truncated), bool(stats.response_truncated))


# ---------------------------------------------------------------------------------------------- preference data
def _who(example: Any) -> dict[str, str | None]:
    """The example's ``annotator`` and ``group`` (None when it has none), carried to the batch."""
    return {"annotator": getattr(example, "annotator", None), "group": getattr(example, "group", None)}


def tokenize_pair(tokenizer: Any, pair: Any, *, max_length: int, max_prompt_length: int | None = None,
                  truncation: str = "keep_end", stats: TruncationStats | None = None,
                  index: int | None = None) -> TokenizedPair | None:
    """A ``PreferencePair`` (prompt, chosen, rejected, margin, annotator, group) -> ``TokenizedPair``;
    None if dropped."""
    out = _truncate(tokenizer, pair.prompt, [pair.chosen, pair.rejected], max_length=max_length,
                    max_prompt_length=max_prompt_length, truncation=truncation, stats=stats, example=pair,
                    index=index)
    if out is None:
        return None
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = out
    margin = getattr(pair, "margin", None)
    return TokenizedPair(chosen_ids, chosen_labels, rejected_ids, rejected_labels,
                         margin=None if margin is None else float(margin), **_who(pair))


def tokenize_ranking(tokenizer: Any, ranking: Any, *, max_length: int, max_prompt_length: int | None = None,
                     truncation: str = "keep_end", stats: TruncationStats | None = None,
                     index: int | None = None) -> TokenizedRanking | None:
    """A ``Ranking`` (prompt, K responses best first, optional scores) -> ``TokenizedRanking``, same order."""
    if len(ranking.responses) < 2:
        raise PreftuneError("a ranking needs at least two responses", **{"field": "responses",
                                                                         **_where(ranking, index)})
    out = _truncate(tokenizer, ranking.prompt, list(ranking.responses), max_length=max_length,
                    max_prompt_length=max_prompt_length, truncation=truncation, stats=stats, example=ranking,
                    index=index)
    if out is None:
        return None
    scores = [float(x) for x in ranking.scores] if getattr(ranking, "scores", None) is not None else []
    return TokenizedRanking([ids for ids, _ in out], [lab for _, lab in out], scores, **_who(ranking))


def tokenize_preferences(tokenizer: Any, items: Sequence[Any], *, max_length: int,
                         max_prompt_length: int | None = None,
                         truncation: str = "keep_end") -> tuple[list[TokenizedPair | TokenizedRanking], TruncationStats]:
    """Tokenise pairs and rankings (an item with ``responses`` is a ranking); returns items and counts."""
    stats = TruncationStats()
    out: list[TokenizedPair | TokenizedRanking] = []
    with pre_encoded(tokenizer, items):
        for index, item in enumerate(items):
            fn = tokenize_ranking if hasattr(item, "responses") else tokenize_pair
            tokenized = fn(tokenizer, item, max_length=max_length, max_prompt_length=max_prompt_length,
                           truncation=truncation, stats=stats, index=index)
            if tokenized is not None:
                out.append(tokenized)
    return out, stats


def tokenize_unpaired(tokenizer: Any, example: Any, *, kl_completion: Text, max_length: int,
                      max_prompt_length: int | None = None, truncation: str = "keep_end",
                      stats: TruncationStats | None = None, index: int | None = None) -> TokenizedUnpaired | None:
    """An ``UnpairedExample`` (prompt, completion, label) -> ``TokenizedUnpaired``; None if dropped.

    ``truncation`` applies to prompt + completion (counted in ``stats``). The mismatched pair, prompt +
    ``kl_completion`` (another example's completion), is always cut with keep_end and never counted or
    dropped: it only feeds the estimate of z0."""
    out = _truncate(tokenizer, example.prompt, [example.completion], max_length=max_length,
                    max_prompt_length=max_prompt_length, truncation=truncation, stats=stats, example=example,
                    index=index)
    if out is None:
        return None
    ((ids, labels),) = out
    ((kl_ids, kl_labels),) = _truncate(tokenizer, example.prompt, [kl_completion], max_length=max_length,
                                       max_prompt_length=max_prompt_length, truncation="keep_end", stats=None)
    return TokenizedUnpaired(ids, labels, bool(example.label), kl_ids, kl_labels, **_who(example))


# ---------------------------------------------------------------------------------------------- SFT
def _get(example: Any, key: str) -> Any:
    return example.get(key) if isinstance(example, Mapping) else getattr(example, key, None)


def _conversation(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]:
    """Ids of a rendered conversation and, per token, whether it belongs to an assistant turn."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        head = _template(tokenizer, messages[:i], generation_prompt=True)
        full = _template(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (head.startswith(done) and full.startswith(head)):
            raise PreftuneError("the chat template is not prefix-stable; cannot mask the prompt turns",
                                field="messages", hint="set completion_only_loss: false")
        turn = _strip_after_eos(tokenizer, full[len(head):])
        segments += [(head[len(done):], False), (turn, True)]
        done = head + turn
    tail = _template(tokenizer, messages, generation_prompt=False)
    rest = tail[len(done):] if tail.startswith(done) else ""
    if rest.strip():  # whitespace after the last assistant turn's EOS is dropped
        segments.append((rest, False))
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_assistant in segments:
        piece = _encode(tokenizer, text, special=False) if text else []
        ids += piece
        trained += [is_assistant] * len(piece)
    return ids, trained


def tokenize_sft(tokenizer: Any, example: Any, *, max_length: int,
                 completion_only_loss: bool = True) -> TokenizedSequence:
    """An SFT example -> ids and labels, cut from the right to ``max_length`` (``response_truncated``).

    ``example`` is a mapping or an object (``preftune.data``'s ``SFTExample``) with: ``messages`` (chat
    template; labels on every assistant turn, an EOS after the last one), else ``prompt`` + ``completion``
    (strings or messages; labels on the completion + EOS), else ``text`` (BOS + text + EOS, all trained
    on; also an ``SFTExample`` whose prompt is None). ``completion_only_loss=False`` trains on every token.
    """
    eos = _eos_id(tokenizer)
    prompt, completion, messages, text = (_get(example, k) for k in ("prompt", "completion", "messages", "text"))
    if prompt is None and isinstance(completion, str):  # preftune.data's SFTExample of a {"text": ...} row
        completion, text = None, completion
    if messages is not None:
        ids, trained = _conversation(tokenizer, list(messages))
        if messages and messages[-1].get("role") == "assistant" and (not ids or ids[-1] != eos):
            ids, trained = [*ids, eos], [*trained, True]
        labels = [t if (keep or not completion_only_loss) else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
    elif completion is not None:
        prompt_ids, response_ids = render_prompt_response(tokenizer, prompt or "", completion)
        ids, labels = _sequence(prompt_ids, response_ids, mask_prompt=completion_only_loss)
    elif text is not None:
        ids = _with_eos(_encode(tokenizer, str(text), special=True), eos)
        labels = list(ids)
    else:
        raise PreftuneError("an SFT example needs prompt+completion, messages or text", field="completion",
                            **_where(example, None), hint="see docs/data.md for the accepted formats")
    cut = len(ids) > max_length
    return TokenizedSequence(ids[:max_length], labels[:max_length], False, cut)
