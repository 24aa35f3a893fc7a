"""The embedded default corpus: real Korean and English text that the installation already brings.

Korean: the Constitution of the Republic of Korea and ten National Assembly bills, shipped as plain data files
inside the `konlpy` package (read as files; konlpy's Java-backed modules are never imported). English: the
documentation topics of CPython's `pydoc_data` (the text behind `help('FOR')` and friends).

`materialize(out_dir)` writes them as `corpus/ko.jsonl` and `corpus/en.jsonl`, which `data.sources` then names
(`embedded:ko`, `embedded:en`) so that they flow through the same reading, cleaning and sharding as a user's
own files.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator

EMBEDDED_PREFIX = "embedded:"
CORPUS_VERSION = 1  # bump when the way documents are cut out of the files changes
STREAMS = ("ko", "en")
# Documents are paragraph groups of about this many characters: long enough to learn from, yet enough of them
# for a held-out split (the Korean files hold about 36k characters, the English topics about 460k).
KO_TARGET_CHARS = 450
EN_TARGET_CHARS = 1400

_PAGE_MARK = re.compile(r"^\s*-\s*\d+\s*-\s*$")
_ARTICLE = re.compile(r"^\s*제\d+조(의\d+)?\s")
_CHAPTER = re.compile(r"^\s*(제\d+장|제\d+절|부칙)")


class EmbeddedCorpusError(RuntimeError):
    pass


def konlpy_corpus_dir() -> str:
    spec = importlib.util.find_spec("konlpy")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedCorpusError(
            "the embedded corpus needs the `konlpy` package (its data files only); "
            "install ftlm's dependencies, or choose data=custom"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "data", "corpus")
        if os.path.isdir(path):
            return path
    raise EmbeddedCorpusError("the `konlpy` package has no data/corpus directory; reinstall it or choose data=custom")


def content_digest() -> str:
    """sha256 of the corpus's origin files by content and name relative to their package: the same corpus gives
    the same digest in any checkout, venv or install path (a preparation's fingerprint uses it)."""
    import pydoc_data

    digest = hashlib.sha256(str(CORPUS_VERSION).encode())
    roots = (konlpy_corpus_dir(), os.path.dirname(os.path.dirname(pydoc_data.__file__)))
    for path in origin_files():
        name = next((os.path.relpath(path, r) for r in roots if path.startswith(r + os.sep)), os.path.basename(path))
        with open(path, "rb") as f:
            data = f.read()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def origin_files() -> list[str]:
    """Every installed file the corpus is built from (their sizes go into the preparation's fingerprint)."""
    root = konlpy_corpus_dir()
    files = [os.path.join(root, "kolaw", "constitution.txt")] + sorted(glob.glob(os.path.join(root, "kobill", "*.txt")))
    import pydoc_data.topics

    return files + [pydoc_data.topics.__file__]


def _group(paragraphs: list[str], target: int = KO_TARGET_CHARS, sep: str = "\n") -> Iterator[str]:
    buffer: list[str] = []
    size = 0
    for paragraph in paragraphs:
        buffer.append(paragraph)
        size += len(paragraph)
        if size >= target:
            yield sep.join(buffer)
            buffer, size = [], 0
    if buffer:
        yield sep.join(buffer)


def constitution_documents(path: str) -> Iterator[str]:
    """The preamble, then runs of articles (never across a chapter) of about KO_TARGET_CHARS characters."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().replace("\r\n", "\n").split("\n")]
    chapters: list[tuple[str, list[str]]] = [("", [])]
    for line in lines:
        if not line:
            continue
        if _CHAPTER.match(line):
            chapters.append((line, []))
        elif _ARTICLE.match(line) or not chapters[-1][1]:
            chapters[-1][1].append(line)
        else:  # a numbered paragraph (②, ③ ...) belongs to the article above it
            chapters[-1][1][-1] += "\n" + line
    for title, articles in chapters:
        for body in _group(articles):
            yield f"{title}\n{body}" if title else body


def bill_documents(path: str) -> Iterator[str]:
    """A bill's explanation and amendment text, with its print layout undone.

    The files keep the printed page: lines wrapped at a fixed width with blank lines between them, page numbers,
    and a two-column old/new comparison table at the end (dropped: it is mostly dashes).
    """
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f]
    lengths = sorted(len(line.strip()) for line in lines if line.strip())
    wrap_width = lengths[int(0.9 * (len(lengths) - 1))] if lengths else 0  # the printed line width
    paragraphs: list[str] = []
    ended_with_space = False
    previous_width = 0
    for line in lines:
        if "대비표" in line:
            break
        if not line.strip() or _PAGE_MARK.match(line):
            continue
        previous = paragraphs[-1] if paragraphs else ""
        starts_paragraph = (
            not paragraphs
            or line[:1].isspace()
            or previous.endswith((".", ":", ")"))
            or len(previous) < 20
            or previous_width < 0.8 * wrap_width
        )
        text = " ".join(line.split())
        if starts_paragraph:
            paragraphs.append(text)
        else:  # a wrapped line: rejoin; a space survives only where the printed line ended with one
            paragraphs[-1] += (" " if ended_with_space else "") + text
        ended_with_space = line.endswith((" ", "\t"))
        previous_width = len(line.strip())
    return _group([p.strip() for p in paragraphs if p.strip()])


def korean_documents() -> Iterator[dict]:
    root = konlpy_corpus_dir()
    constitution = os.path.join(root, "kolaw", "constitution.txt")
    for i, text in enumerate(constitution_documents(constitution)):
        yield {"text": text, "source": f"konlpy:kolaw/constitution.txt#{i}"}
    for path in sorted(glob.glob(os.path.join(root, "kobill", "*.txt"))):
        for i, text in enumerate(bill_documents(path)):
            yield {"text": text, "source": f"konlpy:kobill/{os.path.basename(path)}#{i}"}


def english_documents() -> Iterator[dict]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", topics[name]) if p.strip()]
        for i, text in enumerate(_group(paragraphs, target=EN_TARGET_CHARS, sep="\n\n")):
            yield {"text": text, "source": f"pydoc_data.topics:{name}#{i}"}


def materialize(out_dir: str) -> dict[str, str]:
    """Write the corpus as one jsonl file per stream under `out_dir/corpus`; returns stream -> path."""
    corpus_dir = os.path.join(out_dir, "corpus")
    os.makedirs(corpus_dir, exist_ok=True)
    paths = {}
    for stream, documents in (("ko", korean_documents()), ("en", english_documents())):
        path = os.path.join(corpus_dir, f"{stream}.jsonl")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for record in documents:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        paths[stream] = path
    return paths


def expand_embedded(sources: dict, out_dir: str) -> dict:
    """Replace `embedded:<stream>` entries of `data.sources` by the materialized files."""
    wanted = {
        entry[len(EMBEDDED_PREFIX) :]
        for files in sources.values()
        for entry in files
        if str(entry).startswith(EMBEDDED_PREFIX)
    }
    if not wanted:
        return sources
    unknown = wanted - set(STREAMS)
    if unknown:
        raise EmbeddedCorpusError(
            f"data.sources: unknown embedded stream(s) {sorted(unknown)}; the embedded corpus has {list(STREAMS)}"
        )
    paths = materialize(out_dir)
    return {
        stream: [paths[e[len(EMBEDDED_PREFIX) :]] if str(e).startswith(EMBEDDED_PREFIX) else e for e in files]
        for stream, files in sources.items()
    }
