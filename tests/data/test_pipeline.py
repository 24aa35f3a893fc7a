"""The staged pipeline on its executors: same documents and stats everywhere, dedup across tasks, resume, retries."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ftlm.data import pipeline
from ftlm.data.executor import ExecutorError, make_executor
from ftlm.data.shards import split_dir
from ftlm.data.stream import read_split
from ftlm.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
SYLLABLES = [chr(0xAC00 + i * 37) for i in range(300)]


def korean(rng: random.Random, n: int = 100) -> str:
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(n)) + "."


def english(rng: random.Random, n: int = 100) -> str:
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def edit(text: str, rng: random.Random, n: int = 1) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), n):
        words[i] = words[i][::-1] + "x"
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two streams of three files each; duplicates (exact and near) within and across files; bad lines in every file.

    -> (sources, expected kept documents per stream as multisets of text, malformed lines per stream)"""
    root = tmp_path_factory.mktemp("pipeline-corpus")
    rng = random.Random(0)
    sources, kept, malformed = {}, {}, {}
    for stream, make in (("ko", korean), ("en", english)):
        originals = [make(rng) for _ in range(60)]
        files = [[] for _ in range(3)]
        for i, text in enumerate(originals):
            files[i % 3].append(json.dumps({"text": text}, ensure_ascii=False))
        first = Counter(originals)
        # Copies land in other files than their originals: only cross-task dedup can find them. The copy in the
        # earlier file (task) is the one kept.
        for i in range(0, 60, 6):
            for j, copy in ((i, originals[i].upper()), (i + 1, edit(originals[i + 1], rng))):  # exact, near
                home, away = j % 3, (j % 3 + 1 + i // 6 % 2) % 3
                files[away].append(json.dumps({"text": copy}, ensure_ascii=False))
                if away < home:
                    first[originals[j]] -= 1
                    first[copy] += 1
        files[0].append(json.dumps({"text": "too short"}))  # dropped by a filter
        bad = 0
        for k, lines in enumerate(files):
            lines.insert(len(lines) // 2, "{not json")
            lines.append(json.dumps({"body": "no text field"}))
            bad += 2
            folder = root / stream
            folder.mkdir(exist_ok=True)
            (folder / f"part{k}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        sources[stream] = [str(root / stream)]
        kept[stream] = +first
        malformed[stream] = bad
    return sources, kept, malformed


def config(sources, **overrides) -> dict:
    cfg = {
        "sources": sources,
        "lang": {"ko": "ko", "en": "en"},
        "clean": {"min_chars": 50, "min_words": 10},
        "dedup": {"threshold": 0.8},
        "tokenizer": {"vocab_size": 600, "sample_chars": 200_000, "min_frequency": 2},
        "val_fraction": 0.1,
        "val_min_docs": 2,
        "num_workers": 2,
        "executor": "local",
    }
    cfg.update(overrides)
    return cfg


def prepared_texts(work: Path, streams=("ko", "en")) -> dict:
    tokenizer = Tokenizer.load(str(work / "tokenizer.json"))
    return {
        s: Counter(
            tokenizer.decode(tokens.tolist())
            for split in ("train", "val")
            for tokens in read_split(split_dir(str(work), s, split))
        )
        for s in streams
    }


def comparable(result: dict) -> dict:
    return {"streams": result["streams"], "vocab": result["tokenizer"]["vocab_size"]}


def tasks(result: dict, stage: str) -> dict:
    return {k: v for k, v in result["execution"][stage].items() if k != "cpu_s"}


@pytest.fixture(scope="module")
def local_run(corpus, tmp_path_factory):
    sources, _, _ = corpus
    work = tmp_path_factory.mktemp("local")
    return work, pipeline.run(config(sources, num_workers=1), ["ko", "en"], str(work), None)


def test_local_run_keeps_exactly_the_good_documents(corpus, local_run):
    _, kept, malformed = corpus
    work, result = local_run
    assert prepared_texts(work) == kept  # every original once; copies in other files (other tasks) removed
    for s in ("ko", "en"):
        stats = result["streams"][s]
        assert stats["duplicates"] == {"exact": 10, "near": 10}
        assert stats["filtered"] == {"too_short": 1}
        issues = stats["input_issues"]["counts"]
        assert issues["malformed_json"] + issues["missing_text_field"] == malformed[s]  # counted across tasks
        assert stats["docs_train"] + stats["docs_val"] == stats["docs_out"] == 60 and stats["docs_val"] == 6
    assert tasks(result, "clean") == {"tasks": 6, "run": 6, "resumed": 0, "retried": 0}
    assert not (work / pipeline.STATE_DIR).exists()  # the resumable state is removed once complete


def test_merging_the_shards_logs_no_warning_under_the_trainers_logging(corpus, tmp_path, caplog):
    """The trainer sets the "streaming" logger's own level (setup_logging), where streaming's merge_index warned
    "exists and not empty" for every split of every stream into the run's log."""
    sources, _, _ = corpus
    streaming_logger = logging.getLogger("streaming")
    level = streaming_logger.level
    streaming_logger.setLevel(logging.WARNING)
    try:
        with caplog.at_level(logging.INFO):
            result = pipeline.run(config({"ko": sources["ko"]}, num_workers=1), ["ko"], str(tmp_path), None)
        assert streaming_logger.level == logging.WARNING  # put back after each merge
    finally:
        streaming_logger.setLevel(level)
    assert result["streams"]["ko"]["docs_out"] == 60
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("streaming")]
    assert "malformed_json" in caplog.text  # the bad input lines still warn


@pytest.mark.slow  # starts worker processes (or a Ray) that import torch and streaming
def test_two_local_workers_and_a_retried_worker_give_the_same_result(corpus, local_run, tmp_path, monkeypatch):
    sources, _, _ = corpus
    monkeypatch.setenv(pipeline.FAULT_ENV, "clean:1")  # the worker running clean task 1 dies on its first attempt
    result = pipeline.run(config(sources, num_workers=2), ["ko", "en"], str(tmp_path), None)
    # The dead worker's task is retried; a task still running on the other worker when the pool broke is run again
    # too (how many depends on timing), so at least one and at most the two in flight.
    assert 1 <= result["execution"]["clean"]["retried"] <= 2
    assert comparable(result) == comparable(local_run[1])
    assert prepared_texts(tmp_path) == prepared_texts(local_run[0])


def test_big_files_divided_among_tasks_give_the_same_result(corpus, local_run, tmp_path):
    """data.task_bytes below the files' sizes: each file is cleaned by several tasks (byte ranges); dedup across them
    keeps the same first copies, and every malformed line is still counted once, at its line."""
    sources, _, _ = corpus
    sizes = [os.path.getsize(p) for d in sources.values() for p in Path(d[0]).iterdir()]
    result = pipeline.run(config(sources, num_workers=1, task_bytes=min(sizes) // 3), ["ko", "en"], str(tmp_path), None)
    assert result["execution"]["clean"]["tasks"] >= 3 * 6
    assert comparable(result) == comparable(local_run[1])
    assert prepared_texts(tmp_path) == prepared_texts(local_run[0])
    for s in ("ko", "en"):
        shown = result["streams"][s]["input_issues"]["examples"]["malformed_json"]
        theirs = local_run[1]["streams"][s]["input_issues"]["examples"]["malformed_json"]
        assert sorted(shown) == sorted(theirs)  # the same file:line, though read from the middle of the file


def test_a_llama_style_tokenizer_puts_bos_before_every_document(corpus, local_run, tmp_path):
    """With a tokenizer whose template adds BOS (Llama-2, Mistral, SOLAR) every document in the shards starts with it,
    as the model was trained; ftlm's own tokenizers add none."""
    sys.path.insert(0, str(ROOT / "tests" / "hf"))
    import sp_tokenizer

    from ftlm.data.config import with_defaults

    sp = tmp_path / "sp.json"
    sp.write_text(sp_tokenizer.build([d for ds in corpus[1].values() for d in ds][:200], 600))
    sources, _, _ = corpus
    cfg = config(sources, num_workers=1, tokenizer={"path": str(sp)})
    result = pipeline.run(cfg, ["ko", "en"], str(tmp_path / "work"), pipeline.given_tokenizer(with_defaults(cfg)))
    tokenizer = Tokenizer.load(str(tmp_path / "work" / "tokenizer.json"))
    assert tokenizer.adds_bos
    for s in ("ko", "en"):
        docs = [t for split in ("train", "val") for t in read_split(split_dir(str(tmp_path / "work"), s, split))]
        assert len(docs) == result["streams"][s]["docs_out"] and all(int(t[0]) == tokenizer.bos_id for t in docs)
        assert all(tokenizer.bos_id not in t[1:].tolist() for t in docs)
    ours = Tokenizer.load(str(local_run[0] / "tokenizer.json"))
    assert not ours.adds_bos


@pytest.mark.slow  # starts worker processes (or a Ray) that import torch and streaming
def test_ray_executor_gives_the_same_documents_and_stats(corpus, local_run, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    sources, _, _ = corpus
    monkeypatch.setenv(pipeline.FAULT_ENV, "tokenize:4")  # the Ray worker running tokenize task 4 dies once
    result = pipeline.run(config(sources, executor="ray", num_workers=2), ["ko", "en"], str(tmp_path), None)
    assert result["execution"]["executor"] == "ray"
    assert result["execution"]["tokenize"]["retried"] == 1  # Ray ran it again; the run reports it
    assert comparable(result) == comparable(local_run[1])
    assert prepared_texts(tmp_path) == prepared_texts(local_run[0])


@pytest.mark.slow  # starts worker processes (or a Ray) that import torch and streaming
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_killed_preparation_resumes_the_finished_tasks(corpus, local_run, tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    sources, _, _ = corpus
    cfg = config(sources, num_workers=1 if executor == "local" else 2, executor=executor)
    script = (
        "import json, sys; from ftlm.data import pipeline; "
        f"pipeline.run(json.loads(sys.argv[1]), ['ko', 'en'], {str(tmp_path)!r}, None)"
    )
    env = dict(os.environ, **{pipeline.FAULT_ENV: "stop:tokenize:4"})  # killed after 4 of 6 tokenize tasks
    # A session of its own, so that whatever it started (a Ray's processes) is ended with it below.
    killed = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(cfg)],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stderr = killed.communicate(timeout=300)[1]
    finally:
        try:
            os.killpg(killed.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert killed.returncode == -9, stderr.decode()[-2000:]
    result = pipeline.run(cfg, ["ko", "en"], str(tmp_path), None)
    assert tasks(result, "clean") == {"tasks": 6, "run": 0, "resumed": 6, "retried": 0}
    assert tasks(result, "pairs")["run"] == 0 and tasks(result, "clusters")["run"] == 0
    tokenize = tasks(result, "tokenize")
    assert tokenize["tasks"] == 6 and tokenize["run"] + tokenize["resumed"] == 6
    if executor == "local":
        assert tokenize["run"] == 2  # exactly the unfinished ones
    else:
        assert tokenize["resumed"] >= 4  # tasks still running on Ray when the driver died may have finished too
    assert comparable(result) == comparable(local_run[1])
    assert prepared_texts(tmp_path) == prepared_texts(local_run[0])


def test_workers_exit_when_the_preparation_is_killed(tmp_path):
    # kill -9 of ftlm-prepare (the OOM killer, a scheduler) used to leave every worker running for good
    script = (
        "import multiprocessing, os, signal, time; from ftlm.data.executor import LocalExecutor\n"
        "ex = LocalExecutor(2); it = ex.map(time.sleep, [(600,), (600,)])\n"
        "import threading; threading.Thread(target=lambda: next(it), daemon=True).start()\n"
        "while len(multiprocessing.active_children()) < 2: time.sleep(0.1)\n"
        "time.sleep(2)  # the workers have run their initializer\n"
        "print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) >= 2
    deadline = time.monotonic() + 15

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False

    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [p for p in pids if alive(p)]
    for p in survivors:
        os.kill(p, signal.SIGKILL)
    assert not survivors, "worker processes outlived the killed preparation"


def test_fast_tokenizer_setup_gives_the_same_ids(corpus, local_run):
    from ftlm.data.clean import normalize

    path = str(local_run[0] / "tokenizer.json")
    texts = [normalize(t) for t in list(corpus[1]["ko"])[:20] + list(corpus[1]["en"])[:20]]
    fast = pipeline._tokenizer(path)
    assert fast.backend.normalizer is None  # the NFC normaliser is skipped: the texts are NFC already
    assert fast.encode_batch(texts) == Tokenizer.load(path).encode_batch(texts)


def test_without_the_native_extension_the_preparation_is_the_same(corpus, local_run, tmp_path, monkeypatch):
    from ftlm.data import native

    sources, _, _ = corpus
    work, result = local_run  # made with ftlm._text
    assert native.text_ops() is not None
    monkeypatch.setattr(native, "_module", None)  # as when it is not built: numpy rules and MinHash, Python table
    monkeypatch.setattr(pipeline, "_CACHE", {})  # no encoder or filter made with it before
    plain = pipeline.run(config(sources, num_workers=1), ["ko", "en"], str(tmp_path), None)  # in this process
    encoders = [v for v in pipeline._CACHE.values() if isinstance(v, pipeline.FastEncoder)]
    assert encoders and all(e._table is None and e._bpe is None for e in encoders)
    assert comparable(plain) == comparable(result)
    assert prepared_texts(tmp_path) == prepared_texts(work)
    assert (tmp_path / "tokenizer.json").read_bytes() == (work / "tokenizer.json").read_bytes()


def test_lone_surrogates_from_json_escapes_are_removed_not_fatal(tmp_path):
    """JSON may escape half of a surrogate pair ("\\ud800"): no character, and UTF-8 cannot encode it. Cleaning removes
    it like other invisible characters, so the exact key, the shards and the report never meet it."""
    rng = random.Random(5)
    texts = [english(rng) for _ in range(12)]
    texts[3] = texts[3].replace(" ", " \ud800", 1)  # lone surrogates: json.dumps writes them as escapes
    texts[7] = texts[7].replace(" ", "\udfff ", 1)
    lines = [json.dumps({"text": t}) for t in texts]
    assert "\\ud800" in lines[3]
    (tmp_path / "en.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = config({"en": [str(tmp_path / "en.jsonl")]}, num_workers=1, lang={"en": "en"}, dedup={"near": False})
    work = tmp_path / "work"
    result = pipeline.run(cfg, ["en"], str(work), None)
    assert result["streams"]["en"]["docs_out"] == 12
    decoded = prepared_texts(work, ("en",))["en"]
    assert sum(decoded.values()) == 12 and not any(0xD800 <= ord(c) <= 0xDFFF for t in decoded for c in t)


def test_executor_errors_say_what_to_do(monkeypatch):
    with pytest.raises(ExecutorError, match="data.ray_address=127.0.0.1:9: no Ray head reachable"):
        make_executor("ray", 1, "127.0.0.1:9")
    with pytest.raises(ExecutorError, match="data.executor must be one of"):
        make_executor("spark", 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ExecutorError, match=r"pip install 'ftlm\[ray\]'"):
        make_executor("ray", 1)
    from ftlm.data.prepare import REFUSALS

    assert ExecutorError in REFUSALS  # the apps print these as one line, not a traceback
