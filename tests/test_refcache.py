"""The reference log-prob cache: keys that change with what they depend on, and files that round-trip."""

from __future__ import annotations

import copy

import torch

from preftune.data.tokenize import TokenizedPair
from preftune.train import refcache


def _items() -> list[TokenizedPair]:
    return [TokenizedPair([1, 2, 3], [-100, 2, 3], [1, 4], [-100, 4]),
            TokenizedPair([1, 5], [-100, 5], [1, 6, 7], [-100, 6, 7])]


def test_items_fingerprint_follows_the_token_ids():
    a, b = _items(), _items()
    assert refcache.items_fingerprint(a) == refcache.items_fingerprint(b)
    b[1].rejected_input_ids = [1, 6, 8]
    assert refcache.items_fingerprint(a) != refcache.items_fingerprint(b)
    assert refcache.items_fingerprint(a) != refcache.items_fingerprint(a[::-1])  # order matters


def test_model_fingerprint_follows_weights_but_not_lora_adapters():
    """Changing one weight changes the fingerprint; a parameter whose name contains 'lora_' is skipped
    (the reference runs with the adapter disabled)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    same = copy.deepcopy(model)
    assert refcache.model_fingerprint(model) == refcache.model_fingerprint(same)
    with torch.no_grad():
        same[1].bias[0] += 1e-3
    assert refcache.model_fingerprint(model) != refcache.model_fingerprint(same)
    lora = copy.deepcopy(model)
    lora.register_parameter("lora_A", torch.nn.Parameter(torch.randn(3)))
    assert refcache.model_fingerprint(lora) == refcache.model_fingerprint(model)


def test_cache_key_depends_on_every_part():
    base = {"model": "m", "tokenizer": "t", "items": "i", "settings": {"max_length": 512}}
    key = refcache.cache_key(**base)
    for part, other in (("model", "m2"), ("tokenizer", "t2"), ("items", "i2"), ("settings", {"max_length": 256})):
        assert refcache.cache_key(**{**base, part: other}) != key


def test_tokenizer_fingerprint_follows_the_chat_template(tiny_tokenizer):
    other = copy.deepcopy(tiny_tokenizer)
    assert refcache.tokenizer_fingerprint(other) == refcache.tokenizer_fingerprint(tiny_tokenizer)
    other.chat_template = "{{ messages[0]['content'] }}"
    assert refcache.tokenizer_fingerprint(other) != refcache.tokenizer_fingerprint(tiny_tokenizer)


def test_ensure_computes_once_then_reads_and_recovers_from_a_broken_file(tmp_path):
    """First call: a miss, compute_fn runs once and the values are attached; second call: a hit, no
    compute. A file with the wrong number of values, or a corrupt one, is recomputed."""
    calls = []

    def compute():
        calls.append(1)
        return torch.tensor([-1.5, -2.0]), torch.tensor([-3.25, -4.0])

    items = _items()
    assert refcache.ensure(items, key="k", directory=tmp_path, compute_fn=compute) is False
    assert [(i.ref_chosen_logps, i.ref_rejected_logps) for i in items] == [(-1.5, -3.25), (-2.0, -4.0)]
    fresh = _items()
    assert refcache.ensure(fresh, key="k", directory=tmp_path, compute_fn=compute) is True
    assert len(calls) == 1 and fresh[1].ref_rejected_logps == -4.0
    assert refcache.load(tmp_path, "k", 3) is None  # wrong length -> miss
    (tmp_path / "k.safetensors").write_bytes(b"not a safetensors file")
    assert refcache.ensure(_items(), key="k", directory=tmp_path, compute_fn=compute) is False
    assert len(calls) == 2


def test_compute_splits_chosen_and_rejected_rows():
    """forward returns [2B] per batch (chosen rows first); 3 items in batches of 2 -> 2 batches."""
    items = _items() + _items()[:1]

    def collate(batch_items):
        n = len(batch_items)
        return {"input_ids": torch.arange(2 * n, dtype=torch.float32)}

    chosen, rejected = refcache.compute(items, forward=lambda b: -b["input_ids"], collate=collate, batch_size=2,
                                        device="cpu")
    # batch 1 (2 items): rows [0, 1 | 2, 3] -> chosen [0, -1], rejected [-2, -3]; batch 2: [0 | 1]
    assert chosen.tolist() == [0.0, -1.0, 0.0] and rejected.tolist() == [-2.0, -3.0, -1.0]
