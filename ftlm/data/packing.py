"""Packing documents into rows of seq_len + 1 tokens: `concat` (back to back) or `best_fit` (Ding et al. 2024).

A row of C = seq_len + 1 tokens gives the model seq_len inputs and seq_len next-token targets. Each document is
its tokens followed by `<|endoftext|>`.

- concat: documents back to back across rows, so a row starts and ends mid-document; nothing is padded.
- best_fit: a document longer than C is cut into pieces: a short first one (its length mod C) and C-token ones that
  fill rows of their own. Pieces and whole documents are then packed best-fit-decreasing within a buffer of
  `data.packing_buffer` documents: longest first, each into the open row with the least room that still holds it,
  else a new row. The room left is `<|pad|>`, which the
  loss ignores. Fewer documents are cut than with concat, at the price of some padding.

Both are pure functions of the documents given, so a loader that knows where a buffer starts can rebuild it exactly.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

PACKINGS = ("concat", "best_fit")


@dataclass
class Row:
    tokens: np.ndarray  # (C,) int64, padded with pad_id after `used`
    starts: list[int]  # offsets in the row where a segment (a document, or a piece of a cut one) starts
    used: int  # tokens that are not padding
    docs: int  # documents that start in this row
    cut_docs: int  # ... of which are cut (best_fit: longer than a row; concat: running past the row's end)
    parts: list[int] = field(default_factory=list)  # best_fit: the document (index in the buffer) of each piece
    part_tokens: list[int] = field(default_factory=list)  # ... and its length
    # best_fit: offsets whose next token in the row is not the next token of their document (the last token of a
    # cut document's first piece, when another piece follows it): their targets are masked
    unrelated_next: list[int] = field(default_factory=list)


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing: item indices per row, rows in the order they were opened. Every length <= capacity.

    Ties are broken by index, so the result depends on the lengths only.
    """
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (room left, row id) of the open rows
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[i]
        if not 0 < need <= capacity:
            raise ValueError(f"item {i} has length {need}, outside 1..{capacity}")
        at = bisect.bisect_left(room, (need, -1))  # the tightest row that still fits
        if at < len(room):
            left, row = room.pop(at)
        else:
            left, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if left - need > 0:
            bisect.insort(room, (left - need, row))
    return rows


def best_fit_rows(docs: Sequence[np.ndarray], capacity: int, pad_id: int) -> list[Row]:
    """Pack documents (each already ending with <|endoftext|>) into rows of `capacity` tokens."""
    pieces: list[tuple[int, int, int]] = []  # (document, start, end)
    for d, doc in enumerate(docs):
        # The short piece first: it holds the document's start and is packed beside others; the full pieces after
        # it fill rows of their own, so a piece never continues mid-row after an unrelated document.
        first = len(doc) % capacity or capacity
        pieces.append((d, 0, first))
        pieces += [(d, s, s + capacity) for s in range(first, len(doc), capacity)]
    rows = []
    for items in best_fit([end - start for _, start, end in pieces], capacity):
        tokens = np.full(capacity, pad_id, np.int64)
        starts, used, n_docs, n_cut, parts, part_tokens, cut_ends = [], 0, 0, 0, [], [], []
        for i in items:
            d, start, end = pieces[i]
            tokens[used : used + end - start] = docs[d][start:end]
            starts.append(used)  # every piece is a segment of its own
            if start == 0:
                n_docs += 1
                n_cut += len(docs[d]) > capacity
            used += end - start
            parts.append(d)
            part_tokens.append(end - start)
            if end < len(docs[d]):  # the document goes on in another row: what follows here is another's
                cut_ends.append(used - 1)
        unrelated = [j for j in cut_ends if j < used - 1]  # last in the row: padding (masked) or nothing follows
        rows.append(Row(tokens, starts, used, n_docs, n_cut, parts, part_tokens, unrelated))
    # In the order of the documents given (the first each row holds), not best-fit's longest-first: a loader reads a
    # buffer's rows in this order, and longest-first would give hundreds of steps of long documents, then of short
    # ones; a validation pass that reads a buffer's first rows would score only the middles of long documents.
    rows.sort(key=lambda row: min(row.parts))
    return rows


def concat_rows(docs: Iterable[np.ndarray], capacity: int, pad_id: int | None = None) -> Iterator[Row]:
    """Documents back to back, cut wherever a row ends (for the finite val loaders; the train loader has its own
    resumable version of this loop). With `pad_id`, the last row, if partly filled, comes too, padded."""
    tokens, starts, used, n_docs, n_cut = np.empty(capacity, np.int64), [], 0, 0, 0
    for doc in docs:
        offset = 0
        while offset < len(doc):
            take = min(capacity - used, len(doc) - offset)
            if offset == 0:
                starts.append(used)
                n_docs += 1
                n_cut += take < len(doc)
            tokens[used : used + take] = doc[offset : offset + take]
            used, offset = used + take, offset + take
            if used == capacity:
                yield Row(tokens, starts, used, n_docs, n_cut)
                tokens, starts, used, n_docs, n_cut = np.empty(capacity, np.int64), [], 0, 0, 0
    if used and pad_id is not None:
        tokens[used:] = pad_id
        yield Row(tokens, starts, used, n_docs, n_cut)


class PackingStats:
    """Counts for the log: share of row tokens that are padding, share of documents cut across rows."""

    def __init__(self):
        self.real = self.pad = self.docs = self.cut = 0

    def add(self, row: Row) -> None:
        self.real += row.used
        self.pad += len(row.tokens) - row.used
        self.docs += row.docs
        self.cut += row.cut_docs

    def take(self) -> dict[str, float]:
        """{'pad_fraction', 'cut_doc_share'} since the previous call, and start counting again."""
        out = {
            "pad_fraction": self.pad / max(self.real + self.pad, 1),
            "cut_doc_share": self.cut / max(self.docs, 1),
        }
        self.__init__()
        return out
