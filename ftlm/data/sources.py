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
    line: int  # 1-based line (jsonl/txt: first line of the document) or row number (parquet)


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


def _lines(path: str, issues: InputIssues, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """Yield (line number, decoded line without its end) and record byte-level issues.

    A line longer than `max_line_bytes` is skipped without ever being held in memory whole.
    """
    saw_any = saw_crlf = False
    last = b""
    with _open_binary(path) as f:
        number = 0
        while True:
            try:
                raw = f.readline(max_line_bytes + 1)
            except Exception as err:  # noqa: BLE001 - gzip: EOFError, BadGzipFile, zlib.error; zstd: ZstdError
                # a truncated or corrupt compressed file: keep every line read so far, report where it broke off,
                # and go on with the next file
                kind = "truncated_file" if isinstance(err, EOFError) else "corrupt_file"
                issues.add(kind, path, number + 1, f"{type(err).__name__}: {str(err)[:80]}; the lines before are kept")
                return
            if not raw:
                break
            number += 1
            saw_any = True
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                skipped = len(raw)
                while raw and not raw.endswith(b"\n"):  # drain the rest of the enormous line
                    raw = f.readline(1 << 20)
                    skipped += len(raw)
                issues.add("enormous_line", path, number, f"{skipped} bytes > data.max_line_bytes={max_line_bytes}")
                last = raw or b"\n"
                continue
            last = raw
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                issues.add("byte_order_mark", path, 1)
                raw = raw[3:]
            if raw.endswith(b"\r\n"):
                if not saw_crlf:
                    issues.add("crlf_line_ends", path, number)
                    saw_crlf = True
                raw = raw[:-2]
            elif raw.endswith(b"\n"):
                raw = raw[:-1]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                issues.add("invalid_utf8", path, number, f"byte {err.start}: replaced")
                text = raw.decode("utf-8", errors="replace")
            yield number, text.replace("\r", "\n") if "\r" in text else text
    if not saw_any:
        issues.add("empty_file", path, 0)
    elif not last.endswith(b"\n"):
        issues.add("no_final_newline", path, number)


def read_jsonl(path: str, text_field: str, issues: InputIssues, max_line_bytes: int) -> Iterator[RawDoc]:
    for number, line in _lines(path, issues, max_line_bytes):
        if not line.strip():
            continue  # blank separator lines are harmless in jsonl
        try:
            record = json.loads(line)
        except ValueError as err:
            issues.add("malformed_json", path, number, str(err)[:80])
            continue
        if not isinstance(record, dict) or text_field not in record or record[text_field] is None:
            issues.add("missing_text_field", path, number, f"no '{text_field}' (data.text_field)")
            continue
        text = record[text_field]
        if not isinstance(text, str):
            issues.add("non_string_text_field", path, number, f"'{text_field}' is {type(text).__name__}")
            continue
        if not text.strip():
            issues.add("empty_document", path, number)
            continue
        yield RawDoc(text, path, number)


def read_txt(path: str, issues: InputIssues, max_line_bytes: int) -> Iterator[RawDoc]:
    """Documents are separated by one or more blank lines."""
    buffer: list[str] = []
    first = 0
    for number, line in _lines(path, issues, max_line_bytes):
        if line.strip():
            if not buffer:
                first = number
            buffer.append(line)
        elif buffer:
            yield RawDoc("\n".join(buffer), path, first)
            buffer = []
    if buffer:
        yield RawDoc("\n".join(buffer), path, first)


def read_parquet(path: str, text_field: str, issues: InputIssues) -> Iterator[RawDoc]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # a truncated or foreign file must not stop the run
        issues.add("unreadable_file", path, 0, str(err)[:80])
        return
    if parquet.metadata.num_rows == 0:
        issues.add("empty_file", path, 0)
        return
    if text_field not in parquet.schema_arrow.names:
        issues.add(
            "missing_text_field",
            path,
            0,
            f"no column '{text_field}' (data.text_field) in any of {parquet.metadata.num_rows} rows",
        )
        return
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
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
                yield RawDoc(value, path, row)


def read_documents(files: list[str], text_field: str, issues: InputIssues, max_line_bytes: int) -> Iterator[RawDoc]:
    """All documents of a stream's files, in file order then line order."""
    for path in files:
        stem = path[: -len(path.rsplit(".", 1)[1]) - 1] if path.endswith(COMPRESSION_SUFFIXES) else path
        if path.endswith(".parquet"):
            yield from read_parquet(path, text_field, issues)
        elif stem.endswith((".jsonl", ".json")):
            yield from read_jsonl(path, text_field, issues, max_line_bytes)
        else:
            yield from read_txt(path, issues, max_line_bytes)
