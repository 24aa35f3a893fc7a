"""The train and val loaders with data.packing=best_fit: an epoch keeps every token exactly once, padding is masked
and reported, positions restart per document, and a saved position resumes bitwise."""

import json
from collections import Counter

import numpy as np
import torch
from omegaconf import OmegaConf

from ftlm.data.batch import IGNORE_INDEX
from ftlm.data.layout import COLUMN
from ftlm.data.stream import build_train_loader, build_val_loaders
from ftlm.data.tokenizer import Tokenizer

SEQ = 128
C = SEQ + 1


def best_fit_cfg(cfg, **extra):
    return OmegaConf.create(dict(cfg, packing="best_fit", packing_buffer=64, **extra))


def segments(batch) -> list[list[int]]:
    """The real tokens of every row, split where positions restart (document or piece starts)."""
    out = []
    for b in range(batch.inputs.shape[0]):
        valid = (batch.targets[b] != IGNORE_INDEX).nonzero()
        used = int(valid[-1]) + 2  # the row's non-padding tokens: the last valid target is the last real token
        row = torch.cat([batch.inputs[b], batch.targets[b, -1:]]).tolist()[:used]
        pos = batch.positions[b].tolist() + [0]
        starts = [j for j in range(used) if j < SEQ and pos[j] == 0] + [used]
        out += [row[s:e] for s, e in zip(starts, starts[1:])]
    return out


def masked_only_where_the_next_token_is_not_the_documents(batch, pad: int) -> bool:
    """A target is masked only for padding, or where the next token of the row starts another segment or is padding
    (the last real token of a row, a cut piece's end beside another document)."""
    S = batch.inputs.shape[1]
    for b, j in (batch.targets == IGNORE_INDEX).nonzero().tolist():
        if batch.inputs[b, j] == pad:
            continue
        if j + 1 < S and batch.positions[b, j + 1] != 0 and batch.inputs[b, j + 1] != pad:
            return False
    return True


def test_an_epoch_of_best_fit_keeps_every_token_once(embedded_prepared):
    cfg, prepared = embedded_prepared
    tokenizer = Tokenizer.load(prepared.tokenizer_path)
    eot, pad = tokenizer.eot_id, tokenizer.pad_id
    loader = build_train_loader(best_fit_cfg(cfg), SEQ, 1, 0, 1, seed=2, prepared=prepared)
    expected = [
        np.concatenate([loader.dataset[int(i)][COLUMN].astype(np.int64), [eot]]).tolist()
        for i in loader._epoch_order(0)
    ]
    seen, batches, reported_pad = [], 0, 0.0
    while True:
        batch = next(loader)
        row_stats = loader.stats()  # of this one row
        if loader._epoch > 0:  # this row is the next epoch's
            break
        batches += 1
        seen += segments(batch)
        reported_pad += row_stats["pad_fraction"] * C
        assert masked_only_where_the_next_token_is_not_the_documents(batch, pad)

    assert Counter(t for s in seen for t in s) == Counter(t for d in expected for t in d)  # no token lost or doubled
    short_docs = Counter(tuple(d) for d in expected if len(d) < C)
    short_seen = Counter(tuple(s) for s in seen if len(s) < C and s[-1] == eot)
    assert short_seen == short_docs  # every document that fits in a row arrives whole, exactly as often as drawn
    decoded = sorted(tokenizer.decode(list(d)) for d in short_seen.elements())
    assert decoded == sorted(tokenizer.decode(d) for d in expected if len(d) < C)
    cut = sum(len(d) > C for d in expected)
    assert 0 < cut < len(expected)
    pad_tokens = batches * C - sum(len(d) for d in expected)
    assert abs(reported_pad - pad_tokens) < 1e-6 and 0 < pad_tokens / (batches * C) < 0.2
    # the share of cut documents, over a whole epoch at once
    again = build_train_loader(best_fit_cfg(cfg), SEQ, batches, 0, 1, seed=2, prepared=prepared)
    next(again)
    shares = again.stats()
    assert abs(shares["cut_doc_share"] - cut / len(expected)) < 1e-9
    assert abs(shares["pad_fraction"] - pad_tokens / (batches * C)) < 1e-9


def test_best_fit_resumes_bitwise_and_positions_restart(embedded_prepared):
    cfg = best_fit_cfg(embedded_prepared[0])
    loader = build_train_loader(cfg, 64, 4, 0, 1, seed=9)
    for _ in range(37):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [next(loader) for _ in range(30)]
    resumed = build_train_loader(cfg, 64, 4, 0, 1, seed=9)
    resumed.load_state_dict(state)
    for a, b in zip(expected, (next(resumed) for _ in range(30))):
        assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))
    batch = expected[0]
    B, S = batch.inputs.shape
    cu = batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == B * S and all(i * S in cu for i in range(B)) and cu == sorted(set(cu))
    flat = batch.positions.reshape(-1)
    for start, end in zip(cu, cu[1:]):  # positions count 0, 1, 2, ... within every segment
        assert flat[start:end].tolist() == list(range(end - start))


def test_val_loaders_yield_batches_with_the_same_masking(embedded_prepared):
    cfg, prepared = embedded_prepared
    tokenizer = Tokenizer.load(prepared.tokenizer_path)
    for packing in ("concat", "best_fit"):
        loaders = build_val_loaders(OmegaConf.create(dict(cfg, packing=packing)), 64, 2, 0, 1, max_batches=2)
        assert set(loaders) == {"ko", "en"}
        for batches in (list(loader) for loader in loaders.values()):
            assert batches and all(b.inputs.shape == (2, 64) and b.cu_seqlens.dtype == torch.int32 for b in batches)
            for b in batches:
                assert masked_only_where_the_next_token_is_not_the_documents(b, tokenizer.pad_id)


def test_a_validation_pass_reads_every_held_out_document_once(embedded_prepared):
    """Given batches enough, the ranks' passes together hold each val document exactly once, the short split (ko:
    fewer tokens than one batch) padded rather than repeated; best_fit's rows come in document order, so a pass of
    few batches scores documents from their start, as training does, not only the middles of long ones."""
    from ftlm.data.stream import open_dataset, split_dir

    cfg, prepared = embedded_prepared
    tokenizer = Tokenizer.load(prepared.tokenizer_path)
    for packing in ("concat", "best_fit"):
        data = OmegaConf.create(dict(cfg, packing=packing))
        for stream in ("ko", "en"):
            split = open_dataset([split_dir(prepared.out_dir, stream, "val")], cfg["cache_dir"])
            docs = [split[i][COLUMN].astype(np.int64).tolist() + [tokenizer.eot_id] for i in range(split.num_samples)]
            read = Counter()
            for rank in range(2):
                loader = build_val_loaders(data, SEQ, 2, rank, 2, max_batches=10**6, prepared=prepared)[stream]
                for batch in loader:
                    read.update(t for seg in segments_of_real_tokens(batch, tokenizer.pad_id) for t in seg)
            assert read == Counter(t for d in docs for t in d), (packing, stream)
        first = next(iter(build_val_loaders(data, SEQ, 2, 0, 1, max_batches=1, prepared=prepared)["en"]))
        starts = int((first.positions == 0).sum()) - first.inputs.shape[0]  # segment starts inside rows
        assert starts > 0, packing  # documents (or their first pieces) begin within the first batch


def segments_of_real_tokens(batch, pad: int) -> list[list[int]]:
    """Every row's tokens up to its padding (a row of padding alone gives none)."""
    out = []
    for b in range(batch.inputs.shape[0]):
        row = torch.cat([batch.inputs[b], batch.targets[b, -1:]]).tolist()
        valid = (batch.targets[b] != IGNORE_INDEX).nonzero()
        out.append(row[: int(valid[-1]) + 2] if len(valid) else [])
    return out
