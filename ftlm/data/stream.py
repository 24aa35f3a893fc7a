"""Token shards -> packed training batches, mixed across streams, deterministic per rank, exactly resumable.

Reading is `streaming`'s: one `StreamingDataset` over `streaming.Stream`s, local or remote (s3://, gs://, ...
with a local cache), each Stream weighted by its `proportion`. `data.mix` gives shares of *tokens*; documents
differ in length between streams, so each proportion is the token share divided by the stream's mean document
length (from `ftlm.json`), which makes the expected token shares exactly `data.mix`.

The order of documents is ours, not `StreamingDataset.__iter__`'s: every epoch, `resample_streams(epoch)` gives the
weighted multiset of documents, a permutation seeded by (seed, epoch) orders them, and rank r takes every
world_size-th one starting at r. Each rank packs its documents back to back, separated by `<|endoftext|>`, into
rows of seq_len + 1 tokens. So a rank's stream is a pure function of (seed, rank, world size, data), ranks never
wait on each other, and the loader's position is three integers: that is what `state_dict()` saves.

Each process opens its datasets as a "world of one" under a machine-wide file lock. streaming's shared memory
coordinates processes of one node; here nothing needs coordinating (every rank reads by index), and the lock
makes the choice of shared-memory names atomic, so several nodes on one machine, several jobs, and several
datasets in one process (train + one val per stream) never collide.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch

from .checks import as_dict, check_mix, stream_names
from .prepare import STATS_FILE, TOKENIZER_FILE, expand_path
from .shards import COLUMN, read_meta, split_dir
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


# -- opening datasets ----------------------------------------------------------------------------------------------
@contextmanager
def _world_of_one():
    """Let streaming see a single process, with registration of its shared memory atomic across the machine."""
    import fcntl

    with open(os.path.join(tempfile.gettempdir(), "ftlm-streaming.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = {k: os.environ.get(k) for k in _WORLD_ENV}
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        try:
            with mock.patch.object(torch.distributed, "is_initialized", lambda: False):
                yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release_dead_caches(cache_root: str) -> None:
    """Remove cache folders of processes that died, and the shared memory that still names them."""
    from multiprocessing.shared_memory import SharedMemory

    from streaming.base.constant import LOCALS, SHM_TO_CLEAN

    dead = []
    for name in os.listdir(cache_root) if os.path.isdir(cache_root) else []:
        match = re.fullmatch(r"pid(\d+)", name)
        if match and not _pid_alive(int(match.group(1))):
            dead.append(os.path.join(cache_root, name))
    if not dead:
        return
    for prefix in range(10000):
        try:
            shm = SharedMemory(f"{prefix:06}_{LOCALS}", create=False)
        except FileNotFoundError:
            break
        except PermissionError:
            continue
        data = bytes(shm.buf)
        shm.close()
        size = int(np.frombuffer(data[:4], np.int32)[0])
        registered = data[4:size].decode("utf-8", errors="replace").split("\0")[:-1] if size > 4 else []
        if any(path.startswith(tuple(dead)) for path in registered):
            for name in SHM_TO_CLEAN:
                try:
                    stale = SharedMemory(f"{prefix:06}_{name}", create=False)
                    stale.close()
                    stale.unlink()
                except (FileNotFoundError, PermissionError):
                    pass
    for path in dead:
        shutil.rmtree(path, ignore_errors=True)


def _is_compressed(directory: str) -> bool:
    with open(os.path.join(directory, "index.json"), encoding="utf-8") as f:
        return any(shard.get("compression") for shard in json.load(f).get("shards", []))


def _stream(directory: str, cache_dir: str, proportion: float | None):
    """A streaming.Stream reading `directory`: in place when it is local and uncompressed, else via the cache."""
    from streaming import Stream

    if "://" not in directory and not _is_compressed(directory):
        return Stream(local=directory, proportion=proportion)
    # Decompressing or downloading writes files: each process gets its own folder, so none races another.
    root = os.path.join(expand_path(cache_dir), hashlib.sha1(directory.encode()).hexdigest()[:12])
    _release_dead_caches(root)
    return Stream(remote=directory, local=os.path.join(root, f"pid{os.getpid()}"), proportion=proportion)


def open_dataset(
    directories: list[str],
    cache_dir: str,
    proportions: list[float] | None = None,
    epoch_size: int | None = None,
    cache_limit: str | None = None,
    seed: int = 0,
):
    """A StreamingDataset over split directories (local paths or URLs), read by index."""
    from streaming import StreamingDataset

    proportions = proportions or [None] * len(directories)
    with _world_of_one():
        streams = [_stream(d, cache_dir, p) for d, p in zip(directories, proportions)]
        return StreamingDataset(
            streams=streams,
            shuffle=False,
            batch_size=1,
            epoch_size=epoch_size,
            cache_limit=cache_limit,
            shuffle_seed=seed,
            sampling_method="balanced",
        )


def read_split(directory: str, cache_dir: str | None = None) -> list[np.ndarray]:
    """Every document's tokens of one split, in order (for tests and inspection)."""
    meta = read_meta(directory)
    if meta is not None and meta["docs"] == 0:
        return []
    dataset = open_dataset([directory], cache_dir or os.path.join(tempfile.gettempdir(), "ftlm-read-cache"))
    return [dataset[i][COLUMN] for i in range(dataset.num_samples)]


# -- where the prepared data is ------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    """Same as conf/data/*.yaml's data.cache_dir."""
    return os.path.join(os.environ.get("FTLM_CACHE", "~/.cache/ftlm"), "streaming")


def _prepared(cfg: dict) -> tuple[str, Tokenizer]:
    out_dir = expand_path(cfg["out_dir"])
    tokenizer_path = os.path.join(out_dir, TOKENIZER_FILE)
    if not os.path.isfile(os.path.join(out_dir, STATS_FILE)) or not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(
            f"no prepared data in data.out_dir={out_dir}: run `ftlm-prepare` with the same data "
            f"config first (ftlm-train does it by itself)"
        )
    root = cfg.get("remote") or out_dir
    return root, Tokenizer.load(tokenizer_path)


def _split_meta(root: str, stream: str, split: str, cache_dir: str) -> dict:
    directory = split_dir(root, stream, split)
    meta = read_meta(directory, os.path.join(expand_path(cache_dir), "meta", stream, split))
    if meta is None:
        raise FileNotFoundError(f"{directory}: no {split} shards prepared by ftlm-prepare (ftlm.json missing)")
    return meta


# -- training ------------------------------------------------------------------------------------------------------
class PackedTrainLoader:
    """Endless (micro_batch_size, seq_len + 1) LongTensors for one rank; `state_dict()` resumes exactly."""

    def __init__(
        self,
        dataset,
        stream_names: list[str],
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        eot_id: int,
        signature: dict,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if dataset.epoch_size < world_size:
            raise ValueError(f"data.epoch_size={dataset.epoch_size} documents cannot be split over {world_size} ranks")
        self.dataset = dataset
        self.stream_names = stream_names
        self.row = seq_len + 1
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.eot_id = eot_id
        self.signature = signature  # what must not change for a saved position to mean the same documents
        self.stream_of_sample = np.repeat(np.arange(len(stream_names)), dataset.samples_per_stream)
        self.tokens_per_stream = np.zeros(len(stream_names), np.int64)  # what this rank has emitted, by stream
        self._epoch = self._start = self._pos = self._offset = 0
        self._order_epoch, self._order_all = -1, np.empty(0, np.int64)
        self._doc_key, self._doc = None, np.empty(0, np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This epoch's documents for this rank (global sample ids)."""
        if self._order_epoch != epoch:
            _, ids = self.dataset.resample_streams(epoch)  # the Streams' proportions, resampled per epoch
            ids = ids[np.random.default_rng([self.seed, epoch]).permutation(len(ids))]
            self._order_epoch, self._order_all = epoch, ids
        return self._order_all[self._start + self.rank :: self.world_size]

    def _document(self) -> np.ndarray:
        order = self._epoch_order(self._epoch)
        while self._pos >= len(order):  # epoch done: the next one starts from its beginning
            self._epoch, self._start, self._pos, self._offset = self._epoch + 1, 0, 0, 0
            order = self._epoch_order(self._epoch)
        key = (self._epoch, self._start, self._pos)
        if self._doc_key != key:
            sample = int(order[self._pos])
            tokens = self.dataset[sample][COLUMN]
            self._doc = np.concatenate([tokens.astype(np.int64), [self.eot_id]])
            self._doc_stream = self.stream_of_sample[sample]
            self._doc_key = key
        return self._doc

    def __iter__(self) -> PackedTrainLoader:
        return self

    def __next__(self) -> torch.Tensor:
        batch = np.empty((self.micro_batch_size, self.row), np.int64)
        flat = batch.reshape(-1)
        filled = 0
        while filled < flat.size:
            doc = self._document()
            take = min(flat.size - filled, len(doc) - self._offset)
            flat[filled : filled + take] = doc[self._offset : self._offset + take]
            self.tokens_per_stream[self._doc_stream] += take
            filled += take
            self._offset += take
            if self._offset == len(doc):
                self._pos, self._offset = self._pos + 1, 0
        return torch.from_numpy(batch)

    # -- resumption ------------------------------------------------------------------------------------------------
    def _cursor(self) -> dict:
        return {"epoch": self._epoch, "start": self._start, "pos": self._pos, "offset": self._offset}

    def state_dict(self) -> dict:
        """Small JSON-serialisable position of every rank.

        In a distributed run this gathers the cursors of all ranks (a collective: call it on every rank at the same
        point, as a checkpoint save does); every rank returns the same dict, so any rank may save it.
        """
        cursors = {str(self.rank): self._cursor()}
        dist = torch.distributed
        if (
            self.world_size > 1
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() == self.world_size
        ):
            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, cursors)
            cursors = {k: v for part in gathered for k, v in part.items()}
        return {
            "version": STATE_VERSION,
            "world_size": self.world_size,
            "seed": self.seed,
            "signature": self.signature,
            "ranks": cursors,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        if state.get("signature") != self.signature or state.get("seed") != self.seed:
            logger.warning(
                "the data mix, epoch size, corpus or seed changed since this loader state was saved: "
                "resuming at the same position of a different document order"
            )
        ranks = state["ranks"]
        if state["world_size"] == self.world_size and str(self.rank) in ranks:
            cursor = ranks[str(self.rank)]
            self._epoch, self._start, self._pos, self._offset = (
                int(cursor[k]) for k in ("epoch", "start", "pos", "offset")
            )
        else:
            self._resume_elastic(state)
        self._doc_key = None

    def _resume_elastic(self, state: dict) -> None:
        """Another world size: restart the oldest saved epoch after the documents every old rank had finished."""
        old_world, cursors = state["world_size"], list(state["ranks"].values())
        epoch = min(c["epoch"] for c in cursors)
        done = min(c["start"] + c["pos"] * old_world for c in cursors if c["epoch"] == epoch)
        self._epoch, self._start, self._pos, self._offset = epoch, done, 0, 0
        logger.warning(
            "resuming the data loader saved by %d rank(s) on %d rank(s): approximate; epoch %d restarts "
            "after its first %d documents (some documents may be seen twice)",
            old_world,
            self.world_size,
            epoch,
            done,
        )


def _mix_proportions(cfg: dict, streams: list[str], metas: dict[str, dict]) -> tuple[list[str], list[float] | None]:
    """Streams to train on, and each one's streaming proportion (documents) for its share of tokens."""
    mix = check_mix(cfg, streams)
    if not mix:
        return streams, None
    used = [s for s in streams if mix[s] > 0]
    for s in used:
        if metas[s]["docs"] == 0:
            raise ValueError(f"data.mix.{s}={mix[s]} but stream {s} has no training documents")
    mean_doc_tokens = {s: (metas[s]["tokens"] + metas[s]["docs"]) / metas[s]["docs"] for s in used}  # +1: <|endoftext|>
    weights = [mix[s] / mean_doc_tokens[s] for s in used]
    return used, [w / sum(weights) for w in weights]


def build_train_loader(
    data_cfg, seq_len: int, micro_batch_size: int, rank: int, world_size: int, seed: int
) -> PackedTrainLoader:
    cfg = as_dict(data_cfg)
    streams = stream_names(cfg)
    check_mix(cfg, streams)
    if seq_len < 1 or micro_batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be positive")
    root, tokenizer = _prepared(cfg)
    cache_dir = cfg.get("cache_dir") or default_cache_dir()
    metas = {s: _split_meta(root, s, "train", cache_dir) for s in streams}
    used, proportions = _mix_proportions(cfg, streams, metas)
    dataset = open_dataset(
        [split_dir(root, s, "train") for s in used],
        cache_dir,
        proportions,
        epoch_size=cfg.get("epoch_size"),
        cache_limit=cfg.get("cache_limit"),
        seed=seed,
    )
    signature = {
        "streams": used,
        "proportions": proportions,
        "epoch_size": dataset.epoch_size,
        "docs": [metas[s]["docs"] for s in used],
    }
    loader = PackedTrainLoader(
        dataset, used, seq_len, micro_batch_size, rank, world_size, seed, tokenizer.eot_id, signature
    )
    logger.info(
        "training data: %s; %d documents per epoch over %d rank(s)",
        ", ".join(f"{s} {(cfg.get('mix') or {}).get(s, 'natural')}" for s in used),
        dataset.epoch_size,
        world_size,
    )
    return loader


# -- validation ----------------------------------------------------------------------------------------------------
class PackedValLoader:
    """A fixed, finite, re-iterable list of batches from one stream's held-out split, for one rank.

    Every rank yields the same number of batches (computed from the split's size), so collective evaluation never
    waits on a rank that ran out; a rank whose share of the split is too short starts over from its beginning.
    """

    def __init__(
        self, dataset, seq_len: int, micro_batch_size: int, rank: int, world_size: int, n_batches: int, eot_id: int
    ):
        self.dataset = dataset
        self.row, self.micro_batch_size = seq_len + 1, micro_batch_size
        self.n_batches = n_batches
        self.eot_id = eot_id
        n_docs = dataset.num_samples
        ids = np.arange(rank, n_docs, world_size)
        self.ids = ids if len(ids) else np.roll(np.arange(n_docs), -(rank % n_docs))

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        def tokens() -> Iterator[np.ndarray]:
            while True:
                for sample in self.ids:
                    yield np.concatenate([self.dataset[int(sample)][COLUMN].astype(np.int64), [self.eot_id]])

        docs = tokens()
        doc, offset = next(docs), 0
        for _ in range(self.n_batches):
            batch = np.empty(self.micro_batch_size * self.row, np.int64)
            filled = 0
            while filled < batch.size:
                take = min(batch.size - filled, len(doc) - offset)
                batch[filled : filled + take] = doc[offset : offset + take]
                filled, offset = filled + take, offset + take
                if offset == len(doc):
                    doc, offset = next(docs), 0
            yield torch.from_numpy(batch.reshape(self.micro_batch_size, self.row))


def build_val_loaders(
    data_cfg, seq_len: int, micro_batch_size: int, rank: int, world_size: int, max_batches: int
) -> dict[str, PackedValLoader]:
    cfg = as_dict(data_cfg)
    streams = stream_names(cfg)
    root, tokenizer = _prepared(cfg)
    cache_dir = cfg.get("cache_dir") or default_cache_dir()
    loaders = {}
    for stream in streams:
        meta = _split_meta(root, stream, "val", cache_dir)
        if meta["docs"] == 0:
            logger.warning("stream %s has no held-out documents (data.val_fraction): no val/%s loss", stream, stream)
            continue
        per_batch = world_size * micro_batch_size * (seq_len + 1)
        n_batches = max(1, min(int(max_batches), (meta["tokens"] + meta["docs"]) // per_batch))
        dataset = open_dataset([split_dir(root, stream, "val")], cache_dir, cache_limit=cfg.get("cache_limit"))
        loaders[stream] = PackedValLoader(
            dataset, seq_len, micro_batch_size, rank, world_size, n_batches, tokenizer.eot_id
        )
    return loaders
