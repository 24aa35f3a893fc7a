"""Where preparations are stored: side by side, immutable, verified on reuse, removed only by --gc, and hostile inputs.

Issue 10 item 1 (a re-preparation must not delete the shards a running training reads), issue 16 items 1, 2, 9
(a run's tokenizer is kept, every check runs before anything is written, damage is named) and issue 10 item 6.
"""

import gc as garbage
import gzip
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ftlm.data.checks import DataConfigError
from ftlm.data.layout import POINTER_FILE, DamagedPreparationError, split_dir
from ftlm.data.prepare import gc, prepare
from ftlm.data.stream import build_train_loader, read_split
from ftlm.data.tokenizer import Tokenizer

SEQ, MB = 32, 2


def words(rng: random.Random, alphabet: str, n: int) -> str:
    return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(3, 7))) for _ in range(n)) + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_corpus")
    rng = random.Random(1)
    hangul = "".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(300))
    for stream, alphabet in (("ko", hangul), ("en", "abcdefghijklmnopqrstuvwxyz")):
        (root / stream).mkdir()
        for part in range(2):
            lines = [json.dumps({"text": words(rng, alphabet, 40)}, ensure_ascii=False) for _ in range(30)]
            (root / stream / f"part{part}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def store_config(make_data_config, out, src, **overrides) -> dict:
    """A small, fast preparation of `src` (the corpus fixture's layout) into `out`."""
    return make_data_config(
        out,
        name="store",
        sources={"ko": [str(src / "ko")], "en": [str(src / "en")]},
        val_fraction=0.1,
        val_min_docs=1,
        clean={"min_chars": 40, "min_words": 8},
        tokenizer={"vocab_size": 320, "sample_chars": 20000},
        **overrides,
    )


@pytest.fixture
def config(corpus, tmp_path, make_data_config):
    def make(out=None, sources=None, **overrides):
        return store_config(make_data_config, out or tmp_path / "data", sources or corpus, **overrides)

    return make


def files_of(folder) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in Path(folder).rglob("*")
        if p.is_file()
    }


def tokens(batches) -> list:
    return [b.inputs.tolist() for b in batches]


def test_a_reader_keeps_working_while_other_settings_are_prepared(config):
    first_cfg = config()
    first = prepare(OmegaConf.create(first_cfg))
    assert os.path.dirname(first.out_dir) == first_cfg["out_dir"]
    before = files_of(first.out_dir)
    loader = build_train_loader(OmegaConf.create(first_cfg), SEQ, MB, 0, 1, seed=3, prepared=first)
    head = tokens(next(loader) for _ in range(3))

    other_cfg = dict(first_cfg, tokenizer=dict(first_cfg["tokenizer"], vocab_size=360))
    other = prepare(OmegaConf.create(other_cfg))  # another job with another setting, same data.name
    assert other.out_dir != first.out_dir and other.stats["tokenizer"]["vocab_size"] == 360
    assert files_of(first.out_dir) == before  # not one file of the first preparation changed
    with open(os.path.join(first_cfg["out_dir"], POINTER_FILE)) as f:
        assert json.load(f)["fingerprint"] == other.fingerprint

    # the running loader goes on reading its own preparation: exactly what a fresh loader over it reads
    rest = tokens(next(loader) for _ in range(40))
    fresh = build_train_loader(OmegaConf.create(first_cfg), SEQ, MB, 0, 1, seed=3, prepared=first.out_dir)
    assert tokens(next(fresh) for _ in range(43)) == head + rest

    # gc keeps the latest and every preparation a live process reads; it removes the first once nobody does
    removed = gc(OmegaConf.create(first_cfg))
    assert removed["removed"] == [] and removed["kept (in use)"] == [first.out_dir]
    del loader, fresh, first
    garbage.collect()
    removed = gc(OmegaConf.create(first_cfg))
    assert len(removed["removed"]) == 1 and removed["kept (latest)"] == [other.out_dir]
    assert os.path.isdir(other.out_dir) and not os.path.exists(removed["removed"][0])


def test_gc_never_removes_a_preparation_another_process_reads(config, tmp_path):
    cfg = config()
    first = prepare(OmegaConf.create(cfg))
    prepare(OmegaConf.create(dict(cfg, val_fraction=0.2)))  # the latest now
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ftlm.data.layout import ReaderLock; lock = ReaderLock(sys.argv[1]); "
            "print('holding', flush=True); time.sleep(60)",
            first.out_dir,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "holding"
        del first
        garbage.collect()
        result = gc(OmegaConf.create(cfg))
        assert result["removed"] == [] and len(result["kept (in use)"]) == 1
        assert os.path.isfile(os.path.join(result["kept (in use)"][0], "stats.json"))
    finally:
        reader.kill()
        reader.wait()
    assert len(gc(OmegaConf.create(cfg))["removed"]) == 1


def test_gc_removes_the_kept_tasks_of_a_killed_preparation_unless_it_runs(config):
    """tmp/tasks-<fingerprint> holds a killed preparation's finished tasks for its rerun; gc removes it only while no
    preparation of that fingerprint holds its lock."""
    import fcntl

    cfg = config()
    prepare(OmegaConf.create(cfg))
    out_dir = cfg["out_dir"]
    tasks = os.path.join(out_dir, "tmp", "tasks-0123abcd")
    os.makedirs(os.path.join(tasks, "done", "clean"))
    os.makedirs(os.path.join(out_dir, "locks"), exist_ok=True)
    with open(os.path.join(out_dir, "locks", "0123abcd.lock"), "w") as running:  # a preparation at work
        fcntl.flock(running, fcntl.LOCK_EX)
        result = gc(OmegaConf.create(cfg))
        assert tasks in result["kept (in use)"] and os.path.isdir(tasks)
    result = gc(OmegaConf.create(cfg))
    assert tasks in result["removed"] and not os.path.exists(tasks)
    assert os.listdir(os.path.join(out_dir, "tmp")) == []


def test_resume_with_the_runs_tokenizer_reuses_it_and_reports_an_edited_source(config, corpus, tmp_path, caplog):
    sources = tmp_path / "src"
    shutil.copytree(corpus, sources)
    cfg = config(sources=sources)
    first = prepare(OmegaConf.create(cfg))
    run_tokenizer = tmp_path / "run" / "tokenizer.json"
    run_tokenizer.parent.mkdir()
    shutil.copyfile(first.tokenizer_path, run_tokenizer)

    # another vocab_size on resume: the run's tokenizer wins, and the existing preparation is reused as it is
    changed = dict(cfg, tokenizer=dict(cfg["tokenizer"], vocab_size=2048))
    again = prepare(OmegaConf.create(changed), tokenizer_path=str(run_tokenizer))
    assert again.out_dir == first.out_dir

    # a source edited between preparation and (resumed) training is noticed and named; the shards are made with
    # the run's tokenizer, byte for byte, beside the old preparation (kept)
    edited = sources / "en" / "part1.jsonl"
    edited.write_text(
        edited.read_text(encoding="utf-8") + json.dumps({"text": words(random.Random(7), "abcdefghij", 40)}) + "\n"
    )
    with caplog.at_level(logging.WARNING):
        resumed = prepare(OmegaConf.create(changed), tokenizer_path=str(run_tokenizer))
    assert resumed.out_dir != first.out_dir and os.path.isfile(os.path.join(first.out_dir, "stats.json"))
    assert f"changed {edited}" in caplog.text and "size" in caplog.text
    assert resumed.stats["source_changes"] and str(edited) in resumed.stats["source_changes"][0]
    assert Path(resumed.tokenizer_path).read_bytes() == run_tokenizer.read_bytes()
    assert resumed.stats["streams"]["en"]["docs_out"] == first.stats["streams"]["en"]["docs_out"] + 1

    # data.source_change=refuse stops before anything is written, naming the file
    edited.write_text(
        edited.read_text(encoding="utf-8") + json.dumps({"text": words(random.Random(8), "abcdefghij", 40)}) + "\n"
    )
    before = sorted(os.listdir(cfg["out_dir"]))
    with pytest.raises(DataConfigError, match=f"changed {edited}"):
        prepare(OmegaConf.create(dict(changed, source_change="refuse")), tokenizer_path=str(run_tokenizer))
    assert sorted(os.listdir(cfg["out_dir"])) == before


def test_refused_tokenizer_writes_nothing(config, tmp_path):
    cfg = config()
    first = prepare(OmegaConf.create(cfg))
    state = files_of(cfg["out_dir"])
    bad = dict(cfg, tokenizer=dict(cfg["tokenizer"], special_tokens=["<|new|>"]))
    with pytest.raises(DataConfigError, match=r"<\|new\|>"):
        prepare(OmegaConf.create(bad), tokenizer_path=first.tokenizer_path)
    with pytest.raises(DataConfigError, match="does not exist"):
        prepare(OmegaConf.create(cfg), tokenizer_path=str(tmp_path / "missing.json"))
    assert files_of(cfg["out_dir"]) == state


def test_a_tokenizer_setting_that_cannot_load_and_data_that_all_drops_are_refusals(config, tmp_path):
    """Each is one `ftlm-prepare: error:` line naming the key (a DataConfigError), never a traceback."""
    cfg = config(out=tmp_path / "out")
    for key in ("path", "extend_from"):
        with pytest.raises(DataConfigError, match=f"data.tokenizer.{key}: {tmp_path}/absent.json does not exist"):
            prepare(
                OmegaConf.create(dict(cfg, tokenizer=dict(cfg["tokenizer"], **{key: str(tmp_path / "absent.json")})))
            )
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": "1.0", "model"')
    with pytest.raises(DataConfigError, match=f"data.tokenizer.path: {broken} is not a tokenizer.json that loads"):
        prepare(OmegaConf.create(dict(cfg, tokenizer=dict(cfg["tokenizer"], path=str(broken)))))
    assert not (tmp_path / "out").exists()  # refused before anything was written
    strict = dict(cfg, clean=dict(cfg["clean"], min_words=10_000))
    with pytest.raises(DataConfigError, match=r"data.sources.(ko|en): no document survived"):
        prepare(OmegaConf.create(strict))


def test_a_file_two_streams_name_is_reported(config, corpus, caplog):
    from ftlm.data.prepare import source_inputs

    shared = corpus / "en" / "part0.jsonl"
    cfg = config(sources=corpus)
    cfg["sources"] = {"ko": [str(corpus / "ko"), str(shared)], "en": [str(corpus / "en")]}
    with caplog.at_level(logging.WARNING):
        source_inputs(cfg)
    assert f"{shared} is a source of both data.sources.ko and data.sources.en" in caplog.text
    assert str(corpus / "en" / "part1.jsonl") not in caplog.text


def test_a_llama_style_tokenizer_is_prepared_with_as_it_is(config, tmp_path):
    """A run's or a source model's tokenizer whose end of text is </s> and which has no padding token (Llama-2,
    Mistral, SOLAR) prepares the data unchanged; one without any end-of-text token is refused, naming the file."""
    cfg = config()
    ours = Path(prepare(OmegaConf.create(cfg)).tokenizer_path).read_text(encoding="utf-8")
    llama_like = tmp_path / "llama" / "tokenizer.json"
    llama_like.parent.mkdir()
    llama_like.write_text(ours.replace("<|endoftext|>", "</s>").replace("<|pad|>", "<unk>"), encoding="utf-8")
    done = prepare(OmegaConf.create(cfg), tokenizer_path=str(llama_like))
    assert Path(done.tokenizer_path).read_bytes() == llama_like.read_bytes()  # the vocabulary as it was
    tokenizer = Tokenizer.load(done.tokenizer_path)
    assert tokenizer.eot_id == tokenizer.backend.token_to_id("</s>") == tokenizer.pad_id
    assert all(s["docs_out"] > 0 for s in done.stats["streams"].values())

    no_end = tmp_path / "no_end" / "tokenizer.json"
    no_end.parent.mkdir()
    no_end.write_text(ours.replace("<|endoftext|>", "<|sep|>"), encoding="utf-8")
    with pytest.raises(DataConfigError, match=f"{no_end}, has no end-of-text token"):
        prepare(OmegaConf.create(cfg), tokenizer_path=str(no_end))


def damage(root: str, kind: str) -> str:
    split = Path(split_dir(root, "ko", "train"))
    shard = sorted(split.rglob("shard.*.mds"))[0]
    if kind == "deleted shard":
        shard.unlink()
        return str(shard)
    if kind == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-7])
        return str(shard)
    if kind == "corrupt index.json":
        (split / "index.json").write_text('{"shards": [', encoding="utf-8")
        return str(split / "index.json")
    if kind == "deleted index.json":
        (split / "index.json").unlink()
        return str(split / "index.json")
    (Path(root) / "stats.json").write_text("{", encoding="utf-8")
    return str(Path(root) / "stats.json")


@pytest.fixture(scope="module")
def pristine(corpus, tmp_path_factory, make_data_config):
    cfg = store_config(make_data_config, tmp_path_factory.mktemp("pristine"), corpus)
    return cfg, prepare(OmegaConf.create(cfg))


@pytest.mark.parametrize(
    "kind", ["deleted shard", "truncated shard", "corrupt index.json", "deleted index.json", "corrupt stats.json"]
)
def test_damaged_preparation_is_named_with_the_fix(pristine, tmp_path, kind):
    cfg, prepared = pristine
    out = tmp_path / "data"
    root = out / prepared.fingerprint
    shutil.copytree(prepared.out_dir, root)  # the fingerprint does not depend on out_dir
    shutil.copyfile(os.path.join(cfg["out_dir"], POINTER_FILE), out / POINTER_FILE)
    cfg = dict(cfg, out_dir=str(out), cache_dir=str(tmp_path / "cache"))
    bad = damage(str(root), kind)
    with pytest.raises(DamagedPreparationError, match="ftlm-prepare --rebuild") as err:
        prepare(OmegaConf.create(cfg))
    assert bad in str(err.value)
    with pytest.raises(DamagedPreparationError) as err:
        build_train_loader(OmegaConf.create(cfg), SEQ, MB, 0, 1, seed=0)
    assert bad in str(err.value)
    rebuilt = prepare(OmegaConf.create(cfg), rebuild=True)  # sets the damaged one aside, makes it anew
    assert rebuilt.out_dir == str(root) and len(os.listdir(out / "trash")) == 1
    assert len(read_split(split_dir(rebuilt.out_dir, "ko", "train"))) == prepared.stats["streams"]["ko"]["docs_train"]
    next(build_train_loader(OmegaConf.create(cfg), SEQ, MB, 0, 1, seed=0))


def test_out_dir_that_is_a_file_or_not_writable(config, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(DataConfigError, match="is a file"):
        prepare(OmegaConf.create(config(out=a_file)))
    with pytest.raises(DataConfigError, match="is a file"):
        prepare(OmegaConf.create(config(out=a_file / "data")))
    assert a_file.read_text() == "x"
    # not writable: root may write anywhere but on a read-only file system such as /proc
    if os.geteuid() == 0:
        with pytest.raises(DataConfigError, match="is not writable"):
            prepare(OmegaConf.create(config(out="/proc/ftlm-data/store")))
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(DataConfigError, match="is not writable"):
            prepare(OmegaConf.create(config(out=locked / "data")))
        assert os.listdir(locked) == []


def test_truncated_gzip_parquet_without_text_and_a_symlink_loop(config, corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "hostile"
    shutil.copytree(corpus, src)
    good = (src / "en" / "part0.jsonl").read_bytes()
    packed = gzip.compress(good)
    (src / "en" / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])  # truncated mid-stream
    pq.write_table(pa.table({"body": ["no text column here"] * 3}), src / "en" / "other.parquet")
    os.symlink(src / "ko", src / "ko" / "loop")  # ko/loop -> ko: a folder containing itself
    result = prepare(OmegaConf.create(config(sources=src)))
    en = result.stats["streams"]["en"]["input_issues"]
    assert en["counts"]["truncated_file"] == 1 and "cut.jsonl.gz" in en["examples"]["truncated_file"][0]
    assert en["counts"]["missing_text_field"] == 1 and "other.parquet" in en["examples"]["missing_text_field"][0]
    assert "no column 'text'" in en["examples"]["missing_text_field"][0]
    ko = result.stats["streams"]["ko"]
    assert ko["files"] == 2 and ko["docs_in"] == 60  # the loop's copies of the files are read once

    # a stream of nothing but the column-less parquet: a clear error naming data.text_field
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(src / "en" / "other.parquet", only)
    cfg = config(sources=src, out=tmp_path / "only_out")
    cfg["sources"]["en"] = [str(only)]
    with pytest.raises(DataConfigError, match="no document survived.*data.text_field"):
        prepare(OmegaConf.create(cfg))


def test_stream_cache_folders_are_removed_only_when_their_owner_is_gone(tmp_path):
    """A compressed/remote stream's cache: one folder per process; another process's is never removed while it may
    be read (another host's, a live pid's, or one whose lock is held), only a dead process's of this host."""
    import socket

    from ftlm.data.stream import _CACHE_LOCK, _own_cache_folder, _release_dead_caches

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    root = tmp_path / "cache"
    mine = Path(_own_cache_folder(str(root)))  # this process: live and locked
    gone = root / f"{host}.{dead_pid}"
    other_host = root / f"some-other-node.{dead_pid}"
    for folder in (gone, other_host):
        folder.mkdir()
        (folder / "shard.00000.mds").write_bytes(b"x")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            # what _own_cache_folder does, without importing torch: its folder, and a shared lock in it
            "import fcntl, os, socket, sys, time; "
            "d = os.path.join(sys.argv[1], f'{socket.gethostname()}.{os.getpid()}'); "
            "os.makedirs(d); f = open(os.path.join(d, sys.argv[2]), 'a'); fcntl.flock(f, fcntl.LOCK_SH); "
            "print('holding', flush=True); time.sleep(60)",
            str(root),
            _CACHE_LOCK,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        live = root / f"{host}.{holder.pid}"
        _release_dead_caches(str(root))
        assert mine.is_dir() and live.is_dir() and other_host.is_dir() and not gone.exists()
    finally:
        holder.kill()
        holder.wait()
    _release_dead_caches(str(root))  # the holder died: its lock went with it
    assert not live.exists() and mine.is_dir() and other_host.is_dir()


@pytest.mark.slow
def test_ftlm_prepare_gc_and_a_damaged_preparation_on_the_command_line(pristine, tmp_path):
    """`ftlm-prepare --gc` lists what it removed and kept; a damaged preparation exits 2 with the fix."""
    cfg, prepared = pristine
    out = tmp_path / "data"
    shutil.copytree(prepared.out_dir, out / prepared.fingerprint)
    shutil.copytree(prepared.out_dir, out / "0123456789abcdef0123")  # an older preparation nobody reads
    shutil.copyfile(os.path.join(cfg["out_dir"], POINTER_FILE), out / POINTER_FILE)
    overrides = [
        "data=embedded",  # as the pristine preparation's config (conftest's data_config)
        "data.name=store",
        f"data.out_dir={out}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.sources={{ko: [{cfg['sources']['ko'][0]}], en: [{cfg['sources']['en'][0]}]}}",
        "data.val_fraction=0.1",
        "data.val_min_docs=1",
        "data.clean.min_chars=40",
        "data.clean.min_words=8",
        "data.tokenizer.vocab_size=320",
        "data.tokenizer.sample_chars=20000",
    ]
    env = {**os.environ, "FTLM_CACHE": str(tmp_path / "home")}
    run = [sys.executable, "-m", "ftlm.data.prepare"]
    gc_run = subprocess.run([*run, "--gc", *overrides], capture_output=True, text=True, env=env, timeout=300)
    assert gc_run.returncode == 0, gc_run.stderr[-3000:]
    assert f"removed: {out / '0123456789abcdef0123'}" in gc_run.stdout
    assert f"kept (latest): {out / prepared.fingerprint}" in gc_run.stdout
    bad = damage(str(out / prepared.fingerprint), "corrupt index.json")
    again = subprocess.run([*run, *overrides], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and bad in again.stderr and "ftlm-prepare --rebuild" in again.stderr


@pytest.mark.slow
def test_a_training_process_reads_on_while_another_process_prepares_and_collects(config, tmp_path):
    """The scenario of issue 10: a job reads its preparation while another job prepares other settings into the
    same data.out_dir and then runs --gc; the reader never fails and reads exactly what it would have alone."""
    import hashlib

    cfg = config()
    first = prepare(OmegaConf.create(cfg))
    alone = hashlib.sha256()
    loader = build_train_loader(OmegaConf.create(cfg), SEQ, MB, 0, 1, seed=5, prepared=first)
    for _ in range(200):
        alone.update(next(loader).inputs.numpy().tobytes())
    del loader
    go = tmp_path / "go"
    reader_code = (
        "import hashlib, json, os, sys, time\n"
        "from ftlm.data.stream import build_train_loader\n"
        "cfg, root, go = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]\n"
        f"loader = build_train_loader(cfg, {SEQ}, {MB}, 0, 1, seed=5, prepared=root)\n"
        "h = hashlib.sha256()\n"
        "for i in range(200):\n"
        "    if i == 100:\n"
        "        print('reading', flush=True)\n"
        "        while not os.path.exists(go):\n"
        "            time.sleep(0.1)\n"
        "    h.update(next(loader).inputs.numpy().tobytes())\n"
        "print(h.hexdigest(), flush=True)\n"
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", reader_code, json.dumps(cfg), first.out_dir, str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "reading", reader.stderr.read()[-3000:]
        root = first.out_dir
        del first
        garbage.collect()
        other = prepare(OmegaConf.create(dict(cfg, tokenizer=dict(cfg["tokenizer"], vocab_size=360))))
        collected = gc(OmegaConf.create(cfg))  # the reader holds the first preparation: kept
        assert collected["kept (in use)"] == [root] and collected["kept (latest)"] == [other.out_dir]
        go.write_text("")
        out, err = reader.communicate(timeout=300)
    finally:
        reader.kill()
    assert reader.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == alone.hexdigest()
    assert gc(OmegaConf.create(cfg))["removed"] == [root]  # nobody reads it now
