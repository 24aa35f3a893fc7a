"""The preparation's stages, as tasks on an executor (`ftlm.data.executor`: local processes or a Ray cluster).

`run` prepares every stream into a work directory and returns the statistics; `prepare.py` decides where that
directory is and how the result is published (stats.json, fingerprint). The stages:

  clean     one task per input file (or per data.task_bytes of a big .jsonl / .parquet): read -> normalise ->
            quality filters -> exact key + MinHash signature; the surviving documents and the dedup rows
            (hash-partitioned) are spilled to the state directory
  pairs     one task per stream and partition: exact groups and verified LSH candidate pairs (`ftlm.data.dedup`)
  clusters  one task per stream: union-find over the pairs -> which documents each clean task drops
  tokenizer in this process: trained on a sample of the kept text mixed across streams, reused, or extended
  tokenize  one task per clean task: drop the duplicates, batch-encode, write MDS shards of the train / val split
  merge     in this process: every split's per-task shard folders joined with streaming's merge_index

Every task writes its outputs atomically and then a marker with its result under `<state>/done/`; a preparation that
was killed resumes from those markers (same inputs and settings), rerunning only the unfinished tasks. Task
attempts are recorded too, so a task retried after its worker died is reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import corpus, dedup
from .checks import DataConfigError
from .clean import CleanConfig, QualityFilter, normalize
from .config import with_defaults
from .dedup import DedupConfig
from .encode import FastEncoder
from .executor import make_executor
from .layout import TOKENIZER_FILE, expand_path
from .shards import SPLITS, SplitWriter, split_dir, token_dtype, write_json_atomic
from .sources import EXAMPLES_PER_ISSUE, InputIssues, file_parts, read_documents, resolve_files
from .tokenizer import Tokenizer, add_special_tokens, extend_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

STATE_DIR = ".pipeline"  # default resumable state below the work directory
STATE_VERSION = 2  # bump when a change here changes what the tasks write for the same inputs
CHUNK_DOCS = 512  # documents processed together inside a task (one numpy / batch-encode call)
CHUNK_CHARS = 1 << 22  # ... or fewer, when they are long
# Test-only fault injection: "<stage>:<task>" kills that task's worker on its first attempt (a worker dying);
# "stop:<stage>:<n>" kills this process after n tasks of that stage finished (a preparation killed half-way).
FAULT_ENV = "FTLM_PIPELINE_FAULT"


# -- worker-side caches (per process: built on first use, reused by every task the process runs) -------------------
_CACHE: dict[Any, Any] = {}


def _quality(clean_cfg: dict, lang: str | None) -> QualityFilter:
    key = ("filter", json.dumps(clean_cfg, sort_keys=True, default=str), lang)
    if key not in _CACHE:
        _CACHE[key] = QualityFilter(CleanConfig.from_cfg(clean_cfg), lang)
    return _CACHE[key]


BPE_CACHE_WORDS = 1 << 18  # words whose BPE result a tokenize worker remembers (the library's default is 10,000)


def _content_key(path: str) -> str:
    """What a cached tokenizer is keyed by: its file's content, so that every copy of it (the preparation's own, the
    one a worker was warmed up with) shares one tokenizer and one table of units per process. The file is read and
    hashed once per version of it (path, size, mtime), not on every call."""
    st = os.stat(path)
    version = ("content", path, st.st_size, st.st_mtime_ns)
    if version not in _CACHE:
        with open(path, "rb") as f:
            _CACHE[version] = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
    return _CACHE[version]


def _tokenizer(path: str) -> Tokenizer:
    """The tokenizer at `path`, set up for speed with the same ids: a larger BPE word cache, and no NFC normaliser
    when that is all it has (every document was NFC-normalised by the clean stage, and NFC is idempotent)."""
    key = ("tokenizer", _content_key(path))
    if key not in _CACHE:
        from tokenizers import models

        tokenizer = Tokenizer.load(path)
        backend = tokenizer.backend
        spec = json.loads(backend.to_str())
        if spec.get("normalizer") == {"type": "NFC"}:
            backend.normalizer = None
        model = spec.get("model") or {}
        if model.get("type") == "BPE" and not model.get("dropout"):
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            options = ("unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback")
            options += ("ignore_merges",)
            kwargs = {k: model[k] for k in options if model.get(k) is not None}
            backend.model = models.BPE(model["vocab"], merges, cache_capacity=BPE_CACHE_WORDS, **kwargs)
        _CACHE[key] = tokenizer
    return _CACHE[key]


def _encoder(path: str) -> FastEncoder:
    """The tokenize stage's encoder for the tokenizer at `path`; its table of units is kept for the process's tasks."""
    key = ("encoder", _content_key(path))
    if key not in _CACHE:
        tokenizer = _tokenizer(path)
        _CACHE[key] = FastEncoder(tokenizer, token_dtype(tokenizer.vocab_size))
    return _CACHE[key]


def _chunks(items: Iterator, size: Callable[[Any], int]) -> Iterator[list]:
    chunk: list = []
    chars = 0
    for item in items:
        chunk.append(item)
        chars += size(item)
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _progress(total: int | None, desc: str, unit: str = "task"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, mininterval=0.5)


# -- task bookkeeping: markers, attempts, faults --------------------------------------------------------------------
def _marker(state: str, stage: str, key: str) -> str:
    return os.path.join(state, "done", stage, f"{key}.json")


def _begin(state: str, stage: str, key: str) -> float:
    """Record an attempt (for the retry count); apply a test fault if one names this task. -> CPU clock."""
    folder = os.path.join(state, "attempts")
    os.makedirs(folder, exist_ok=True)
    previous = [n for n in os.listdir(folder) if n.startswith(f"{stage}.{key}.")]
    with open(os.path.join(folder, f"{stage}.{key}.{uuid.uuid4().hex[:8]}"), "w") as f:
        f.write(f"{os.getpid()}\n")
    if os.environ.get(FAULT_ENV) == f"{stage}:{key}" and not previous:
        os.kill(os.getpid(), signal.SIGKILL)  # a worker dying mid-task, exactly once
    return time.process_time()


def _finish(state: str, stage: str, key: str, result: dict, cpu: float | None = None) -> dict:
    if cpu is not None:
        result["cpu_s"] = round(time.process_time() - cpu, 4)  # this task's own CPU time, for benchmarks
    path = _marker(state, stage, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, result)
    return result


def _stage(executor, state: str, stage: str, fn: Callable, tasks: list[tuple[str, tuple]], report: dict) -> dict:
    """Run fn(*args) for every (key, args) not already done; -> {key: result}. Counts run / resumed / retried."""
    results: dict[str, Any] = {}
    todo = []
    for key, args in tasks:
        path = _marker(state, stage, key)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                results[key] = json.load(f)
        else:
            todo.append((key, args))
    counts = {"tasks": len(tasks), "run": len(todo), "resumed": len(tasks) - len(todo), "retried": 0}
    stop = os.environ.get(FAULT_ENV, "").split(":")
    stop_after = int(stop[2]) if len(stop) == 3 and stop[0] == "stop" and stop[1] == stage else None
    if todo:
        with _progress(len(tasks), stage) as bar:
            bar.update(len(tasks) - len(todo))
            for n, (i, result) in enumerate(executor.map(fn, [args for _, args in todo]), 1):
                results[todo[i][0]] = result
                bar.update(1)
                if stop_after is not None and n >= stop_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # test fault: the whole preparation killed half-way
    folder = os.path.join(state, "attempts")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    attempts = Counter(name.split(".")[1] for name in names if name.startswith(f"{stage}."))
    retried = sorted(k for k, _ in todo if attempts[k] > 1)
    if retried:
        counts["retried"] = len(retried)
        logger.warning("%s: %d task(s) were retried after their worker died: %s", stage, len(retried), retried[:10])
    counts["cpu_s"] = round(sum(r.get("cpu_s", 0.0) for r in results.values()), 3)
    report[stage] = counts
    return results


# -- stage: clean (+ fingerprints) ----------------------------------------------------------------------------------
def clean_task(
    state: str, task: int, path: str, part: list[int] | None, lang: str | None, settings: dict, partitions: int
) -> dict:
    """Read one file (or one part of a big one: `sources.file_parts`), normalise and filter its documents; spill
    the survivors and their dedup rows."""
    key = str(task)
    cpu = _begin(state, "clean", key)
    quality = _quality(settings["clean"], lang)
    dedup_cfg = DedupConfig(**settings["dedup"])
    issues = InputIssues()
    counts: Counter = Counter()
    filtered: Counter = Counter()
    keys, sigs, meta = [], [], []
    docs_path = os.path.join(state, "docs", f"{task}.jsonl")
    os.makedirs(os.path.dirname(docs_path), exist_ok=True)
    tmp = f"{docs_path}.tmp{os.getpid()}"
    raw = read_documents([path], settings["text_field"], issues, settings["max_line_bytes"], part)
    with open(tmp, "w", encoding="utf-8") as out:
        for chunk in _chunks((doc.text for doc in raw), len):
            counts["docs_in"] += len(chunk)
            counts["bytes_in"] += sum(len(t.encode("utf-8", "surrogatepass")) for t in chunk)  # JSON may hold "\\ud800"
            texts = [normalize(t) for t in chunk]
            kept, kept_words = [], []
            reasons, n_words = quality.judge(texts)  # one batched pass over all the rules
            for text, reason, words in zip(texts, reasons, n_words.tolist()):
                reason = reason if text else "empty_after_cleaning"
                if reason:
                    filtered[reason] += 1
                else:
                    kept.append(text)
                    kept_words.append(words)
            if not kept:
                continue
            out.write("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in kept))
            k, s = dedup.fingerprint(kept, dedup_cfg)
            keys.append(k)
            sigs.append(s)
            meta.append([(len(t), w, len(t.encode("utf-8"))) for t, w in zip(kept, kept_words)])
    os.replace(tmp, docs_path)
    n = sum(map(len, meta))
    keys = np.concatenate(keys) if keys and keys[0] is not None else None
    sigs = np.concatenate(sigs) if sigs and sigs[0] is not None else None
    if n == 0:  # nothing survived: empty rows keep the later stages uniform
        keys = np.zeros((0, 2), np.uint64) if dedup_cfg.exact else None
        sigs = np.zeros((0, dedup_cfg.num_perm), np.uint32) if dedup_cfg.near else None
    dedup.write_rows(_dedup_dir(state, settings["stream"]), task, keys, sigs, dedup_cfg, partitions)
    meta_arr = np.array([m for part in meta for m in part], dtype=np.int64).reshape(-1, 3)
    dedup._save(os.path.join(state, "docs", f"{task}.meta.npy"), meta_arr)
    result = {
        "docs_in": counts["docs_in"],
        "bytes_in": counts["bytes_in"],
        "kept": n,
        "filtered": dict(filtered),
        "issues": issues.to_dict(),
    }
    return _finish(state, "clean", key, result, cpu)


def _dedup_dir(state: str, stream: str) -> str:
    return os.path.join(state, "dedup", stream)


def pairs_task(state: str, stream: str, tasks: list[int], partition: int, dedup_cfg: dict) -> dict:
    key = f"{stream}-{partition}"
    cpu = _begin(state, "pairs", key)
    result = dedup.find_pairs(_dedup_dir(state, stream), tasks, partition, DedupConfig(**dedup_cfg))
    return _finish(state, "pairs", key, result, cpu)


def clusters_task(state: str, stream: str, partitions: int) -> dict:
    cpu = _begin(state, "clusters", stream)
    result = dedup.clusters(_dedup_dir(state, stream), partitions)
    return _finish(state, "clusters", stream, result, cpu)


def _kept_texts(state: str, stream: str, task: int) -> Iterator[str]:
    """The documents of one clean task that deduplication kept, in order."""
    dropped = set(dedup.drops(_dedup_dir(state, stream), task)[:, 0].tolist())
    with open(os.path.join(state, "docs", f"{task}.jsonl"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i not in dropped:
                yield json.loads(line)["text"]


# -- stage: tokenize + shard ----------------------------------------------------------------------------------------
def tokenize_task(
    state: str,
    task: int,
    stream: str,
    tokenizer_path: str,
    first: int,
    n_docs: int,
    n_val: int,
    settings: dict,
) -> dict:
    """Tokenize one clean task's kept documents (global indices first.. of n_docs) into per-task MDS folders."""
    key = str(task)
    cpu = _begin(state, "tokenize", key)
    tokenizer = _tokenizer(tokenizer_path)
    encoder = _encoder(tokenizer_path)
    folders = {split: os.path.join(state, "shards", stream, split, str(task)) for split in SPLITS}
    tmps = {split: f"{folder}.tmp{os.getpid()}" for split, folder in folders.items()}
    for folder in tmps.values():
        shutil.rmtree(folder, ignore_errors=True)
    writers = {
        split: SplitWriter(
            tmps[split], tokenizer.vocab_size, settings["shard_compression"], settings["shard_size_limit"]
        )
        for split in SPLITS
    }
    clean_out = None
    if settings["keep_clean_text"]:
        clean_path = os.path.join(state, "clean", stream, f"{task}.jsonl")
        os.makedirs(os.path.dirname(clean_path), exist_ok=True)
        clean_out = open(f"{clean_path}.tmp{os.getpid()}", "w", encoding="utf-8")
    chars = Counter()
    index = first
    bos = np.array(tokenizer.document_start, dtype=token_dtype(tokenizer.vocab_size))
    for chunk in _chunks(_kept_texts(state, stream, task), len):
        for text, ids in zip(chunk, encoder.encode_batch(chunk)):  # the library's ids (ftlm/data/encode.py)
            split = "val" if is_val(index, n_docs, n_val) else "train"
            writers[split].write(np.concatenate((bos, ids)) if len(bos) else ids)  # BOS first: Llama-style
            chars[split] += len(text)
            index += 1
        if clean_out is not None:
            clean_out.write("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chunk))
    meta = {split: writer.close() for split, writer in writers.items()}
    for split, folder in folders.items():
        shutil.rmtree(folder, ignore_errors=True)  # a previous attempt's, finished but unrecorded
        os.replace(tmps[split], folder)
    if clean_out is not None:
        clean_out.close()
        os.replace(clean_out.name, clean_out.name.rsplit(".tmp", 1)[0])
    result = {f"{k}_{split}": meta[split][k] for split in SPLITS for k in ("docs", "tokens")}
    result.update({f"chars_{split}": chars[split] for split in SPLITS})
    return _finish(state, "tokenize", key, result, cpu)


def val_count(n_docs: int, fraction: float, min_docs: int) -> int:
    if fraction <= 0 or n_docs < 2:
        return 0
    return min(max(min_docs, round(n_docs * fraction)), n_docs // 2)


def is_val(index: int, n_docs: int, n_val: int) -> bool:
    """Exactly n_val of n_docs indices, evenly spread, so the held-out split looks like the whole stream."""
    return (index + 1) * n_val // n_docs > index * n_val // n_docs


# -- tokenizer -----------------------------------------------------------------------------------------------------
def tokenizer_sample(
    kept: dict[str, Callable[[], Iterator[str]]], stats: dict, tok_cfg: dict
) -> tuple[Iterator[str], int]:
    """Documents for tokenizer training, each stream weighted to its share of `sample_chars` characters.

    `kept[stream]()` iterates that stream's kept documents. A stream with less text than its share is repeated (BPE
    counts scale, so that is exact weighting), one with more is thinned evenly; both deterministically.
    """
    # Equal shares by default, not data.mix: the mix is a training choice and may change without re-tokenizing.
    shares = tok_cfg["sample_shares"] or {s: 1.0 for s in kept}
    shares = {s: float(shares.get(s, 0.0)) for s in kept}
    total_share = sum(shares.values())
    budget = int(tok_cfg["sample_chars"])
    weights = {s: budget * shares[s] / total_share / max(stats[s]["chars_out"], 1) for s in kept}
    expected_docs = int(sum(weights[s] * stats[s]["docs_out"] for s in kept))
    logger.info(
        "tokenizer sample: %s",
        ", ".join(f"{s} x{w:.3g} of {stats[s]['chars_out']:,} chars" for s, w in weights.items()),
    )

    def texts() -> Iterator[str]:
        for stream, documents in kept.items():
            weight = weights[stream]
            if weight <= 0:
                continue
            for i, text in enumerate(documents()):
                for _ in range(int((i + 1) * weight) - int(i * weight)):
                    yield text

    return texts(), expected_docs


def given_tokenizer(cfg: dict) -> Tokenizer | None:
    """The tokenizer named by data.tokenizer.path or .extend_from (load it before clearing out_dir: it may be in it);
    DataConfigError naming the key when it is missing or does not load."""
    tok_cfg = cfg["tokenizer"]
    key = "path" if tok_cfg["path"] else "extend_from"
    if not tok_cfg[key]:
        return None
    path = expand_path(tok_cfg[key])
    try:
        return Tokenizer.load(path)
    except FileNotFoundError:
        raise DataConfigError(f"data.tokenizer.{key}: {path} does not exist") from None
    except Exception as err:  # the tokenizers library raises plain Exceptions for a file it cannot parse
        raise DataConfigError(f"data.tokenizer.{key}: {path} is not a tokenizer.json that loads ({err})") from None


def build_tokenizer(
    cfg: dict, given: Tokenizer | None, kept: dict[str, Callable[[], Iterator[str]]], stats: dict, path: str
) -> tuple[Tokenizer, str]:
    tok_cfg = cfg["tokenizer"]
    specials = list(tok_cfg["special_tokens"] or [])
    vocab_size, min_frequency = int(tok_cfg["vocab_size"]), int(tok_cfg["min_frequency"])
    if tok_cfg["path"]:
        tokenizer = add_special_tokens(given, specials)
        origin = f"reused {tok_cfg['path']}"
    else:
        texts, length = tokenizer_sample(kept, stats, tok_cfg)
        if tok_cfg["extend_from"]:
            base = given
            tokenizer = add_special_tokens(
                extend_tokenizer(base, texts, vocab_size, min_frequency, length=length), specials
            )
            origin = f"extended {tok_cfg['extend_from']} ({base.vocab_size} -> {tokenizer.vocab_size})"
        else:
            tokenizer = train_tokenizer(texts, vocab_size, min_frequency, specials, length=length)
            origin = "trained"
    if not tokenizer.never_unknown():
        logger.warning("the tokenizer is neither byte-level nor byte-fallback: text it cannot spell becomes <unk>")
    tokenizer.save(path)
    return tokenizer, origin


# -- the whole run -------------------------------------------------------------------------------------------------
def _settings(cfg: dict, stream: str) -> dict:
    """What the tasks of one stream need from the config: plain values only (they travel to other machines)."""
    return {
        "stream": stream,
        "clean": CleanConfig.from_cfg(cfg["clean"]).__dict__,
        "dedup": DedupConfig.from_cfg(cfg["dedup"]).__dict__,
        "text_field": cfg["text_field"],
        "max_line_bytes": int(cfg["max_line_bytes"]),
        "shard_compression": cfg["shard_compression"],
        "shard_size_limit": int(cfg["shard_size_limit"]),
        "keep_clean_text": bool(cfg["keep_clean_text"]),
    }


def _plan(state: str, cfg: dict, files: dict[str, list[str]], partitions: int, tokenizer: Tokenizer | None) -> dict:
    """The task list, reused from an interrupted run of the same inputs and settings; otherwise the state is reset."""
    identity = {
        "version": STATE_VERSION,
        "files": {s: [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in fs] for s, fs in files.items()},
        "settings": {s: _settings(cfg, s) for s in files},
        "lang": cfg["lang"],
        "tokenizer_cfg": cfg["tokenizer"],
        "given": hashlib.sha256(tokenizer.to_str().encode()).hexdigest() if tokenizer is not None else None,
        "val": [cfg["val_fraction"], cfg["val_min_docs"]],
        "task_bytes": cfg["task_bytes"],
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = os.path.join(state, "plan.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
        if plan.get("key") == key:
            logger.info("resuming the interrupted preparation in %s", state)
            return plan
        logger.info("the state in %s is of other inputs or settings: starting over", state)
    shutil.rmtree(state, ignore_errors=True)
    os.makedirs(state)
    task_bytes = cfg["task_bytes"]
    tasks = [(stream, f, part) for stream in files for f in files[stream] for part in file_parts(f, task_bytes)]
    plan = {"key": key, "partitions": partitions, "tasks": tasks}
    write_json_atomic(path, plan)
    return plan


def _merge_issues(results: list[dict]) -> dict:
    counts: Counter = Counter()
    examples: dict[str, list] = {}
    for r in results:
        counts.update(r["issues"]["counts"])
        for kind, shown in r["issues"]["examples"].items():
            examples.setdefault(kind, []).extend(shown)
    return {
        "counts": dict(sorted(counts.items())),
        "examples": {k: v[:EXAMPLES_PER_ISSUE] for k, v in examples.items()},
    }


def warm_up(_: Any = None, tokenizer_path: str | None = None) -> int:
    """Import and build what tasks need (streaming, the filter tables, the tokenize stage's encoder when given its
    tokenizer): a benchmark times work, not start-up."""
    import streaming  # noqa: F401

    from ftlm.checkpoint import atomic  # noqa: F401  (the tasks' atomic writes)

    from .clean import char_tables
    from .native import text_ops

    char_tables()
    text_ops()
    if tokenizer_path is not None:
        _encoder(tokenizer_path)
    return os.getpid()


def run(
    cfg: dict,
    streams: list[str],
    work_dir: str,
    tokenizer: Tokenizer | None,
    *,
    state_dir: str | None = None,
    executor=None,
) -> dict:
    """Run every stage for `streams` into `work_dir` (tokenizer.json, shards/, clean/ with keep_clean_text).

    `tokenizer` is the one named by data.tokenizer.path / extend_from (`given_tokenizer`), or None to train one.
    `state_dir` keeps the finished tasks so that a killed run resumes: give the same folder to a rerun of the same
    preparation (default: <work_dir>/.pipeline). `executor`: one made by `make_executor` (kept open), instead of
    the one data.executor names (made and closed here). Returns {"tokenizer": {...}, "streams": {stream: stats},
    "num_workers": n, "execution": {...}, "timings": {...}}.
    """
    started = time.time()
    cfg = with_defaults(cfg)  # a partial config (tests, notebooks) takes conf/data/base.yaml's values
    state = expand_path(state_dir or os.path.join(work_dir, STATE_DIR))
    sources = corpus.expand_embedded(
        {s: list(v) if not isinstance(v, str) else [v] for s, v in cfg["sources"].items()}, work_dir
    )
    files = {stream: resolve_files(stream, sources[stream]) for stream in streams}
    n_workers = cfg["num_workers"]
    n_workers = (os.cpu_count() or 1) if n_workers is None else int(n_workers)
    own_executor = executor is None
    if own_executor:
        executor = make_executor(cfg["executor"], n_workers, cfg["ray_address"])
    settings = {s: _settings(cfg, s) for s in streams}
    lang = cfg["lang"] or {}
    for s in streams:  # here, before any task: a filter that cannot be built (py3langid missing) fails now
        _quality(settings[s]["clean"], lang.get(s))
    timings: dict[str, float] = {}
    execution: dict[str, Any] = {"executor": executor.name, "workers": executor.workers}
    try:
        plan = _plan(state, cfg, files, max(2 * executor.workers, 1), tokenizer)
        partitions = plan["partitions"]
        tasks = [(i, stream, path, part) for i, (stream, path, part) in enumerate(plan["tasks"])]

        t = time.time()
        cleaned = _stage(
            executor,
            state,
            "clean",
            clean_task,
            [(str(i), (state, i, path, part, lang.get(s), settings[s], partitions)) for i, s, path, part in tasks],
            execution,
        )
        stream_tasks = {s: [i for i, st, _, _ in tasks if st == s] for s in streams}
        pair_tasks = [
            (f"{s}-{p}", (state, s, stream_tasks[s], p, settings[s]["dedup"]))
            for s in streams
            for p in range(partitions)
        ]
        _stage(executor, state, "pairs", pairs_task, pair_tasks, execution)
        dups = _stage(
            executor, state, "clusters", clusters_task, [(s, (state, s, partitions)) for s in streams], execution
        )
        timings["clean_dedup_s"] = time.time() - t

        stats: dict[str, dict] = {}
        kept_per_task: dict[int, int] = {}
        for s in streams:
            results = [cleaned[str(i)] for i in stream_tasks[s]]
            out = Counter()
            for i in stream_tasks[s]:
                meta = np.load(os.path.join(state, "docs", f"{i}.meta.npy"))
                dropped = dedup.drops(_dedup_dir(state, s), i)[:, 0]
                keep = np.ones(len(meta), dtype=bool)
                keep[dropped] = False
                kept_per_task[i] = int(keep.sum())
                out.update(dict(zip(("chars_out", "words_out", "bytes_out"), meta[keep].sum(axis=0).tolist())))
            filtered: Counter = Counter()
            for r in results:
                filtered.update(r["filtered"])
            stats[s] = {
                "lang": lang.get(s),
                "files": len(files[s]),
                "docs_in": sum(r["docs_in"] for r in results),
                "bytes_in": sum(r["bytes_in"] for r in results),
                "input_issues": _merge_issues(results),
                "filtered": dict(sorted(filtered.items())),
                "duplicates": {"exact": dups[s]["exact"], "near": dups[s]["near"]},
                "docs_out": sum(kept_per_task[i] for i in stream_tasks[s]),
                "bytes_out": out["bytes_out"],
                "chars_out": out["chars_out"],
                "words_out": out["words_out"],
            }
            if not stats[s]["docs_out"]:
                raise DataConfigError(
                    f"data.sources.{s}: no document survived reading, cleaning and deduplication "
                    f"(read {stats[s]['docs_in']}; dropped {dict(filtered)}, duplicates {stats[s]['duplicates']}; "
                    f"input issues {stats[s]['input_issues']['counts']}); check the files, data.text_field and "
                    "data.clean"
                )

        t = time.time()
        tokenizer_path = os.path.join(state, TOKENIZER_FILE)
        origin_path = _marker(state, "tokenizer", "origin")
        if os.path.isfile(origin_path) and os.path.isfile(tokenizer_path):
            with open(origin_path, encoding="utf-8") as f:
                origin = json.load(f)["origin"]
            built = Tokenizer.load(tokenizer_path)
        else:
            kept = {
                s: (lambda s=s: (text for i in stream_tasks[s] for text in _kept_texts(state, s, i))) for s in streams
            }
            built, origin = build_tokenizer(cfg, tokenizer, kept, stats, tokenizer_path)
            _finish(state, "tokenizer", "origin", {"origin": origin})
        timings["tokenizer_s"] = time.time() - t

        t = time.time()
        token_tasks = []
        for s in streams:
            n_docs = stats[s]["docs_out"]
            n_val = val_count(n_docs, float(cfg["val_fraction"]), int(cfg["val_min_docs"]))
            first = 0
            for i in stream_tasks[s]:
                token_tasks.append((str(i), (state, i, s, tokenizer_path, first, n_docs, n_val, settings[s])))
                first += kept_per_task[i]
        tokenized = _stage(executor, state, "tokenize", tokenize_task, token_tasks, execution)
        for s in streams:
            sharded = _merge_shards(state, work_dir, s, stream_tasks[s], built.vocab_size)
            chars = {split: sum(tokenized[str(i)][f"chars_{split}"] for i in stream_tasks[s]) for split in SPLITS}
            stats[s].update(
                {
                    "docs_train": sharded["train"]["docs"],
                    "docs_val": sharded["val"]["docs"],
                    "tokens_train": sharded["train"]["tokens"],
                    "tokens_val": sharded["val"]["tokens"],
                    "chars_train": chars["train"],
                    "chars_val": chars["val"],
                }
            )
            _add_ratios(stats[s])
            if cfg["keep_clean_text"]:
                _join_clean(state, work_dir, s, stream_tasks[s])
        shutil.copyfile(tokenizer_path, os.path.join(work_dir, TOKENIZER_FILE))
        timings["tokenize_shard_s"] = time.time() - t
    finally:
        if own_executor:
            executor.close()
    shutil.rmtree(state, ignore_errors=True)  # complete: the shards are in work_dir now
    timings["total_s"] = time.time() - started
    return {
        "tokenizer": {
            "path": os.path.join(work_dir, TOKENIZER_FILE),
            "origin": origin,
            "vocab_size": built.vocab_size,
            "eot_id": built.eot_id,
            "pad_id": built.pad_id,
            "special_tokens": built.special_tokens(),
        },
        "streams": stats,
        "num_workers": executor.workers,
        "execution": execution,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _merge_shards(state: str, work_dir: str, stream: str, tasks: list[int], vocab_size: int) -> dict:
    """Move each task's MDS folder below the split and join their index.json files into one (merge_index)."""
    from streaming.base.util import merge_index

    meta = {}
    for split in SPLITS:
        target = split_dir(work_dir, stream, split)
        os.makedirs(target, exist_ok=True)
        indexes, docs, tokens = [], 0, 0
        for i in tasks:
            source = os.path.join(state, "shards", stream, split, str(i))
            folder = os.path.join(target, str(i))
            shutil.rmtree(folder, ignore_errors=True)
            shutil.move(source, folder)  # a rename when state and work_dir share a file system
            with open(os.path.join(folder, "ftlm.json"), encoding="utf-8") as f:
                counts = json.load(f)
            docs += counts["docs"]
            tokens += counts["tokens"]
            indexes.append(os.path.join(folder, "index.json"))
        _quiet_merge(merge_index, indexes, target)
        meta[split] = {"docs": docs, "tokens": tokens, "dtype": token_dtype(vocab_size).name, "vocab_size": vocab_size}
        write_json_atomic(os.path.join(target, "ftlm.json"), meta[split])
    return meta


def _quiet_merge(merge_index: Callable, indexes: list[str], target: str) -> None:
    """merge_index warns on every call that its target "exists and not empty": it is not empty by design (it holds
    the task folders being merged). Silenced at the root and at "streaming", whose own level the trainer sets."""
    loggers = [logging.getLogger(), logging.getLogger("streaming")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        merge_index(indexes, target)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _join_clean(state: str, work_dir: str, stream: str, tasks: list[int]) -> None:
    target = os.path.join(work_dir, "clean", f"{stream}.jsonl")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(f"{target}.tmp{os.getpid()}", "wb") as out:
        for i in tasks:
            with open(os.path.join(state, "clean", stream, f"{i}.jsonl"), "rb") as f:
                shutil.copyfileobj(f, out)
    os.replace(f"{target}.tmp{os.getpid()}", target)


def _add_ratios(s: dict) -> None:
    tokens = s["tokens_train"] + s["tokens_val"]
    s["tokens"] = tokens
    s["tokens_per_char"] = round(tokens / max(s["chars_out"], 1), 4)
    s["tokens_per_word"] = round(tokens / max(s["words_out"], 1), 4)
    s["bytes_per_token"] = round(s["bytes_out"] / max(tokens, 1), 4)
    s["chinchilla_params"] = s["tokens_train"] // 20  # compute-optimal model size for this many tokens (~20/param)
