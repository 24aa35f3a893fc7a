"""Token shards -> packed training batches, mixed across streams, deterministic per rank, exactly resumable.

Reading is `streaming`'s: one `StreamingDataset` over `streaming.Stream`s, local or remote (s3://, gs://, ...
with a local cache), each Stream weighted by its `proportion`. `data.mix` gives shares of *tokens*; documents
differ in length between streams, so each proportion is the token share divided by the stream's mean document
length (from `ftlm.json`), which makes the expected token shares exactly `data.mix`.

The order of documents is ours, not `StreamingDataset.__iter__`'s: every epoch, `resample_streams(epoch)` gives the
weighted multiset of documents, a permutation seeded by (seed, epoch) orders them, and rank r takes every
world_size-th one starting at r. Each rank packs its documents (`data.packing`, see packing.py) into rows of
seq_len + 1 tokens and yields `Batch`es: inputs, targets (-100 on padding), per-token positions that restart at
every document start, and cu_seqlens, all from the document boundaries the packer placed (nothing scans for
`<|endoftext|>`). So a rank's stream is a pure function of (seed, rank, world size, data), ranks never wait on
each other, and the loader's position is four integers: that is what `state_dict()` saves.

Each process opens its datasets as a "world of one" under a machine-wide file lock. streaming's shared memory
coordinates processes of one node; here nothing needs coordinating (every rank reads by index), and the lock
makes the choice of shared-memory names atomic, so several nodes on one machine, several jobs, and several
datasets in one process (train + one val per stream) never collide.

Compressed or remote shards are decompressed/downloaded into `data.cache_dir`, one folder per process
(`<host>.<pid>`, holding a lock for the life of the process): a folder is removed only when its owner is provably
gone (same host, process dead, lock free), never while any live process reads it.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch

from . import layout
from .batch import Batch
from .checks import as_dict, check_mix, stream_names
from .layout import COLUMN, expand_path, split_dir
from .packing import PACKINGS, PackingStats, Row, best_fit_rows, concat_rows
from .shards import read_meta
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


@contextmanager
def _shared_memory_without_fds():
    """While a StreamingDataset is made: streaming attaches to the shared memory of every dataset opened before it in
    this process (to find a free prefix) and keeps each attachment, with its file descriptors, until the process
    exits, so a process that opens many datasets (a test run, a notebook) runs out of descriptors ("Too many open
    files"). Those attachments are read once, during construction: they are closed when it ends. The dataset's own
    blocks keep their mapping but not the extra descriptor the mapping does not need."""
    from streaming.base.shared.memory import SharedMemory

    original = SharedMemory.__init__
    attached = []

    def init(self, name=None, create=None, size=0, auto_cleanup=True):
        original(self, name, create, size, auto_cleanup)
        block = getattr(self, "shm", None)  # multiprocessing.shared_memory.SharedMemory; close() skips fd -1
        fd = getattr(block, "_fd", -1)
        if isinstance(fd, int) and fd >= 0:
            os.close(fd)
            block._fd = -1
        if create is False and block is not None:
            attached.append(block)

    try:
        with mock.patch.object(SharedMemory, "__init__", init):
            yield
    finally:
        for block in attached:
            try:
                block.close()  # the mapping too (its own duplicate descriptor); closing again at exit is harmless
            except BufferError:  # still viewed from somewhere: leave it open
                pass


_CACHE_LOCK = ".in-use.lock"
_held_cache_locks: dict[str, object] = {}  # folder -> open lock file, held until this process exits


def _own_cache_folder(root: str) -> str:
    """This process's cache folder below `root`, created and locked for the life of the process."""
    folder = os.path.join(root, layout.host_tag())
    if folder not in _held_cache_locks:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, _CACHE_LOCK), "a")
        fcntl.flock(lock, fcntl.LOCK_SH)
        _held_cache_locks[folder] = lock
    return folder


def _owner_gone(folder: str) -> bool:
    """True only when the folder's owner is certainly not reading it: a process of this host that is dead and
    whose lock nobody holds. Another host's folder, a live pid, or a held lock all keep the folder."""
    if not layout.owner_gone(os.path.basename(folder)):
        return False
    try:
        with open(os.path.join(folder, _CACHE_LOCK), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError:  # BlockingIOError: held
        return False
    return True


def _release_dead_caches(cache_root: str) -> None:
    """Remove cache folders whose owner is provably gone, and the shared memory that still names them."""
    from multiprocessing.shared_memory import SharedMemory

    from streaming.base.constant import LOCALS, SHM_TO_CLEAN

    names = os.listdir(cache_root) if os.path.isdir(cache_root) else []
    dead = [os.path.join(cache_root, n) for n in names if _owner_gone(os.path.join(cache_root, n))]
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
        # set aside first (atomic), so nothing ever sees a half-removed folder under its live name
        trash = f"{path}.removing.{layout.host_tag()}"
        try:
            os.rename(path, trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)


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
    return Stream(remote=directory, local=_own_cache_folder(root), proportion=proportion)


def open_dataset(
    directories: list[str],
    cache_dir: str,
    proportions: list[float] | None = None,
    epoch_size: int | None = None,
    cache_limit: str | None = None,
    seed: int = 0,
):
    """A StreamingDataset over split directories (local paths or URLs), read by index.

    Opened once per process for the same arguments and files: we only read it by index (and resample_streams is a
    function of the epoch), so loaders can share it; and streaming keeps every dataset's shared memory until the
    process exits, so opening the same split again and again would only pile up file descriptors.
    """
    from streaming import StreamingDataset

    proportions = proportions or [None] * len(directories)
    key = (
        tuple(directories),
        tuple(_identity(d) for d in directories),  # a preparation made anew at the same path is another dataset
        expand_path(cache_dir),
        tuple(proportions),
        epoch_size,
        cache_limit,
        seed,
    )
    if key not in _datasets:
        with _world_of_one(), _shared_memory_without_fds():
            streams = [_stream(d, cache_dir, p) for d, p in zip(directories, proportions)]
            _datasets[key] = StreamingDataset(
                streams=streams,
                shuffle=False,
                batch_size=1,
                epoch_size=epoch_size,
                cache_limit=cache_limit,
                shuffle_seed=seed,
                sampling_method="balanced",
            )
    return _datasets[key]


_datasets: dict[tuple, object] = {}


def _identity(directory: str) -> tuple:
    if "://" in directory:
        return ()
    st = os.stat(os.path.join(directory, layout.INDEX_FILE))
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_split(directory: str, cache_dir: str | None = None) -> list[np.ndarray]:
    """Every document's tokens of one split, in order (for tests and inspection)."""
    meta = read_meta(directory)
    if meta is not None and meta["docs"] == 0:
        return []
    dataset = open_dataset([directory], cache_dir or os.path.join(tempfile.gettempdir(), "ftlm-read-cache"))
    return [dataset[i][COLUMN] for i in range(dataset.num_samples)]


# -- where the prepared data is ------------------------------------------------------------------------------------
class _Source:
    """The preparation a loader reads: its folder, shard root, tokenizer, stats, and the reader lock it holds."""

    def __init__(self, cfg: dict, prepared=None):
        if prepared is None:
            root = layout.locate(cfg["out_dir"])
        else:  # a Prepared (from prepare()) or the path of a preparation folder
            root = expand_path(getattr(prepared, "out_dir", prepared))
        self.lock = layout.ReaderLock(root)  # ftlm-prepare --gc leaves it alone while we read it
        # with data.remote the shards are elsewhere (streaming checks what it downloads): only the local files here
        self.stats = layout.verify(root, [] if cfg["remote"] else stream_names(cfg))
        self.root = root
        self.shards = cfg["remote"] or root
        self.fingerprint = self.stats.get("fingerprint")
        self.tokenizer = Tokenizer.load(os.path.join(root, layout.TOKENIZER_FILE))
        if prepared is None:
            settings = self.stats.get("settings", {})
            keys = [k for k in layout.PREPARATION_KEYS if k != "tokenizer" and k in settings]
            changed = [k for k in keys if settings[k] != json.loads(json.dumps(cfg[k]))]  # as stats.json holds it
            if changed:
                logger.warning(
                    "data.out_dir's latest preparation %s was made with other data.%s than this config: another "
                    "preparation may have been made since; pass the preparation prepare() returned to the loader",
                    root,
                    ", data.".join(changed),
                )


def _split_meta(source: _Source, stream: str, split: str, cache_dir: str) -> dict:
    directory = split_dir(source.shards, stream, split)
    meta_cache = os.path.join(expand_path(cache_dir), "meta", hashlib.sha1(directory.encode()).hexdigest()[:12])
    meta = read_meta(directory, meta_cache)
    if meta is None:
        raise FileNotFoundError(f"{directory}: no {split} shards prepared by ftlm-prepare (ftlm.json missing)")
    return meta


def _check_packing(cfg: dict) -> tuple[str, int]:
    packing, buffer = cfg["packing"], cfg["packing_buffer"]
    if packing not in PACKINGS:
        raise ValueError(f"data.packing must be one of {list(PACKINGS)}, got {packing!r}")
    if not isinstance(buffer, int) or buffer < 1:
        raise ValueError(f"data.packing_buffer must be a positive number of documents, got {buffer!r}")
    return packing, buffer


def _rows_to_batch(rows: list[Row]) -> Batch:
    tokens = torch.from_numpy(np.stack([r.tokens for r in rows]))  # (B, S+1)
    return Batch.from_rows(tokens, [r.starts for r in rows], [r.used for r in rows], [r.unrelated_next for r in rows])


# -- training ------------------------------------------------------------------------------------------------------
class PackedTrainLoader:
    """Endless `Batch`es of (micro_batch_size, seq_len) for one rank; `state_dict()` resumes exactly.

    The position is (epoch, start, pos, offset): `pos` documents of this rank's share of the epoch (after the first
    `start` of the epoch's order) are done; with concat `offset` tokens of the next one are too, with best_fit
    `offset` rows of the buffer that starts at `pos`.
    """

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
        pad_id: int | None = None,
        packing: str = "concat",
        packing_buffer: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if dataset.epoch_size < world_size:
            raise ValueError(f"data.epoch_size={dataset.epoch_size} documents cannot be split over {world_size} ranks")
        if packing == "best_fit" and pad_id is None:
            raise ValueError("data.packing=best_fit needs a tokenizer with <|pad|>")
        self.dataset = dataset
        self.stream_names = stream_names
        self.row = seq_len + 1
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.eot_id, self.pad_id = eot_id, pad_id
        self.packing, self.packing_buffer = packing, packing_buffer
        self.signature = signature  # what must not change for a saved position to mean the same documents
        self.stream_of_sample = np.repeat(np.arange(len(stream_names)), dataset.samples_per_stream)
        self.tokens_per_stream = np.zeros(len(stream_names), np.int64)  # real tokens this rank emitted, by stream
        self.packing_stats = PackingStats()
        self.source = None  # the _Source (and its reader lock) this loader reads; set by build_train_loader
        self._epoch = self._start = self._pos = self._offset = 0
        self._order_epoch, self._order_all = -1, np.empty(0, np.int64)
        self._doc_key, self._doc = None, np.empty(0, np.int64)
        self._rows_key, self._rows, self._rows_docs = None, [], 0

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This epoch's documents for this rank (global sample ids)."""
        if self._order_epoch != epoch:
            _, ids = self.dataset.resample_streams(epoch)  # the Streams' proportions, resampled per epoch
            ids = ids[np.random.default_rng([self.seed, epoch]).permutation(len(ids))]
            self._order_epoch, self._order_all = epoch, ids
        return self._order_all[self._start + self.rank :: self.world_size]

    def _current_order(self) -> np.ndarray:
        order = self._epoch_order(self._epoch)
        while self._pos >= len(order):  # epoch done: the next one starts from its beginning
            self._epoch, self._start, self._pos, self._offset = self._epoch + 1, 0, 0, 0
            order = self._epoch_order(self._epoch)
            if self.rank == 0:
                logger.info(
                    "data: epoch %d of the training mix begins (%d documents, reshuffled)",
                    self._epoch + 1,
                    len(self._order_all),
                )
        return order

    def _read(self, sample: int) -> np.ndarray:
        """One document's tokens followed by <|endoftext|>."""
        return np.concatenate([self.dataset[sample][COLUMN].astype(np.int64), [self.eot_id]])

    def _document(self) -> np.ndarray:
        order = self._current_order()
        key = (self._epoch, self._start, self._pos)
        if self._doc_key != key:
            sample = int(order[self._pos])
            self._doc = self._read(sample)
            self._doc_stream = self.stream_of_sample[sample]
            self._doc_key = key
        return self._doc

    def __iter__(self) -> PackedTrainLoader:
        return self

    def __next__(self) -> Batch:
        rows = self._next_concat() if self.packing == "concat" else self._next_best_fit()
        for row in rows:
            self.packing_stats.add(row)
        return _rows_to_batch(rows)

    def _next_concat(self) -> list[Row]:
        flat = np.empty(self.micro_batch_size * self.row, np.int64)
        starts: list[list[int]] = [[] for _ in range(self.micro_batch_size)]
        docs, cut = [0] * self.micro_batch_size, [0] * self.micro_batch_size
        filled = 0
        while filled < flat.size:
            doc = self._document()
            take = min(flat.size - filled, len(doc) - self._offset)
            if self._offset == 0:  # a document starts here
                row, col = divmod(filled, self.row)
                starts[row].append(col)
                docs[row] += 1
                cut[row] += col + len(doc) > self.row  # it runs past the end of its row
            flat[filled : filled + take] = doc[self._offset : self._offset + take]
            self.tokens_per_stream[self._doc_stream] += take
            filled += take
            self._offset += take
            if self._offset == len(doc):
                self._pos, self._offset = self._pos + 1, 0
        rows = flat.reshape(self.micro_batch_size, self.row)
        return [Row(rows[b], starts[b], self.row, docs[b], cut[b]) for b in range(self.micro_batch_size)]

    def _buffer(self) -> list[Row]:
        """The rows best-fit packing makes of the buffer of documents that starts at `pos` (cached)."""
        order = self._current_order()
        key = (self._epoch, self._start, self._pos)
        if self._rows_key != key:
            samples = [int(i) for i in order[self._pos : self._pos + self.packing_buffer]]
            docs = [self._read(i) for i in samples]
            self._rows = best_fit_rows(docs, self.row, self.pad_id)
            self._rows_streams = [[self.stream_of_sample[samples[d]] for d in r.parts] for r in self._rows]
            self._rows_key, self._rows_docs = key, len(samples)
        return self._rows

    def _next_best_fit(self) -> list[Row]:
        rows: list[Row] = []
        while len(rows) < self.micro_batch_size:
            buffer = self._buffer()
            if self._offset >= len(buffer):
                self._pos, self._offset = self._pos + self._rows_docs, 0
                continue
            row = buffer[self._offset]
            for stream, n in zip(self._rows_streams[self._offset], row.part_tokens):
                self.tokens_per_stream[stream] += n
            rows.append(row)
            self._offset += 1
        return rows

    def stats(self) -> dict[str, float]:
        """{'pad_fraction', 'cut_doc_share'} of the rows yielded since the previous call (log as train/<key>)."""
        return self.packing_stats.take()

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
        self._doc_key = self._rows_key = None

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
    data_cfg, seq_len: int, micro_batch_size: int, rank: int, world_size: int, seed: int, prepared=None
) -> PackedTrainLoader:
    """The training loader of one rank. `prepared`: what prepare() returned (or a preparation folder); without it,
    the preparation data.out_dir's latest.json names."""
    cfg = as_dict(data_cfg)
    streams = stream_names(cfg)
    check_mix(cfg, streams)
    packing, buffer = _check_packing(cfg)
    if seq_len < 1 or micro_batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be positive")
    source = _Source(cfg, prepared)
    metas = {s: _split_meta(source, s, "train", cfg["cache_dir"]) for s in streams}
    used, proportions = _mix_proportions(cfg, streams, metas)
    dataset = open_dataset(
        [split_dir(source.shards, s, "train") for s in used],
        cfg["cache_dir"],
        proportions,
        epoch_size=cfg["epoch_size"],
        cache_limit=cfg["cache_limit"],
        seed=seed,
    )
    signature = {
        "streams": used,
        "proportions": proportions,
        "epoch_size": dataset.epoch_size,
        "docs": [metas[s]["docs"] for s in used],
        "packing": packing,
        "packing_buffer": buffer if packing == "best_fit" else None,
    }
    tokenizer = source.tokenizer
    loader = PackedTrainLoader(
        dataset,
        used,
        seq_len,
        micro_batch_size,
        rank,
        world_size,
        seed,
        tokenizer.eot_id,
        signature,
        pad_id=tokenizer.pad_id,
        packing=packing,
        packing_buffer=buffer,
    )
    loader.source = source
    logger.info(
        "training data: %s (%s); %d documents per epoch over %d rank(s), packing %s",
        ", ".join(f"{s} {(cfg['mix'] or {}).get(s, 'natural')}" for s in used),
        source.root,
        dataset.epoch_size,
        world_size,
        packing,
    )
    return loader


# -- validation ----------------------------------------------------------------------------------------------------
class PackedValLoader:
    """A fixed, finite, re-iterable list of `Batch`es from one stream's held-out split, for one rank.

    Every rank yields the same number of batches (computed from the split's size), so collective evaluation never
    waits on a rank that ran out; a rank whose share of the split ends first fills its batches with padding, which
    counts for nothing (a document is never scored twice). Packed as training is (`data.packing`), with the same
    document boundaries, rows in document order, so val loss compares with train loss.
    """

    def __init__(
        self,
        dataset,
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        n_batches: int,
        eot_id: int,
        pad_id: int | None = None,
        packing: str = "concat",
        packing_buffer: int = 1,
    ):
        self.dataset = dataset
        self.row, self.micro_batch_size = seq_len + 1, micro_batch_size
        self.n_batches = n_batches
        self.eot_id, self.pad_id = eot_id, pad_id
        self.packing, self.packing_buffer = packing, packing_buffer
        self.source = None  # the _Source (and its reader lock) this loader reads; set by build_val_loaders
        self.ids = np.arange(rank, dataset.num_samples, world_size)  # this rank's share (it may be empty)

    def __len__(self) -> int:
        return self.n_batches

    def _rows(self) -> Iterator[Row]:
        pad = self.pad_id if self.pad_id is not None else self.eot_id
        docs = (np.concatenate([self.dataset[int(i)][COLUMN].astype(np.int64), [self.eot_id]]) for i in self.ids)
        if self.packing == "concat":
            yield from concat_rows(docs, self.row, pad)
        else:
            while buffer := list(itertools.islice(docs, self.packing_buffer)):
                yield from best_fit_rows(buffer, self.row, pad)
        while True:  # the share is read: what is left of the pass is padding
            yield Row(np.full(self.row, pad, np.int64), [0], 0, 0, 0)

    def __iter__(self) -> Iterator[Batch]:
        rows = self._rows()
        for _ in range(self.n_batches):
            yield _rows_to_batch([next(rows) for _ in range(self.micro_batch_size)])


def build_val_loaders(
    data_cfg, seq_len: int, micro_batch_size: int, rank: int, world_size: int, max_batches: int, prepared=None
) -> dict[str, PackedValLoader]:
    cfg = as_dict(data_cfg)
    streams = stream_names(cfg)
    packing, buffer = _check_packing(cfg)
    source = _Source(cfg, prepared)
    loaders = {}
    for stream in streams:
        meta = _split_meta(source, stream, "val", cfg["cache_dir"])
        if meta["docs"] == 0:
            logger.warning("stream %s has no held-out documents (data.val_fraction): no val/%s loss", stream, stream)
            continue
        per_batch = world_size * micro_batch_size * (seq_len + 1)
        n_batches = max(1, min(int(max_batches), -(-(meta["tokens"] + meta["docs"]) // per_batch)))  # the tail too
        dataset = open_dataset(
            [split_dir(source.shards, stream, "val")], cfg["cache_dir"], cache_limit=cfg["cache_limit"]
        )
        loaders[stream] = PackedValLoader(
            dataset,
            seq_len,
            micro_batch_size,
            rank,
            world_size,
            n_batches,
            source.tokenizer.eot_id,
            pad_id=source.tokenizer.pad_id,
            packing=packing,
            packing_buffer=buffer,
        )
        loaders[stream].source = source
    return loaders
