"""How token shards are written and their counts read back (the layout itself is in layout.py)."""

from __future__ import annotations

import json
import os

import numpy as np

from .layout import COLUMN, META_FILE, SPLITS, host_tag, split_dir  # noqa: F401  (re-exported: the names readers use)

COMPRESSIONS = (None, "zstd", "zstd:1", "zstd:3", "zstd:9", "gz", "bz2", "br", "snappy")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def write_json_atomic(path: str, obj) -> None:
    from ftlm.checkpoint.atomic import write_json_atomic as write

    write(path, obj)


class SplitWriter:
    """MDS writer for one stream's split that also counts what it wrote."""

    def __init__(self, directory: str, vocab_size: int, compression: str | None, size_limit: int):
        from streaming import MDSWriter

        self.directory = directory
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self._writer = MDSWriter(
            columns={COLUMN: f"ndarray:{self.dtype.name}"},
            out=directory,
            compression=compression,
            size_limit=size_limit,
        )
        self.docs = 0
        self.tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        self._writer.write({COLUMN: np.asarray(tokens, dtype=self.dtype)})
        self.docs += 1
        self.tokens += int(len(tokens))

    def close(self) -> dict:
        self._writer.finish()
        meta = {"docs": self.docs, "tokens": self.tokens, "dtype": self.dtype.name, "vocab_size": self.vocab_size}
        write_json_atomic(os.path.join(self.directory, META_FILE), meta)
        return meta


def read_meta(directory: str, cache_dir: str | None = None) -> dict | None:
    """`ftlm.json` of a split directory or URL (downloaded into `cache_dir`), or None if it has none."""
    if "://" not in directory:
        path = os.path.join(directory, META_FILE)
        if not os.path.isfile(path):
            return None
    else:
        from streaming.base.storage import CloudDownloader

        path = os.path.join(cache_dir or ".", META_FILE)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{host_tag()}"  # the cache is shared: never write over a file another process may read
        try:
            CloudDownloader.direct_download(f"{directory.rstrip('/')}/{META_FILE}", tmp, 60)
        except Exception:  # older preparations or other tools: the loader falls back to index.json sizes
            return None
        os.replace(tmp, path)
    with open(path, encoding="utf-8") as f:
        return json.load(f)
