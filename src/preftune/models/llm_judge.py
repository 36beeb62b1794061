"""A local causal LM as a pairwise judge: the prompt template, the two answer labels' log-probabilities and
the verdict in both orders.

For a prompt and a pair of responses (a, b) the judge fills ``template`` ({prompt}, {response_1},
{response_2}) in the order (a, b) and again in the order (b, a), and in each compares
``log p(labels[0] | text)`` with ``log p(labels[1] | text)``, each the sum of the label's token log-probs
(one forward pass of text + label). LLM judges favour a position (Zheng et al. 2023, "Judging
LLM-as-a-Judge", sec. 3.3), so a verdict stands only when both orders agree; a disagreement, or an exact
tie in either order, is a tie (their "conservative" swap rule).

Two users sit above this layer: ``preftune.judges.LLMJudge`` (evaluation, ``preftune compare --judge
llm:PATH``) and ``preftune.train.online_dpo`` (online DPO's ``judge_model``). Nothing heavy is imported at
module level; torch loads inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from preftune.errors import PreftuneError

LLM_TEMPLATE = (
    "Which of the two responses below continues or answers the prompt better?\n\n"
    "Prompt: {prompt}\n\nResponse 1: {response_1}\n\nResponse 2: {response_2}\n\n"
    "The better response is Response"
)
LLM_LABELS = (" 1", " 2")
PLACEHOLDERS = ("{prompt}", "{response_1}", "{response_2}")


def decide(score_first: float, score_second: float, *, margin: float = 0.0) -> int | None:
    """1 if score_second - score_first > margin, 0 if score_first - score_second > margin, else None."""
    diff = score_second - score_first
    if diff > margin:
        return 1
    if -diff > margin:
        return 0
    return None


def missing_placeholder(template: str) -> str | None:
    """The first of {prompt}, {response_1}, {response_2} that ``template`` lacks; None when it has all three."""
    return next((key for key in PLACEHOLDERS if key not in template), None)


def fill_template(template: str, prompt: str, first: str, second: str) -> str:
    """``template`` with the prompt and the two responses in this order (plain replacement: braces in the
    texts are kept as they are)."""
    return template.replace("{prompt}", prompt).replace("{response_1}", first).replace("{response_2}", second)


class PairwiseLLM:
    """An LLM judge of pairs (see the module docstring): a model directory or hub id, or a loaded ``model``
    and ``tokenizer``, or ``scorer`` (texts -> [(logp_label_1, logp_label_2)]) instead of a model, for tests or
    other backends. ``field`` names the option in errors."""

    def __init__(self, model_path: str | None = None, *, template: str = LLM_TEMPLATE,
                 labels: tuple[str, str] = LLM_LABELS, batch_size: int = 8, model: Any = None,
                 tokenizer: Any = None, device: str | None = None,
                 scorer: Callable[[list[str]], Sequence[tuple[float, float]]] | None = None,
                 field: str = "judge") -> None:
        missing = missing_placeholder(template)
        if missing is not None:
            raise PreftuneError(f"the judge template lacks {missing}", field="template",
                                hint="the template needs {prompt}, {response_1} and {response_2}")
        self.template, self.labels, self.batch_size = template, tuple(labels), batch_size
        self.scorer = scorer
        if scorer is None and model is None:
            if model_path is None:
                raise PreftuneError("give an LLM judge model path (or a loaded model and tokenizer)", field=field)
            from preftune.models.load import default_device, load_policy, load_tokenizer

            tokenizer = load_tokenizer(model_path)
            model = load_policy(model_path, tokenizer=tokenizer).to(default_device(device))
        self.model, self.tokenizer = model, tokenizer
        self.name = f"llm:{model_path}" if model_path else "llm"

    def fill(self, prompt: str, first: str, second: str) -> str:
        return fill_template(self.template, prompt, first, second)

    def label_logprobs(self, texts: list[str]) -> list[tuple[float, float]]:
        """log p(label | text) for both labels, per text."""
        if self.scorer is not None:
            return [(float(x), float(y)) for x, y in self.scorer(texts)]
        return continuation_logprobs(self.model, self.tokenizer, texts, self.labels, batch_size=self.batch_size)

    def verdicts(self, prompts: Sequence[str], pairs: Sequence[tuple[str, str]]
                 ) -> tuple[list[int | None], list[dict[str, Any]]]:
        """Per pair (a, b): 0 = a preferred, 1 = b, None = a tie (the orders disagree, or one is an exact tie);
        and per pair the details (``order_ab``, ``order_ba``: each order's verdict, ``logp_ab``, ``logp_ba``).
        A NaN log-probability is an error (it would be a silent tie)."""
        forward = [self.fill(p, a, b) for p, (a, b) in zip(prompts, pairs, strict=True)]
        backward = [self.fill(p, b, a) for p, (a, b) in zip(prompts, pairs, strict=True)]
        lp = self.label_logprobs(forward + backward)
        choices: list[int | None] = []
        details: list[dict[str, Any]] = []
        for k in range(len(pairs)):
            (f1, f2), (b1, b2) = lp[k], lp[len(pairs) + k]
            if any(math.isnan(v) for v in (f1, f2, b1, b2)):  # decide() would call it a tie, silently
                from preftune.models.rewards import excerpt

                raise PreftuneError(f"the judge {self.name} gave a NaN log-probability for the prompt "
                                    f"{excerpt(prompts[k])}", field="judge",
                                    hint="the judge model's weights or dtype are broken; try float32")
            in_order = decide(f1, f2)               # 0: a (shown first) preferred
            swapped = decide(b1, b2)                # 0: b (shown first) preferred
            swapped = None if swapped is None else 1 - swapped
            choices.append(in_order if in_order == swapped else None)
            details.append({"order_ab": in_order, "order_ba": swapped, "logp_ab": [f1, f2], "logp_ba": [b1, b2]})
        return choices, details


def continuation_logprobs(model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[str], *,
                          batch_size: int) -> list[tuple[float, float]]:
    """Sum of log p(label tokens | text) for each text and label, batched with right padding."""
    import torch

    label_ids = [tokenizer(lab, add_special_tokens=False)["input_ids"] for lab in labels]
    if any(not ids for ids in label_ids):
        raise PreftuneError(f"a judge label tokenizes to nothing: {labels}", field="labels")
    seqs, spans = [], []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for lab in label_ids:
            seqs.append(ids + lab)
            spans.append((len(ids), len(ids) + len(lab)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size * 2):
            chunk = seqs[start:start + batch_size * 2]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=model.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=model.device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for row, (lo, hi) in enumerate(spans[start:start + len(chunk)]):
                targets = ids[row, lo:hi]
                out.append(float(logp[row, lo - 1:hi - 1].gather(-1, targets[:, None]).sum()))
    return [(out[2 * i], out[2 * i + 1]) for i in range(len(texts))]
