"""Text normalisation and Gopher-style quality filters.

`normalize` makes text canonical (NFC, so decomposed Hangul jamo become syllables; no control or zero-width
characters; tidy whitespace). `QualityFilter` then applies the rules configured under `data.clean` in a fixed
order and names the first one a document fails, so the report can count drops per rule. The rules follow
Rae et al. 2021 (Gopher), with the alphabetic checks generalised to a per-stream script (Hangul for `ko`,
Latin for `en`).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

# Cc controls except tab and newline; format characters that are invisible in text (zero-width space/joiners,
# word joiner, BOM, soft hyphen, bidi marks); the U+FFFD left behind by repaired invalid UTF-8.
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\ufffd]")
_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING_SPACE = re.compile("[ \t]+\n")
_MANY_BLANK_LINES = re.compile("\n{3,}")

# Runs, not single characters: counting sum(map(len, findall)) over runs is faster than one match per character.
LETTER = re.compile(r"[^\W\d_]+")
HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\ud7b0-\ud7ff]+")
LATIN = re.compile("[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f]+")
SCRIPTS = {"ko": HANGUL, "en": LATIN}


def count(pattern: re.Pattern, text: str) -> int:
    """Characters of `text` matched by a run pattern such as LETTER or HANGUL."""
    return sum(map(len, pattern.findall(text)))


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", text)
    text = _ODD_SPACES.sub(" ", text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()


@dataclass
class CleanConfig:
    """Thresholds of `data.clean`; a null threshold turns its rule off."""

    min_chars: int | None = 200
    max_chars: int | None = 1_000_000
    min_words: int | None = 20
    max_mean_word_chars: float | None = 20.0
    min_letter_share: float | None = 0.5
    min_script_share: float | None = 0.6
    max_dup_line_frac: float | None = 0.3
    max_dup_line_char_frac: float | None = 0.2
    max_top_ngram_frac: dict = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_dup_ngram_frac: dict = field(default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})

    @classmethod
    def from_cfg(cls, cfg) -> CleanConfig:
        values = dict(cfg or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"data.clean: unknown key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        for name in ("max_top_ngram_frac", "max_dup_ngram_frac"):
            if name in values:
                values[name] = {int(k): float(v) for k, v in dict(values[name] or {}).items() if v is not None}
        return cls(**values)


# The order in which rules are tried; a document is counted against the first rule it fails.
FILTERS = (
    "too_short",
    "too_long",
    "too_few_words",
    "long_words",
    "few_letters",
    "wrong_language",
    "repeated_lines",
    "repeated_ngrams",
)


class QualityFilter:
    def __init__(self, config: CleanConfig, lang: str | None):
        if lang is not None and lang not in SCRIPTS:
            raise ValueError(f"data.lang: unknown language {lang!r}; known: {sorted(SCRIPTS)} or null")
        self.config = config
        self.script = SCRIPTS.get(lang) if lang else None

    def reject_reason(self, text: str) -> str | None:
        """The first rule `text` (already normalised) fails, or None if it passes them all."""
        c = self.config
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
        if self.script is not None and c.min_script_share is not None:
            if count(self.script, text) < c.min_script_share * max(letters, 1):
                return "wrong_language"
        if self._repeated_lines(text):
            return "repeated_lines"
        if self._repeated_ngrams(words):
            return "repeated_ngrams"
        return None

    def _repeated_lines(self, text: str) -> bool:
        c = self.config
        lines = [line for line in text.split("\n") if line.strip()]
        if len(lines) < 2:
            return False
        counts = Counter(lines)
        dup_lines = sum(n for n in counts.values() if n > 1)
        dup_chars = sum(len(line) * n for line, n in counts.items() if n > 1)
        if c.max_dup_line_frac is not None and dup_lines > c.max_dup_line_frac * len(lines):
            return True
        return c.max_dup_line_char_frac is not None and dup_chars > c.max_dup_line_char_frac * sum(map(len, lines))

    def _repeated_ngrams(self, words: list[str]) -> bool:
        total_chars = sum(map(len, words))
        if not total_chars:
            return False
        # Share of characters in the most frequent n-gram (short n): catches "click here click here ...".
        for n, limit in self.config.max_top_ngram_frac.items():
            if len(words) < 2 * n:
                continue
            grams = Counter(zip(*(words[i:] for i in range(n))))
            gram, count = grams.most_common(1)[0]
            if count > 1 and count * sum(map(len, gram)) > limit * total_chars:
                return True
        # Share of characters covered by any n-gram occurring more than once (long n): copy-pasted passages.
        # That share can only shrink as n grows, so when the smallest n is under every limit the rest pass too.
        limits = sorted(self.config.max_dup_ngram_frac.items())
        for index, (n, limit) in enumerate(limits):
            if len(words) < 2 * n:
                continue
            share = _dup_ngram_char_share(words, n, total_chars)
            if share > limit:
                return True
            if share <= min(rest for _, rest in limits[index:]):
                break
        return False


def _dup_ngram_char_share(words: list[str], n: int, total_chars: int) -> float:
    starts = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(starts)
    if len(counts) == len(starts):
        return 0.0
    depth = [0] * (len(words) + 1)  # +1 where a repeated n-gram starts, -1 where it ends
    for i, gram in enumerate(starts):
        if counts[gram] > 1:
            depth[i] += 1
            depth[i + n] -= 1
    covered = running = 0
    for word, delta in zip(words, depth):
        running += delta
        if running:
            covered += len(word)
    return covered / total_chars
