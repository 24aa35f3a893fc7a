"""Fast batch encoding for the tokenize stage: the same ids as the tokenizers library, several times faster per core.

For a byte-level BPE (ftlm's own tokenizers, GPT-2 style ones) the library spends most of its time in the
pre-tokenizer's regex, not in BPE. But that regex (GPT-2's: `'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|
\\s+(?!\\S)|\\s+`) never lets a piece cross from a whitespace run into the word after it except for the run's last
character, and no piece of a word reaches past the word. So a text splits into *units*, each a whitespace run and the
word after it ("  세계." or "\\n한국어"), that the library encodes alone to exactly the ids it gives them in place: the
ids of a text are the concatenation of its units' ids. Units repeat (Zipf's law), so each distinct unit is encoded
once per worker and remembered; a chunk of texts becomes unit numbers and its ids one numpy gather.

With ftlm._text built (csrc/text/text_ops.cpp) the split and the table of units are C++ (`units_lookup`), and so is
the encoding of a new unit (`bpe_encode`): GPT-2's regex on a unit reduces to a few rules on character classes, and
byte-level BPE is the lowest-ranked merge first, which the library's own priority queue also does; a unit holding a
character whose class Python and the library might disagree on (outside `_SETTLED`) is encoded by the library. Without
the extension, the Python table and the library's own pre-tokenizer and BPE do the same, slower.

The split uses only space, tab, newline and carriage return, which every regex flavour calls whitespace. A text with
any other whitespace character (no-break space, ideographic space, ...), or with an added token that the library
would match as a whole, is encoded by the library directly, as is everything when the tokenizer is not a plain
byte-level BPE (normaliser other than NFC, add_prefix_space, BPE dropout, a SentencePiece-style tokenizer): the
result is the same ids in every case, tested against the library on the corpora and on adversarial text.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from functools import lru_cache
from itertools import chain

import numpy as np

from .native import code_points, text_ops
from .tokenizer import Tokenizer

_UNITS = re.compile(r"[ \t\n\r]*[^ \t\n\r]+|[ \t\n\r]+")


@lru_cache(maxsize=1)
def _other_whitespace() -> str:
    """Every character any flavour might call whitespace (Python's isspace, which includes all of Unicode's separators
    Zs/Zl/Zp; the C0 controls that some engines include; DEL and NEL), except the four the split uses."""
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    chars = set(re.findall(r"\s", every)) | {chr(cp) for cp in range(0x20)} | {"\x7f", "\x85"}
    return "".join(sorted(chars - set(" \t\n\r")))


class FastEncoder:
    """`encode_batch(texts) -> list[np.ndarray]` with the ids `tokenizer.encode_batch` gives, using a table of units
    when the tokenizer allows it (see the module docstring). One per worker process: the table is its own.

    The table keeps every distinct unit's ids in one flat array; a chunk of texts becomes unit numbers (the C++ table,
    or one dict lookup per unit) and its ids one numpy gather, so no Python loop runs per token."""

    def __init__(self, tokenizer: Tokenizer, dtype=np.int64, max_units: int = 1 << 20, native: bool | None = None):
        self.dtype, self.max_units = dtype, max_units
        self.backend = tokenizer.backend
        spec = json.loads(self.backend.to_str())
        self.fast = _unit_safe(spec)
        self._ops = text_ops(native)
        self._table = self._ops.units_new() if self._ops is not None else None
        self._bpe = _native_bpe(self._ops, spec) if self._ops is not None and self.fast else None
        # library_units: new units with a character the C++ BPE leaves to the library
        self.stats = {"texts": 0, "fallback_texts": 0, "units": 0, "unit_misses": 0, "library_units": 0}
        self._unsafe = re.compile("[" + re.escape(_other_whitespace()) + "]")
        matched = _matched_added_tokens(self.backend)
        self._added = re.compile("|".join(re.escape(t) for t in matched)) if matched else None
        self._clear()

    def _clear(self) -> None:
        self.index: dict[str, int] = {}  # unit -> its number (the Python path; the C++ table has its own)
        self._n_units = 0
        if self._table is not None:
            self._ops.units_clear(self._table)
        self._start = np.zeros(1 << 14, dtype=np.int64)  # unit number -> where its ids begin in _ids
        self._length = np.zeros(1 << 14, dtype=np.int64)
        self._ids = np.zeros(1 << 16, dtype=np.int64)
        self._n_ids = 0

    def _add(self, units: list[str]) -> None:
        lengths, flat = self._encode_units(units)
        first = self._n_units
        if self._table is None:
            self.index.update(zip(units, range(first, first + len(units))))
        self._n_units += len(units)
        self._start = _append(self._start, first, self._n_ids + np.cumsum(lengths) - lengths)
        self._length = _append(self._length, first, lengths)
        self._ids = _append(self._ids, self._n_ids, flat)
        self._n_ids += len(flat)
        self.stats["unit_misses"] += len(units)

    def _encode_units(self, units: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(U,) ids per unit and their ids, flat: the C++ BPE where it applies, else what the library does."""
        if self._bpe is None:
            return self._encode_units_library(units)
        norm = self.backend.normalizer  # NFC or none (_unit_safe); the tokenize stage drops it (text is NFC already)
        ids_raw, lengths_raw = self._ops.bpe_encode(
            self._bpe, [norm.normalize_str(u) for u in units] if norm else units
        )
        lengths, flat = np.frombuffer(lengths_raw, dtype=np.int64), np.frombuffer(ids_raw, dtype=np.int64)
        unknown = np.flatnonzero(lengths < 0)  # a character whose class the table does not vouch for
        self.stats["library_units"] += len(unknown)
        if not len(unknown):
            return lengths, flat
        lib_lengths, lib_flat = self._encode_units_library([units[i] for i in unknown.tolist()])
        parts, at, lib_at, lib = [], 0, 0, iter(lib_lengths.tolist())
        for n in lengths.tolist():
            if n >= 0:
                parts.append(flat[at : at + n])
                at += n
            else:
                m = next(lib)
                parts.append(lib_flat[lib_at : lib_at + m])
                lib_at += m
        lengths = lengths.copy()
        lengths[unknown] = lib_lengths
        return lengths, np.concatenate(parts)

    def _encode_units_library(self, units: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # What the library's encode does to a unit, less its per-text bookkeeping (offsets, masks, an Encoding
        # object): its normaliser (NFC or none), its pre-tokenizer, its BPE on each piece (no added tokens here).
        # NFC never joins characters across whitespace, so normalising each unit is normalising the text.
        norm, pre, model = self.backend.normalizer, self.backend.pre_tokenizer, self.backend.model
        if norm is not None:
            units_in = [norm.normalize_str(u) for u in units]
        else:
            units_in = units
        ids_of = [[t.id for piece, _ in pre.pre_tokenize_str(u) for t in model.tokenize(piece)] for u in units_in]
        lengths = np.fromiter(map(len, ids_of), dtype=np.int64, count=len(units))
        flat = np.fromiter(chain.from_iterable(ids_of), dtype=np.int64, count=int(lengths.sum()))
        return lengths, flat

    def _library(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype) for e in encodings]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        self.stats["texts"] += len(texts)
        if not self.fast:
            self.stats["fallback_texts"] += len(texts)
            return self._library(texts)
        out: list[np.ndarray | None] = [None] * len(texts)
        fallback: list[int] = []
        split: list[int] = []
        for i, text in enumerate(texts):
            if self._unsafe.search(text) or (self._added is not None and self._added.search(text)):
                fallback.append(i)
            else:
                split.append(i)
        if fallback:
            self.stats["fallback_texts"] += len(fallback)
            for i, ids in zip(fallback, self._library([texts[i] for i in fallback])):
                out[i] = ids
        if split:
            chosen = texts if len(split) == len(texts) else [texts[i] for i in split]
            numbers, counts = self._numbers_native(chosen) if self._table is not None else self._numbers(chosen)
            for i, ids in zip(split, self._gather(numbers, counts)):
                out[i] = ids
        return out  # type: ignore[return-value]

    def _numbers(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(U,) unit numbers of all texts' units and (D,) units per text; units not in the table are added."""
        units = [_UNITS.findall(text) for text in texts]
        index = self.index
        missing = list(dict.fromkeys(u for text in units for u in text if u not in index))
        if len(index) + len(missing) > self.max_units:
            self._clear()  # bounded memory; the next chunks refill it with what is frequent
            missing = list(dict.fromkeys(chain.from_iterable(units)))
        if missing:
            self._add(missing)
        counts = np.fromiter(map(len, units), dtype=np.int64, count=len(units))
        index = self.index  # a new dict if it was cleared
        numbers = np.fromiter(map(index.__getitem__, chain.from_iterable(units)), dtype=np.int64, count=counts.sum())
        return numbers, counts

    def _numbers_native(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        codes, offsets = code_points(texts)
        numbers, counts, missing = self._ops.units_lookup(self._table, codes, offsets)
        if self._ops.units_size(self._table) > self.max_units:
            self._clear()  # bounded memory, as above
            numbers, counts, missing = self._ops.units_lookup(self._table, codes, offsets)
        if missing:
            self._add(missing)
        return np.frombuffer(numbers, dtype=np.int64), np.frombuffer(counts, dtype=np.int64)

    def _gather(self, numbers: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
        total = len(numbers)
        self.stats["units"] += total
        lengths = self._length[numbers]
        ends = np.cumsum(lengths)
        # position p of unit u's ids: start[u] + (p - where u's ids begin in the output)
        gather = np.arange(int(ends[-1]) if total else 0) + np.repeat(self._start[numbers] - (ends - lengths), lengths)
        ids = self._ids[gather].astype(self.dtype, copy=False)
        bounds = np.concatenate([[0], ends])[np.concatenate([[0], np.cumsum(counts)])]
        return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _append(buffer: np.ndarray, used: int, values: np.ndarray) -> np.ndarray:
    """Write values after the first `used` entries, growing the buffer by doubling (appends stay amortised O(1))."""
    if used + len(values) > len(buffer):
        grown = np.zeros(max(2 * len(buffer), used + len(values)), dtype=buffer.dtype)
        grown[:used] = buffer[:used]
        buffer = grown
    buffer[used : used + len(values)] = values
    return buffer


def _unit_safe(spec: dict) -> bool:
    """True when units encode alone as they do in place: no normaliser (or NFC, which the clean stage has applied:
    callers drop it), a byte-level pre-tokenizer with GPT-2's regex and no prefix space, a BPE without dropout.
    spec: the tokenizer's JSON (`backend.to_str()`), parsed."""
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        return False
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return False
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and not model.get("dropout")


# Code point ranges whose Unicode class (letter / number / other) is settled in every Unicode version the library and
# Python may use (assigned long ago): the C++ BPE splits units with characters from these only, the library the rest.
_SETTLED = (
    (0x0000, 0x04FF),  # Latin, IPA, Greek, Cyrillic, combining marks
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2010, 0x2027),  # dashes, quotes, ellipsis
    (0x2030, 0x205E),
    (0x20A0, 0x20BF),  # currency
    (0x2100, 0x22FF),  # letterlike, number forms, arrows, mathematical operators
    (0x2460, 0x27BF),  # enclosed alphanumerics, box drawing, shapes, symbols, dingbats
    (0x3001, 0x303F),  # CJK symbols and punctuation (not the ideographic space)
    (0x3040, 0x30FF),  # kana
    (0x3130, 0x318F),  # Hangul compatibility jamo
    (0x3200, 0x32FE),  # enclosed CJK
    (0x4E00, 0x9FEF),  # CJK unified ideographs
    (0xAC00, 0xD7A3),  # Hangul syllables
    (0xFF01, 0xFFEE),  # half- and full-width forms
)


@lru_cache(maxsize=1)
def _char_classes() -> np.ndarray:
    """uint8 per BMP code point for the C++ BPE: 1 letter (\\p{L}), 2 number (\\p{N}), 0 other, 3 not vouched for."""
    import unicodedata

    classes = np.full(0x10000, 3, dtype=np.uint8)
    for lo, hi in _SETTLED:
        for cp in range(lo, hi + 1):
            c = chr(cp)
            category = unicodedata.category(c)
            if category == "Cn" or (c.isspace() and c not in " \t\n\r"):
                continue  # unassigned here (maybe not there), or whitespace the split does not use
            classes[cp] = 1 if category[0] == "L" else 2 if category[0] == "N" else 0
    return classes


@lru_cache(maxsize=1)
def _byte_chars() -> list[str]:
    """GPT-2's byte-to-character map, which byte-level tokenizers spell their vocabulary with."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _native_bpe(ops, spec: dict):
    """ftlm._text's byte-level BPE for a tokenizer that passed _unit_safe (spec: its parsed JSON), or None when it
    is not one it reproduces exactly: a BPE without prefixes, suffixes, ignore_merges or byte fallback, whose
    vocabulary spells every byte and every merge."""
    model = spec.get("model") or {}
    if any(model.get(k) for k in ("continuing_subword_prefix", "end_of_word_suffix", "ignore_merges", "byte_fallback")):
        return None
    vocab = model.get("vocab") or {}
    try:
        byte_ids = np.array([vocab[c] for c in _byte_chars()], dtype=np.int32)
        merges = []
        for m in model.get("merges") or []:
            left, right = m.split(" ", 1) if isinstance(m, str) else m
            merges.append((vocab[left], vocab[right], vocab[left + right]))
    except KeyError:
        return None
    return ops.bpe_new(byte_ids, np.array(merges, dtype=np.int32).reshape(-1, 3), _char_classes())


def _matched_added_tokens(backend) -> list[str]:
    """The added tokens the library cuts out of a text before pre-tokenizing it: the non-special ones, and the
    special ones unless it encodes those as text (ftlm's tokenizers do)."""
    as_text = getattr(backend, "encode_special_tokens", False)
    return [t.content for t in backend.get_added_tokens_decoder().values() if not (t.special and as_text)]
