import unicodedata

import pytest

from ftlm.data.clean import FILTERS, CleanConfig, QualityFilter, normalize

KO = (
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. "
    "국가는 법률이 정하는 바에 의하여 재외국민을 보호할 의무를 진다. 대한민국의 영토는 한반도와 그 부속도서로 한다. "
    "대한민국은 통일을 지향하며, 자유민주적 기본질서에 입각한 평화적 통일 정책을 수립하고 이를 추진한다."
)
EN = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from a distance. "
    "Later that afternoon the children walked to the river, where they counted boats and talked about school. "
    "Nobody expected the storm, yet everyone was home before the first drops of rain began to fall."
)


def test_normalize_composes_jamo_and_strips_invisible_characters():
    decomposed = unicodedata.normalize("NFD", "한국어 문장")
    assert decomposed != "한국어 문장"
    assert normalize(decomposed) == "한국어 문장"
    assert normalize("zero\u200bwidth\u2060 and\ufeff bom\u00ad") == "zerowidth and bom"
    assert normalize("bell\x07 and nul\x00 and repaired \ufffd byte") == "bell and nul and repaired  byte"
    assert normalize("lone \ud800surrogate\udfff from a JSON escape") == "lone surrogate from a JSON escape"
    assert normalize("a\r\nb\rc") == "a\nb\nc"
    assert normalize("  wide\u3000space\u00a0nbsp  \n\n\n\nnext   \n") == "wide space nbsp\n\nnext"
    assert normalize("keep\ttabs\n    and indentation") == "keep\ttabs\n    and indentation"


def lenient(**overrides) -> CleanConfig:
    return CleanConfig(**{"min_chars": 20, "min_words": 5, **overrides})


def test_normalize_turns_whitespace_controls_into_line_breaks():
    # form feeds between PDF pages, vertical tabs and separators between table fields: deleting them joined words
    assert normalize("페이지 끝.\x0c다음 페이지") == "페이지 끝.\n다음 페이지"
    for control in "\x0b\x1c\x1d\x1e\x1f\x85\u2028\u2029":
        assert normalize(f"col1{control}col2") == "col1\ncol2"


def test_normalize_output_is_nfc_and_a_fixed_point():
    # an invisible character between jamo composes only once it is gone: the shards must hold syllables
    samples = ["\u1112\u200b\u1161\u11ab", "\u1100\u00ad\u1161 \n\n\n\n\u1102\ufeff\u1161", "a\x0c \n\x0bb"]
    for text in samples:
        once = normalize(text)
        assert unicodedata.is_normalized("NFC", once) and normalize(once) == once, repr(text)
    assert normalize(samples[0]) == "한"


def test_normalize_keeps_the_joiner_inside_emoji_only():
    family, rainbow = "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f3f3\ufe0f\u200d\U0001f308"
    assert normalize(f"우리 {family} 가족 {rainbow}") == f"우리 {family} 가족 {rainbow}"
    assert normalize("한\u200d글 x\u200dy \u200d") == "한글 xy"


@pytest.mark.parametrize("lang,text", [("ko", KO), ("en", EN), (None, KO + " " + EN)])
def test_good_documents_pass(lang, text):
    assert QualityFilter(CleanConfig(min_chars=100, min_words=10), lang).reject_reason(text) is None


@pytest.mark.parametrize(
    "reason,text,config",
    [
        ("too_short", "짧은 문장.", lenient()),
        ("too_long", EN * 3, lenient(max_chars=500)),
        ("too_few_words", "한두세 단어뿐인데도길이는충분히긴문서입니다", lenient(min_words=5)),
        ("long_words", "aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQ= " * 8, lenient()),
        ("few_letters", "1234 5678 !!!! #### ---- ==== 9999 0000 **** ++++ " + "ab cd", lenient()),
        ("repeated_lines", "click here for more\n" * 5 + EN, lenient()),
        ("repeated_ngrams", "buy cheap pills now " * 30, lenient(max_dup_line_frac=None, max_dup_line_char_frac=None)),
        ("repeated_ngrams", EN + " " + " ".join(EN.split()[:40]), lenient()),
    ],
)
def test_each_filter_names_its_reason(reason, text, config):
    assert reason in FILTERS
    assert QualityFilter(config, "en").reject_reason(text) == reason


def test_language_check_uses_the_streams_script():
    config = CleanConfig(min_chars=100, min_words=10)
    assert QualityFilter(config, "ko").reject_reason(EN) == "wrong_language"
    assert QualityFilter(config, "en").reject_reason(KO) == "wrong_language"
    mostly_korean = KO + " (Republic of Korea)"
    assert QualityFilter(config, "ko").reject_reason(mostly_korean) is None


@pytest.mark.parametrize("native", [True, False], ids=["c++", "numpy"])
def test_hanja_in_korean_is_korean_and_chinese_is_not(native):
    # Constitution-style mixed script (국한문 혼용): the Hanja outnumber the Hangul, yet the text is Korean
    sentences = ["大韓民國은 民主共和國이다.", "大韓民國의 主權은 國民에게 있고, 모든 權力은 國民으로부터 나온다."]
    mixed = " ".join(sentences * 6)
    chinese = " ".join(["中华人民共和国是工人阶级领导的、以工农联盟为基础的人民民主专政的社会主义国家。"] * 12)
    halfwidth = " ".join(["\uffbe\uffc2\uffa1 \uffb1\uffc1\uffa4 \uffbb\uffcc 한국어 문장입니다"] * 10)
    repetition_off = dict(max_dup_line_frac=None, max_dup_line_char_frac=None)
    repetition_off.update(max_top_ngram_frac={}, max_dup_ngram_frac={})
    config = CleanConfig(min_chars=50, min_words=5, max_mean_word_chars=None, **repetition_off)
    reasons = QualityFilter(config, "ko").reject_reasons([mixed, chinese, halfwidth], native=native)
    assert reasons == [None, "wrong_language", None]
    assert QualityFilter(config, "en").reject_reasons([mixed], native=native) == ["wrong_language"]


def test_null_threshold_turns_a_rule_off():
    assert QualityFilter(lenient(), "en").reject_reason("tiny") == "too_short"
    off = CleanConfig(min_chars=None, min_words=None, min_letter_share=None, min_script_share=None)
    assert QualityFilter(off, "en").reject_reason("tiny") is None


def test_unknown_keys_and_languages_are_config_errors():
    with pytest.raises(ValueError, match="data.clean"):
        CleanConfig.from_cfg({"min_char": 10})
    with pytest.raises(ValueError, match="data.lang"):
        QualityFilter(CleanConfig(), "xx")


# -- the batched filter against a plain reference (the per-document Counter implementation it replaced) ----------
def reference_reason(config: CleanConfig, lang, text: str):
    from collections import Counter

    from ftlm.data.clean import HAN, HANGUL, LATIN, LETTER, count

    c, script = config, {"ko": HANGUL, "en": LATIN}.get(lang)
    if c.min_chars is not None and len(text) < c.min_chars:
        return "too_short"
    if c.max_chars is not None and len(text) > c.max_chars:
        return "too_long"
    words = text.split()
    if c.min_words is not None and len(words) < c.min_words:
        return "too_few_words"
    if c.max_mean_word_chars is not None and words and sum(map(len, words)) / len(words) > c.max_mean_word_chars:
        return "long_words"
    letters = count(LETTER, text)
    visible = len(text) - text.count(" ") - text.count("\n") - text.count("\t")
    if c.min_letter_share is not None and letters < c.min_letter_share * max(visible, 1):
        return "few_letters"
    if (
        script is not None
        and c.min_script_share is not None
        and count(script, text) < c.min_script_share * max(letters - (count(HAN, text) if lang == "ko" else 0), 1)
    ):
        return "wrong_language"
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) >= 2:
        counts = Counter(lines)
        dup_lines = sum(n for n in counts.values() if n > 1)
        dup_chars = sum(len(line) * n for line, n in counts.items() if n > 1)
        if c.max_dup_line_frac is not None and dup_lines > c.max_dup_line_frac * len(lines):
            return "repeated_lines"
        if c.max_dup_line_char_frac is not None and dup_chars > c.max_dup_line_char_frac * sum(map(len, lines)):
            return "repeated_lines"
    total = sum(map(len, words))
    for n, limit in c.max_top_ngram_frac.items():
        if len(words) >= 2 * n:
            gram, top = Counter(zip(*(words[i:] for i in range(n)))).most_common(1)[0]
            if top > 1 and top * sum(map(len, gram)) > limit * total:
                return "repeated_ngrams"
    for n, limit in c.max_dup_ngram_frac.items():
        if len(words) >= 2 * n:
            starts = list(zip(*(words[i:] for i in range(n))))
            counts = Counter(starts)
            covered = set()
            for i, gram in enumerate(starts):
                if counts[gram] > 1:
                    covered.update(range(i, i + n))
            if sum(len(words[i]) for i in covered) / total > limit:
                return "repeated_ngrams"
    return None


@pytest.mark.parametrize("native", [True, False], ids=["c++", "numpy"])
def test_batched_filter_matches_the_reference_on_random_documents(native):
    import random

    rng = random.Random(0)
    pool = (KO + " " + EN).split() + ["½", "Ⅻ", "²", "🙂", "𝔘𝔫𝔦", "x_y", "42", "—", "…", "𠀀한", "ǅ", "\x1c", "\x85"]
    texts = []
    for _ in range(400):
        words = [rng.choice(pool) for _ in range(rng.randint(3, 120))]
        if rng.random() < 0.3:  # repeated passages
            k = rng.randint(2, 12)
            start = rng.randrange(max(len(words) - k, 1))
            words += words[start : start + k] * rng.randint(1, 4)
        lines = [rng.choice(" \u3000\t").join(words[i : i + 9]) for i in range(0, len(words), 9)]
        if rng.random() < 0.2:
            lines += lines[: rng.randint(1, 3)]
        if rng.random() < 0.1:
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(["   ", "\t", "\u2028", ""]))  # blank lines
        texts.append("\n".join(lines) if rng.random() < 0.2 else normalize("\n".join(lines)))
    configs = [CleanConfig(min_chars=20, min_words=3), CleanConfig(min_chars=None, max_dup_line_frac=None)]
    configs.append(CleanConfig(min_chars=10, max_top_ngram_frac={2: 0.05, 3: 0.04}, max_dup_ngram_frac={5: 0.02}))
    seen = set()
    for config in configs:
        for lang in (None, "ko", "en"):
            got, words = QualityFilter(config, lang).judge(texts, native=native)
            assert got == [reference_reason(config, lang, t) for t in texts]
            assert words.tolist() == [len(t.split()) for t in texts]
            seen.update(got)
    assert {"repeated_ngrams", "repeated_lines", "wrong_language", None} <= seen  # the set exercises the rules


@pytest.mark.parametrize("native", [True, False], ids=["c++", "numpy"])
def test_optional_language_id_filter(native):
    pytest.importorskip("py3langid")
    config = CleanConfig(min_chars=100, min_words=10, min_script_share=None, langid_min_prob=0.9)
    assert QualityFilter(config, "ko").reject_reasons([KO, EN], native) == [None, "wrong_language_id"]
    assert QualityFilter(config, "en").reject_reasons([KO, EN], native) == ["wrong_language_id", None]
    assert QualityFilter(config, None).reject_reasons([KO, EN], native) == [None, None]  # needs data.lang to know
    # language ID is tried after the script rule and before the repetition rules, in both versions
    repeated = "\n".join([KO] * 3)
    assert QualityFilter(config, "en").reject_reasons([repeated], native) == ["wrong_language_id"]
    assert QualityFilter(config, "ko").reject_reasons([repeated], native) == ["repeated_lines"]
