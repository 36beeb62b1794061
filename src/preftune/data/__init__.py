"""Preference and SFT data: read any source, recognise its format, check it, and report what was found.

>>> pairs, report = load_preferences("tests/data/prefs_standard.jsonl")   # doctest: +SKIP
>>> report.summary()                                                       # doctest: +SKIP

Importing this package pulls in no heavy dependency (pyarrow and datasets load only when needed).
"""

from __future__ import annotations

from preftune.data.formats import (
    ASSISTANT_TAG,
    FORMATS,
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    LoadReport,
    PreferencePair,
    Problem,
    Ranking,
    SFTExample,
    Text,
    UnpairedExample,
    detect_format,
    split_implicit_prompt,
    split_shared_messages,
    text_length,
)
from preftune.data.load import load_any, load_preferences, load_sft
from preftune.data.sources import read_records
from preftune.data.validate import describe, find_duplicates, length_stats

__all__ = [
    "ASSISTANT_TAG", "FORMATS", "PREFERENCE_FORMATS", "SFT_FORMATS", "LoadReport", "PreferencePair", "Problem",
    "Ranking", "SFTExample", "Text", "UnpairedExample", "describe", "detect_format", "find_duplicates",
    "length_stats", "load_any", "load_preferences", "load_sft", "read_records", "split_implicit_prompt",
    "split_shared_messages", "text_length",
]
