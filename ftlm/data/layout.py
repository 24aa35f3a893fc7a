"""Where prepared data lives on disk: the one description that the writer (prepare) and the readers (stream) share.

`data.out_dir` holds any number of preparations side by side, one folder per fingerprint (a hash of every setting
and input that shapes the output), and a pointer to the one made or reused last:

    <out_dir>/
      <fingerprint>/                  one complete preparation; never changed once it is there
        tokenizer.json                the tokenizer, special tokens included
        shards/<stream>/<split>/      MDS shards (index.json + shard.*.mds[.zstd]) with one column `tokens` (the
                                      ids of one document, no end-of-text: the loader adds it) and ftlm.json (counts)
        corpus/                       the embedded corpus as jsonl, when data.sources names `embedded:<stream>`
        stats.json                    the report; written last, so its presence means the preparation is complete
      latest.json                     {"fingerprint": ...}: the preparation made or reused last (switched atomically)
      tmp/<fingerprint>.<host>.<pid>/ a preparation being written; renamed to <fingerprint>/ when complete
      locks/<fingerprint>.lock        held while that fingerprint is being prepared
      trash/                          preparations set aside by `ftlm-prepare --rebuild`, removed by `--gc`

Nothing is ever deleted implicitly. A reader (a training job) holds a shared lock on its preparation's stats.json
for as long as it reads it; `ftlm-prepare --gc` removes only preparations nobody holds and latest.json does not name.
With `data.remote`, the shards are read from `<remote>/shards/...` (upload `<out_dir>/<fingerprint>/shards` there).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket

SPLITS = ("train", "val")
COLUMN = "tokens"  # the MDS column holding one document's token ids
META_FILE = "ftlm.json"  # per split: {"docs", "tokens", "dtype", "vocab_size"}
INDEX_FILE = "index.json"  # streaming's shard index, per split
STATS_FILE = "stats.json"
TOKENIZER_FILE = "tokenizer.json"
POINTER_FILE = "latest.json"
TMP_DIR, LOCKS_DIR, TRASH_DIR = "tmp", "locks", "trash"
TASKS_PREFIX = "tasks-"  # tmp/tasks-<fingerprint>: finished tasks of an unfinished preparation, for its rerun
# The data.* keys that shape the prepared output; stats.json keeps them under "settings".
PREPARATION_KEYS = (
    "sources",
    "text_field",
    "lang",
    "clean",
    "dedup",
    "tokenizer",
    "val_fraction",
    "val_min_docs",
    "shard_compression",
    "shard_size_limit",
    "max_line_bytes",
)
# stats.json top-level keys: fingerprint, name, out_dir (the preparation's folder), created, tokenizer ({path, origin,
# vocab_size, eot_id, pad_id, special_tokens}), streams ({stream: counts}), inputs ({stream: [[file, size, mtime]]}),
# num_workers, timings, settings ({key: value for PREPARATION_KEYS}).


class DamagedPreparationError(RuntimeError):
    """A preparation whose files are missing or corrupt; the message names the file and how to prepare again."""


def expand_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(os.path.expandvars(str(path))))


def split_dir(root: str, stream: str, split: str) -> str:
    """Directory (or URL) of one stream's split below a preparation root."""
    return (
        "/".join([root.rstrip("/"), "shards", stream, split])
        if "://" in root
        else os.path.join(root, "shards", stream, split)
    )


def preparation_dir(out_dir: str, fingerprint: str) -> str:
    return os.path.join(out_dir, fingerprint)


def host_tag() -> str:
    """`<host>.<pid>`: unique among live processes, also across machines sharing a file system."""
    return f"{socket.gethostname()}.{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(name: str) -> bool:
    """True for a `[<prefix>.]<host>.<pid>` name (host_tag) whose process ran on this host and is dead; a process of
    another host is never assumed dead (its pid means nothing here)."""
    head, _, pid = name.rpartition(".")
    host = socket.gethostname()
    if not pid.isdigit() or not (head == host or head.endswith("." + host)):
        return False
    return not pid_alive(int(pid))


def read_pointer(out_dir: str) -> str | None:
    """The fingerprint latest.json names, or None."""
    try:
        with open(os.path.join(out_dir, POINTER_FILE), encoding="utf-8") as f:
            return str(json.load(f)["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def locate(out_dir: str) -> str:
    """The preparation a reader uses when it is not told which: the one latest.json names.

    A folder in the layout before fingerprint folders (stats.json directly in out_dir) is read as it is.
    """
    out_dir = expand_path(out_dir)
    fingerprint = read_pointer(out_dir)
    if fingerprint is not None and os.path.isfile(os.path.join(out_dir, fingerprint, STATS_FILE)):
        return os.path.join(out_dir, fingerprint)
    if os.path.isfile(os.path.join(out_dir, STATS_FILE)):
        return out_dir
    raise FileNotFoundError(
        f"no prepared data in data.out_dir={out_dir}: run `ftlm-prepare` with the same data config first "
        f"(ftlm-train does it by itself)"
    )


def read_stats(root: str) -> dict:
    path = os.path.join(root, STATS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DamagedPreparationError(f"{path} is missing: {_fix(root)}") from None
    except ValueError as err:
        raise DamagedPreparationError(f"{path} is not valid JSON ({err}): {_fix(root)}") from None


def _fix(root: str) -> str:
    return (
        f"this preparation is damaged; prepare it again with `ftlm-prepare --rebuild` and the same data config "
        f"(which sets {root} aside and writes a fresh copy), or remove {root} once no job reads it"
    )


def verify(root: str, streams: list[str] | None = None) -> dict:
    """Check that a local preparation is whole: stats.json, tokenizer.json, and per split index.json and every
    shard file it lists at the size it lists. Returns stats.json; raises DamagedPreparationError naming the file."""
    stats = read_stats(root)
    streams = list(stats.get("streams", {})) if streams is None else streams
    tokenizer = os.path.join(root, TOKENIZER_FILE)
    if not os.path.isfile(tokenizer):
        raise DamagedPreparationError(f"{tokenizer} is missing: {_fix(root)}")
    for stream in streams:
        if stream not in stats.get("streams", {}):
            raise DamagedPreparationError(f"{root} holds no stream {stream!r} (it has {list(stats['streams'])})")
        for split in SPLITS:
            verify_split(split_dir(root, stream, split), root)
    return stats


def verify_split(directory: str, root: str) -> None:
    if "://" in directory:
        return  # remote shards: streaming checks what it downloads
    meta = os.path.join(directory, META_FILE)
    try:
        with open(meta, encoding="utf-8") as f:
            counts = json.load(f)
        if not isinstance(counts, dict) or not {"docs", "tokens"} <= set(counts):
            raise ValueError("no docs/tokens counts")
    except FileNotFoundError:
        raise DamagedPreparationError(f"{meta} is missing: {_fix(root)}") from None
    except ValueError as err:
        raise DamagedPreparationError(f"{meta} is corrupt ({err}): {_fix(root)}") from None
    index = os.path.join(directory, INDEX_FILE)
    try:
        with open(index, encoding="utf-8") as f:
            shards = json.load(f)["shards"]
        if not isinstance(shards, list):
            raise ValueError("'shards' is not a list")
    except FileNotFoundError:
        raise DamagedPreparationError(f"{index} is missing: {_fix(root)}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedPreparationError(f"{index} is corrupt ({type(err).__name__}: {err}): {_fix(root)}") from None
    for shard in shards:
        try:
            stored = shard["zip_data"] if shard.get("compression") else shard["raw_data"]
            name, size = stored["basename"], int(stored["bytes"])
        except (KeyError, TypeError, ValueError) as err:
            raise DamagedPreparationError(f"{index} is corrupt (a shard entry lacks {err}): {_fix(root)}") from None
        path = os.path.join(directory, name)
        try:
            actual = os.path.getsize(path)
        except OSError:
            raise DamagedPreparationError(f"{path} is missing (listed in {index}): {_fix(root)}") from None
        if actual != size:
            raise DamagedPreparationError(
                f"{path} has {actual} bytes, {index} lists {size}: the shard is truncated or changed: {_fix(root)}"
            )


class ReaderLock:
    """A shared lock on a preparation's stats.json, held while a process reads the preparation.

    `ftlm-prepare --gc` takes the exclusive lock before it removes a preparation, so it never removes one in use.
    flock locks are released by the kernel when the process dies, so a crashed reader never pins data forever.
    """

    def __init__(self, root: str):
        self.root = root
        self._file = None
        path = os.path.join(root, STATS_FILE)
        if "://" in root or not os.path.isfile(path):
            return
        f = open(path, "rb")
        fcntl.flock(f, fcntl.LOCK_SH)
        if not os.path.exists(path) or not os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
            f.close()  # removed (or set aside) while we waited for the lock
            raise DamagedPreparationError(f"{root} was removed while opening it: {_fix(root)}")
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        self.release()
