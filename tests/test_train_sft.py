"""SFT: what is trained on (labels, units, the loss value) and that training lowers the loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preftune.config import from_mapping, load_config, to_dict, write_config
from preftune.core.logprobs import next_token_labels
from preftune.errors import PreftuneError
from preftune.train import run
from preftune.train.base import RunContext
from preftune.train.data import split_eval
from preftune.train.loop import read_metrics
from preftune.train.sft import SFTConfig, SFTMethod


def _setup(model_dir: Path, examples: list, **values) -> tuple[SFTMethod, list[str]]:
    """An SFTMethod after setup (model, tokenizer, tokenized items) without running the loop."""
    config = from_mapping(SFTConfig, {"model": str(model_dir), "data": "in-memory", "report_to": "none", **values})
    messages: list[str] = []
    method = SFTMethod(examples=examples)
    method.setup(RunContext(config=config, accelerator=None, output_dir=Path("."), log=messages.append))
    return method, messages


def test_prompt_tokens_are_masked_and_eos_is_trained(tiny_model_dir: Path, tiny_tokenizer) -> None:
    """{prompt, completion}: ids = tok(prompt) [BOS + prompt] + tok(completion) + [EOS];
    labels = -100 on the len(tok(prompt)) prompt ids, then the completion ids and EOS. The loss is
    scored on labels shifted by one, so the units are the completion tokens + 1 (EOS)."""
    example = {"prompt": "Answer yes or no:", "completion": " yes"}
    method, _ = _setup(tiny_model_dir, [example])
    prompt_ids = tiny_tokenizer("Answer yes or no:")["input_ids"]
    completion_ids = tiny_tokenizer(" yes", add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    item = method.train_items[0]
    assert prompt_ids[0] == tiny_tokenizer.bos_token_id
    assert item.input_ids == prompt_ids + completion_ids + [eos]
    assert item.labels == [-100] * len(prompt_ids) + completion_ids + [eos]

    batch = method.collate(method.train_items)
    assert method.units(batch) == len(completion_ids) + 1
    targets = next_token_labels(batch["labels"])
    assert targets[0, len(prompt_ids) - 1].item() == completion_ids[0]  # the last prompt position predicts it
    assert (targets[0, : len(prompt_ids) - 1] == -100).all() and targets[0, -1] == -100


def test_loss_is_the_token_mean_nll_over_completion_tokens(tiny_model_dir: Path) -> None:
    """Two examples of different lengths padded into one batch: loss(normaliser=units) equals the
    cross-entropy averaged over all completion tokens of both, computed per example without padding."""
    examples = [{"prompt": "What colour is the sky?", "completion": " Blue."},
                {"prompt": "To be, or not to be:", "completion": " that is the question."}]
    method, _ = _setup(tiny_model_dir, examples)
    batch = method.collate(method.train_items)
    out = method.loss(method.model, batch, normaliser=method.units(batch))

    nll, count = 0.0, 0
    for item in method.train_items:
        logits = method.model(input_ids=torch.tensor([item.input_ids])).logits[0, :-1]
        labels = torch.tensor(item.labels[1:])
        keep = labels != -100
        nll += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    assert count == method.units(batch)
    assert out.loss.item() == pytest.approx(nll / count, rel=1e-5)
    assert 0 <= out.metric_sums["mean_token_accuracy"].item() <= count


def _step(method: SFTMethod, batch: dict) -> tuple[float, float, dict[str, torch.Tensor]]:
    """One SFT loss + backward: (loss, mean_token_accuracy sum, every trainable parameter's gradient)."""
    method.model.zero_grad()
    out = method.loss(method.model, batch, normaliser=method.units(batch))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in method.model.named_parameters() if p.requires_grad}
    return out.loss.item(), out.metric_sums["mean_token_accuracy"].item(), grads


SEA = [{"prompt": "What colour is the sky?", "completion": " Blue."},
       {"prompt": "To be, or not to be:", "completion": " that is the question. The sea is blue."}]


def test_fused_lm_head_gives_the_same_step(tiny_model_dir: Path) -> None:
    """fused_lm_head: true (the lm_head applied chunk by chunk, no [B, T, V] logits) gives the same loss,
    mean_token_accuracy and gradient of every parameter as the full logits, to float32 rounding. The
    model is first fitted a little (8 AdamW steps) so that it predicts some tokens right: the accuracy
    compared is not 0."""
    method, messages = _setup(tiny_model_dir, SEA, fused_lm_head=True)
    assert method.fused_lm_head is True and not any("cannot be fused" in m for m in messages)
    batch = method.collate(method.train_items)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(method.model.parameters(), lr=3e-3)
    for _ in range(8):
        optimizer.zero_grad()
        method.loss(method.model, batch, normaliser=method.units(batch)).loss.backward()
        optimizer.step()
    fused = _step(method, batch)
    method.fused_lm_head = False
    full = _step(method, batch)
    assert fused[0] == pytest.approx(full[0], rel=1e-6)
    assert fused[1] == full[1] and 0 < full[1] < method.units(batch)  # some tokens right, not all
    assert fused[2].keys() == full[2].keys() and "lm_head.weight" in full[2]
    for name, grad in full[2].items():
        torch.testing.assert_close(fused[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lm_head_with_lora(tiny_model_dir: Path) -> None:
    """LoRA on the other layers (the default target_modules, all-linear, leaves lm_head out) keeps a plain,
    frozen lm_head: the fused path applies and gives the same loss and LoRA gradients. LoRA on lm_head
    wraps it: the key falls back to the full logits, says so in the log, and the step is the default's,
    bit for bit."""
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False}
    method, messages = _setup(tiny_model_dir, SEA, fused_lm_head=True, lora=lora)
    assert method.fused_lm_head is True and not any("cannot be fused" in m for m in messages)
    batch = method.collate(method.train_items)
    fused = _step(method, batch)
    method.fused_lm_head = False
    full = _step(method, batch)
    assert fused[0] == pytest.approx(full[0], rel=1e-6) and fused[1] == full[1]
    assert full[2] and all("lora_" in name for name in full[2])
    for name, grad in full[2].items():
        torch.testing.assert_close(fused[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    on_head = {**lora, "target_modules": ["q_proj", "v_proj", "lm_head"]}
    torch.manual_seed(1)  # the same LoRA initialisation for both
    method, messages = _setup(tiny_model_dir, SEA, fused_lm_head=True, lora=on_head)
    assert method.fused_lm_head is False
    assert any("fused_lm_head" in m and "computing the full logits instead" in m for m in messages)
    torch.manual_seed(1)
    default, _ = _setup(tiny_model_dir, SEA, lora=on_head)
    fallback, unfused = _step(method, batch), _step(default, batch)
    assert fallback[:2] == unfused[:2]
    assert all(torch.equal(fallback[2][name], grad) for name, grad in unfused[2].items())


def test_fused_lm_head_key_round_trips(tmp_path: Path) -> None:
    """Off by default; on from YAML or the command line; written back by write_config and read again."""
    assert SFTConfig.fused_lm_head is False
    config = load_config(SFTConfig, None, ["--model", "m", "--data", "d", "--fused_lm_head"])
    assert config.fused_lm_head is True
    path = write_config(config, tmp_path / "config.yaml")
    assert "fused_lm_head: true" in path.read_text()
    again = load_config(SFTConfig, path)
    assert again.fused_lm_head is True and to_dict(again) == to_dict(config)
    assert load_config(SFTConfig, path, ["--fused_lm_head", "false"]).fused_lm_head is False


def test_completion_only_loss_false_trains_every_token(tiny_model_dir: Path) -> None:
    method, _ = _setup(tiny_model_dir, [{"prompt": "Answer yes or no:", "completion": " yes"}],
                       completion_only_loss=False)
    item = method.train_items[0]
    assert item.labels == item.input_ids
    assert method.units(method.collate([item])) == len(item.input_ids) - 1  # all but the first are predicted


def test_messages_train_on_assistant_turns_only(tiny_model_dir: Path, tiny_tokenizer) -> None:
    """The tiny chat template renders '<s><|user|>\\nhi</s>\\n<|assistant|>\\nhello</s>\\n'; the labels
    cover exactly the assistant content 'hello' and its '</s>'."""
    example = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    method, _ = _setup(tiny_model_dir, [example])
    item = method.train_items[0]
    trained = [t for t in item.labels if t != -100]
    assert trained == tiny_tokenizer("hello", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert tiny_tokenizer.decode(item.input_ids) == "<s><|user|>\nhi</s>\n<|assistant|>\nhello</s>"


def test_truncation_is_counted_and_prompt_only_examples_dropped(tiny_model_dir: Path, tiny_tokenizer) -> None:
    """max_length 12: a long completion is cut (counted); a prompt of >= 12 tokens leaves no completion
    token, so that example is dropped and counted."""
    long_prompt = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate"
    assert len(tiny_tokenizer(long_prompt)["input_ids"]) >= 12
    examples = [{"prompt": "Hi", "completion": " The sea is blue and the sky is wide and the sea is blue."},
                {"prompt": long_prompt, "completion": " yes"},
                {"prompt": "Hi", "completion": " yes"}]
    method, messages = _setup(tiny_model_dir, examples, max_length=12)
    assert len(method.train_items) == 2 and all(len(i.input_ids) <= 12 for i in method.train_items)
    assert "train: 2 of 3 examples kept; 1 of them truncated to max_length 12; 1 dropped" in " ".join(messages)


def test_split_eval_is_seeded_and_disjoint() -> None:
    items = list(range(10))
    train, held = split_eval(items, fraction=0.2, seed=3)
    assert len(held) == 2 and sorted(train + held) == items
    assert split_eval(items, fraction=0.2, seed=3) == (train, held)
    assert split_eval(items, fraction=0.0, seed=3) == (items, [])
    with pytest.raises(PreftuneError, match="eval_fraction"):
        split_eval([1], fraction=0.5, seed=0)


def test_sft_lowers_the_loss_on_a_toy_set(tiny_model_dir: Path, tmp_path: Path) -> None:
    """30 steps of AdamW (lr 3e-3) on 8 question/answer pairs from a JSONL file: the random model starts
    near log(vocab) = log(384) ~ 5.95 nats per token; memorising 8 short answers must at least halve the
    training loss, and the eval loss on the same file (memorisation, no held-out claim) likewise."""
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"Question: what is {w} plus {w}? Answer:", "completion": f" {a}."}
            for w, a in [("one", "two"), ("two", "four"), ("three", "six"), ("four", "eight"),
                         ("five", "ten"), ("six", "twelve"), ("seven", "fourteen"), ("eight", "sixteen")]]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    final = run("sft", {"model": str(tiny_model_dir), "data": str(data), "eval_data": str(data),
                       "output_dir": str(tmp_path / "run"), "report_to": "none", "batch_size": 4,
                       "max_steps": 30, "learning_rate": 3e-3, "log_every": 1, "eval_every": 15})
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert len(losses) == 30 and len(evals) == 2
    assert losses[0] == pytest.approx(torch.log(torch.tensor(384.0)).item(), abs=0.5)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
    assert evals[-1] < 0.5 * losses[0]

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 2
