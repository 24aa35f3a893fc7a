"""The tokenize stage's FastEncoder gives exactly the ids of the tokenizers library, on corpora and adversarial text."""

import random
import unicodedata

import numpy as np
import pytest

from ftlm.data import corpus
from ftlm.data.encode import FastEncoder
from ftlm.data.tokenizer import Tokenizer, train_tokenizer

TRICKY = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n  \t",
    "word",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "a  b   c    d",
    "line\nbreak",
    "line \nspace before break",
    "line\n space after break",
    "tab\tseparated\t\tvalues",
    "crlf\r\nline\r\n",
    "it's we'll they've I'm you'd 's 'S",
    " 's leading contraction",
    "numbers 12,345.67 and 1st 2nd 3rd",
    "punctuation... !!! ??? -- (brackets) [x] {y}",
    "한국어 문장입니다. 대한민국은 민주공화국이다.",
    "한국어English123혼합 text",
    "이모지 😀👍🏽 그리고 ☃",
    "조사가 붙은 단어: 국민은, 국민이, 국민의, 국민에게",
    "<|endoftext|> is text, not a boundary <|pad|>",
    "no-break\u00a0space",
    "ideographic\u3000space 한국\u3000어",
    "control\x0bchar and \x1c file separator",
    "line\u2028separator and paragraph\u2029separator",
    "next line\x85char",
    "zero width\u200bspace",
    "combining e\u0301 and a \u0301 after space",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [d["text"] for d in [*corpus.korean_documents(), *corpus.english_documents()]]
    return train_tokenizer(texts, 1200, show_progress=False)


def library_ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.backend.encode_batch(texts, add_special_tokens=False)]


def assert_same(encoder: FastEncoder, tokenizer: Tokenizer, texts: list[str]) -> None:
    ours = encoder.encode_batch(texts)
    theirs = library_ids(tokenizer, texts)
    assert len(ours) == len(theirs)
    for text, a, b in zip(texts, ours, theirs):
        assert a.tolist() == b, repr(text)


@pytest.mark.parametrize("native", [True, False], ids=["c++", "python"])
def test_tricky_texts(tokenizer, native):
    encoder = FastEncoder(tokenizer, native=native)
    assert encoder.fast
    assert_same(encoder, tokenizer, TRICKY)
    # texts with other whitespace went to the library; the rest were split into units
    assert 0 < encoder.stats["fallback_texts"] < len(TRICKY)
    assert encoder.stats["units"] > 0


@pytest.mark.parametrize("native", [True, False], ids=["c++", "python"])
def test_random_texts(tokenizer, native):
    rng = random.Random(0)
    alphabet = list("abcXYZ가나다한국어'sdt0123.,!?-_") + [" "] * 8 + ["\n", "\t", "\r", "\u00a0", "😀", "\u0301"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(600)]
    encoder = FastEncoder(tokenizer, native=native)
    for i in range(0, len(texts), 100):  # several chunks: later ones reuse the table
        assert_same(encoder, tokenizer, texts[i : i + 100])
    assert encoder.stats["unit_misses"] < encoder.stats["units"]


@pytest.mark.parametrize("native", [True, False], ids=["c++", "python"])
def test_corpus_and_a_table_that_overflows(tokenizer, native):
    docs = [unicodedata.normalize("NFC", d["text"]) for d in [*corpus.korean_documents(), *corpus.english_documents()]]
    encoder = FastEncoder(tokenizer, dtype=np.uint16, max_units=500, native=native)  # cleared again and again
    for i in range(0, len(docs), 7):
        assert_same(encoder, tokenizer, docs[i : i + 7])
    assert encoder.stats["unit_misses"] > encoder._n_units  # the table was cleared and refilled
    assert encoder.encode_batch(docs[:1])[0].dtype == np.uint16


@pytest.mark.parametrize("native", [True, False], ids=["c++", "python"])
def test_a_non_special_added_token_is_cut_out_by_the_library(tokenizer, native):
    from tokenizers import Tokenizer as HF

    tok = Tokenizer(HF.from_str(tokenizer.to_str()))
    tok.backend.add_tokens(["대한민국"])
    encoder = FastEncoder(tok, native=native)
    texts = ["대한민국은 민주공화국이다", "우리 대한민국", "no added token here"]
    assert_same(encoder, tok, texts)
    assert encoder.stats["fallback_texts"] == 2


def test_tokenizers_it_cannot_split_go_to_the_library():
    from tokenizers import Tokenizer as HF
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    hf = HF(models.BPE(unk_token="<unk>"))
    hf.normalizer = normalizers.Lowercase()
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.train_from_iterator(TRICKY * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    tok = Tokenizer(hf)
    encoder = FastEncoder(tok)
    assert not encoder.fast
    assert_same(encoder, tok, TRICKY)
    assert encoder.stats["fallback_texts"] == len(TRICKY)
