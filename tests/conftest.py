"""Shared fixtures: a tiny Llama-style model + tokenizer saved to a temporary directory.

Built in process (no downloads) by `preftune.testing`; session-scoped so the whole suite builds it once.
Tests must not modify the directory: copy it first if a test needs to change files.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding a 2-layer, 64-dim Llama causal LM (seed 0) and its byte-level BPE tokenizer."""
    from preftune.testing import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    """The tokenizer of `tiny_model_dir`, loaded with AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
