"""Shared fixtures: a tiny Llama-style model + tokenizer saved to a temporary directory.

Built in process (no downloads) by `preftune.models.tiny`; session-scoped so the whole suite builds it once.
Tests must not modify the directory: copy it first if a test needs to change files.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding a 2-layer, 64-dim Llama causal LM (seed 0) and its byte-level BPE tokenizer."""
    from preftune.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    """The tokenizer of `tiny_model_dir`, loaded with AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def float64_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model stored in float64, so summation-order differences are ~1e-16, not ~1e-7."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny64")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(torch.float64).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module that trains the tiny model: the 64-dim model gains nothing from more,
    and on a busy 2-core machine two spinning OpenMP threads made those runs 10-20x slower. A module uses it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
