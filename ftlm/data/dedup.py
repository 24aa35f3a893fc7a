"""Exact and near-duplicate detection across all files of a stream.

Work is split so that the costly part runs in worker processes: `fingerprint` (exact hash + MinHash signature
of one document) is a pure function, and `Deduplicator` (the main process) keeps the set of seen hashes and
the MinHash LSH index of `datasketch`, keeping the first copy of every document in input order.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+")
SCHEME = "affine32"  # datasketch's unbiased 32-bit permutation scheme


@dataclass
class DedupConfig:
    """Settings of `data.dedup`."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # estimated Jaccard similarity of shingle sets above which two documents are near-duplicates
    num_perm: int = 128
    ngram: int = 5  # words per shingle
    seed: int = 1

    @classmethod
    def from_cfg(cls, cfg) -> DedupConfig:
        values = dict(cfg or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"data.dedup: unknown key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        config = cls(**values)
        if not 0.0 < config.threshold < 1.0:
            raise ValueError(f"data.dedup.threshold must be in (0, 1), got {config.threshold}")
        if config.num_perm < 16 or config.ngram < 1:
            raise ValueError("data.dedup.num_perm must be >= 16 and data.dedup.ngram >= 1")
        return config


def exact_key(text: str) -> bytes:
    """Hash of the text with case and whitespace differences removed."""
    canonical = " ".join(text.lower().split())
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).digest()


class Fingerprinter:
    """Computes what the deduplicator needs for one document. Built once per worker process."""

    def __init__(self, config: DedupConfig):
        self.config = config
        self._permutations = None
        if config.near:
            from datasketch import MinHash

            self._minhash = MinHash
            self._permutations = MinHash(num_perm=config.num_perm, seed=config.seed, scheme=SCHEME).permutations

    def __call__(self, text: str) -> tuple[bytes | None, np.ndarray | None]:
        key = exact_key(text) if self.config.exact else None
        if not self.config.near:
            return key, None
        words = _WORD.findall(text.lower())
        n = self.config.ngram
        if len(words) <= n:
            shingles = [" ".join(words).encode("utf-8")]
        else:
            shingles = [" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)]
        # crc32 is stable across processes (unlike hash()) and fast; affine32 re-mixes it before permuting.
        m = self._minhash(
            num_perm=self.config.num_perm,
            seed=self.config.seed,
            hashfunc=zlib.crc32,
            permutations=self._permutations,
            scheme=SCHEME,
        )
        m.update_batch(shingles)
        return key, m.hashvalues


class Deduplicator:
    """Keeps the first of each group of exact or near duplicates, in the order documents are offered."""

    def __init__(self, config: DedupConfig):
        self.config = config
        self.seen: set[bytes] = set()
        self.exact_dropped = 0
        self.near_dropped = 0
        self._lsh = None
        if config.near:
            from datasketch import LeanMinHash, MinHashLSH

            self._lean = LeanMinHash
            self._lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
        self._next_key = 0

    def is_duplicate(self, key: bytes | None, signature: np.ndarray | None) -> str | None:
        """'exact', 'near', or None (then the document is remembered as seen)."""
        if key is not None:
            if key in self.seen:
                self.exact_dropped += 1
                return "exact"
        if signature is not None:
            sketch = self._lean(seed=self.config.seed, hashvalues=signature, scheme=SCHEME)
            if self._lsh.query(sketch):
                self.near_dropped += 1
                return "near"
            self._lsh.insert(self._next_key, sketch, check_duplication=False)
            self._next_key += 1
        if key is not None:
            self.seen.add(key)
        return None
