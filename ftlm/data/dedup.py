"""Exact and near-duplicate removal that scales past one process: staged, hash-partitioned, spilled to disk.

Stages (each a set of independent tasks; `ftlm.data.pipeline` runs them on the configured executor):

  1. fingerprint (per input task, with cleaning): the exact key of every document (blake2b of its case- and
     whitespace-folded text) and its MinHash signature (`ftlm.data.minhash`), then rows
     [key, doc id] and [band, band key, doc id] written to disk sorted by partition (key mod `partitions`)
  2. pairs (per stream and partition): read that partition's rows of every task, group equal keys: an exact group is
     a set of identical documents; an LSH bucket gives candidate pairs, kept when their signatures agree on at least
     `threshold` of their positions (the estimated Jaccard similarity)
  3. clusters (per stream): union-find over the pairs (only documents with a duplicate appear there); every cluster
     keeps its first document in input order and drops the others
  4. filter: each input task drops its documents named by stage 3 (done while tokenizing)

No process holds the index of a whole stream: stage 2 holds one partition's rows, stage 3 only the duplicate pairs.
A document id is (task index << 32) | index of the document in that task, so ids sort in input order.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from . import minhash
from .clean import char_tables
from .native import text_ops

EXACT, NEAR = 0, 1
REASONS = ("exact", "near")
BUCKET_FANOUT = 16  # a bucket member is compared with at most this many earlier members (enough for connectivity)


@dataclass
class DedupConfig:
    """Settings of `data.dedup` (datasketch's names and meaning)."""

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

    @property
    def bands(self) -> tuple[int, int]:
        return minhash.band_params(self.threshold, self.num_perm)


def exact_key(text: str) -> bytes:
    """Hash of the text with case and whitespace differences removed."""
    canonical = " ".join(text.lower().split())
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).digest()


def exact_keys(texts: list[str], native: bool | None = None, codes: np.ndarray | None = None) -> np.ndarray:
    """(D, 2) uint64: the 128-bit exact keys (`exact_key` of each text). native: the canonical texts come from
    ftlm._text (None: when built), hashed the same way; codes: minhash.lowered_codes(texts) if the caller has them."""
    ops = text_ops(native)
    if ops is None or not texts:
        blob = b"".join(exact_key(t) for t in texts)
    else:
        codes = minhash.lowered_codes(texts) if codes is None else codes
        canonical, offsets = ops.canonical(codes, len(texts), char_tables()["space"])
        view, at = memoryview(canonical), np.frombuffer(offsets, dtype=np.int64).tolist()
        blob = b"".join(hashlib.blake2b(view[at[i] : at[i + 1]], digest_size=16).digest() for i in range(len(texts)))
    return np.frombuffer(blob, dtype=np.uint64).reshape(len(texts), 2).copy()


def doc_ids(task_index: int, n: int) -> np.ndarray:
    return (np.uint64(task_index) << np.uint64(32)) | np.arange(n, dtype=np.uint64)


# -- stage 1: fingerprints and partitioned rows ---------------------------------------------------------------------
def _paths(directory: str, task_index: int) -> dict[str, str]:
    base = os.path.join(directory, "rows", str(task_index))
    return {
        "sig": os.path.join(directory, "sig", f"{task_index}.npy"),
        "exact": base + ".exact.npy",
        "exact_off": base + ".exact.off.npy",
        "near": base + ".near.npy",
        "near_off": base + ".near.off.npy",
    }


def _save(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _by_partition(rows: np.ndarray, part: np.ndarray, partitions: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(part, kind="stable")
    offsets = np.concatenate(([0], np.cumsum(np.bincount(part, minlength=partitions)))).astype(np.int64)
    return rows[order], offsets


def fingerprint(texts: list[str], config: DedupConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    """-> exact keys (D, 2) uint64 (None if data.dedup.exact is off), signatures (D, P) uint32 (None if near is off)."""
    codes = minhash.lowered_codes(texts) if text_ops() is not None and texts else None  # shared by both
    keys = exact_keys(texts, codes=codes) if config.exact else None
    sigs = minhash.signatures(texts, config.num_perm, config.ngram, config.seed, codes=codes) if config.near else None
    return keys, sigs


def write_rows(
    directory: str,
    task_index: int,
    keys: np.ndarray | None,
    sigs: np.ndarray | None,
    config: DedupConfig,
    partitions: int,
) -> None:
    """Stage 1 for the documents of one task (in order): signatures and both kinds of rows, sorted by partition."""
    paths = _paths(directory, task_index)
    p = np.uint64(partitions)
    if keys is not None:
        ids = doc_ids(task_index, len(keys))
        rows = np.column_stack((keys, ids))  # (D, 3): key hi, key lo, doc id
        rows, off = _by_partition(rows, (keys[:, 0] % p).astype(np.int64), partitions)
        _save(paths["exact"], rows)
        _save(paths["exact_off"], off)
    if sigs is not None:
        ids = doc_ids(task_index, len(sigs))
        _save(paths["sig"], sigs)
        bands, rows_per_band = config.bands
        band_keys = minhash.band_keys(sigs, bands, rows_per_band)  # (D, bands)
        band = np.broadcast_to(np.arange(bands, dtype=np.uint64), band_keys.shape)
        rows = np.column_stack((band.ravel(), band_keys.ravel(), np.repeat(ids, bands)))  # (D * bands, 3)
        rows, off = _by_partition(rows, (band_keys.ravel() % p).astype(np.int64), partitions)
        _save(paths["near"], rows)
        _save(paths["near_off"], off)


# -- stage 2: pairs per partition -----------------------------------------------------------------------------------
def _partition_rows(directory: str, tasks: list[int], kind: str, partition: int) -> np.ndarray:
    parts = []
    for t in tasks:
        paths = _paths(directory, t)
        if not os.path.exists(paths[kind]):
            continue
        off = np.load(paths[f"{kind}_off"])
        rows = np.load(paths[kind], mmap_mode="r")  # only this partition's slice is read
        parts.append(np.asarray(rows[off[partition] : off[partition + 1]]))
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.uint64)


def _groups(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (col 0, col 1, id) -> (sorted rows, start index of each row's group)."""
    rows = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]
    new = np.ones(len(rows), dtype=bool)
    new[1:] = (rows[1:, 0] != rows[:-1, 0]) | (rows[1:, 1] != rows[:-1, 1])
    starts = np.flatnonzero(new)
    return rows, np.repeat(starts, np.diff(np.append(starts, len(rows))))


def _signatures(directory: str, ids: np.ndarray) -> np.ndarray:
    """(U,) sorted doc ids -> (U, P) signatures, read from each task's file (memory-mapped)."""
    tasks = (ids >> np.uint64(32)).astype(np.int64)
    index = (ids & np.uint64(0xFFFFFFFF)).astype(np.int64)
    out = None
    for t in np.unique(tasks):
        sigs = np.load(_paths(directory, int(t))["sig"], mmap_mode="r")
        sel = tasks == t
        if out is None:
            out = np.empty((len(ids), sigs.shape[1]), dtype=np.uint32)
        out[sel] = sigs[index[sel]]
    return out if out is not None else np.zeros((0, 0), dtype=np.uint32)


def find_pairs(directory: str, tasks: list[int], partition: int, config: DedupConfig) -> dict:
    """Stage 2 for one partition of one stream: write pairs/<partition>.npy, (E, 3) uint64 [first id, id, kind]."""
    found = []
    if config.exact:
        rows, group = _groups(_partition_rows(directory, tasks, "exact", partition))
        dup = np.flatnonzero(group != np.arange(len(rows)))
        found.append(np.column_stack((rows[group[dup], 2], rows[dup, 2], np.full(len(dup), EXACT, np.uint64))))
    candidates = 0
    if config.near:
        rows, group = _groups(_partition_rows(directory, tasks, "near", partition))
        position = np.arange(len(rows)) - group
        pairs = []
        for k in range(BUCKET_FANOUT):  # member at position p pairs with the members at positions 0 .. fanout-1 < p
            sel = np.flatnonzero(position > k)
            if not sel.size:
                break
            pairs.append(np.column_stack((rows[group[sel] + k, 2], rows[sel, 2])))
        if pairs:
            pairs = np.unique(np.concatenate(pairs), axis=0)
            candidates = len(pairs)
            ids, inverse = np.unique(pairs, return_inverse=True)
            sigs = _signatures(directory, ids)
            inverse = inverse.reshape(pairs.shape)
            similar = minhash.similarity(sigs[inverse[:, 0]], sigs[inverse[:, 1]]) >= config.threshold
            near = pairs[similar]
            found.append(np.column_stack((near, np.full(len(near), NEAR, np.uint64))))
    edges = np.concatenate(found) if found else np.zeros((0, 3), dtype=np.uint64)
    _save(os.path.join(directory, "pairs", f"{partition}.npy"), edges.astype(np.uint64))
    return {"pairs": int(len(edges)), "candidates": int(candidates)}


# -- stage 3: clusters ---------------------------------------------------------------------------------------------
def components(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """Union-find over edges (u, v) of nodes 0..n-1, vectorised: label of each node = smallest node of its component."""
    labels = np.arange(n)
    if not len(u):
        return labels
    while True:
        lu, lv = labels[u], labels[v]
        low = np.minimum(lu, lv)
        new = labels.copy()
        np.minimum.at(new, lu, low)  # hook both roots under the smaller one
        np.minimum.at(new, lv, low)
        while True:  # pointer jumping: every node points at its root again
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, labels):
            return labels
        labels = new


def clusters(directory: str, partitions: int) -> dict:
    """Stage 3 for one stream: write drops/<task>.npy, (k, 2) int64 [index in task, EXACT or NEAR], for every task
    that loses documents; -> {"exact": n, "near": n}."""
    edges = [np.load(os.path.join(directory, "pairs", f"{p}.npy")) for p in range(partitions)]
    edges = np.concatenate(edges) if edges else np.zeros((0, 3), dtype=np.uint64)
    ids, inverse = np.unique(edges[:, :2], return_inverse=True)  # only documents that have a duplicate
    inverse = inverse.reshape(-1, 2)
    every = components(inverse[:, 0], inverse[:, 1], len(ids))
    exact = edges[:, 2] == EXACT
    same = components(inverse[exact, 0], inverse[exact, 1], len(ids))
    dropped = np.flatnonzero(every != np.arange(len(ids)))
    reason = np.where(same[dropped] != dropped, EXACT, NEAR)
    tasks = (ids[dropped] >> np.uint64(32)).astype(np.int64)
    index = (ids[dropped] & np.uint64(0xFFFFFFFF)).astype(np.int64)
    for t in np.unique(tasks):
        sel = tasks == t
        _save(os.path.join(directory, "drops", f"{t}.npy"), np.column_stack((index[sel], reason[sel])))
    return {"exact": int((reason == EXACT).sum()), "near": int((reason == NEAR).sum())}


def drops(directory: str, task_index: int) -> np.ndarray:
    """(k, 2) [index in task, reason] of the documents stage 3 dropped from one task (empty if none)."""
    path = os.path.join(directory, "drops", f"{task_index}.npy")
    return np.load(path) if os.path.exists(path) else np.zeros((0, 2), dtype=np.int64)


def deduplicate(texts: list[str], config: DedupConfig, directory: str, partitions: int = 2) -> list[str | None]:
    """All stages in this process over one list of documents -> per document None (kept), 'exact' or 'near'.

    For tests and small jobs; the pipeline runs the stages as tasks."""
    write_rows(directory, 0, *fingerprint(texts, config), config, partitions)
    for p in range(partitions):
        find_pairs(directory, [0], p, config)
    clusters(directory, partitions)
    out: list[str | None] = [None] * len(texts)
    for index, reason in drops(directory, 0):
        out[int(index)] = REASONS[int(reason)]
    return out
