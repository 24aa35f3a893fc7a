import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ftlm.data.batch import Batch
from ftlm.data.checks import DataConfigError
from ftlm.data.prepare import prepare
from ftlm.data.shards import split_dir
from ftlm.data.stream import build_train_loader, build_val_loaders, read_split
from ftlm.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
SEQ, MB = 64, 4


def same(a: Batch, b: Batch) -> bool:
    return all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))


def with_mix(cfg, **mix):
    return OmegaConf.create(dict(cfg, mix=mix))


def rows(batch: Batch) -> torch.Tensor:
    """The (B, S+1) token rows a concat batch was cut from."""
    return torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)


def test_batches_are_packed_documents_separated_by_eot(embedded_prepared):
    cfg, prepared = embedded_prepared
    loader = build_train_loader(OmegaConf.create(cfg), SEQ, MB, 0, 1, seed=1)
    eot = Tokenizer.load(prepared.tokenizer_path).eot_id
    batches = [next(loader) for _ in range(30)]
    assert all(b.shape == (MB, SEQ) and b.inputs.dtype == torch.long for b in batches)
    assert all(torch.equal(b.inputs[:, 1:], b.targets[:, :-1]) for b in batches)
    stream = torch.cat([rows(b).reshape(-1) for b in batches])
    assert stream.max() < Tokenizer.load(prepared.tokenizer_path).vocab_size and stream.min() >= 0
    # the concatenated rows are whole documents separated by <|endoftext|>
    pieces = np.split(stream.numpy(), np.flatnonzero(stream.numpy() == eot) + 1)
    train_docs = {tuple(t.tolist()) for s in ("ko", "en") for t in read_split(split_dir(prepared.out_dir, s, "train"))}
    whole = [p[:-1] for p in pieces[1:-1]]  # the first and last piece may be cut by the sample window
    assert len(whole) > 5 and all(tuple(p.tolist()) in train_docs for p in whole)


@pytest.mark.parametrize("ko", [0.7, 0.3])
def test_observed_token_mix_matches_data_mix(embedded_prepared, ko):
    cfg, _ = embedded_prepared
    loader = build_train_loader(with_mix(cfg, ko=ko, en=round(1 - ko, 6)), 128, 8, 0, 1, seed=3)
    for _ in range(600):  # ~600k tokens: several passes over the (repeated) mix
        next(loader)
    observed = loader.tokens_per_stream / loader.tokens_per_stream.sum()
    assert loader.stream_names == ["ko", "en"]
    assert abs(observed[0] - ko) < 0.03, observed


def test_zero_share_streams_are_left_out(embedded_prepared):
    cfg, _ = embedded_prepared
    loader = build_train_loader(with_mix(cfg, ko=1.0, en=0.0), SEQ, MB, 0, 1, seed=0)
    next(loader)
    assert loader.stream_names == ["ko"]


@pytest.mark.parametrize("past_an_epoch", [False, True])
def test_restored_state_gives_exactly_the_following_batches(embedded_prepared, past_an_epoch, caplog):
    cfg = OmegaConf.create(embedded_prepared[0])
    original = build_train_loader(cfg, SEQ, 8, 0, 1, seed=11)
    with caplog.at_level("INFO", logger="ftlm.data.stream"):
        for _ in range(3):
            next(original)
        while past_an_epoch and original._epoch == 0:  # until a batch reaches into the second epoch
            next(original)
    assert ("epoch 2 of the training mix begins" in caplog.text) == past_an_epoch
    state = json.loads(json.dumps(original.state_dict()))  # what a checkpoint stores
    expected = [next(original) for _ in range(25)]
    resumed = build_train_loader(cfg, SEQ, 8, 0, 1, seed=11)
    resumed.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(expected, (next(resumed) for _ in range(25))))
    fresh = build_train_loader(cfg, SEQ, 8, 0, 1, seed=11)
    assert not same(next(fresh), expected[0])


def test_ranks_read_disjoint_documents_deterministically(embedded_prepared):
    cfg = OmegaConf.create(embedded_prepared[0])
    ranks = [build_train_loader(cfg, SEQ, MB, r, 2, seed=5) for r in range(2)]
    orders = [loader._epoch_order(0) for loader in ranks]
    epoch = ranks[0]._order_all  # the whole epoch; Korean documents appear several times (upsampled by the mix)
    assert sorted(np.concatenate(orders).tolist()) == sorted(epoch.tolist())
    ids, counts = np.unique(epoch, return_counts=True)
    once = set(ids[counts == 1].tolist())
    assert len(once) > 50 and not (set(orders[0].tolist()) & set(orders[1].tolist()) & once)
    again = build_train_loader(cfg, SEQ, MB, 1, 2, seed=5)
    assert all(same(next(ranks[1]), next(again)) for _ in range(5))
    assert not same(next(ranks[0]), next(ranks[1]))


def test_other_world_size_resumes_approximately(embedded_prepared, caplog):
    cfg = OmegaConf.create(embedded_prepared[0])
    two = [build_train_loader(cfg, SEQ, MB, r, 2, seed=5) for r in range(2)]
    states = []
    for loader in two:
        for _ in range(10):
            next(loader)
        states.append(loader.state_dict())
    merged = dict(states[0], ranks={**states[0]["ranks"], **states[1]["ranks"]})
    one = build_train_loader(cfg, SEQ, MB, 0, 1, seed=5)
    one.load_state_dict(merged)
    assert "approximate" in caplog.text
    assert one._epoch == 0 and 0 < one._start <= 2 * max(s["ranks"][str(r)]["pos"] for r, s in enumerate(states))
    assert next(one).shape == (MB, SEQ)


def test_val_loaders_are_finite_reiterable_and_equal_in_length_across_ranks(embedded_prepared):
    cfg = OmegaConf.create(embedded_prepared[0])
    per_rank = [build_val_loaders(cfg, SEQ, MB, r, 2, max_batches=3) for r in range(2)]
    assert set(per_rank[0]) == {"ko", "en"}
    for stream in ("ko", "en"):
        lengths = [len(list(loaders[stream])) for loaders in per_rank]
        assert lengths[0] == lengths[1] == len(per_rank[0][stream]) and 1 <= lengths[0] <= 3
        first, second = list(per_rank[0][stream]), list(per_rank[0][stream])
        assert all(same(a, b) and a.shape == (MB, SEQ) for a, b in zip(first, second))
    root = embedded_prepared[1].out_dir
    val_docs = {tuple(t.tolist()) for t in read_split(split_dir(root, "ko", "val"))}
    assert val_docs and not val_docs & {tuple(t.tolist()) for t in read_split(split_dir(root, "ko", "train"))}


def test_unprepared_data_and_bad_mix_are_clear_errors(embedded_prepared, tmp_path):
    cfg = dict(embedded_prepared[0])
    with pytest.raises(FileNotFoundError, match="data.out_dir"):
        build_train_loader(OmegaConf.create(dict(cfg, out_dir=str(tmp_path))), SEQ, MB, 0, 1, seed=0)
    with pytest.raises(DataConfigError, match="data.mix"):
        build_train_loader(with_mix(cfg, ko=0.5, en=0.6), SEQ, MB, 0, 1, seed=0)
    with pytest.raises(DataConfigError, match="data.mix names unknown"):
        build_train_loader(with_mix(cfg, ko=0.5, fr=0.5), SEQ, MB, 0, 1, seed=0)


def test_compressed_shards_stream_through_the_cache(embedded_prepared, make_data_config, tmp_path):
    """zstd shards are decompressed into a per-process cache folder and give the same documents."""
    cfg, prepared = embedded_prepared
    corpus_dir = Path(prepared.out_dir) / "corpus"
    compressed = make_data_config(
        tmp_path,
        name="zstd",
        sources={"ko": [str(corpus_dir / "ko.jsonl")], "en": [str(corpus_dir / "en.jsonl")]},
        shard_compression="zstd",
        tokenizer=dict(cfg["tokenizer"], path=prepared.tokenizer_path),
    )
    result = prepare(OmegaConf.create(compressed))
    assert list(Path(split_dir(result.out_dir, "ko", "train")).rglob("*.mds.zstd"))
    for split in ("train", "val"):
        plain = read_split(split_dir(prepared.out_dir, "ko", split))
        packed = read_split(split_dir(result.out_dir, "ko", split), cache_dir=str(tmp_path / "read-cache"))
        assert len(plain) == len(packed) and all(np.array_equal(a, b) for a, b in zip(plain, packed))
    loader = build_train_loader(OmegaConf.create(compressed), SEQ, MB, 0, 1, seed=0)
    next(loader)
    assert any(p.name == f"{socket.gethostname()}.{os.getpid()}" for p in (tmp_path / "cache").glob("*/*"))


def test_two_processes_as_two_nodes_on_one_machine(embedded_prepared):
    """Two ranks started at once, each its own node (LOCAL_WORLD_SIZE=1), as two launcher invocations on one host,
    with a gloo process group: their streaming shared memory must not collide, each must see what an in-process
    loader of its rank sees, and the gathered loader state must resume both exactly."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = embedded_prepared[0]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "stream_worker.py"), json.dumps(cfg)],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert outputs[0]["train"] != outputs[1]["train"]
    assert outputs[0]["val_batches"] == outputs[1]["val_batches"]
    sys.path.insert(0, str(Path(__file__).parent))
    from stream_worker import digest

    # state_dict() gathered both ranks' positions; either rank's copy resumes any rank exactly
    assert outputs[0]["state"] == outputs[1]["state"] and set(outputs[0]["state"]["ranks"]) == {"0", "1"}
    for rank, output in enumerate(outputs):
        loader = build_train_loader(OmegaConf.create(cfg), 64, 4, rank, 2, seed=7)
        assert output["train"] == digest([next(loader) for _ in range(6)])
        resumed = build_train_loader(OmegaConf.create(cfg), 64, 4, rank, 2, seed=7)
        resumed.load_state_dict(outputs[0]["state"])
        assert output["after"] == digest([next(resumed) for _ in range(3)])


def test_streaming_example_datasets_load_only_when_used():
    """ftlm.data defers mosaicml-streaming's example datasets (C4 through transformers' AutoTokenizer, vision,
    multimodal), seconds of imports per process; they still work on first use, by attribute or by submodule."""
    code = (
        "import sys, inspect, ftlm.data, streaming; from streaming import StreamingDataset, MDSWriter; "
        "assert 'transformers.models.auto.tokenization_auto' not in sys.modules; "
        "inspect.getmodule(inspect); assert 'transformers.models.auto.tokenization_auto' not in sys.modules; "
        "import streaming.text.c4 as c4; assert c4.StreamingC4.__name__ == 'StreamingC4'; "
        "assert streaming.text.StreamingPile.__name__ == 'StreamingPile'; "
        "from streaming.vision import StreamingCIFAR10; print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_opening_many_datasets_does_not_run_out_of_file_descriptors(tmp_path):
    """streaming attaches to every earlier dataset's shared memory when it opens one and would keep those
    descriptors for good (quadratic growth: 'Too many open files' in a long test run); each dataset now costs a
    constant few."""
    from streaming import MDSWriter

    from ftlm.data.stream import open_dataset

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    counts = []
    for k in range(8):
        folder = tmp_path / f"split{k}"
        with MDSWriter(out=str(folder), columns={"tokens": "ndarray:uint16"}) as writer:
            for i in range(3):
                writer.write({"tokens": np.arange(i + 1, dtype=np.uint16)})
        dataset = open_dataset([str(folder)], str(tmp_path / "cache"))
        assert dataset[2]["tokens"].tolist() == [0, 1, 2]
        counts.append(open_fds())
    growth = np.diff(counts)
    assert growth.max() <= 10 and growth[-1] <= growth[0] + 2, counts  # constant per dataset, not growing with k
