import json
import unicodedata

import pytest

from ftlm.data import corpus
from ftlm.data.tokenizer import EOT, PAD, Tokenizer, extend_tokenizer, train_tokenizer

KOREAN_CASES = [
    "대한민국은 민주공화국이다.",
    "똻 뷁 뾟 쀍 꿻 햏 — 드문 음절도 바이트로 남는다",  # rare syllables WordPiece would turn into [UNK]
    "옛한글: ᄒᆞᆫ글, ᄀᆞᄅᆞᆷ, ᄫᅡᆯ, ᅀᅵ (아래아와 옛 자모)",  # old Hangul: conjoining jamo with no precomposed form
    "호환 자모 ㄱㄴㄷ ㅏㅑㅓ 와 반각 ﾡﾢ",
    "이모지 😀👍🏽🇰🇷 👨‍👩‍👧 와 함께",
    "def 합계(값들):\n    return sum(값들)  # 코드 속 한글\n",
    "한국어 English 日本語 中文 Ελληνικά русский عربى mixed scripts 123.45%",
    "\t탭과  두 칸   공백, 줄바꿈\n\n그리고 끝 ",
]
ENGLISH_CASES = [
    "The quick brown fox jumps over the lazy dog.",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    'for i in range(10):\n    print(f"{i:>3}", end="")\n',
    "naïve café résumé — “smart quotes” and ‘apostrophes’…",
    "URLs https://example.com/a?b=c&d=e#f and emails a.b@c.de",
    "Control-ish \x01 and NUL \x00 bytes survive a byte-level tokenizer too",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [d["text"] for d in corpus.korean_documents()] + [d["text"] for d in corpus.english_documents()][:120]
    tok = train_tokenizer(texts, vocab_size=1200, show_progress=False)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer.load(str(path)), path


@pytest.mark.parametrize("text", KOREAN_CASES + ENGLISH_CASES)
def test_round_trip_is_lossless_up_to_nfc(tokenizer, text):
    tok, _ = tokenizer
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_no_unknown_token_exists(tokenizer):
    tok, path = tokenizer
    model = json.loads(path.read_text())["model"]
    assert model["type"] == "BPE" and model.get("unk_token") is None
    assert len([t for t in model["vocab"] if len(t) == 1]) >= 256  # every byte has its own token


def test_decomposed_jamo_encode_like_syllables(tokenizer):
    tok, _ = tokenizer
    text = "한국어 토크나이저"
    assert tok.encode(unicodedata.normalize("NFD", text)) == tok.encode(text)


def test_special_tokens_are_saved_and_not_spoofed_by_text(tokenizer):
    tok, path = tokenizer
    saved = {t["content"]: t for t in json.loads(path.read_text())["added_tokens"]}
    assert saved[EOT]["special"] and saved[PAD]["special"]
    assert tok.eot_id == saved[EOT]["id"] and tok.pad_id == saved[PAD]["id"] and tok.eot_id != tok.pad_id
    ids = tok.encode(f"a{EOT}b")
    assert tok.eot_id not in ids and tok.decode(ids) == f"a{EOT}b"
    assert tok.decode([tok.eot_id]) == EOT


def test_token_byte_lengths_add_up_to_utf8_bytes(tokenizer):
    tok, _ = tokenizer
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,) and lengths.dtype.is_floating_point is False
    assert lengths[tok.eot_id] == 0 and lengths[tok.pad_id] == 0
    for text in KOREAN_CASES + ENGLISH_CASES:
        nfc = unicodedata.normalize("NFC", text)
        assert int(lengths[tok.encode(nfc)].sum()) == len(nfc.encode("utf-8"))


def test_transformers_loads_the_tokenizer_json(tokenizer):
    transformers = pytest.importorskip("transformers")
    tok, path = tokenizer
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in KOREAN_CASES[:3] + ENGLISH_CASES[:3]:
        assert hf.encode(text) == tok.encode(text)
        assert hf.decode(hf.encode(text)) == unicodedata.normalize("NFC", text)
    assert hf.convert_tokens_to_ids(EOT) == tok.eot_id


def test_extending_keeps_every_old_id_and_shortens_korean(tokenizer):
    base, _ = tokenizer
    english_only = train_tokenizer(
        [d["text"] for d in corpus.english_documents()][:150], vocab_size=800, show_progress=False
    )
    korean = [d["text"] for d in corpus.korean_documents()]
    extended = extend_tokenizer(english_only, korean, new_vocab_size=1200, show_progress=False)
    old_vocab = english_only.backend.get_vocab(with_added_tokens=True)
    new_vocab = extended.backend.get_vocab(with_added_tokens=True)
    assert all(new_vocab[t] == i for t, i in old_vocab.items())
    assert extended.vocab_size > english_only.vocab_size + 100
    sample = "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다."
    assert len(extended.encode(sample)) < 0.7 * len(english_only.encode(sample))
    for text in KOREAN_CASES + ENGLISH_CASES:
        assert extended.decode(extended.encode(text)) == unicodedata.normalize("NFC", text)
    assert extended.eot_id == english_only.eot_id


def test_extending_a_base_without_an_end_of_text_token_keeps_the_added_ids():
    # A byte-level BPE with no special tokens at all: Tokenizer adds <|endoftext|> and <|pad|> after its vocabulary;
    # the extension must keep them there (the library used to re-number them past the new merges, leaving holes)
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = HFTok(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([d["text"] for d in corpus.english_documents()][:100], trainer=trainer)
    size = raw.get_vocab_size()
    base = Tokenizer(HFTok.from_str(raw.to_str()))
    assert (base.eot_id, base.pad_id) == (size, size + 1)
    korean = [d["text"] for d in corpus.korean_documents()]
    extended = extend_tokenizer(base, korean, new_vocab_size=900, show_progress=False)
    reloaded = Tokenizer(HFTok.from_str(extended.to_str()))  # as the run and the export read it
    for tok in (extended, reloaded):
        assert (tok.eot_id, tok.pad_id) == (size, size + 1)
        vocab = tok.backend.get_vocab(with_added_tokens=True)
        assert sorted(vocab.values()) == list(range(tok.vocab_size))  # no holes
        assert all(vocab[t] == i for t, i in base.backend.get_vocab(with_added_tokens=True).items())


def test_too_small_vocabulary_is_a_config_error():
    with pytest.raises(ValueError, match="data.tokenizer.vocab_size"):
        train_tokenizer(["abc"], vocab_size=100, show_progress=False)


# -- SentencePiece-style tokenizers (Llama-2, Mistral, SOLAR: BPE + byte fallback, "▁" for spaces) ------------------
def _sentencepiece(legacy: bool) -> Tokenizer:
    import sys
    from pathlib import Path

    from tokenizers import Tokenizer as HFTok

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
    import sp_tokenizer  # tests/hf/sp_tokenizer.py: built locally with the tokenizers library

    english = [d["text"] for d in corpus.english_documents()][:150]
    return Tokenizer(HFTok.from_str(sp_tokenizer.build(english, 600, legacy=legacy)))


@pytest.fixture(scope="module", params=[False, True], ids=["metaspace", "legacy_llama2"])
def sentencepiece_pair(request):
    base = _sentencepiece(request.param)
    korean = [d["text"] for d in corpus.korean_documents()]
    return base, extend_tokenizer(base, korean, new_vocab_size=1200, show_progress=False)


def test_sentencepiece_extension_keeps_ids_round_trips_and_never_unknown(sentencepiece_pair):
    base, extended = sentencepiece_pair
    assert base.eot_id == base.backend.token_to_id("</s>") and base.bos_id == 1  # its own specials, nothing added
    assert base.pad_id == base.eot_id and base.vocab_size == 859
    old_vocab = base.backend.get_vocab(with_added_tokens=True)
    new_vocab = extended.backend.get_vocab(with_added_tokens=True)
    assert all(new_vocab[t] == i for t, i in old_vocab.items())
    assert extended.vocab_size > base.vocab_size + 300 and extended.vocab_size % 64 == 0
    assert extended.never_unknown() and extended.has_byte_fallback() and not extended.is_byte_level()
    unk = base.backend.token_to_id("<unk>")
    for text in KOREAN_CASES + ENGLISH_CASES:
        ids = extended.encode(text)
        assert unk not in ids and extended.decode(ids) == text
        if not any(not c.isascii() and unicodedata.category(c).startswith("L") for c in text):
            assert ids == base.encode(text)  # text without new-language letters encodes exactly as before
    sample = "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다."
    assert len(extended.encode(sample)) < 0.5 * len(base.encode(sample))
    stats = extended.extension_stats
    print(f"\nKorean tokens per character {stats['korean_tokens_per_char_before']:.3f} -> "
          f"{stats['korean_tokens_per_char_after']:.3f}")  # fmt: skip
    assert stats["korean_tokens_per_char_after"] < 0.6 * stats["korean_tokens_per_char_before"]


def test_a_llama_style_tokenizer_starts_documents_with_bos(sentencepiece_pair, tokenizer):
    base, extended = sentencepiece_pair
    for tok in (base, extended):  # the extension keeps the base's template
        assert tok.adds_bos and tok.bos_id == 1
        assert tok.encode_document("hello world") == [1, *tok.encode("hello world")]
        assert tok.encode("hello world")[:1] != [1]
    ours = tokenizer[0]
    assert not ours.adds_bos and ours.encode_document("안녕") == ours.encode("안녕")


def test_sentencepiece_token_byte_lengths(sentencepiece_pair):
    _, extended = sentencepiece_pair
    lengths = extended.token_byte_lengths()
    for text in KOREAN_CASES + ENGLISH_CASES:
        n = len(text.encode("utf-8"))
        assert int(lengths[extended.encode(text)].sum()) in (n, n + 1)  # + the space SentencePiece prepends


def test_transformers_agrees_on_the_extended_sentencepiece_tokenizer(sentencepiece_pair, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, extended = sentencepiece_pair
    extended.save(str(tmp_path / "tokenizer.json"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in KOREAN_CASES[:3] + ENGLISH_CASES[:3]:
        assert hf.encode(text, add_special_tokens=False) == extended.encode(text)


def test_tokenizers_that_cannot_be_extended_say_why():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models as tm
    from tokenizers import pre_tokenizers as tp
    from tokenizers import trainers as tt

    from ftlm.data.tokenizer import TokenizerExtensionError

    texts = [d["text"] for d in corpus.english_documents()][:30]
    cases = {
        "WordPiece": (tm.WordPiece(unk_token="[UNK]"), tt.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"])),
        "Unigram": (tm.Unigram(), tt.UnigramTrainer(vocab_size=300, unk_token="<unk>", special_tokens=["<unk>"])),
        "BPE": (tm.BPE(unk_token="<unk>"), tt.BpeTrainer(vocab_size=300, special_tokens=["<unk>"])),
    }
    why = {
        "WordPiece": "WordPiece model turns every character it lacks into \\[UNK\\]",
        "Unigram": "Unigram model's tokens are chosen by learned scores",
        "BPE": "neither byte-level nor byte-fallback maps characters outside its alphabet to '<unk>'",
    }
    for kind, (model, trainer) in cases.items():
        tok = HFTok(model)
        tok.pre_tokenizer = tp.Whitespace()
        tok.train_from_iterator(texts, trainer)
        with pytest.raises(TokenizerExtensionError, match=f"cannot be extended: .*{why[kind]}"):
            extend_tokenizer(Tokenizer(tok), ["대한민국"], new_vocab_size=400, show_progress=False)
