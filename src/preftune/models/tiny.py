"""Tiny models and tokenizers built in process, for tests, examples, benchmarks and the demo.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in milliseconds on a few
built-in lines, and the model is a randomly initialised 2-layer Llama (64 dimensions) seeded for
reproducibility. Both are saved with ``save_pretrained`` so every command can load them the normal
way (``AutoTokenizer.from_pretrained(dir)``, ``AutoModelForCausalLM.from_pretrained(dir)``).

Command line::

    python -m preftune.models.tiny make-tiny runs/tiny     # writes a tiny model + tokenizer directory
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Special tokens of the tiny tokenizer. "</s>" ends every chat turn, so a model trained on chat data
# learns to stop with the same token that `generate` stops on.
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A few public-domain lines to learn BPE merges from (Shakespeare, Sonnet 18 and Hamlet III.1) plus
# plain sentences, so common English words become single tokens and sequences stay short.
_CORPUS = [
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate:",
    "Rough winds do shake the darling buds of May, And summer's lease hath all too short a date;",
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles",
    "The quick brown fox jumps over the lazy dog. What is the answer? The answer is yes.",
    "Please write a short poem about the sea. Here is a poem about the sea and the sky.",
    "Question: what is two plus two? Answer: four. Question: what colour is the sky? Answer: blue.",
]


def build_tiny_tokenizer(*, vocab_size: int = 384, texts: Iterable[str] | None = None) -> Any:
    """A byte-level BPE tokenizer (any text encodes; no unknown tokens) with pad/bos/eos and a chat template.

    The tokenizer prepends ``<s>`` to every encoded text (like Llama) and the chat template ends each
    turn with ``</s>``. The merges are learnt from ``texts`` (the demo passes its corpus), else from a
    few built-in lines.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4 if texts is None else texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )


def build_tiny_model(tokenizer: Any, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                     attention_dropout: float = 0.0, max_positions: int = 512, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int | None = None,
                     tie_word_embeddings: bool = False) -> Any:
    """A randomly initialised Llama-style causal LM: ``num_layers`` layers of width ``hidden_size``.

    By default 4 attention heads with 2 key/value heads (grouped-query attention, as in current Llama
    models) and MLP width 2 x hidden. Initialisation is seeded by ``seed`` without touching the global RNG.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        attention_dropout=attention_dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_tiny(path: str | Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
              attention_dropout: float = 0.0) -> Path:
    """Write a tiny model + tokenizer to ``path`` (created if missing) and return the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                             attention_dropout=attention_dropout)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m preftune.models.tiny", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write a tiny Llama-style model + tokenizer directory")
    tiny.add_argument("path", help="directory to write (created if missing)")
    tiny.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    tiny.add_argument("--hidden-size", type=int, default=64, help="model width (default 64)")
    tiny.add_argument("--layers", type=int, default=2, help="number of layers (default 2)")
    args = parser.parse_args(argv)
    out = make_tiny(args.path, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.layers)
    print(f"wrote a tiny model and tokenizer to {out}")


if __name__ == "__main__":
    main()
