"""Input files -> raw documents, whatever shape the files are in.

`data.sources` maps a stream name to files, globs or directories. Each supported file (.jsonl, .txt, .parquet,
optionally .gz/.zst for the text formats) is read as a sequence of `RawDoc`s. Nothing in here stops a run:
malformed lines, bad bytes, empty files and the like are counted in an `InputIssues` with their file and line,
and the reader goes on.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".jsonl", ".json", ".txt")
COMPRESSION_SUFFIXES = (".gz", ".zst")
SUPPORTED = tuple(s + c for s in TEXT_SUFFIXES for c in ("",) + COMPRESSION_SUFFIXES) + (".parquet",)
EXAMPLES_PER_ISSUE = 20  # file:line examples kept per kind of issue; all of them are counted


@dataclass
class RawDoc:
    text: str
    file: str


@dataclass
class InputIssues:
    """Counts of input problems, each with a few `file:line` examples for the report."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, kind: str, file: str, line: int, detail: str = "") -> None:
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES_PER_ISSUE:
            shown.append(f"{file}:{line}" + (f" ({detail})" if detail else ""))
        if self.counts[kind] <= 3:
            logger.warning("input issue %s at %s:%d%s", kind, file, line, f" ({detail})" if detail else "")

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}


class SourceError(ValueError):
    """A source path or pattern that cannot be used; the message names the config key and the path."""


def resolve_files(stream: str, patterns: Iterable[str]) -> list[str]:
    """Expand `data.sources.<stream>` into a sorted, de-duplicated list of readable files."""
    if isinstance(patterns, (str, bytes)):
        patterns = [patterns]
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.abspath(os.path.expanduser(str(pattern)))
        if os.path.isdir(pattern):
            found = sorted(p for p in _walk_files(stream, pattern) if p.endswith(SUPPORTED))
            if not found:
                raise SourceError(f"data.sources.{stream}: directory {pattern} holds no {'/'.join(SUPPORTED)} file")
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not found:
                raise SourceError(f"data.sources.{stream}: no file matches {pattern}")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            raise SourceError(f"data.sources.{stream}: no such file or directory: {pattern}")
        for path in found:
            if not path.endswith(SUPPORTED):
                raise SourceError(
                    f"data.sources.{stream}: {path} is not one of the supported formats ({', '.join(SUPPORTED)})"
                )
        files.extend(found)
    # the same file reached twice (through a symlink, or two patterns) is read once
    unique: dict[str, str] = {}
    for path in files:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def _walk_files(stream: str, root: str) -> Iterator[str]:
    """Every file below `root`, following symlinked folders but entering no folder twice (a symlink loop such as
    `a/b -> a` would otherwise recurse until the path is too long, listing the same files again and again)."""
    seen: set[tuple[int, int]] = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            logger.warning("data.sources.%s: %s is a folder already read (a symlink loop): skipped", stream, folder)
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                yield path


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path))
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """A .zst file, frame after frame, that raises EOFError when the file ends inside a frame (zstandard's own
    stream reader ends silently there, so a truncated file would pass for a short one)."""

    def __init__(self, path: str):
        import zstandard

        self._zstd = zstandard
        self._file = open(path, "rb")
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the zstd file ended inside a frame (truncated)")
                return 0
            while chunk:
                self._in_frame = True
                self._pending += self._frame.decompress(chunk)
                if not self._frame.eof:
                    break
                chunk = self._frame.unused_data  # the next frame of a multi-frame file
                self._frame = self._zstd.ZstdDecompressor().decompressobj()
                self._in_frame = False
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


# -- parts: a big file is read by several clean tasks ----------------------------------------------------------------
SPLITTABLE = (".jsonl", ".json", ".parquet")  # uncompressed JSON lines split at line starts, parquet at row groups


def file_parts(path: str, task_bytes: int | None) -> list[list[int] | None]:
    """How a file is divided among clean tasks: [None] (the whole file, one task) or a list of parts, each
    [start, end): byte offsets of an uncompressed .jsonl (a line belongs to the part holding its first byte) or row
    groups of a .parquet, each part about `task_bytes` (data.task_bytes) big. Compressed files are read whole."""
    size = os.path.getsize(path)
    if not task_bytes or size <= task_bytes or not path.endswith(SPLITTABLE):
        return [None]
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except Exception:  # unreadable: the reader reports it, once
            return [None]
        parts, start, running = [], 0, 0
        for g in range(meta.num_row_groups):
            running += meta.row_group(g).total_byte_size
            if running >= task_bytes and g + 1 < meta.num_row_groups:
                parts.append([start, g + 1])
                start, running = g + 1, 0
        parts.append([start, meta.num_row_groups])
        return parts if len(parts) > 1 else [None]
    n = -(-size // task_bytes)
    step = -(-size // n)
    return [[i * step, min((i + 1) * step, size)] for i in range(n)]


class _LineNumbers:
    """Line numbers inside a part of a file that starts at byte `start`: the lines before it are counted only when
    an issue needs an exact `file:line` (a part of a 50 GB file should not read the 40 GB before it for nothing)."""

    def __init__(self, path: str, start: int = 0):
        self.path = path
        self.begin_at(start)

    def begin_at(self, start: int) -> None:
        """The part's first line starts at byte `start`."""
        self.start, self._before = start, 0 if start == 0 else None

    def __call__(self, number: int) -> int:
        if self._before is None:
            count = 0
            with open(self.path, "rb") as f:
                left = self.start
                while left > 0:
                    block = f.read(min(left, 1 << 24))
                    if not block:
                        break
                    count += block.count(b"\n")
                    left -= len(block)
            self._before = count
        return self._before + number


def _lines(
    path: str, issues: InputIssues, max_line_bytes: int, part: list[int] | None = None, at: _LineNumbers | None = None
) -> Iterator[tuple[int, str]]:
    """Yield (line number within the part, decoded line without its end) and record byte-level issues; `part` =
    [start, end) reads only the lines that begin in that byte range (see file_parts); `at` turns those numbers into
    the file's line numbers, for issues.

    A line longer than `max_line_bytes` is skipped without ever being held in memory whole.
    """
    start, end = part if part is not None else (0, None)
    saw_any = saw_crlf = False
    last = b""
    with _open_binary(path) as f:
        if start > 0:  # the line holding byte start-1 belongs to the part before: skip to the end of it
            f.seek(start - 1)
            raw = f.readline(1 << 20)
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(1 << 20)
        position = f.tell() if start > 0 else 0  # parts are of uncompressed files; a zstd stream cannot tell()
        at = at or _LineNumbers(path)
        at.begin_at(position)
        number = 0
        while end is None or position < end:
            try:
                raw = f.readline(max_line_bytes + 1)
            except Exception as err:  # noqa: BLE001 - gzip: EOFError, BadGzipFile, zlib.error; zstd: ZstdError
                # a truncated or corrupt compressed file: keep every line read so far, report where it broke off,
                # and go on with the next file
                kind = "truncated_file" if isinstance(err, EOFError) else "corrupt_file"
                issues.add(kind, path, at(number + 1), f"{type(err).__name__}: {str(err)[:80]}; lines before kept")
                return
            if not raw:
                break
            position += len(raw)
            number += 1
            saw_any = True
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                skipped = first = len(raw)
                while raw and not raw.endswith(b"\n"):  # drain the rest of the enormous line
                    raw = f.readline(1 << 20)
                    skipped += len(raw)
                position += skipped - first  # `first` was counted above
                issues.add("enormous_line", path, at(number), f"{skipped} bytes > data.max_line_bytes={max_line_bytes}")
                last = raw or b"\n"
                continue
            last = raw
            if number == 1 and start == 0 and raw.startswith(b"\xef\xbb\xbf"):
                issues.add("byte_order_mark", path, 1)
                raw = raw[3:]
            if raw.endswith(b"\r\n"):
                if not saw_crlf:  # once per file (per part of a divided file)
                    issues.add("crlf_line_ends", path, at(number))
                    saw_crlf = True
                raw = raw[:-2]
            elif raw.endswith(b"\n"):
                raw = raw[:-1]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                issues.add("invalid_utf8", path, at(number), f"byte {err.start}: replaced")
                text = raw.decode("utf-8", errors="replace")
            yield number, text.replace("\r", "\n") if "\r" in text else text
        at_end = end is None or position >= os.path.getsize(path)
    if not saw_any and start == 0 and at_end:
        issues.add("empty_file", path, 0)
    elif saw_any and at_end and not last.endswith(b"\n"):
        issues.add("no_final_newline", path, at(number))


def read_jsonl(
    path: str, text_field: str, issues: InputIssues, max_line_bytes: int, part: list[int] | None = None
) -> Iterator[RawDoc]:
    at = _LineNumbers(path)
    for number, line in _lines(path, issues, max_line_bytes, part, at):
        if not line.strip():
            continue  # blank separator lines are harmless in jsonl
        try:
            record = json.loads(line)
        except ValueError as err:
            issues.add("malformed_json", path, at(number), str(err)[:80])
            continue
        if not isinstance(record, dict) or text_field not in record or record[text_field] is None:
            issues.add("missing_text_field", path, at(number), f"no '{text_field}' (data.text_field)")
            continue
        text = record[text_field]
        if not isinstance(text, str):
            issues.add("non_string_text_field", path, at(number), f"'{text_field}' is {type(text).__name__}")
            continue
        if not text.strip():
            issues.add("empty_document", path, at(number))
            continue
        yield RawDoc(text, path)


def read_txt(path: str, issues: InputIssues, max_line_bytes: int) -> Iterator[RawDoc]:
    """Documents are separated by one or more blank lines."""
    buffer: list[str] = []
    for _, line in _lines(path, issues, max_line_bytes):
        if line.strip():
            buffer.append(line)
        elif buffer:
            yield RawDoc("\n".join(buffer), path)
            buffer = []
    if buffer:
        yield RawDoc("\n".join(buffer), path)


def read_parquet(path: str, text_field: str, issues: InputIssues, part: list[int] | None = None) -> Iterator[RawDoc]:
    """A parquet file's column data.text_field, or only row groups [first, last) of it (see file_parts)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # a truncated or foreign file must not stop the run
        issues.add("unreadable_file", path, 0, str(err)[:80])
        return
    meta = parquet.metadata
    groups = list(range(*part)) if part is not None else list(range(meta.num_row_groups))
    first_part = part is None or part[0] == 0
    if meta.num_rows == 0:
        if first_part:
            issues.add("empty_file", path, 0)
        return
    if text_field not in parquet.schema_arrow.names:
        if first_part:
            detail = f"no column '{text_field}' (data.text_field) in any of {meta.num_rows} rows"
            issues.add("missing_text_field", path, 0, detail)
        return
    row = sum(meta.row_group(g).num_rows for g in range(groups[0])) if groups else 0  # rows before this part
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096, row_groups=groups):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                issues.add("missing_text_field", path, row, f"'{text_field}' is null")
            elif isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    issues.add("invalid_utf8", path, row, "replaced")
                    value = value.decode("utf-8", errors="replace")
            if value is None:
                continue
            if not isinstance(value, str):
                issues.add("non_string_text_field", path, row, f"'{text_field}' is {type(value).__name__}")
            elif not value.strip():
                issues.add("empty_document", path, row)
            else:
                yield RawDoc(value, path)


def read_documents(
    files: list[str], text_field: str, issues: InputIssues, max_line_bytes: int, part: list[int] | None = None
) -> Iterator[RawDoc]:
    """All documents of a stream's files, in file order then line order; with `part` (one file only), those of that
    part of it (see file_parts)."""
    if part is not None and len(files) != 1:
        raise ValueError("read_documents: a part is of one file")
    for path in files:
        stem = path[: -len(path.rsplit(".", 1)[1]) - 1] if path.endswith(COMPRESSION_SUFFIXES) else path
        if path.endswith(".parquet"):
            yield from read_parquet(path, text_field, issues, part)
        elif stem.endswith((".jsonl", ".json")):
            yield from read_jsonl(path, text_field, issues, max_line_bytes, part)
        else:
            yield from read_txt(path, issues, max_line_bytes)
