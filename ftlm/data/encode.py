"""Fast batch encoding for the tokenize stage: the same ids as the tokenizers library, several times faster per core.

For a byte-level BPE (ftlm's own tokenizers, GPT-2 style ones) the library spends most of its time in the
pre-tokenizer's regex, not in BPE. But that regex (GPT-2's: `'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|
\\s+(?!\\S)|\\s+`) never lets a piece cross from a whitespace run into the word after it except for the run's last
character, and no piece of a word reaches past the word. So a text splits into *units*, each a whitespace run and the
word after it ("  세계." or "\\n한국어"), that the library encodes alone to exactly the ids it gives them in place: the
ids of a text are the concatenation of its units' ids. Units repeat (Zipf's law), so each distinct unit is encoded
once, by the library itself, in one batch per chunk of texts, and remembered.

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

from .tokenizer import Tokenizer

_UNITS = re.compile(r"[ \t\n\r]*[^ \t\n\r]+|[ \t\n\r]+")


@lru_cache(maxsize=1)
def _other_whitespace() -> str:
    """Every character any flavour might call whitespace (Python's isspace, Unicode's separators, the C0 controls
    that some engines include), except the four the split uses."""
    import unicodedata

    chars = []
    for cp in range(sys.maxunicode + 1):
        c = chr(cp)
        if c in " \t\n\r":
            continue
        if c.isspace() or unicodedata.category(c) in ("Zs", "Zl", "Zp") or cp < 0x20 or cp in (0x7F, 0x85):
            chars.append(c)
    return "".join(chars)


class FastEncoder:
    """`encode_batch(texts) -> list[np.ndarray]` with the ids `tokenizer.encode_batch` gives, using a table of units
    when the tokenizer allows it (see the module docstring). One per worker process: the table is its own.

    The table keeps every distinct unit's ids in one flat array; a chunk of texts becomes unit numbers (one dict
    lookup per unit) and its ids one numpy gather, so no Python loop runs per token."""

    def __init__(self, tokenizer: Tokenizer, dtype=np.int64, max_units: int = 1 << 20):
        self.dtype, self.max_units = dtype, max_units
        self.backend = tokenizer.backend
        self.fast = _unit_safe(self.backend)
        self.stats = {"texts": 0, "fallback_texts": 0, "units": 0, "unit_misses": 0}
        self._unsafe = re.compile("[" + re.escape(_other_whitespace()) + "]")
        matched = _matched_added_tokens(self.backend)
        self._added = re.compile("|".join(re.escape(t) for t in matched)) if matched else None
        self._clear()

    def _clear(self) -> None:
        self.index: dict[str, int] = {}  # unit -> its number
        self._start = np.zeros(1 << 14, dtype=np.int64)  # unit number -> where its ids begin in _ids
        self._length = np.zeros(1 << 14, dtype=np.int64)
        self._ids = np.zeros(1 << 16, dtype=np.int64)
        self._n_ids = 0

    def _add(self, units: list[str]) -> None:
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
        first = len(self.index)
        self.index.update(zip(units, range(first, first + len(units))))
        self._start = _append(self._start, first, self._n_ids + np.cumsum(lengths) - lengths)
        self._length = _append(self._length, first, lengths)
        self._ids = _append(self._ids, self._n_ids, flat)
        self._n_ids += len(flat)
        self.stats["unit_misses"] += len(units)

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
        units: list[list[str]] = []
        for i, text in enumerate(texts):
            if self._unsafe.search(text) or (self._added is not None and self._added.search(text)):
                fallback.append(i)
            else:
                split.append(i)
                units.append(_UNITS.findall(text))
        if fallback:
            self.stats["fallback_texts"] += len(fallback)
            for i, ids in zip(fallback, self._library([texts[i] for i in fallback])):
                out[i] = ids
        if split:
            for i, ids in zip(split, self._gather(units)):
                out[i] = ids
        return out  # type: ignore[return-value]

    def _gather(self, units: list[list[str]]) -> list[np.ndarray]:
        index = self.index
        missing = list(dict.fromkeys(u for text in units for u in text if u not in index))
        if len(index) + len(missing) > self.max_units:
            self._clear()  # bounded memory; the next chunks refill it with what is frequent
            missing = list(dict.fromkeys(chain.from_iterable(units)))
        if missing:
            self._add(missing)
        counts = np.fromiter(map(len, units), dtype=np.int64, count=len(units))
        total = int(counts.sum())
        self.stats["units"] += total
        numbers = np.fromiter(map(self.index.__getitem__, chain.from_iterable(units)), dtype=np.int64, count=total)
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


def _unit_safe(backend) -> bool:
    """True when units encode alone as they do in place: no normaliser (or NFC, which the clean stage has applied:
    callers drop it), a byte-level pre-tokenizer with GPT-2's regex and no prefix space, a BPE without dropout."""
    spec = json.loads(backend.to_str())
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        return False
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return False
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and not model.get("dropout")


def _matched_added_tokens(backend) -> list[str]:
    """The added tokens the library cuts out of a text before pre-tokenizing it: the non-special ones, and the
    special ones unless it encodes those as text (ftlm's tokenizers do)."""
    as_text = getattr(backend, "encode_special_tokens", False)
    return [t.content for t in backend.get_added_tokens_decoder().values() if not (t.special and as_text)]
