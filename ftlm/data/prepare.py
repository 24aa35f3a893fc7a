"""ftlm-prepare: raw text files -> clean, deduplicated, tokenized MDS shards, a tokenizer and a report.

    ftlm-prepare                                  # the embedded corpus (conf/data/embedded.yaml)
    ftlm-prepare data=custom data.sources.ko='[/data/ko/*.jsonl.zst]' data.num_workers=32

Per stream (`data.sources`), in two passes over the input so memory stays flat for any corpus size:
  1. read -> normalise -> quality filters -> exact and near dedup  (worker processes; dedup index in this process)
     kept documents go to `clean/<stream>.jsonl` under `data.out_dir`
  2. tokenizer: trained on a sample mixed across streams, reused, or extended (`data.tokenizer`)
  3. tokenize (worker processes) -> MDS shards, train and held-out val split per stream
Then `stats.json` is written last, atomically, with a fingerprint of everything that shaped the output: a second
call with the same config and inputs returns at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import corpus
from .checks import as_dict, check_data_config
from .clean import CleanConfig, QualityFilter, normalize
from .dedup import DedupConfig, Deduplicator, Fingerprinter
from .shards import SPLITS, SplitWriter, split_dir, token_dtype, write_json_atomic
from .sources import InputIssues, read_documents, resolve_files
from .tokenizer import Tokenizer, add_special_tokens, extend_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

PIPELINE_VERSION = 1  # bump when a change here changes the shards for the same inputs
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
STATS_FILE = "stats.json"
TOKENIZER_FILE = "tokenizer.json"
CHUNK_DOCS = 256  # documents per task sent to a worker
CHUNK_CHARS = 1 << 21  # ... or fewer, when they are long


@dataclass
class Prepared:
    out_dir: str
    tokenizer_path: str
    streams: list[str]
    stats: dict = field(repr=False)


def expand_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


# -- worker side ---------------------------------------------------------------------------------------------------
# Worker processes are started with "spawn" (safe beside torch.distributed and tokenizers' threads) and receive only
# plain dicts; these globals are their per-process state.
_STATE: dict[str, Any] = {}


def _init_worker(clean_cfg: dict, dedup_cfg: dict, in_pool: bool) -> None:
    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    clean = CleanConfig(**clean_cfg)
    _STATE["filters"] = {lang: QualityFilter(clean, lang) for lang in (None, "ko", "en")}
    _STATE["fingerprint"] = Fingerprinter(DedupConfig(**dedup_cfg))
    _STATE["tokenizers"] = {}


def _clean_chunk(task: tuple[str | None, list[str]]) -> list[tuple]:
    """-> per document: (clean text or None, reject reason or None, exact key, MinHash signature)."""
    lang, texts = task
    quality, fingerprint = _STATE["filters"][lang], _STATE["fingerprint"]
    out = []
    for raw in texts:
        text = normalize(raw)
        reason = quality.reject_reason(text) if text else "empty_after_cleaning"
        if reason:
            out.append((None, reason, None, None))
        else:
            key, signature = fingerprint(text)
            out.append((text, None, key, signature))
    return out


def _tokenize_chunk(task: tuple[str, list[str]]) -> list[tuple[np.ndarray, int]]:
    """-> per document: (token ids, characters)."""
    path, texts = task
    tokenizer = _STATE["tokenizers"].get(path)
    if tokenizer is None:
        tokenizer = _STATE["tokenizers"][path] = Tokenizer.load(path)
    dtype = token_dtype(tokenizer.vocab_size)
    return [(np.asarray(ids, dtype=dtype), len(text)) for ids, text in zip(tokenizer.encode_batch(texts), texts)]


class Workers:
    """An ordered map over worker processes with bounded look-ahead; runs in this process when n <= 1."""

    def __init__(self, n: int, clean_cfg: dict, dedup_cfg: dict):
        self.n = n
        self._pool = None
        if n > 1:
            self._pool = multiprocessing.get_context("spawn").Pool(n, _init_worker, (clean_cfg, dedup_cfg, True))
        else:
            _init_worker(clean_cfg, dedup_cfg, False)

    def map(self, fn: Callable, tasks: Iterable) -> Iterator:
        if self._pool is None:
            yield from map(fn, tasks)
            return
        pending: deque = deque()
        for task in tasks:
            pending.append(self._pool.apply_async(fn, (task,)))
            if len(pending) >= 3 * self.n:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


def _chunks(texts: Iterable[str], head: Any) -> Iterator[tuple[Any, list[str]]]:
    chunk: list[str] = []
    chars = 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield head, chunk
            chunk, chars = [], 0
    if chunk:
        yield head, chunk


def _progress(total: int | None, desc: str, unit: str = "doc"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, mininterval=0.5)


# -- pass 1: read, clean, filter, dedup ----------------------------------------------------------------------------
def clean_stream(stream: str, files: list[str], cfg: dict, workers: Workers, clean_path: str) -> dict:
    issues = InputIssues()
    lang = (cfg.get("lang") or {}).get(stream)
    dedup = Deduplicator(DedupConfig.from_cfg(cfg.get("dedup")))
    counts: Counter = Counter()
    drops: Counter = Counter()

    def texts() -> Iterator[str]:
        for doc in read_documents(
            files, cfg.get("text_field", "text"), issues, int(cfg.get("max_line_bytes", 1 << 26))
        ):
            counts["docs_in"] += 1
            counts["bytes_in"] += len(doc.text.encode("utf-8"))
            yield doc.text

    tmp = f"{clean_path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out, _progress(None, f"clean {stream}") as bar:
        for results in workers.map(_clean_chunk, _chunks(texts(), lang)):
            for text, reason, key, signature in results:
                if reason is None:
                    reason = dedup.is_duplicate(key, signature)
                    reason = reason and f"{reason}_duplicate"
                if reason is not None:
                    drops[reason] += 1
                    continue
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                counts["docs_out"] += 1
                counts["chars_out"] += len(text)
                counts["words_out"] += len(text.split())
                counts["bytes_out"] += len(text.encode("utf-8"))
            bar.update(len(results))
    os.replace(tmp, clean_path)
    if not counts["docs_out"]:
        raise RuntimeError(
            f"data.sources.{stream}: no document survived reading, cleaning and deduplication "
            f"(read {counts['docs_in']}; dropped {dict(drops)}; input issues "
            f"{dict(issues.counts)}); check the files, data.text_field and data.clean"
        )
    filters = {k: v for k, v in drops.items() if not k.endswith("_duplicate")}
    return {
        "lang": lang,
        "files": len(files),
        "docs_in": counts["docs_in"],
        "bytes_in": counts["bytes_in"],
        "input_issues": issues.to_dict(),
        "filtered": dict(sorted(filters.items())),
        "duplicates": {"exact": drops["exact_duplicate"], "near": drops["near_duplicate"]},
        "docs_out": counts["docs_out"],
        "bytes_out": counts["bytes_out"],
        "chars_out": counts["chars_out"],
        "words_out": counts["words_out"],
    }


def _clean_texts(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


# -- tokenizer -----------------------------------------------------------------------------------------------------
def tokenizer_sample(clean_paths: dict[str, str], stats: dict, tok_cfg: dict) -> tuple[Iterator[str], int]:
    """Documents for tokenizer training, each stream weighted to its share of `sample_chars` characters.

    A stream with less text than its share is repeated (BPE counts scale, so that is exact weighting), one with
    more is thinned evenly; both deterministically.
    """
    # Equal shares by default, not data.mix: the mix is a training choice and may change without re-tokenizing.
    shares = tok_cfg.get("sample_shares") or {s: 1.0 for s in clean_paths}
    shares = {s: float(shares.get(s, 0.0)) for s in clean_paths}
    total_share = sum(shares.values())
    budget = int(tok_cfg.get("sample_chars", 200_000_000))
    weights = {s: budget * shares[s] / total_share / max(stats[s]["chars_out"], 1) for s in clean_paths}
    expected_docs = int(sum(weights[s] * stats[s]["docs_out"] for s in clean_paths))
    logger.info(
        "tokenizer sample: %s",
        ", ".join(f"{s} x{w:.3g} of {stats[s]['chars_out']:,} chars" for s, w in weights.items()),
    )

    def texts() -> Iterator[str]:
        for stream, path in clean_paths.items():
            weight = weights[stream]
            if weight <= 0:
                continue
            for i, text in enumerate(_clean_texts(path)):
                for _ in range(int((i + 1) * weight) - int(i * weight)):
                    yield text

    return texts(), expected_docs


def given_tokenizer(cfg: dict) -> Tokenizer | None:
    """The tokenizer named by data.tokenizer.path or .extend_from, loaded before out_dir is cleared (it may live there)."""
    tok_cfg = cfg.get("tokenizer") or {}
    path = tok_cfg.get("path") or tok_cfg.get("extend_from")
    return Tokenizer.load(expand_path(path)) if path else None


def build_tokenizer(
    cfg: dict, given: Tokenizer | None, clean_paths: dict[str, str], stats: dict, path: str
) -> tuple[Tokenizer, str]:
    tok_cfg = cfg.get("tokenizer") or {}
    specials = list(tok_cfg.get("special_tokens") or [])
    vocab_size = int(tok_cfg.get("vocab_size", 32000))
    min_frequency = int(tok_cfg.get("min_frequency", 2))
    if tok_cfg.get("path"):
        tokenizer = add_special_tokens(given, specials)
        origin = f"reused {tok_cfg['path']}"
    else:
        texts, length = tokenizer_sample(clean_paths, stats, tok_cfg)
        if tok_cfg.get("extend_from"):
            base = given
            tokenizer = add_special_tokens(
                extend_tokenizer(base, texts, vocab_size, min_frequency, length=length), specials
            )
            origin = f"extended {tok_cfg['extend_from']} ({base.vocab_size} -> {tokenizer.vocab_size})"
        else:
            tokenizer = train_tokenizer(texts, vocab_size, min_frequency, specials, length=length)
            origin = "trained"
    if not tokenizer.is_byte_level():
        logger.warning("the tokenizer is not byte-level: text it cannot spell may become unknown tokens")
    tokenizer.save(path)
    return tokenizer, origin


# -- pass 2: tokenize and shard ------------------------------------------------------------------------------------
def val_count(n_docs: int, fraction: float, min_docs: int) -> int:
    if fraction <= 0 or n_docs < 2:
        return 0
    return min(max(min_docs, round(n_docs * fraction)), n_docs // 2)


def is_val(index: int, n_docs: int, n_val: int) -> bool:
    """Exactly n_val of n_docs indices, evenly spread, so the held-out split looks like the whole stream."""
    return (index + 1) * n_val // n_docs > index * n_val // n_docs


def shard_stream(
    stream: str,
    clean_path: str,
    cfg: dict,
    workers: Workers,
    tokenizer: Tokenizer,
    tokenizer_path: str,
    out_dir: str,
    n_docs: int,
) -> dict:
    n_val = val_count(n_docs, float(cfg.get("val_fraction", 0.005)), int(cfg.get("val_min_docs", 100)))
    writers = {
        split: SplitWriter(
            split_dir(out_dir, stream, split),
            tokenizer.vocab_size,
            cfg.get("shard_compression"),
            int(cfg.get("shard_size_limit", 1 << 26)),
        )
        for split in SPLITS
    }
    index = 0
    chars = Counter()
    with _progress(n_docs, f"tokenize {stream}") as bar:
        for results in workers.map(_tokenize_chunk, _chunks(_clean_texts(clean_path), tokenizer_path)):
            for tokens, n_chars in results:
                split = "val" if is_val(index, n_docs, n_val) else "train"
                writers[split].write(tokens)
                chars[split] += n_chars
                index += 1
            bar.update(len(results))
    meta = {split: writer.close() for split, writer in writers.items()}
    return {
        "docs_train": meta["train"]["docs"],
        "docs_val": meta["val"]["docs"],
        "tokens_train": meta["train"]["tokens"],
        "tokens_val": meta["val"]["tokens"],
        "chars_train": chars["train"],
        "chars_val": chars["val"],
    }


# -- the whole preparation -----------------------------------------------------------------------------------------
def _file_identity(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def fingerprint(cfg: dict) -> str:
    """Hash of every setting and input file (path, size, mtime) that shapes the prepared output."""
    inputs = {}
    for stream, entries in cfg["sources"].items():
        entries = [entries] if isinstance(entries, str) else entries
        files: list = []
        for entry in entries:
            if str(entry).startswith(corpus.EMBEDDED_PREFIX):
                files += [[entry, corpus.CORPUS_VERSION]] + [_file_identity(f) for f in corpus.origin_files()]
            else:
                files += [_file_identity(f) for f in resolve_files(stream, [entry])]
        inputs[stream] = files
    tok = cfg.get("tokenizer") or {}
    for key in ("path", "extend_from"):
        if tok.get(key):
            inputs[f"tokenizer.{key}"] = _file_identity(expand_path(tok[key]))
    blob = {"version": PIPELINE_VERSION, "settings": {k: cfg.get(k) for k in PREPARATION_KEYS}, "inputs": inputs}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


@contextmanager
def _exclusive(out_dir: str):
    """One preparation per out_dir at a time, across processes (e.g. two nodes sharing a machine or a disk)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_prepared(out_dir: str, expected_fingerprint: str | None = None) -> Prepared | None:
    """The preparation in out_dir if it is complete (and matches the fingerprint, when one is given)."""
    path = os.path.join(out_dir, STATS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
    except ValueError:
        return None
    if expected_fingerprint is not None and stats.get("fingerprint") != expected_fingerprint:
        return None
    tokenizer_path = os.path.join(out_dir, TOKENIZER_FILE)
    streams = list(stats.get("streams", {}))
    complete = os.path.isfile(tokenizer_path) and all(
        os.path.isfile(os.path.join(split_dir(out_dir, s, split), "index.json")) for s in streams for split in SPLITS
    )
    return Prepared(out_dir, tokenizer_path, streams, stats) if complete else None


def prepare(data_cfg) -> Prepared:
    """Prepare `data.sources` into `data.out_dir`, or return at once if that is already done.

    Single-process API: in a distributed job call it on one rank and barrier.
    """
    cfg = as_dict(data_cfg)
    streams = check_data_config(cfg)
    out_dir = expand_path(cfg["out_dir"])
    wanted = fingerprint(cfg)  # also resolves every source: a missing file fails here, before any work
    with _exclusive(out_dir):
        done = load_prepared(out_dir, wanted)
        if done is not None:
            logger.info("data already prepared in %s (fingerprint %s)", out_dir, wanted)
            return done
        return _prepare(cfg, streams, out_dir, wanted)


def _prepare(cfg: dict, streams: list[str], out_dir: str, wanted: str) -> Prepared:
    started = time.time()
    given = given_tokenizer(cfg)
    for name in (STATS_FILE, TOKENIZER_FILE):  # the marker goes first: a crash below leaves no valid preparation
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in ("shards", "clean"):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    os.makedirs(os.path.join(out_dir, "clean"))
    logger.info("preparing %s into %s", cfg.get("name", "data"), out_dir)

    sources = corpus.expand_embedded(
        {s: list(v) if not isinstance(v, str) else [v] for s, v in cfg["sources"].items()}, out_dir
    )
    files = {stream: resolve_files(stream, sources[stream]) for stream in streams}
    n_workers = cfg.get("num_workers")
    n_workers = (os.cpu_count() or 1) if n_workers is None else int(n_workers)
    clean_cfg = CleanConfig.from_cfg(cfg.get("clean")).__dict__
    dedup_cfg = DedupConfig.from_cfg(cfg.get("dedup")).__dict__
    workers = Workers(n_workers, clean_cfg, dedup_cfg)
    timings = {}
    try:
        stats: dict[str, dict] = {}
        clean_paths = {s: os.path.join(out_dir, "clean", f"{s}.jsonl") for s in streams}
        t = time.time()
        for stream in streams:
            stats[stream] = clean_stream(stream, files[stream], cfg, workers, clean_paths[stream])
        timings["clean_dedup_s"] = time.time() - t

        t = time.time()
        tokenizer_path = os.path.join(out_dir, TOKENIZER_FILE)
        tokenizer, origin = build_tokenizer(cfg, given, clean_paths, stats, tokenizer_path)
        timings["tokenizer_s"] = time.time() - t

        t = time.time()
        for stream in streams:
            stats[stream].update(
                shard_stream(
                    stream,
                    clean_paths[stream],
                    cfg,
                    workers,
                    tokenizer,
                    tokenizer_path,
                    out_dir,
                    stats[stream]["docs_out"],
                )
            )
            _add_ratios(stats[stream])
        timings["tokenize_shard_s"] = time.time() - t
    finally:
        workers.close()
    if not cfg.get("keep_clean_text", False):
        shutil.rmtree(os.path.join(out_dir, "clean"), ignore_errors=True)
    timings["total_s"] = time.time() - started

    report = {
        "fingerprint": wanted,
        "name": cfg.get("name"),
        "out_dir": out_dir,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tokenizer": {
            "path": tokenizer_path,
            "origin": origin,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "pad_id": tokenizer.pad_id,
            "special_tokens": tokenizer.special_tokens(),
        },
        "streams": stats,
        "num_workers": n_workers,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "settings": {k: cfg.get(k) for k in PREPARATION_KEYS},
    }
    print(format_report(report), flush=True)
    write_json_atomic(os.path.join(out_dir, STATS_FILE), report)  # last: marks the preparation complete
    return Prepared(out_dir, tokenizer_path, streams, report)


def _add_ratios(s: dict) -> None:
    tokens = s["tokens_train"] + s["tokens_val"]
    s["tokens"] = tokens
    s["tokens_per_char"] = round(tokens / max(s["chars_out"], 1), 4)
    s["tokens_per_word"] = round(tokens / max(s["words_out"], 1), 4)
    s["bytes_per_token"] = round(s["bytes_out"] / max(tokens, 1), 4)
    s["chinchilla_params"] = s["tokens_train"] // 20  # compute-optimal model size for this many tokens (~20/param)


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def format_report(report: dict) -> str:
    streams = report["streams"]
    names = list(streams)
    rows: list[tuple[str, list[str]]] = [
        ("language", [str(streams[s]["lang"]) for s in names]),
        ("files", [str(streams[s]["files"]) for s in names]),
        ("documents read", [f"{streams[s]['docs_in']:,}" for s in names]),
    ]
    issue_kinds = sorted({k for s in names for k in streams[s]["input_issues"]["counts"]})
    rows += [
        (f"  input: {k}", [str(streams[s]["input_issues"]["counts"].get(k, 0)) for s in names]) for k in issue_kinds
    ]
    filter_kinds = sorted({k for s in names for k in streams[s]["filtered"]})
    rows += [(f"  dropped: {k}", [str(streams[s]["filtered"].get(k, 0)) for s in names]) for k in filter_kinds]
    rows += [
        ("  exact duplicates", [str(streams[s]["duplicates"]["exact"]) for s in names]),
        ("  near duplicates", [str(streams[s]["duplicates"]["near"]) for s in names]),
        ("documents kept", [f"{streams[s]['docs_out']:,}" for s in names]),
        ("  train / val", [f"{streams[s]['docs_train']:,} / {streams[s]['docs_val']:,}" for s in names]),
        ("bytes in -> kept", [f"{_human(streams[s]['bytes_in'])} -> {_human(streams[s]['bytes_out'])}" for s in names]),
        (
            "tokens train / val",
            [f"{_human(streams[s]['tokens_train'])} / {_human(streams[s]['tokens_val'])}" for s in names],
        ),
        ("tokens per char", [f"{streams[s]['tokens_per_char']:.3f}" for s in names]),
        ("tokens per word", [f"{streams[s]['tokens_per_word']:.3f}" for s in names]),
        ("Chinchilla-optimal params", [_human(streams[s]["chinchilla_params"]) for s in names]),
    ]
    total_train = sum(streams[s]["tokens_train"] for s in names)
    width = max(len(r[0]) for r in rows)
    cols = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    lines = [
        f"data report: {report['name']}  ({report['out_dir']})",
        f"tokenizer: {report['tokenizer']['origin']}, vocabulary {report['tokenizer']['vocab_size']:,}",
        " " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols)),
    ]
    lines += [label.ljust(width) + "  " + "  ".join(v.rjust(c) for v, c in zip(values, cols)) for label, values in rows]
    lines.append(
        f"all streams: {_human(total_train)} training tokens -> Chinchilla-optimal model "
        f"~{_human(total_train / 20)} parameters; took {report['timings']['total_s']:.1f}s "
        f"with {report['num_workers']} worker(s)"
    )
    for s in names:
        for kind, examples in streams[s]["input_issues"]["examples"].items():
            lines.append(f"  {s}: {kind}: {', '.join(examples[:3])}" + (" ..." if len(examples) > 3 else ""))
    return "\n".join(lines)


def _run(cfg) -> Prepared:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return prepare(cfg.data)


def main() -> None:
    """Console script `ftlm-prepare`: a Hydra app over conf/ (use `data=...` and `data.*` overrides)."""
    from ftlm.config import hydra_app

    hydra_app()(_run)()


if __name__ == "__main__":
    main()
