"""Input files -> raw documents, whatever shape the files are in.

`data.sources` maps a stream name to files, globs or directories. An existing path is taken literally (a file
may be named `part[1].jsonl`); only a path that does not exist is a glob. A directory, or a folder a glob
matches, is read with every supported file below it, hidden ones (`.name`, or inside a `.folder`) left out as a
`**` glob leaves them out; a dangling symlink is skipped with a warning. Each supported file (.jsonl, .json,
.txt, .parquet, optionally .gz/.zst for the text formats) is read as a sequence of `RawDoc`s; a .json whose first
character is `[` is one JSON array of documents (parsed whole, as one line is), any other .json is JSON lines.
Nothing in here stops a run: malformed lines, bad bytes, empty files and the like are counted in an `InputIssues`
with their file and line (the row of a .parquet, the element of a JSON array), and the reader goes on.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import re
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
    if patterns is None or isinstance(patterns, (str, bytes)):
        patterns = [patterns]
    files: list[str] = []
    for entry in patterns:
        # abspath("") is the working directory: an empty entry (a blank override) would read it all, recursively
        if entry is None or not str(entry).strip():
            raise SourceError(f"data.sources.{stream}: a path is empty ({entry!r}); name a file, a glob or a folder")
        pattern = os.path.abspath(os.path.expanduser(str(entry)))
        # an existing path is taken literally before it is read as a glob: `part[1].jsonl` is a file's own name
        if os.path.isdir(pattern):
            found = _supported_below(stream, pattern)
            if not found:
                raise SourceError(f"data.sources.{stream}: directory {pattern} holds no {'/'.join(SUPPORTED)} file")
        elif os.path.isfile(pattern):
            found = [pattern]
        elif glob.has_magic(pattern):
            found, walked = [], []
            for match in sorted(glob.glob(pattern, recursive=True)):
                if os.path.isdir(match):  # a matched folder is read like a folder source
                    # `**` matches every folder of a tree: one walk of the topmost lists them all
                    if not any(match.startswith(os.path.join(root, "")) for root in walked):
                        walked.append(match)
                        found.extend(_supported_below(stream, match))
                elif os.path.isfile(match):
                    found.append(match)
                else:
                    _warn_dangling(stream, match)
            found.sort()
            if not found:
                raise SourceError(f"data.sources.{stream}: no file matches {pattern}")
        elif os.path.islink(pattern):
            raise SourceError(
                f"data.sources.{stream}: {pattern} is a symlink to {os.readlink(pattern)}, which is missing"
            )
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


def _supported_below(stream: str, root: str) -> list[str]:
    return sorted(p for p in _walk_files(stream, root) if p.endswith(SUPPORTED))


def _warn_dangling(stream: str, path: str) -> None:
    """A symlink whose target is gone is an input that will not be read: say so rather than drop it unseen."""
    if os.path.islink(path):
        logger.warning(
            "data.sources.%s: %s is a symlink to %s, which is missing: skipped", stream, path, os.readlink(path)
        )


def _walk_files(stream: str, root: str) -> Iterator[str]:
    """Every file below `root` but hidden ones (a name starting with `.`, or inside such a folder, as a `**` glob
    skips them), following symlinked folders but entering no folder twice (a symlink loop such as `a/b -> a` would
    otherwise recurse until the path is too long, listing the same files again and again)."""
    seen: set[tuple[int, int]] = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            logger.warning("data.sources.%s: %s is a folder already read (a symlink loop): skipped", stream, folder)
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = os.path.join(folder, name)
            if name.startswith("."):
                continue
            if os.path.isfile(path):
                yield path
            else:
                _warn_dangling(stream, path)


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
        self._error: Exception | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            if self._error is not None:
                raise self._error
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the zstd file ended inside a frame (truncated)")
                return 0
            try:
                while chunk:
                    self._in_frame = True
                    self._pending += self._frame.decompress(chunk)
                    if not self._frame.eof:
                        break
                    chunk = self._frame.unused_data  # the next frame of a multi-frame file
                    self._frame = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
            except self._zstd.ZstdError as err:
                # what this chunk gave before the corruption (a whole good frame, say) is handed out first: the
                # error is raised once it is read, so that the lines before it are kept, as gzip keeps them
                self._error = err
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


class _LoneCarriageReturns(io.RawIOBase):
    """A .txt stream whose lone CRs (classic Mac line ends) read as LFs, so that they end lines as CRLF and LF
    do; the byte count does not change. `first` is the stream offset of the first one replaced (None: none)."""

    _LONE_CR = re.compile(rb"\r(?!\n)")

    def __init__(self, inner: io.BufferedIOBase):
        self._inner = inner
        self._held = b""  # a CR at the end of a block: whether it is lone depends on the next block
        self._ready = b""
        self._offset = 0  # of the next block
        self.first: int | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._ready:
            # read1: one read of the stream below, so that an error there loses nothing read before it
            block = self._inner.read1(1 << 16)
            data, self._held = self._held + block, b""
            if not data:
                return 0
            if block and data.endswith(b"\r"):
                data, self._held = data[:-1], b"\r"
            found = self._LONE_CR.search(data)
            if found:
                if self.first is None:
                    self.first = self._offset + found.start()
                data = self._LONE_CR.sub(b"\n", data)
            self._offset += len(data)
            self._ready = data
        n = min(len(buffer), len(self._ready))
        buffer[:n] = self._ready[:n]
        self._ready = self._ready[n:]
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


# -- parts: a big file is read by several clean tasks ----------------------------------------------------------------
SPLITTABLE = (".jsonl", ".json", ".parquet")  # uncompressed JSON lines split at line starts, parquet at row groups


def file_parts(path: str, task_bytes: int | None) -> list[list[int] | None]:
    """How a file is divided among clean tasks: [None] (the whole file, one task) or a list of parts, each
    [start, end): byte offsets of an uncompressed .jsonl (a line belongs to the part holding its first byte) or row
    groups of a .parquet, each part about `task_bytes` (data.task_bytes) big. Compressed files are read whole."""
    size = os.path.getsize(path)
    if not task_bytes or size <= task_bytes or not path.endswith(SPLITTABLE) or is_json_array(path):
        return [None]  # a JSON array has no line starts to divide it at
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


BOM = b"\xef\xbb\xbf"


def _lines(
    path: str,
    issues: InputIssues,
    max_line_bytes: int,
    part: list[int] | None = None,
    at: _LineNumbers | None = None,
    lone_cr_ends: bool = False,
) -> Iterator[tuple[int, str]]:
    """Yield (line number within the part, decoded line without its end) and record byte-level issues; `part` =
    [start, end) reads only the lines that begin in that byte range (see file_parts); `at` turns those numbers into
    the file's line numbers, for issues; `lone_cr_ends`: a lone CR ends a line too (.txt; in JSON lines it may be
    whitespace inside a record, and is kept as a newline there).

    A line longer than `max_line_bytes` is skipped without ever being held in memory whole. A file holding nothing
    but blank lines is an `empty_file`, as one of zero bytes is (for a file read in parts: when the whole is read).
    """
    start, end = part if part is not None else (0, None)
    saw_any = saw_text = saw_crlf = saw_cr = False
    last = b""
    f = _open_binary(path)
    cr = _LoneCarriageReturns(f) if lone_cr_ends else None
    if cr is not None:
        f = io.BufferedReader(cr, 1 << 16)
    with f:
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
                saw_text = True  # not an empty file: a line too long to read
                continue
            last = raw
            if cr is not None and cr.first is not None and cr.first < position and not saw_cr:
                issues.add("cr_line_ends", path, at(number))  # once per file, as CRLF
                saw_cr = True
            if raw.startswith(BOM):  # line 1, or the first line of a file concatenated to another
                issues.add("byte_order_mark", path, at(number))
                raw = raw[len(BOM) :]
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
            saw_text = saw_text or bool(text.strip())
            yield number, text.replace("\r", "\n") if "\r" in text else text
        at_end = end is None or position >= os.path.getsize(path)
    if not saw_text and start == 0 and at_end:
        issues.add("empty_file", path, 0, "only blank lines" if saw_any else "")
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
        except (ValueError, RecursionError) as err:  # RecursionError: nested too deep for the parser
            issues.add("malformed_json", path, at(number), str(err)[:80])
            continue
        doc = _document(record, text_field, path, issues, at(number))
        if doc is not None:
            yield doc


def _document(record, text_field: str, path: str, issues: InputIssues, line: int, where: str = "") -> RawDoc | None:
    """The document a JSON record holds, or None and an issue at `line` (`where` goes before the issue's detail)."""
    if not isinstance(record, dict) or text_field not in record or record[text_field] is None:
        issues.add("missing_text_field", path, line, f"{where}no '{text_field}' (data.text_field)")
        return None
    text = record[text_field]
    if not isinstance(text, str):
        issues.add("non_string_text_field", path, line, f"{where}'{text_field}' is {type(text).__name__}")
        return None
    if not text.strip():
        issues.add("empty_document", path, line, where.rstrip(": "))
        return None
    return RawDoc(text, path)


# -- a .json holding one JSON array ----------------------------------------------------------------------------------
def is_json_array(path: str) -> bool:
    """Whether a .json file holds one JSON array (its first character but a BOM and whitespace is `[`), rather than
    JSON lines; an unreadable file is not (the line reader reports it)."""
    if not path.removesuffix(".gz").removesuffix(".zst").endswith(".json"):
        return False
    try:
        with _open_binary(path) as f:
            head = f.read(4096)
    except Exception:  # noqa: BLE001 - a broken compressed stream: read (and reported) as JSON lines
        return False
    return head.removeprefix(BOM).lstrip().startswith(b"[")


def read_json_array(path: str, text_field: str, issues: InputIssues, max_line_bytes: int) -> Iterator[RawDoc]:
    """A .json holding one array of objects, each a document with its text in data.text_field (elements are
    numbered from 1: the `line` of their issues). It is one JSON value, so it is parsed whole, as a line is: one
    over data.max_line_bytes is skipped with the command that makes it JSON lines, which stream."""
    try:
        with _open_binary(path) as f:
            raw = f.read(max_line_bytes + 1)
    except Exception as err:  # noqa: BLE001 - gzip: EOFError, BadGzipFile, zlib.error; zstd: ZstdError
        kind = "truncated_file" if isinstance(err, EOFError) else "corrupt_file"
        issues.add(kind, path, 1, f"{type(err).__name__}: {str(err)[:80]}; a JSON array is read whole: none kept")
        return
    if len(raw) > max_line_bytes:
        detail = f"a JSON array over data.max_line_bytes={max_line_bytes} bytes; as JSON lines: jq -c '.[]' {path}"
        issues.add("enormous_line", path, 1, detail)
        return
    if raw.startswith(BOM):
        issues.add("byte_order_mark", path, 1)
        raw = raw[len(BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        issues.add("invalid_utf8", path, 1, f"byte {err.start}: replaced")
        text = raw.decode("utf-8", errors="replace")
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as err:  # a broken array has no line to resume at: the file is skipped
        issues.add("malformed_json", path, 1, f"{str(err)[:80]}; a JSON array is read whole: none kept")
        return
    if not records:
        issues.add("empty_file", path, 0, "an empty JSON array")
    for number, record in enumerate(records, 1):
        doc = _document(record, text_field, path, issues, number, "array element: ")
        if doc is not None:
            yield doc


def read_txt(path: str, issues: InputIssues, max_line_bytes: int) -> Iterator[RawDoc]:
    """Documents are separated by one or more blank lines."""
    buffer: list[str] = []
    for _, line in _lines(path, issues, max_line_bytes, lone_cr_ends=True):
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
    for group in groups:
        group_end = row + meta.row_group(group).num_rows
        batches = parquet.iter_batches(columns=[text_field], batch_size=4096, row_groups=[group])
        while True:
            try:
                batch = next(batches, None)
            except Exception as err:  # noqa: BLE001 - a corrupt page (OSError, ArrowInvalid...) past a sound footer
                # the rows before are kept, and the next row group is read on its own: its pages may be intact
                message = " ".join(str(err).split())[:80]  # arrow's messages run over several lines
                detail = f"{type(err).__name__}: {message}; rows before kept, the rest of row group {group} lost"
                issues.add("corrupt_file", path, row + 1, detail)
                break
            if batch is None:
                break
            for value in batch.column(0).to_pylist():
                row += 1
                doc = _parquet_document(value, text_field, path, issues, row)
                if doc is not None:
                    yield doc
        row = group_end


def _parquet_document(value, text_field: str, path: str, issues: InputIssues, row: int) -> RawDoc | None:
    if value is None:
        issues.add("missing_text_field", path, row, f"'{text_field}' is null")
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            issues.add("invalid_utf8", path, row, "replaced")
            value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        issues.add("non_string_text_field", path, row, f"'{text_field}' is {type(value).__name__}")
    elif not value.strip():
        issues.add("empty_document", path, row)
    else:
        return RawDoc(value, path)
    return None


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
        elif stem.endswith(".json") and is_json_array(path):
            if part is None or part[0] == 0:  # file_parts does not divide an array: read whole, by its first part
                yield from read_json_array(path, text_field, issues, max_line_bytes)
        elif stem.endswith((".jsonl", ".json")):
            yield from read_jsonl(path, text_field, issues, max_line_bytes, part)
        else:
            yield from read_txt(path, issues, max_line_bytes)
