"""Best-fit packing and the Batch it yields: every token kept exactly once, padding masked, positions per document."""

import numpy as np
import pytest
import torch

from ftlm.data.batch import IGNORE_INDEX, Batch
from ftlm.data.packing import PackingStats, best_fit, best_fit_rows, concat_rows


def reference_best_fit(lengths, capacity):
    """Plain O(n * rows) best-fit-decreasing, to check the bisect version against."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (room[r], r))
        else:
            r = len(rows)
            rows.append([])
            room.append(capacity)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_matches_the_plain_algorithm_and_never_overfills(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 33, size=200).tolist()
    rows = best_fit(lengths, 32)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 32 for r in rows)
    assert [sorted(r) for r in rows] == [sorted(r) for r in reference_best_fit(lengths, 32)]


def test_pieces_rows_and_segments():
    capacity, pad = 8, 99
    docs = [np.arange(1, 20), np.array([50, 51, 52]), np.array([60])]  # 19 tokens: cut into 3 + 8 + 8
    rows = best_fit_rows(docs, capacity, pad)
    tokens = [row.tokens[: row.used].tolist() for row in rows]
    assert sorted(t for r in tokens for t in r) == sorted(np.concatenate(docs).tolist())
    assert sum(r.docs for r in rows) == 3 and sum(r.cut_docs for r in rows) == 1
    for row in rows:
        assert (row.tokens[row.used :] == pad).all() and row.starts[0] == 0
    full = [r for r in rows if r.used == capacity and r.starts == [0] and r.docs == 0]
    assert len(full) == 2  # the full pieces of the long document fill rows of their own


@pytest.mark.parametrize("seed", range(4))
def test_no_target_is_another_documents_token_after_a_cut(seed):
    """Best-fit puts a cut document's first piece beside other documents; its last token's next token in the row is
    then another document's, so that target is masked. Every unmasked target follows its input in one document, or
    starts a document after the end of one (end-of-text, in real data)."""
    rng = np.random.default_rng(seed)
    docs = [1000 * (d + 1) + np.arange(int(n)) for d, n in enumerate(rng.integers(1, 40, size=60))]
    last = {int(doc[-1]) for doc in docs}
    rows = best_fit_rows(docs, 16, pad_id=0)
    batch = Batch.from_rows(
        torch.from_numpy(np.stack([r.tokens for r in rows])),
        [r.starts for r in rows],
        [r.used for r in rows],
        [r.unrelated_next for r in rows],
    )
    kept = batch.targets != IGNORE_INDEX
    pairs = zip(batch.inputs[kept].tolist(), batch.targets[kept].tolist())
    assert all(t == x + 1 or (x in last and t % 1000 == 0) for x, t in pairs)
    assert sum(len(r.unrelated_next) for r in rows) > 0  # the case this is about occurs here
    # exactly: a 20-token document cut 4 + 8 + 8 at capacity 8, its 4 beside a 3 and a 1
    rows = best_fit_rows([np.arange(100, 120), np.arange(200, 203), np.array([300])], 8, pad_id=0)
    (mixed,) = [r for r in rows if len(r.starts) == 3]
    assert mixed.tokens.tolist() == [100, 101, 102, 103, 200, 201, 202, 300] and mixed.unrelated_next == [3]


def test_concat_rows_cut_at_row_ends():
    docs = [np.arange(5), np.arange(10, 13), np.arange(20, 27)]
    rows = list(concat_rows(iter(docs), 6))
    assert [r.tokens.tolist() for r in rows] == [[0, 1, 2, 3, 4, 10], [11, 12, 20, 21, 22, 23]]
    assert [r.starts for r in rows] == [[0, 5], [2]] and [r.cut_docs for r in rows] == [1, 1]


def test_batch_positions_targets_and_cu_seqlens():
    rows = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0]])  # row 1: 3 real tokens, then padding (0)
    batch = Batch.from_rows(rows, [[0, 2], [0]], [6, 3])
    assert batch.inputs.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]
    assert batch.targets.tolist() == [[2, 3, 4, 5, 6], [8, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.positions.tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 1]]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 2, 5, 8, 10]
    assert batch.num_tokens == 7
    moved = batch.to("cpu")
    assert torch.equal(moved.inputs, batch.inputs) and moved.cu_seqlens.dtype == torch.int32


def test_packing_stats_report_padding_and_cut_documents():
    docs = [np.arange(1, 4), np.arange(1, 12)]  # 3 tokens, and 11 tokens cut into 3 + 8 at capacity 8
    stats = PackingStats()
    for row in best_fit_rows(docs, 8, 0):
        stats.add(row)
    out = stats.take()
    assert out == {"pad_fraction": 2 / 16, "cut_doc_share": 0.5}
    assert stats.take() == {"pad_fraction": 0.0, "cut_doc_share": 0.0}  # counted afresh after each call
