"""Files that are either wholly written or not there: the one implementation every part of ftlm uses.

A write goes to a temporary name beside the target (unique per process, so two writers never share it), is
flushed to disk, and is renamed over the target; a reader sees the old file or the new one, never half of one.
A failed write (a full disk, say) removes its temporary file and leaves the old one in place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable (the directory entry is data too)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename is then as durable as they allow
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj, indent: int | None = 2) -> None:
    """`obj` as JSON (UTF-8 kept readable, a final newline) written atomically to `path`."""
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def fsync_tree(folder: Path) -> None:
    """Flush every file (and the folder entries) to disk, so a manifest never describes data still in page cache."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def tree_size(folder: Path) -> int:
    """Bytes in the files under `folder` (0 when it does not exist)."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def is_disk_full(e: BaseException) -> bool:
    """Whether an exception (or one it was raised from) says the disk is full.

    torch.save reports ENOSPC from its C++ writer as a RuntimeError ("unexpected pos", "file write failed"), so
    the chain is searched for an OSError with ENOSPC/EDQUOT as well as for those words.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if "no space left" in text or "disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(folder: Path) -> int:
    """Free bytes for this user on the file system holding `folder` (or its nearest existing parent)."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free
