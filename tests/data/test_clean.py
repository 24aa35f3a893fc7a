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
    assert normalize("a\r\nb\rc") == "a\nb\nc"
    assert normalize("  wide\u3000space\u00a0nbsp  \n\n\n\nnext   \n") == "wide space nbsp\n\nnext"
    assert normalize("keep\ttabs\n    and indentation") == "keep\ttabs\n    and indentation"


def lenient(**overrides) -> CleanConfig:
    return CleanConfig(**{"min_chars": 20, "min_words": 5, **overrides})


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


def test_null_threshold_turns_a_rule_off():
    assert QualityFilter(lenient(), "en").reject_reason("tiny") == "too_short"
    off = CleanConfig(min_chars=None, min_words=None, min_letter_share=None, min_script_share=None)
    assert QualityFilter(off, "en").reject_reason("tiny") is None


def test_unknown_keys_and_languages_are_config_errors():
    with pytest.raises(ValueError, match="data.clean"):
        CleanConfig.from_cfg({"min_char": 10})
    with pytest.raises(ValueError, match="data.lang"):
        QualityFilter(CleanConfig(), "xx")
