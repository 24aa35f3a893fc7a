"""ftlm._text (csrc/text/text_ops.cpp) gives what its numpy / Python / tokenizers-library references give: bit-identical
MinHash signatures, the same exact keys, the same token ids; its arguments are checked. (The quality rules are compared
with their reference in test_clean.py, on both paths.)"""

import random

import numpy as np
import pytest

from ftlm.data import corpus, dedup, minhash
from ftlm.data.clean import LETTER, LETTER_TABLE_END, char_tables
from ftlm.data.encode import FastEncoder
from ftlm.data.native import text_ops
from ftlm.data.tokenizer import train_tokenizer

ops = text_ops(True)  # the extension is part of the build: its absence is a failure here, not a skip

ODD = [
    "",
    "   ",
    "one",
    "two words",
    "four words in all",
    "UPPER lower MiXeD ΑΣ ΟΔΟΣ ΣΑΣ İstanbul ǅemal",
    "nul\x00inside the text counts as a space here",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀𠀁 letters and 😀 emoji 😀 emoji",
    "punctuation—only… ‘quotes’ «and» 「brackets」、。",
    "whitespace\u3000ideographic\u2028line\x1cfile\x85next\tend",
    "한국어 문장입니다. 대한민국은 민주공화국이다. 한국어 문장입니다.",
]


def documents() -> list[str]:
    texts = [d["text"] for d in [*corpus.korean_documents(), *corpus.english_documents()]]
    rng = random.Random(0)
    words = " ".join(texts[:4]).split()
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    return texts + ODD


@pytest.mark.parametrize("num_perm,ngram,seed", [(128, 5, 1), (64, 1, 7), (32, 3, 0)])
def test_minhash_signatures_are_bit_identical(num_perm, ngram, seed):
    texts = documents()
    ours = minhash.signatures(texts, num_perm, ngram, seed, native=True)
    reference = minhash.signatures(texts, num_perm, ngram, seed, native=False)
    assert ours.shape == (len(texts), num_perm) and ours.dtype == np.uint32
    assert np.array_equal(ours, reference)
    assert (ours[texts.index("")] == 0xFFFFFFFF).all() and (ours[texts.index("   ")] == 0xFFFFFFFF).all()  # no words
    assert np.array_equal(minhash.signatures([], native=True), minhash.signatures([], native=False))


def test_exact_keys_are_the_same():
    texts = documents()
    ours = dedup.exact_keys([t for t in texts if "\x00" not in t], native=True)
    reference = dedup.exact_keys([t for t in texts if "\x00" not in t], native=False)
    assert np.array_equal(ours, reference)
    assert dedup.exact_keys([], native=True).shape == (0, 2)
    a, b = dedup.exact_keys(["Same  TEXT\u3000here ", "same text here"], native=True)
    assert (a == b).all()  # case and whitespace folded, as the Python key


def test_the_letter_table_covers_every_letter():
    tail = "".join(map(chr, range(LETTER_TABLE_END, 0x110000)))
    assert LETTER.search(tail) is None  # above the table nothing is a letter, so the C++ path may say "no"
    tables = char_tables()
    bmp = "".join(map(chr, range(0x10000)))
    assert tables["space"].tolist() == [c.isspace() for c in bmp]
    assert all(not c.isspace() for c in tail)


def test_encoder_matches_the_library_on_wide_random_text():
    texts = [d["text"] for d in [*corpus.korean_documents(), *corpus.english_documents()]]
    tokenizer = train_tokenizer(texts, 1500, show_progress=False)
    rng = random.Random(3)
    alphabet = list("abcXYZ가나다한국어'sdtrevlmSDT0123.,!?-_\"") + [" "] * 10 + ["\n", "\t", "\r"]
    alphabet += list("²½٣Ⅳé\u0301ßΣж中アｱ１€→…—ㄱᄀ😀\u00a0ǅʼـ\u200d①㈜") + ["\U00020000", "\u0378", "\ue000"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(3000)]
    texts += ["it's 's 'S ''s .'s 're 've 'll 'd 'm 'x", "  \n\n word", "x\n \ty", " ", "\n\n", "가 나\r\n다"]
    encoder = FastEncoder(tokenizer, native=True)
    assert encoder._bpe is not None  # a byte-level BPE: the C++ BPE encodes the new units
    for i in range(0, len(texts), 500):
        ours = encoder.encode_batch(texts[i : i + 500])
        theirs = tokenizer.backend.encode_batch(texts[i : i + 500], add_special_tokens=False)
        for text, a, b in zip(texts[i : i + 500], ours, theirs):
            assert a.tolist() == b.ids, repr(text)
    stats = encoder.stats
    assert stats["unit_misses"] > stats["library_units"] > 0  # unsettled characters went to the library
    assert stats["fallback_texts"] > 0  # texts with other whitespace too


def test_bad_arguments_are_errors_not_crashes():
    codes = np.frombuffer("ab\x00cd".encode("utf-32-le"), dtype=np.uint32)
    a, b = minhash.permutations(16, 1)
    table = minhash._WORD_TABLE
    with pytest.raises(ValueError, match="out must be"):
        ops.minhash(codes, 2, 5, a.ravel(), b.ravel(), table, np.empty((2, 8), np.uint32))
    with pytest.raises(ValueError, match="more than the 1 documents"):
        ops.minhash(codes, 1, 5, a.ravel(), b.ravel(), table, np.empty((1, 16), np.uint32))
    with pytest.raises(ValueError, match="whole number"):
        ops.minhash(codes.tobytes()[:-1], 2, 5, a.ravel(), b.ravel(), table, np.empty((2, 16), np.uint32))
    with pytest.raises(ValueError, match="offsets"):
        ops.quality(codes, np.array([0, 9], np.int64), char_tables()["space"], char_tables()["letter"], None,
                    (float("nan"),) * 8, np.zeros((0, 2)), np.zeros((0, 2)))  # fmt: skip
    with pytest.raises(ValueError, match="do not hold"):
        ops.canonical(codes, 3, char_tables()["space"])
    with pytest.raises(ValueError, match="incorrect name"):
        ops.bpe_encode(ops.units_new(), ["x"])  # a unit table is not a BPE


def test_without_the_extension_the_numpy_paths_run_and_say_so(monkeypatch, caplog):
    import sys

    import ftlm
    from ftlm.data import native

    monkeypatch.setattr(native, "_module", native._UNSET)
    monkeypatch.delattr(ftlm, "_text", raising=False)
    monkeypatch.setitem(sys.modules, "ftlm._text", None)  # an import that fails, as when it was never built
    with caplog.at_level("WARNING", logger="ftlm.data.native"):
        assert native.text_ops() is None
    assert "pip install --no-build-isolation -e ." in caplog.text
    with pytest.raises(RuntimeError, match="ftlm._text is needed"):
        native.text_ops(True)
    texts = documents()[:50]
    assert np.array_equal(minhash.signatures(texts), minhash.signatures(texts, native=False))
    monkeypatch.setattr(native, "_module", native._UNSET)
    monkeypatch.setenv("FTLM_NATIVE_TEXT", "0")
    assert native.text_ops() is None and native._module is None  # switched off, before any import
