"""Fixtures of tests/hf: texts and tokenizers built locally (hf_models.py builds the models)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import sp_tokenizer  # noqa: E402

from ftlm.data import corpus  # noqa: E402
from ftlm.data.tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def english() -> list[str]:
    return [d["text"] for d in corpus.english_documents()][:150]


@pytest.fixture(scope="session")
def korean() -> list[str]:
    return [d["text"] for d in corpus.korean_documents()]


@pytest.fixture(scope="session")
def sp_tokenizer_json(english) -> str:
    """Llama-2-style: BPE + byte fallback + Metaspace, <unk> <s> </s>, 859 tokens, trained on English only."""
    return sp_tokenizer.build(english, 600)


@pytest.fixture(scope="session")
def bytelevel_tokenizer_json(english, korean) -> str:
    """GPT-NeoX / Polyglot-Ko style: byte-level BPE with <|endoftext|> (ftlm's own trainer)."""
    return train_tokenizer(english + korean[:20], vocab_size=700, show_progress=False).to_str()
