"""Vectorised MinHash signatures and LSH band keys for many documents at once.

Everything after the text itself is numpy over all characters / words / shingles of a batch of documents: no Python
loop per word or per shingle. Per batch:

    texts --lower, utf-32--> code points (C,) --word mask--> word spans (W,) --polynomial hash--> word hashes (W,)
          --n consecutive words--> shingle hashes (S,) --num_perm multiply-shift hashes, min per document--> (D, P)

A "word" is a maximal run of letters, digits and '_' (ASCII) or of any non-ASCII code point that is not a space or
punctuation (so Hangul, CJK and accented Latin are word characters), close to the regex \\w that the old per-document
code used. Documents with fewer than `ngram` words get one shingle of all their words (as datasketch users usually do).

`signatures` runs in C++ when ftlm._text is built (csrc/text/text_ops.cpp: the same arithmetic, bit-identical results,
tested); the numpy code here is its reference and fallback.

Parameters follow datasketch: `threshold`, `num_perm`, `ngram`, `seed`; the bands x rows split is chosen the way
datasketch's MinHashLSH does (minimising weighted false positive / false negative areas), with false negatives weighted
0.95 because every candidate pair is verified on its signatures afterwards (`similarity`), which removes the false
positives that recall-leaning bands let through.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .native import text_ops

_U64 = np.uint64
_WORD_PRIME = _U64(0x100000001B3)  # FNV-style multiplier for the polynomial word hash
_SHINGLE_MULT = _U64(0x9E3779B97F4A7C15)  # golden-ratio constant: combines word hashes into a shingle hash
_MIX1, _MIX2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)  # splitmix64 finaliser
FALSE_NEGATIVE_WEIGHT = 0.95
BLOCK_SHINGLES = 16384  # shingles hashed per numpy block: (num_perm, 16384) uint32 = 8 MB at 128 permutations


def _ascii_word_table() -> np.ndarray:
    table = np.zeros(128, dtype=bool)
    for c in range(128):
        ch = chr(c)
        table[c] = ch.isalnum() or ch == "_"
    return table


_ASCII_WORD = _ascii_word_table()
# Non-ASCII code points that are not word characters: Latin-1 punctuation/symbols, general punctuation, CJK and
# full-width punctuation, and the usual spaces (ranges are inclusive).
_NON_WORD_RANGES = np.array(
    [
        (0x80, 0xBF),
        (0xD7, 0xD7),
        (0xF7, 0xF7),
        (0x2000, 0x206F),
        (0x20A0, 0x20CF),
        (0x2190, 0x23FF),
        (0x2500, 0x27BF),
        (0x3000, 0x3003),
        (0x3008, 0x3020),
        (0xFE30, 0xFE4F),
        (0xFF00, 0xFF0F),
        (0xFF1A, 0xFF20),
        (0xFF3B, 0xFF40),
        (0xFF5B, 0xFF65),
        (0xFFF0, 0xFFFF),
    ],
    dtype=np.uint32,
)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (wrapping uint64 arithmetic): spreads every input bit over the output."""
    x = x ^ (x >> _U64(30))
    x = x * _MIX1
    x = x ^ (x >> _U64(27))
    x = x * _MIX2
    return x ^ (x >> _U64(31))


def word_mask(codes: np.ndarray) -> np.ndarray:
    """(C,) uint32 code points -> (C,) bool: is a word character."""
    ascii_ = codes < 128
    mask = np.where(ascii_, _ASCII_WORD[np.minimum(codes, 127)], True)
    if not ascii_.all():
        high = codes[~ascii_]
        lo, hi = _NON_WORD_RANGES[:, 0], _NON_WORD_RANGES[:, 1]
        k = np.searchsorted(lo, high, side="right") - 1  # the last range starting at or below the code point
        inside = (k >= 0) & (high <= hi[np.maximum(k, 0)])
        mask[~ascii_] = ~inside
    return mask


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(P, 1) odd multipliers a and offsets b of the affine maps x -> a * x + b (mod 2^32), one per permutation.

    Like datasketch's (a * x + b) mod prime, but in uint32 arithmetic, which numpy vectorises; x is a well mixed
    32-bit shingle hash, so the high bits that decide the minimum depend on all of its bits.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 31, size=(num_perm, 1), dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = rng.integers(0, 1 << 32, size=(num_perm, 1), dtype=np.uint32)
    return a, b


# Word characters as one table over the BMP for the C++ path (no range reaches above it: astral code points are words).
assert int(_NON_WORD_RANGES.max()) < 0x10000
_WORD_TABLE = word_mask(np.arange(0x10000, dtype=np.uint32)).view(np.uint8)


def lowered_codes(texts: list[str]) -> np.ndarray:
    """(C,) uint32 code points of the lower-cased documents with NUL between them (NUL is no word character, so words
    never span two documents; a NUL inside a document counts as the space it is, not as a separator)."""
    joined = "\x00".join(t.replace("\x00", " ") if "\x00" in t else t for t in texts).lower()
    return np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def shingle_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (S,) uint64 shingle hashes of all documents and (D+1,) offsets: document d owns [off[d], off[d+1])."""
    n_docs = len(texts)
    codes = lowered_codes(texts)
    if codes.size == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(n_docs + 1, dtype=np.int64)
    # Document of every character: lower() can change lengths (rarely), so find the separators instead of summing.
    doc_of_char = np.cumsum(codes == 0)
    mask = word_mask(codes)
    edges = np.diff(mask.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    if starts.size == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(n_docs + 1, dtype=np.int64)
    # Polynomial hash of each word: sum(c_i * p^(end-1-i)); positions relative to the word's end.
    lengths = ends - starts
    chars = codes[mask].astype(np.uint64)
    rel = (np.repeat(ends, lengths) - 1 - np.flatnonzero(mask)).astype(np.int64)
    powers = _powers(int(lengths.max()))
    word_hash = np.add.reduceat(chars * powers[rel], np.concatenate(([0], np.cumsum(lengths)[:-1])))
    word_hash = _mix(word_hash ^ lengths.astype(np.uint64))
    word_doc = doc_of_char[starts]  # (W,) document of each word, non-decreasing
    words_per_doc = np.bincount(word_doc, minlength=n_docs)
    w_off = np.concatenate(([0], np.cumsum(words_per_doc)))
    # Shingle i = words i..i+n-1 of one document: valid when they all lie in the same document.
    n_words = word_hash.size
    if n_words >= ngram:
        count = n_words - ngram + 1
        acc = word_hash[:count].copy()
        for j in range(1, ngram):
            acc = acc * _SHINGLE_MULT + word_hash[j : j + count]
        same = word_doc[:count] == word_doc[ngram - 1 :]
        full, full_doc = _mix(acc[same]), word_doc[:count][same]
    else:
        full, full_doc = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    # Documents with 1..ngram-1 words: one shingle of all their words.
    short = np.flatnonzero((words_per_doc > 0) & (words_per_doc < ngram))
    if short.size:
        short_hash = np.empty(short.size, dtype=np.uint64)
        for k, d in enumerate(short):  # per short document, not per shingle: they are rare and tiny
            acc = np.zeros(1, dtype=np.uint64)
            for h in word_hash[w_off[d] : w_off[d + 1]]:
                acc = acc * _SHINGLE_MULT + h  # arrays, not scalars: numpy wraps them silently
            short_hash[k] = acc[0]
        full = np.concatenate((full, _mix(short_hash)))
        full_doc = np.concatenate((full_doc, short))
        order = np.argsort(full_doc, kind="stable")
        full, full_doc = full[order], full_doc[order]
    offsets = np.concatenate(([0], np.cumsum(np.bincount(full_doc, minlength=n_docs)))).astype(np.int64)
    return full, offsets


@lru_cache(maxsize=4)
def _powers(n: int) -> np.ndarray:
    """(n,) uint64 powers of the word-hash multiplier, wrapping."""
    steps = np.full(n, _WORD_PRIME, dtype=np.uint64)
    steps[0] = 1
    return np.cumprod(steps, dtype=np.uint64)


def signatures(
    texts: list[str],
    num_perm: int = 128,
    ngram: int = 5,
    seed: int = 1,
    native: bool | None = None,
    codes: np.ndarray | None = None,
) -> np.ndarray:
    """(D, num_perm) uint32 MinHash signatures; a document without words gets all 0xFFFFFFFF (matches nothing).
    native: use ftlm._text (None: when built; False: this file's numpy reference). codes: lowered_codes(texts) when
    the caller has them already."""
    a, b = permutations(num_perm, seed)
    ops = text_ops(native)
    if ops is not None:
        out = np.empty((len(texts), num_perm), dtype=np.uint32)
        codes = lowered_codes(texts) if codes is None else codes
        ops.minhash(codes, len(texts), ngram, a.ravel(), b.ravel(), _WORD_TABLE, out)
        return out
    hashes, offsets = shingle_hashes(texts, ngram)
    out = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    counts = np.diff(offsets)
    docs = np.flatnonzero(counts)
    if not docs.size:
        return out
    x = (hashes >> _U64(32)).astype(np.uint32)  # (S,) the high half: the better mixed one
    # Blocks of whole documents, each (P, s) row-major so the per-document minimum runs along contiguous rows.
    start_doc = 0
    while start_doc < docs.size:
        end_doc = start_doc + 1
        lo = offsets[docs[start_doc]]
        while end_doc < docs.size and offsets[docs[end_doc] + 1] - lo <= BLOCK_SHINGLES:
            end_doc += 1
        block_docs = docs[start_doc:end_doc]
        hi = offsets[block_docs[-1] + 1]
        values = a * x[None, lo:hi]  # (P, s), wrapping
        values += b
        out[block_docs] = np.minimum.reduceat(values, offsets[block_docs] - lo, axis=1).T
        start_doc = end_doc
    return out


def similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of rows of two (N, P) signature arrays -> (N,) float."""
    return (sig_a == sig_b).mean(axis=-1)


def _areas(threshold: float, b: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False positive / false negative areas under the LSH S-curve 1 - (1 - s^r)^b, for arrays of (b, r) at once."""
    lo = np.linspace(0.0, threshold, 201)[None, :]
    hi = np.linspace(threshold, 1.0, 201)[None, :]
    b, r = b[:, None].astype(np.float64), r[:, None].astype(np.float64)
    fp = np.trapezoid(1 - (1 - lo**r) ** b, lo, axis=1)
    fn = np.trapezoid(1 - (1 - (1 - hi**r) ** b), hi, axis=1)
    return fp, fn


@lru_cache(maxsize=16)
def band_params(threshold: float, num_perm: int, false_negative_weight: float = FALSE_NEGATIVE_WEIGHT) -> tuple:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted error areas (datasketch's method; the
    first of equal ones in its loop order, b then r)."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.int64)
    fp, fn = _areas(threshold, pairs[:, 0], pairs[:, 1])
    err = (1 - false_negative_weight) * fp + false_negative_weight * fn
    b, r = pairs[int(np.argmin(err))]
    return int(b), int(r)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(D, P) signatures -> (D, bands) uint64 keys: equal key in the same band = an LSH candidate pair."""
    sigs = sigs.astype(np.uint64)
    keys = np.empty((sigs.shape[0], bands), dtype=np.uint64)
    for band in range(bands):
        acc = np.full(sigs.shape[0], _mix(np.array([band + 1], dtype=np.uint64))[0], dtype=np.uint64)
        for row in range(band * rows, (band + 1) * rows):
            acc = _mix(acc ^ sigs[:, row])
        keys[:, band] = acc
    return keys
