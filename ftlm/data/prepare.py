"""ftlm-prepare: raw text files -> clean, deduplicated, tokenized MDS shards, a tokenizer and a report.

    ftlm-prepare                                  # the embedded corpus (conf/data/embedded.yaml)
    ftlm-prepare data=custom data.sources.ko='[/data/ko/*.jsonl.zst]' data.num_workers=32
    ftlm-prepare --gc [data overrides]            # remove old preparations of that data.out_dir nobody reads
    ftlm-prepare --rebuild [data overrides]       # set the preparation aside and make it anew (after damage)

The stages (pipeline.py), per stream, in two passes over the input so memory stays flat for any corpus size:
  1. read -> normalise -> quality filters -> exact and near dedup; kept documents go to `clean/<stream>.jsonl`
  2. tokenizer: trained on a sample mixed across streams, reused, or extended (`data.tokenizer`)
  3. tokenize -> MDS shards, train and held-out val split per stream

This module decides where a preparation is stored (layout.py): every check runs first (config, sources, tokenizer
files, out_dir); the stages then write into `<out_dir>/tmp/<fingerprint>.<host>.<pid>/`, stats.json is written
last, and the folder is renamed to `<out_dir>/<fingerprint>/` in one step. A preparation is never changed or
removed afterwards (only `--gc` removes, and only what nobody reads), so a training reading one never loses it.
A second call with the same config and inputs verifies the existing preparation and returns at once.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import corpus, layout, pipeline
from .checks import DataConfigError, as_dict, check_data_config
from .executor import ExecutorError
from .layout import (
    LOCKS_DIR,
    POINTER_FILE,
    PREPARATION_KEYS,
    STATS_FILE,
    TASKS_PREFIX,
    TMP_DIR,
    TOKENIZER_FILE,
    TRASH_DIR,
    DamagedPreparationError,
    ReaderLock,
    expand_path,
)
from .shards import write_json_atomic
from .sources import SourceError, resolve_files
from .tokenizer import TokenizerExtensionError

logger = logging.getLogger(__name__)

PIPELINE_VERSION = 3  # bump when a change in the stages changes the shards for the same inputs

# What a preparation refuses because of its input, each with a message naming the key or file and what to do:
# the apps print these as one line (`ftlm-prepare: error: ...`, exit status 2), never as a traceback.
REFUSALS = (
    DataConfigError,
    SourceError,
    TokenizerExtensionError,
    DamagedPreparationError,
    corpus.EmbeddedCorpusError,
    ExecutorError,  # Ray missing or unreachable, workers that keep dying (finished tasks are kept for the rerun)
)


@dataclass
class Prepared:
    out_dir: str  # the preparation's folder, <data.out_dir>/<fingerprint>: tokenizer.json, shards/, stats.json
    tokenizer_path: str
    streams: list[str]
    stats: dict = field(repr=False)
    # Held while this object lives: `ftlm-prepare --gc` never removes a preparation a live process holds.
    lock: ReaderLock | None = field(default=None, repr=False, compare=False)

    @property
    def root(self) -> str:
        return self.out_dir

    @property
    def fingerprint(self) -> str:
        return self.stats["fingerprint"]


# -- what shapes a preparation -------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_inputs(cfg: dict) -> dict[str, list]:
    """Every input file of every stream: [path, size, mtime_ns]; the embedded corpus by content digest.

    Also resolves every source, so a missing file fails here, before anything is written.
    """
    inputs = {}
    for stream, entries in cfg["sources"].items():
        entries = [entries] if isinstance(entries, str) else entries
        files: list = []
        for entry in entries:
            if str(entry).startswith(corpus.EMBEDDED_PREFIX):
                files.append([str(entry), "content", corpus.content_digest()])
            else:
                for path in resolve_files(stream, [entry]):
                    st = os.stat(path)
                    files.append([path, st.st_size, st.st_mtime_ns])
        inputs[stream] = files
    _warn_shared_files(inputs)
    return inputs


def _warn_shared_files(inputs: dict[str, list]) -> None:
    """A file named by two streams is read by both (deduplication is per stream), so its documents count twice in
    the mix: most likely a glob that reaches too far."""
    owner: dict[str, str] = {}
    for stream, files in inputs.items():
        for path, *_ in files:
            first = owner.setdefault(str(path), stream)
            if first != stream and not str(path).startswith(corpus.EMBEDDED_PREFIX):
                logger.warning(
                    "%s is a source of both data.sources.%s and data.sources.%s: its documents are read for each",
                    path, first, stream,
                )  # fmt: skip


def _digest(blob) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _keys(cfg: dict, inputs: dict) -> dict[str, str]:
    """fingerprint: everything that shapes the output (the folder name). content_key: the same without the tokenizer
    settings, so a preparation made with the tokenizer a run already has is found again. settings_key: the settings
    but the tokenizer's, to find the preparation an edited source replaces (and report what changed)."""
    settings = {k: cfg[k] for k in PREPARATION_KEYS if k != "tokenizer"}
    tok = cfg["tokenizer"]
    tok_inputs = {k: _sha256(expand_path(tok[k])) for k in ("path", "extend_from") if tok[k]}
    tok_settings = {k: v for k, v in tok.items() if k not in ("path", "extend_from")}
    if tok["path"]:  # reused as is: only the extra special tokens matter, not the training settings
        tok_settings = {"special_tokens": tok["special_tokens"]}
    base = {"version": PIPELINE_VERSION, "settings": settings}
    return {
        "fingerprint": _digest({**base, "inputs": inputs, "tokenizer": [tok_settings, tok_inputs]}),
        "content_key": _digest({**base, "inputs": inputs, "special_tokens": tok["special_tokens"]}),
        "settings_key": _digest(base),
    }


# -- checks that run before anything is written --------------------------------------------------------------------
def check_out_dir(out_dir: str) -> None:
    """out_dir must be a folder we can write, or creatable: fail now, naming it, rather than after hours of work.

    Creates the folder (empty) and probes it with a temporary file, which is the one test of writability that
    also holds for root, read-only mounts and network file systems.
    """
    import tempfile

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataConfigError(f"data.out_dir={out_dir} is a file, not a folder: choose another data.out_dir")
    parent = out_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DataConfigError(f"data.out_dir={out_dir}: {parent} is a file, so the folder cannot be created")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise DataConfigError(
            f"data.out_dir={out_dir} is not writable ({err.strerror or err}); choose another data.out_dir"
        ) from None


def _check_forced_tokenizer(path: str, specials: list[str]) -> None:
    """A tokenizer the data must be prepared with as it is (a run's own, trainer.init_from's): it needs an
    end-of-text token of its own (ftlm's <|endoftext|>, Llama's </s>, ...; a padding token is optional, padding
    uses end-of-text then) and every data.tokenizer.special_tokens, since adding any would change the vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer import EOT_NAMES, Tokenizer

    if not os.path.isfile(path):
        raise DataConfigError(f"the tokenizer to prepare with, {path}, does not exist")
    try:
        backend = HFTokenizer.from_file(path)
        own = backend.get_vocab(with_added_tokens=True)  # before Tokenizer adds what it lacks
        tokenizer = Tokenizer(backend)
    except Exception as err:
        raise DataConfigError(f"the tokenizer to prepare with, {path}, cannot be loaded: {err}") from None
    if not any(t in own for t in EOT_NAMES):
        raise DataConfigError(
            f"the tokenizer to prepare with, {path}, has no end-of-text token (one of {', '.join(EOT_NAMES)}); "
            "documents are separated by it, and adding one would change the vocabulary"
        )
    missing = [t for t in specials if t not in tokenizer.special_tokens()]
    if missing:
        raise DataConfigError(
            f"data.tokenizer.special_tokens: {missing} not in {path}; a run keeps its tokenizer as it is, so remove "
            f"them from data.tokenizer.special_tokens (adding tokens would change the vocabulary)"
        )


def _changes(old: dict, new: dict) -> list[str]:
    """What differs between two `inputs` records, per stream, in words."""
    out = []
    for stream in sorted(set(old) | set(new)):
        before = {e[0]: e[1:] for e in old.get(stream, [])}
        after = {e[0]: e[1:] for e in new.get(stream, [])}
        for path in sorted(set(before) | set(after)):
            if path not in before:
                out.append(f"{stream}: added {path}")
            elif path not in after:
                out.append(f"{stream}: removed {path}")
            elif before[path] != after[path]:
                b, a = before[path], after[path]
                if b[0] == "content":
                    out.append(f"{stream}: {path} has other content")
                else:
                    what = [f"size {b[0]} -> {a[0]} bytes"] if b[0] != a[0] else []
                    if b[1] != a[1]:
                        what.append(f"modified {_when(b[1])} -> {_when(a[1])}")
                    out.append(f"{stream}: changed {path} ({', '.join(what)})")
    return out


def _when(mtime_ns) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(mtime_ns) / 1e9))


def _preparations(out_dir: str) -> list[tuple[str, dict]]:
    """(folder, stats) of every complete preparation in out_dir, newest first."""
    found = []
    for path in glob.glob(os.path.join(out_dir, "*", STATS_FILE)):
        try:
            with open(path, encoding="utf-8") as f:
                found.append((os.path.dirname(path), json.load(f)))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda p: str(p[1].get("created", "")), reverse=True)


def _previous(out_dir: str, keys: dict) -> tuple[str, dict] | None:
    """The newest preparation made with the same settings (a source change replaces it)."""
    return next(((d, s) for d, s in _preparations(out_dir) if s.get("settings_key") == keys["settings_key"]), None)


def _equivalent(out_dir: str, keys: dict, tokenizer_sha: str) -> tuple[str, dict] | None:
    """A preparation of the same inputs and settings whose tokenizer is byte for byte the one given."""
    for folder, stats in _preparations(out_dir):
        same_tokenizer = stats.get("tokenizer", {}).get("sha256") == tokenizer_sha
        if stats.get("content_key") == keys["content_key"] and same_tokenizer:
            return folder, stats
    return None


# -- locking and publishing ----------------------------------------------------------------------------------------
@contextmanager
def _exclusive(out_dir: str, fingerprint: str):
    """One preparation of a fingerprint at a time, across processes; other fingerprints prepare side by side."""
    os.makedirs(os.path.join(out_dir, LOCKS_DIR), exist_ok=True)
    path = os.path.join(out_dir, LOCKS_DIR, f"{fingerprint}.lock")
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a job of its own may hold it for hours: say what this one waits for
            logger.info("another job is preparing %s (it holds %s); waiting for it, then using its result", fingerprint,
                        path)  # fmt: skip
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _point(out_dir: str, root: str, stats: dict) -> None:
    pointer = {"fingerprint": os.path.basename(root), "name": stats.get("name"), "created": stats.get("created")}
    # (a folder of the old layout is never pointed at; an unchanged pointer is not rewritten, so the ranks of a
    # job that all find the same preparation do not all write it)
    if os.path.dirname(root) == out_dir and layout.read_pointer(out_dir) != pointer["fingerprint"]:
        write_json_atomic(os.path.join(out_dir, POINTER_FILE), pointer)


def _reuse(out_dir: str, root: str, streams: list[str]) -> Prepared:
    lock = ReaderLock(root)
    stats = layout.verify(root, streams)  # a deleted shard or a corrupt index.json is named here, not mid-training
    _point(out_dir, root, stats)
    return Prepared(root, os.path.join(root, TOKENIZER_FILE), streams, stats, lock)


def _fsync_tree(folder: str) -> None:
    from pathlib import Path

    from ftlm.checkpoint.atomic import fsync_tree

    fsync_tree(Path(folder))


# -- the API -------------------------------------------------------------------------------------------------------
def prepare(data_cfg, tokenizer_path: str | None = None, *, rebuild: bool = False) -> Prepared:
    """Prepare `data.sources` into a folder of `data.out_dir`, or verify and return the one already there.

    tokenizer_path: prepare with exactly this tokenizer.json (a resumed run passes its own, so its vocabulary never
    changes); data.tokenizer's training settings are then ignored, and an existing preparation of the same inputs
    with a byte-identical tokenizer is reused. rebuild: make the preparation anew even if it exists (the old
    folder is set aside under out_dir/trash, for `--gc`). Single-process API: in a distributed job call it on one
    rank, barrier, then on the others (which find it done).
    """
    cfg = as_dict(data_cfg)
    streams = check_data_config(cfg)
    out_dir = expand_path(cfg["out_dir"])
    if tokenizer_path is not None:
        tokenizer_path = expand_path(tokenizer_path)
        _check_forced_tokenizer(tokenizer_path, cfg["tokenizer"]["special_tokens"])
        cfg["tokenizer"] = dict(cfg["tokenizer"], path=tokenizer_path, extend_from=None)
    inputs = source_inputs(cfg)  # resolves every source: a missing file fails here
    given = pipeline.given_tokenizer(cfg)  # a tokenizer file that does not load fails here
    check_out_dir(out_dir)  # the last check, and the first write: an empty folder
    keys = _keys(cfg, inputs)
    root = layout.preparation_dir(out_dir, keys["fingerprint"])

    if not rebuild:
        if os.path.isfile(os.path.join(root, STATS_FILE)):
            done = _reuse(out_dir, root, streams)
            logger.info("data already prepared in %s", root)
            return done
        if tokenizer_path is not None and os.path.isdir(out_dir):
            same = _equivalent(out_dir, keys, _sha256(tokenizer_path))
            if same is not None:
                done = _reuse(out_dir, same[0], streams)
                logger.info("data already prepared with this tokenizer in %s", same[0])
                return done
    previous = _previous(out_dir, keys) if os.path.isdir(out_dir) else None
    changes = _changes(previous[1].get("inputs", {}), inputs) if previous else []
    if changes:
        listing = "\n  ".join(changes)
        if cfg["source_change"] == "refuse":
            raise DataConfigError(
                f"data.sources changed since the preparation {previous[0]} (data.source_change=refuse):\n  {listing}\n"
                f"restore the files, or set data.source_change=prepare to prepare them anew beside it"
            )
        logger.warning(
            "data.sources changed since the preparation %s:\n  %s\npreparing anew beside it (it is kept)%s",
            previous[0],
            listing,
            f", with the given tokenizer {tokenizer_path}" if tokenizer_path else "",
        )

    with _exclusive(out_dir, keys["fingerprint"]):
        if not rebuild and os.path.isfile(os.path.join(root, STATS_FILE)):  # another process made it meanwhile
            logger.info("using %s, which another job prepared meanwhile", root)
            return _reuse(out_dir, root, streams)
        return _prepare(cfg, streams, out_dir, keys, inputs, given, changes, tokenizer_path, rebuild)


def _prepare(
    cfg: dict,
    streams: list[str],
    out_dir: str,
    keys: dict,
    inputs: dict,
    given,
    changes: list[str],
    tokenizer_path: str | None,
    rebuild: bool,
) -> Prepared:
    started = time.time()
    fingerprint = keys["fingerprint"]
    root = layout.preparation_dir(out_dir, fingerprint)
    _remove_dead_temps(out_dir, fingerprint)
    work = os.path.join(out_dir, TMP_DIR, f"{fingerprint}.{layout.host_tag()}")
    os.makedirs(work)
    logger.info("preparing %s into %s (written in %s, renamed when complete)", cfg["name"], root, work)
    try:
        # Finished tasks are kept in tmp/tasks-<fingerprint> (stable across attempts; the fingerprint lock guards it),
        # so a preparation killed half-way resumes them; pipeline.run removes it once complete.
        state = os.path.join(out_dir, TMP_DIR, f"{TASKS_PREFIX}{fingerprint}")
        result = pipeline.run(cfg, streams, work, given, state_dir=state)
        if tokenizer_path is not None:  # exactly the given file, byte for byte
            shutil.copyfile(tokenizer_path, os.path.join(work, TOKENIZER_FILE))
        result["timings"]["total_s"] = round(time.time() - started, 3)
        result["tokenizer"]["path"] = os.path.join(root, TOKENIZER_FILE)
        result["tokenizer"]["sha256"] = _sha256(os.path.join(work, TOKENIZER_FILE))
        report = {
            "fingerprint": fingerprint,
            "content_key": keys["content_key"],
            "settings_key": keys["settings_key"],
            "name": cfg["name"],
            "out_dir": root,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            **result,
            "inputs": inputs,
            "source_changes": changes,
            "settings": {k: cfg[k] for k in PREPARATION_KEYS},
        }
        write_json_atomic(os.path.join(work, STATS_FILE), report)  # last: marks the preparation complete
        _fsync_tree(work)
        _publish(out_dir, work, root, rebuild)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # our own unfinished folder: nobody else reads it
        raise
    print(format_report(report), flush=True)
    return _reuse(out_dir, root, streams)


def _publish(out_dir: str, work: str, root: str, rebuild: bool) -> None:
    """Rename the finished folder into place; an existing one (rebuild) is set aside first, never deleted.

    Without rebuild, a folder that appeared meanwhile (a preparer on another node whose lock this one did not
    see) is complete and may be read already: it stays, and ours is dropped (the same content).
    """
    if os.path.exists(root) and not rebuild:
        shutil.rmtree(work, ignore_errors=True)
        return
    if os.path.exists(root):
        trash = os.path.join(out_dir, TRASH_DIR)
        os.makedirs(trash, exist_ok=True)
        aside = os.path.join(trash, f"{os.path.basename(root)}.{layout.host_tag()}.{int(time.time())}")
        os.rename(root, aside)
        logger.warning("set the previous preparation aside as %s (`ftlm-prepare --gc` removes it)", aside)
    try:
        os.rename(work, root)  # atomic; fails if root appeared since the check above
    except OSError:
        if not os.path.isfile(os.path.join(root, STATS_FILE)):
            raise
        shutil.rmtree(work, ignore_errors=True)


def _remove_dead_temps(out_dir: str, fingerprint: str) -> None:
    for path in glob.glob(os.path.join(out_dir, TMP_DIR, f"{fingerprint}.*")):
        if layout.owner_gone(os.path.basename(path)):
            shutil.rmtree(path, ignore_errors=True)


# -- garbage collection: the only place preparations are removed ---------------------------------------------------
def _try_remove(folder: str) -> bool:
    """Remove `folder` unless a reader holds its stats.json; True if removed."""
    stats = os.path.join(folder, STATS_FILE)
    handle = open(stats, "rb") if os.path.isfile(stats) else None
    try:
        if handle is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        gone = os.path.join(os.path.dirname(folder), f".removing.{os.path.basename(folder)}.{layout.host_tag()}")
        os.rename(folder, gone)  # atomic: a reader opening it now finds it missing, never half removed
    finally:
        if handle is not None:
            handle.close()
    shutil.rmtree(gone, ignore_errors=True)
    return True


def _remove_idle_tasks(out_dir: str, folder: str) -> bool:
    """Remove tmp/tasks-<fingerprint> unless a preparation of that fingerprint runs (it holds the lock, on any node
    whose file system passes flock on); a later preparation then starts those tasks afresh. True if removed."""
    fingerprint = os.path.basename(folder)[len(TASKS_PREFIX) :]
    os.makedirs(os.path.join(out_dir, LOCKS_DIR), exist_ok=True)
    with open(os.path.join(out_dir, LOCKS_DIR, f"{fingerprint}.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        gone = os.path.join(os.path.dirname(folder), f".removing.{os.path.basename(folder)}.{layout.host_tag()}")
        os.rename(folder, gone)
    shutil.rmtree(gone, ignore_errors=True)
    return True


def gc(data_cfg) -> dict[str, list[str]]:
    """Remove the preparations of data.out_dir that latest.json does not name and no live process reads,
    everything set aside in trash/, the unfinished folders of dead preparations (this host's), and the finished
    tasks kept for the rerun of a killed preparation that is not running now."""
    cfg = as_dict(data_cfg)
    out_dir = expand_path(cfg["out_dir"])
    keep = layout.read_pointer(out_dir)
    result: dict[str, list[str]] = {"removed": [], "kept (latest)": [], "kept (in use)": []}
    for folder, _ in _preparations(out_dir):
        if os.path.basename(folder) == keep:
            result["kept (latest)"].append(folder)
        elif _try_remove(folder):
            result["removed"].append(folder)
        else:
            result["kept (in use)"].append(folder)
    for folder in sorted(glob.glob(os.path.join(out_dir, TRASH_DIR, "*"))):
        (result["removed"] if _try_remove(folder) else result["kept (in use)"]).append(folder)
    for folder in sorted(glob.glob(os.path.join(out_dir, TMP_DIR, "*"))):
        name = os.path.basename(folder)
        if name.startswith(TASKS_PREFIX):  # the finished tasks of a killed preparation, kept for its rerun
            (result["removed"] if _remove_idle_tasks(out_dir, folder) else result["kept (in use)"]).append(folder)
        elif layout.owner_gone(name):
            shutil.rmtree(folder, ignore_errors=True)
            result["removed"].append(folder)
    if os.path.isfile(os.path.join(out_dir, STATS_FILE)):
        logger.warning(
            "%s also holds a preparation of the layout before fingerprint folders (stats.json, shards/ at its top): "
            "remove those by hand once no job reads them",
            out_dir,
        )
    return result


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


def _run(cfg, mode: str | None = None) -> Prepared | dict:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if mode == "--gc":
        result = gc(cfg.data)
        for what, folders in result.items():
            for folder in folders:
                print(f"{what}: {folder}")
        print(f"gc: removed {len(result['removed'])} folder(s)")
        return result
    return prepare(cfg.data, rebuild=mode == "--rebuild")


def main() -> None:
    """Console script `ftlm-prepare`: a Hydra app over conf/ (use `data=...` and `data.*` overrides), plus
    `--gc` (remove old preparations nobody reads) and `--rebuild` (make the preparation anew)."""
    from ftlm.config import hydra_app

    modes = [a for a in sys.argv[1:] if a in ("--gc", "--rebuild")]
    if len(modes) > 1:
        print("ftlm-prepare: error: --gc and --rebuild exclude each other", file=sys.stderr)
        sys.exit(2)
    sys.argv = [a for a in sys.argv if a not in ("--gc", "--rebuild")]
    mode = modes[0] if modes else None

    def run(cfg):
        return _run(cfg, mode)

    hydra_app(refusals=REFUSALS, prog="ftlm-prepare")(run)()


if __name__ == "__main__":
    main()
