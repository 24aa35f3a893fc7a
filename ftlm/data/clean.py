"""Text normalisation and Gopher-style quality filters.

`normalize` makes text canonical (NFC, so decomposed Hangul jamo become syllables; no control or zero-width
characters; tidy whitespace). `QualityFilter` then applies the rules configured under `data.clean` in a fixed
order and names the first one a document fails, so the report can count drops per rule. The rules follow
Rae et al. 2021 (Gopher), with the alphabetic checks generalised to a per-stream script (Hangul for `ko`,
Latin for `en`), and an optional language-ID rule (`langid_min_prob`, py3langid: its model ships in its wheel).

Speed: the rules run in C++ (`ftlm._text`, csrc/text/text_ops.cpp) over the code points of a whole batch, with the
character classes passed in as tables built here from the regexes and `str.isspace`, so this file stays their one
definition. The numpy version below is the reference and the fallback, with the same decisions: each document is
scanned a fixed number of times whatever the number of rules, its code points once (letters, Hangul and Latin by
table lookup), its words once (`str.split`) into 64-bit hashes, and every n-gram rule works on those hashes (same
decisions as counting n-gram tuples, up to 64-bit hash collisions, in both versions).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .native import code_points, text_ops

# Controls that are whitespace (str.isspace: vertical tab, form feed, the information separators, NEL, the Unicode
# line and paragraph separators) end lines: PDF text breaks pages with form feeds, tables split fields with them,
# and deleting them would join the words on either side.
_LINE_BREAKS = re.compile("[\x0b\x0c\x1c-\x1f\x85\u2028\u2029]")
# Cc controls except tab and newline; format characters that are invisible in text (zero-width space/non-joiner,
# word joiner, BOM, soft hyphen, bidi marks); the U+FFFD left behind by repaired invalid UTF-8, and lone surrogates
# (JSON's "\ud800" escapes decode to them; they are no characters and UTF-8 cannot encode them).
_INVISIBLE = re.compile(
    "[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u00ad\u200b\u200c\u200e\u200f\u202a-\u202e\u2060-\u2064\ufeff\ufffd"
    "\ud800-\udfff]"
)
# The zero-width joiner too, except between two emoji, where it builds one (family, rainbow flag, profession emoji).
_EMOJI = "\u2600-\u27bf\U0001f000-\U0001faff"
_STRAY_JOINER = re.compile(f"(?<![{_EMOJI}\ufe0f])\u200d|\u200d(?![{_EMOJI}])")
_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING_SPACE = re.compile("[ \t]+\n")
_MANY_BLANK_LINES = re.compile("\n{3,}")

# Runs, not single characters: counting sum(map(len, findall)) over runs is faster than one match per character.
LETTER = re.compile(r"[^\W\d_]+")
HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\ud7b0-\ud7ff\uffa0-\uffdc]+")
LATIN = re.compile("[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f]+")
SCRIPTS = {"ko": HANGUL, "en": LATIN}
# Letters a stream's script share leaves out of the letters it divides by: Hanja in Korean text. Mixed script
# (legal, historical and academic Korean) is Korean, while a page of Chinese still has no Hangul and fails.
HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
NEUTRAL = {"ko": HAN}


def count(pattern: re.Pattern, text: str) -> int:
    """Characters of `text` matched by a run pattern such as LETTER or HANGUL."""
    return sum(map(len, pattern.findall(text)))


# Every character any of the substitutions below acts on, in one class: most documents hold none, one scan tells.
_SPECIAL = re.compile(
    "[\r\u200d" + _LINE_BREAKS.pattern[1:-1] + _INVISIBLE.pattern[1:-1] + _ODD_SPACES.pattern[1:-1] + "]"
)


def _needs_work(text: str) -> bool:
    return " \n" in text or "\t\n" in text or "\n\n\n" in text or _SPECIAL.search(text) is not None


def normalize(text: str) -> str:
    if _needs_work(text):
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _LINE_BREAKS.sub("\n", text)
        text = _INVISIBLE.sub("", text)
        if "\u200d" in text:
            text = _STRAY_JOINER.sub("", text)
        text = _ODD_SPACES.sub(" ", text)
        text = _TRAILING_SPACE.sub("\n", text)
        text = _MANY_BLANK_LINES.sub("\n\n", text)
    # NFC last: a character removed above may have stood between a jamo and the next (L ZWSP V T composes only
    # once the ZWSP is gone), and the tokenizer, which leaves NFC to this stage, must see composed syllables.
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
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
    langid_min_prob: float | None = None  # py3langid must name the stream's language with this probability
    max_dup_line_frac: float | None = 0.3
    max_dup_line_char_frac: float | None = 0.2
    # n -> limit; a null limit turns that n off, a null dict all of them
    max_top_ngram_frac: dict | None = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_dup_ngram_frac: dict | None = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )

    @classmethod
    def from_cfg(cls, cfg) -> CleanConfig:
        values = dict(cfg or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"data.clean: unknown key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        for name in ("max_top_ngram_frac", "max_dup_ngram_frac"):
            if name in values:
                values[name] = {int(k): float(v) for k, v in dict(values[name] or {}).items() if v is not None}
        config = cls(**values)
        config._check_ranges()
        return config

    def _check_ranges(self) -> None:
        """Values no document could meet (or every document would) are settings mistakes, refused before any
        work rather than found out as "no document survived" at the end."""
        for name in ("min_chars", "max_chars", "min_words"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"data.clean.{name} must be null or >= 0, got {value!r}")
        if self.max_mean_word_chars is not None and self.max_mean_word_chars <= 0:
            raise ValueError(f"data.clean.max_mean_word_chars must be null or > 0, got {self.max_mean_word_chars!r}")
        shares = ("min_letter_share", "min_script_share", "langid_min_prob", "max_dup_line_frac")
        for name in (*shares, "max_dup_line_char_frac"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"data.clean.{name} is a share: it must be null or in [0, 1], got {value!r}")
        for name in ("max_top_ngram_frac", "max_dup_ngram_frac"):
            for n, limit in getattr(self, name).items():
                if n < 1 or not 0.0 <= limit <= 1.0:
                    raise ValueError(f"data.clean.{name}: n must be >= 1 and its share in [0, 1], got {n}: {limit}")
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError(
                f"data.clean.min_chars={self.min_chars} is above data.clean.max_chars={self.max_chars}: "
                "no document could be kept"
            )


# The order in which rules are tried; a document is counted against the first rule it fails.
FILTERS = (
    "too_short",
    "too_long",
    "too_few_words",
    "long_words",
    "few_letters",
    "wrong_language",
    "wrong_language_id",
    "repeated_lines",
    "repeated_ngrams",
)
LANGID_CHARS = 2000  # language ID looks at a document's first characters: enough to tell, and bounded in cost
_AFTER_LANGID = {FILTERS.index(name) + 1 for name in ("repeated_lines", "repeated_ngrams")}  # native reason codes
_K = np.uint64(0x9E3779B97F4A7C15)
# No code point from here on is a letter (planes 4-13 are unassigned, 14 holds tags and variation selectors, 15-16
# private use): the letter table stops here (a test checks it against LETTER); HANGUL, LATIN and HAN lie in the BMP.
LETTER_TABLE_END = 0x40000


@lru_cache(maxsize=1)
def char_tables() -> dict[str, np.ndarray]:
    """uint8 per code point: is it matched by LETTER (up to LETTER_TABLE_END), and str.isspace (BMP: no whitespace
    lies above it); per script (BMP) 1 where the script's regex matches, 2 where its NEUTRAL one does. The regexes
    and isspace stay the definitions."""

    def table(end: int, *patterns: re.Pattern) -> np.ndarray:
        out = np.zeros(end, dtype=np.uint8)
        every = "".join(map(chr, range(end)))
        for value, pattern in enumerate(patterns, start=1):
            for m in pattern.finditer(every):
                out[m.start() : m.end()] = value
        return out

    tables = {"letter": table(LETTER_TABLE_END, LETTER)}
    for lang, pattern in SCRIPTS.items():
        tables[lang] = table(0x10000, *(pattern, NEUTRAL[lang]) if lang in NEUTRAL else (pattern,))
    tables["space"] = np.fromiter((chr(c).isspace() for c in range(0x10000)), dtype=np.uint8, count=0x10000)
    return tables


def _char_counts(texts: list[str], script: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(D,) letters, (D,) letters of the stream's script and (D,) letters its share is of (all but the NEUTRAL
    ones), in one pass over all code points of the batch."""
    n = len(texts)
    codes, offsets = code_points(texts)
    doc = np.repeat(np.arange(n), np.diff(offsets))
    tables = char_tables()
    index = np.minimum(codes, 0xFFFF)  # the BMP part of each table; astral code points below
    astral = np.flatnonzero(codes > 0xFFFF)  # rare (emoji, historic scripts): the regexes decide those
    letter = tables["letter"][index]
    letter[astral] = [bool(LETTER.match(chr(c))) for c in codes[astral].tolist()]
    letters = np.bincount(doc, weights=letter, minlength=n).astype(np.int64)
    if script is None:
        return letters, np.zeros(n, dtype=np.int64), letters
    own = tables[script][index]
    own[astral] = 0  # the script tables lie in the BMP, as the C++ path reads them
    in_script = np.bincount(doc, weights=own == 1, minlength=n).astype(np.int64)
    neutral = np.bincount(doc, weights=own == 2, minlength=n).astype(np.int64)
    return letters, in_script, letters - neutral


@lru_cache(maxsize=1)
def _language_identifier():
    try:
        from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise ImportError(
            "data.clean.langid_min_prob needs py3langid (its model ships inside the wheel, nothing is downloaded): "
            "pip install 'ftlm[langid]'"
        ) from None
    return LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)


class QualityFilter:
    def __init__(self, config: CleanConfig, lang: str | None):
        if lang is not None and lang not in SCRIPTS:
            raise ValueError(f"data.lang: unknown language {lang!r}; known: {sorted(SCRIPTS)} or null")
        self.config = config
        self.lang = lang
        self.script = SCRIPTS.get(lang) if lang else None
        self._identify = _language_identifier().classify if lang and config.langid_min_prob is not None else None

    def reject_reason(self, text: str) -> str | None:
        """The first rule `text` (already normalised) fails, or None if it passes them all."""
        return self.reject_reasons([text])[0]

    def reject_reasons(self, texts: list[str], native: bool | None = None) -> list[str | None]:
        """`reject_reason` of every text, computed for the whole batch at once."""
        return self.judge(texts, native)[0]

    def judge(self, texts: list[str], native: bool | None = None) -> tuple[list[str | None], np.ndarray]:
        """(reject reason of every text, (D,) int64 number of words = len(text.split())). native: use ftlm._text
        (None: when built; False: the numpy reference)."""
        ops = text_ops(native)
        if ops is not None:
            return self._judge_native(texts, ops)
        c = self.config
        out: list[str | None] = [None] * len(texts)
        n_words = np.zeros(len(texts), dtype=np.int64)
        alive, words_of = [], []
        for i, text in enumerate(texts):
            if c.min_chars is not None and len(text) < c.min_chars:
                out[i] = "too_short"
                n_words[i] = len(text.split())
            elif c.max_chars is not None and len(text) > c.max_chars:
                out[i] = "too_long"
                n_words[i] = len(text.split())
            else:
                words = text.split()
                n_words[i] = len(words)
                if c.min_words is not None and len(words) < c.min_words:
                    out[i] = "too_few_words"
                elif (
                    c.max_mean_word_chars is not None
                    and words
                    and (sum(map(len, words)) / len(words) > c.max_mean_word_chars)
                ):
                    out[i] = "long_words"
                else:
                    alive.append(i)
                    words_of.append(words)
        if not alive:
            return out, n_words
        letters, in_script, of_letters = _char_counts(
            [texts[i] for i in alive], self.lang if self.script is not None else None
        )
        survivors, survivor_words = [], []
        for k, i in enumerate(alive):
            text = texts[i]
            visible = len(text) - text.count(" ") - text.count("\n") - text.count("\t")
            if c.min_letter_share is not None and letters[k] < c.min_letter_share * max(visible, 1):
                out[i] = "few_letters"
            elif (
                self.script is not None
                and c.min_script_share is not None
                and (in_script[k] < c.min_script_share * max(of_letters[k], 1))
            ):
                out[i] = "wrong_language"
            elif self._identify is not None and self._wrong_id(text):
                out[i] = "wrong_language_id"
            elif self._repeated_lines(text):
                out[i] = "repeated_lines"
            else:
                survivors.append(i)
                survivor_words.append(words_of[k])
        if survivors:
            for i, repeated in zip(survivors, _NGramRules(self.config, survivor_words).repeated()):
                if repeated:
                    out[i] = "repeated_ngrams"
        return out, n_words

    def _judge_native(self, texts: list[str], ops) -> tuple[list[str | None], np.ndarray]:
        c = self.config
        codes, offsets = code_points(texts)
        tables = char_tables()
        off = float("nan")
        thresholds = tuple(
            off if v is None else float(v)
            for v in (
                c.min_chars,
                c.max_chars,
                c.min_words,
                c.max_mean_word_chars,
                c.min_letter_share,
                c.min_script_share,
                c.max_dup_line_frac,
                c.max_dup_line_char_frac,
            )
        )
        top = np.array(sorted(c.max_top_ngram_frac.items()), dtype=np.float64).reshape(-1, 2)
        dup = np.array(sorted(c.max_dup_ngram_frac.items()), dtype=np.float64).reshape(-1, 2)
        script = tables[self.lang] if self.script is not None else None
        codes_raw, words_raw = ops.quality(
            codes, offsets, tables["space"], tables["letter"], script, thresholds, top, dup
        )
        reasons = [FILTERS[code - 1] if code else None for code in codes_raw]
        if self._identify is not None:  # language ID comes after the script rule, before the repetition rules
            for i, code in enumerate(codes_raw):
                if (code == 0 or code in _AFTER_LANGID) and self._wrong_id(texts[i]):
                    reasons[i] = "wrong_language_id"
        return reasons, np.frombuffer(words_raw, dtype=np.int64)

    def _wrong_id(self, text: str) -> bool:
        lang, prob = self._identify(text[:LANGID_CHARS])
        return lang != self.lang or prob < self.config.langid_min_prob

    def _repeated_lines(self, text: str) -> bool:
        c = self.config
        lines = [line for line in text.split("\n") if line.strip()]
        if len(lines) < 2:
            return False
        counts = Counter(lines)
        if len(counts) == len(lines):
            return False  # no line repeats
        dup_lines = sum(n for n in counts.values() if n > 1)
        dup_chars = sum(len(line) * n for line, n in counts.items() if n > 1)
        if c.max_dup_line_frac is not None and dup_lines > c.max_dup_line_frac * len(lines):
            return True
        return c.max_dup_line_char_frac is not None and dup_chars > c.max_dup_line_char_frac * sum(map(len, lines))


class _NGramRules:
    """The repeated n-gram rules for a batch of documents, on 64-bit hashes of their word n-grams.

    All words of the batch are concatenated: (W,) word hashes, lengths and document of each word. The n-gram starting
    at word i is a hash of words i..i+n-1 (built from the (n-1)-gram hashes), valid when they are in one document;
    mixing the document into the key keeps equal n-grams of different documents apart. Same decisions as counting
    n-gram tuples per document (hash(str) is fixed within a process; 64-bit collisions aside).
    """

    def __init__(self, config: CleanConfig, words_of: list[list[str]]):
        self.config = config
        self.n_docs = len(words_of)
        counts = np.fromiter(map(len, words_of), dtype=np.int64, count=self.n_docs)
        flat = [w for words in words_of for w in words]
        self.doc = np.repeat(np.arange(self.n_docs), counts)  # (W,)
        self.words_in_doc = counts
        self.end = np.repeat(np.cumsum(counts), counts)  # (W,) one past the last word of each word's document
        self.lengths = np.fromiter(map(len, flat), dtype=np.int64, count=len(flat))
        self.prefix = np.concatenate(([0], np.cumsum(self.lengths)))  # characters before word i
        self.total_chars = np.bincount(self.doc, weights=self.lengths, minlength=self.n_docs)
        self.doc_key = (self.doc.astype(np.uint64) + np.uint64(1)) * np.uint64(0xD6E8FEB86659FD93)
        self._hashes = {1: np.fromiter(map(hash, flat), dtype=np.int64, count=len(flat)).view(np.uint64)}

    def _grams(self, n: int) -> np.ndarray:
        if n not in self._hashes:
            shorter, single = self._grams(n - 1), self._hashes[1]
            g = shorter[:-1] * _K + single[n - 1 :]  # wrapping uint64
            self._hashes[n] = g ^ (g >> np.uint64(29))
        return self._hashes[n]

    def _groups(self, n: int, docs_mask: np.ndarray):
        """n-grams of the documents in docs_mask -> (start positions, group of each, count of each group)."""
        starts = np.flatnonzero((np.arange(len(self.doc)) + n <= self.end) & docs_mask[self.doc])
        keys = self._grams(n)[starts] ^ self.doc_key[starts]
        order = np.argsort(keys)  # quicksort: faster than a stable sort; first occurrences come from a min below
        sorted_keys = keys[order]
        new = np.empty(len(keys), dtype=bool)
        new[:1] = True
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
        group_sorted = np.cumsum(new) - 1
        group = np.empty(len(keys), dtype=np.int64)
        group[order] = group_sorted
        first = np.minimum.reduceat(starts[order], np.flatnonzero(new)) if len(keys) else starts[:0]
        return starts, group, np.bincount(group_sorted), first

    def repeated(self) -> np.ndarray:
        """(D,) bool: fails a repeated n-gram rule."""
        c = self.config
        bad = np.zeros(self.n_docs, dtype=bool)
        total = np.maximum(self.total_chars, 1)
        if not self.total_chars.any():
            return bad
        has_chars = self.total_chars > 0
        # Share of characters in the most frequent n-gram (short n): catches "click here click here ...".
        for n, limit in c.max_top_ngram_frac.items():
            docs = has_chars & (self.words_in_doc >= 2 * n) & ~bad
            if not docs.any():
                continue
            starts, group, counts, first = self._groups(n, docs)
            group_doc = self.doc[first]
            top = np.zeros(self.n_docs, dtype=np.int64)
            np.maximum.at(top, group_doc, counts)
            best = np.full(self.n_docs, np.iinfo(np.int64).max)
            at_top = counts == top[group_doc]  # ties: the n-gram seen first, as Counter.most_common does
            np.minimum.at(best, group_doc[at_top], first[at_top])
            ok = docs & (top > 1)
            chars = np.zeros(self.n_docs, dtype=np.int64)
            chars[ok] = self.prefix[best[ok] + n] - self.prefix[best[ok]]
            bad |= ok & (top * chars > limit * self.total_chars)
        # Share of characters covered by any n-gram occurring more than once (long n): copy-pasted passages.
        # That share can only shrink as n grows, so when the smallest n is under every limit the rest pass too.
        limits = sorted(c.max_dup_ngram_frac.items())
        undecided = has_chars & ~bad
        for index, (n, limit) in enumerate(limits):
            docs = undecided & (self.words_in_doc >= 2 * n)
            if not docs.any():
                continue
            starts, group, counts, _ = self._groups(n, docs)
            repeated = starts[counts[group] > 1]  # positions where a repeated n-gram starts
            depth = np.zeros(len(self.doc) + 1, dtype=np.int64)  # +1 where it starts, -1 where it ends (same doc)
            np.add.at(depth, repeated, 1)
            np.add.at(depth, repeated + n, -1)
            covered = np.cumsum(depth[:-1]) > 0
            share = np.bincount(self.doc, weights=self.lengths * covered, minlength=self.n_docs) / total
            bad |= docs & (share > limit)
            undecided &= ~(docs & ((share > limit) | (share <= min(rest for _, rest in limits[index:]))))
        return bad
