"""Checkpoints are never deleted implicitly, corrupted ones are named and skipped, malicious pickles never run,
a full disk leaves the previous checkpoint and a clear message, and SIGKILL at any moment of a save leaves a
complete checkpoint to resume from.

These run the trainer's real save() with a small stand-in for the DeepSpeed engine (it writes torch files the way
DeepSpeed does, one model and one optimizer shard per rank), so each takes well under a second.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftlm.checkpoint import (
    MANIFEST,
    CheckpointError,
    TrainerState,
    find_latest,
    list_checkpoints,
    safe_load,
    tag_for,
    validate,
    weights_only_loading,
)
from ftlm.model import GPTConfig
from ftlm.train import checkpoint

MODEL = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MARKER_ENV = "FTLM_TEST_PWNED"


class FakeEngine:
    """What save() needs of a DeepSpeed engine: save_checkpoint(dir, tag) writing torch files, and a module."""

    def __init__(self, n: int = 20_000, seed: int = 0):
        torch.manual_seed(seed)
        self.module = torch.nn.Linear(n // 100, 100, bias=False)

    def save_checkpoint(self, save_dir, tag, save_latest=False):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict()}, d / MODEL)
        w = self.module.weight.detach()
        torch.save({"exp_avg": w.clone(), "exp_avg_sq": w * w, "fp32": w.clone()}, d / OPTIM)


def state(step: int) -> TrainerState:
    cfg = GPTConfig(vocab_size=512, n_layer=1, n_head=2, d_model=32, max_seq_len=32)
    return TrainerState(step=step, tokens_seen=step * 64, world_size=1, model_config=cfg.__dict__.copy())


def save(root: Path, step: int, engine=None, keep_last: int = 0) -> Path:
    return checkpoint.save(engine or FakeEngine(seed=step), root, step, state(step), {"position": step}, keep_last, 0)


def make_run(tmp_path: Path, steps=(10, 20)) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_text('{"the": "tokenizer"}')
    (run / "config.yaml").write_text("model: {}\n")
    for s in steps:
        save(run / "checkpoints", s)
    return run


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- trainer state -----------------------------------------------------------------------------------------------
def test_trainer_state_round_trip_and_old_files(tmp_path):
    s = state(7)
    s.config = {"trainer": {"lr": 1e-3}}
    s.write(tmp_path / "trainer_state.json")
    back = TrainerState.from_file(tmp_path)
    assert back == s and back["step"] == 7 and back.gpt_config().d_model == 32
    # A file from an older ftlm (no tokenizer fields, a key this version does not know) still reads, and keeps it.
    old = {"step": 3, "tokens_seen": 9, "world_size": 2, "model_config": s.model_config, "future_key": [1]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(old))
    back = TrainerState.from_file(tmp_path)
    assert (back.tokenizer_vocab, back.world_size, back.extra) == (None, 2, {"future_key": [1]})
    assert json.loads(back.to_json())["future_key"] == [1]
    (tmp_path / "trainer_state.json").write_text('{"step": 1}')
    with pytest.raises(CheckpointError, match=r"trainer_state.json: missing model_config"):
        TrainerState.from_file(tmp_path)


def test_model_configs_without_the_new_architecture_keys_still_match(tmp_path):
    """Checkpoints written before parallel_residual/rotary_pct/gelu_approx existed resume with their defaults."""
    run = make_run(tmp_path, steps=(10,))
    ckpt = run / "checkpoints" / tag_for(10)
    st = json.loads((ckpt / "trainer_state.json").read_text())
    for key in ("parallel_residual", "rotary_pct", "gelu_approx"):
        st["model_config"].pop(key, None)
    (ckpt / "trainer_state.json").write_text(json.dumps(st))
    checkpoint.check_compatible(ckpt, state(10).gpt_config())  # no difference named
    with pytest.raises(ValueError, match="model.n_layer: checkpoint 1, config 2"):
        checkpoint.check_compatible(ckpt, GPTConfig(vocab_size=512, n_layer=2, n_head=2, d_model=32))


# -- issue 16.3: never deleting ----------------------------------------------------------------------------------
def test_resume_never_moves_checkpoints_aside_never_deletes(tmp_path, caplog):
    run = make_run(tmp_path)
    before = {c.name: contents(c) for c in list_checkpoints(run / "checkpoints")}
    with caplog.at_level(logging.WARNING):
        dest = checkpoint.start_fresh(run)
    assert dest.parent == run / "set_aside" and dest.name.endswith("-resume-never")
    assert f"moved them to {dest}" in caplog.text and "step_00000010, step_00000020" in caplog.text
    assert list_checkpoints(run / "checkpoints") == [] and not (run / "checkpoints" / "latest").exists()
    assert {c.name: contents(c) for c in list_checkpoints(dest / "checkpoints")} == before
    assert (dest / "checkpoints" / "latest").read_text() == "step_00000020"
    assert (dest / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    assert find_latest(dest / "checkpoints") == dest / "checkpoints" / "step_00000020"  # usable as a run dir

    # Starting over again, in the same second: a second folder, the first untouched.
    save(run / "checkpoints", 10)
    second = checkpoint.start_fresh(run)
    assert second != dest and second.is_dir() and dest.is_dir()
    assert {c.name: contents(c) for c in list_checkpoints(dest / "checkpoints")} == before
    assert checkpoint.start_fresh(run) is None  # nothing left to move


def test_rollbacks_keep_every_superseded_checkpoint(tmp_path):
    root = make_run(tmp_path, steps=(10, 20, 30, 40)) / "checkpoints"
    first_40 = contents(root / tag_for(40))
    # Resumed from 20 (past a loss spike, say) and saved 25: 30 and 40 go aside.
    save(root, 25)
    assert [c.name for c in list_checkpoints(root)] == ["step_00000025", "step_00000020", "step_00000010"]
    aside = sorted((root.parent / "set_aside").iterdir())
    assert len(aside) == 1 and aside[0].name.endswith("-after-step_00000025")
    # Saved 30 again, then resumed from 10 and saved 20: the newer 25 and 30 go aside, and the older copy of 20
    # too (replaced by the new one). Nothing is deleted, every set keeps its own never-reused folder.
    save(root, 30)
    save(root, 20)
    sets = sorted((root.parent / "set_aside").iterdir())
    kept = sorted(c.name for s in sets for c in (s / "checkpoints").iterdir())
    assert kept == ["step_00000020", "step_00000025", "step_00000030", "step_00000030", "step_00000040"]
    assert contents(aside[0] / "checkpoints" / tag_for(40)) == first_40
    assert len(sets) == 3
    assert find_latest(root) == root / tag_for(20)


# -- issue 16.5: checksums ---------------------------------------------------------------------------------------
def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_two_jobs_converting_one_checkpoint_never_remove_each_others_work(tmp_path, monkeypatch):
    # Two runs forked from one checkpoint resume on another number of ranks at once: each converts it to the
    # universal format in a folder of its own; the one that finishes second uses the first one's copy.
    ckpt = make_run(tmp_path, steps=(10,)) / "checkpoints" / "step_00000010"
    foreign = ckpt / "universal.tmp-otherhost-4242"  # the other job, still converting
    foreign.mkdir()
    (foreign / "half.pt").write_bytes(b"being written")

    def convert(src, out):  # the other job publishes its copy while this one converts
        out.mkdir()
        (out / "mine.pt").write_bytes(b"this job's copy")
        theirs = ckpt / "universal.tmp-otherhost-1"
        theirs.mkdir()
        (theirs / "theirs.pt").write_bytes(b"the other job's copy")
        checkpoint._write_manifest(theirs)
        os.replace(theirs, ckpt / "universal")

    monkeypatch.setattr(checkpoint, "convert_to_universal", convert)
    out = checkpoint.universal_copy(ckpt, rank=0)
    assert out == ckpt / "universal" and (out / "theirs.pt").is_file() and not (out / "mine.pt").exists()
    assert (foreign / "half.pt").read_bytes() == b"being written"  # left alone
    assert sorted(p.name for p in ckpt.glob("universal*")) == ["universal", foreign.name]
    assert checkpoint.universal_copy(ckpt, rank=0) == out  # published: used as it is


def test_manifest_checksums_name_a_corrupted_file_and_auto_falls_back(tmp_path, caplog):
    run = make_run(tmp_path)
    root = run / "checkpoints"
    manifest = json.loads((root / tag_for(20) / MANIFEST).read_text())
    assert set(manifest["checksums"]) == set(manifest["files"]) >= {MODEL, OPTIM, "rank0_state.pt"}
    flip_a_byte(root / tag_for(20) / OPTIM)  # same size: only the checksum sees it
    assert validate(root / tag_for(20)) is None  # sizes alone pass
    assert validate(root / tag_for(20), checksums=True) == (
        f"file {OPTIM} does not match its checksum in manifest.json (corrupted)"
    )
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resolve_resume("auto", root) == root / tag_for(10)
    assert f"skipping checkpoint {root / tag_for(20)}: file {OPTIM} does not match its checksum" in caplog.text
    with pytest.raises(ValueError, match=rf"checkpoint {root / tag_for(20)} is not usable: file {OPTIM} does not"):
        checkpoint.resolve_resume(str(root / tag_for(20)), root)
    # The readers (ftlm-generate, -eval, -export) skip it too.
    from ftlm.checkpoint.reader import CheckpointError as ReaderError
    from ftlm.checkpoint.reader import _checkpoint_source, _newest

    assert _newest(root) == root / tag_for(10)
    with pytest.raises(ReaderError, match=f"{OPTIM} does not match its checksum"):
        _checkpoint_source(root / tag_for(20), run / "tokenizer.json")


def test_checkpoints_without_checksums_still_load(tmp_path):
    root = make_run(tmp_path, steps=(10,)) / "checkpoints"
    m = json.loads((root / tag_for(10) / MANIFEST).read_text())
    del m["checksums"]  # as written before checksums existed
    (root / tag_for(10) / MANIFEST).write_text(json.dumps(m))
    assert validate(root / tag_for(10), checksums=True) is None
    assert checkpoint.resolve_resume("auto", root) == root / tag_for(10)


# -- issue 10.6: malicious pickles ---------------------------------------------------------------------------------
class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, fix_manifest: bool) -> None:
    """Replace a checkpoint file with a pickle that runs a command when unpickled; with fix_manifest, also update
    its size and checksum, as an attacker (or a bad copy tool) able to write the folder could."""
    torch.save({"state": Evil(marker)}, path)
    if fix_manifest:
        from ftlm.checkpoint.format import file_checksum

        ckpt = path.parent
        m = json.loads((ckpt / MANIFEST).read_text())
        m["files"][path.name] = path.stat().st_size
        m["checksums"][path.name] = file_checksum(path)
        (ckpt / MANIFEST).write_text(json.dumps(m))


def test_malicious_pickle_is_never_executed_and_never_advised(tmp_path):
    root = make_run(tmp_path, steps=(10,)) / "checkpoints"
    ckpt = root / tag_for(10)
    marker = tmp_path / "pwned"
    plant(ckpt / "rank0_state.pt", marker, fix_manifest=True)
    with pytest.raises(CheckpointError) as e:
        safe_load(ckpt / "rank0_state.pt")
    msg = str(e.value)
    assert f"refusing to load {ckpt / 'rank0_state.pt'}" in msg and "GLOBAL posix.system" in msg
    assert "weights_only" not in msg and "trusted source" not in msg  # torch's advice is never passed on
    # DeepSpeed's own loads pass weights_only=False; inside weights_only_loading they are refused just the same.
    plant(ckpt / OPTIM, marker, fix_manifest=True)
    with pytest.raises(CheckpointError, match=f"refusing to load {ckpt / OPTIM}"), weights_only_loading():
        torch.load(ckpt / OPTIM, weights_only=False)
    assert torch.load is not None and os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored
    assert not marker.exists()


# -- issue 16.6: a full disk ---------------------------------------------------------------------------------------
def test_disk_full_midway_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    root = make_run(tmp_path, steps=(10,)) / "checkpoints"
    before = contents(root / tag_for(10))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith(OPTIM):  # half written, then the disk is full, as torch's C++ writer reports it
            Path(f).write_bytes(b"\0" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000 vs 900")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(checkpoint, "free_bytes", lambda p: 0 if (root / "step_00000020.tmp").exists() else 10**12)
    with pytest.raises(checkpoint.CheckpointSaveError) as e:
        save(root, 20)
    need = sum(len(b) for b in before.values())
    assert str(e.value).startswith(
        f"no space left on device while saving step 20 to {root / 'step_00000020'} (needs about {need / 1e6:.1f} MB"
    )
    assert not (root / "step_00000020.tmp").exists() and not (root / "step_00000020").exists()
    assert contents(root / tag_for(10)) == before and (root / "latest").read_text() == tag_for(10)

    # An OSError with ENOSPC is recognised without looking at the free space.
    def enospc(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", enospc)
    monkeypatch.setattr(checkpoint, "free_bytes", lambda p: 10**12)
    with pytest.raises(checkpoint.CheckpointSaveError, match="no space left on device while saving step 20"):
        save(root, 20)
    assert not (root / "step_00000020.tmp").exists()
    from ftlm.train.main import REFUSALS

    assert issubclass(checkpoint.CheckpointSaveError, REFUSALS)  # ftlm-train says it in one line, exit status 2


@pytest.mark.slow
def test_a_disk_full_on_one_rank_inside_deepspeeds_save_fails_on_every_rank(tmp_path):
    """Two ZeRO-3 ranks; rank 1's optimizer shard cannot be written. DeepSpeed's save_checkpoint runs barriers after
    that write, so a rank raising out of it would leave the other waiting forever: instead both ranks finish
    DeepSpeed's save, both raise the disk-full error, and the next save works (their collectives still pair up)."""
    from launch_util import env, free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd += [str(Path(__file__).with_name("save_worker.py")), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(tmp_path / "cache"), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    root = tmp_path / "checkpoints"
    for report in ranks:
        assert report["step1"] is None and report["step2_again"] is None
        assert report["step2_full"].startswith(f"no space left on device while saving step 2 to {root / tag_for(2)}")
    assert sorted(p.name for p in root.glob("step_*")) == [tag_for(1), tag_for(2)]  # no .tmp left
    assert validate(root / tag_for(1), checksums=True) is None and validate(root / tag_for(2), checksums=True) is None


def test_too_little_free_space_refuses_before_writing(tmp_path, monkeypatch):
    root = make_run(tmp_path, steps=(10,)) / "checkpoints"
    size = sum(p.stat().st_size for p in (root / tag_for(10)).rglob("*") if p.is_file())
    monkeypatch.setattr(checkpoint, "free_bytes", lambda p: size // 2)
    with pytest.raises(checkpoint.CheckpointSaveError) as e:
        save(root, 20)
    assert f"not enough free space to save step 20 to {root / tag_for(20)}: needs about" in str(e.value)
    assert "nothing was written" in str(e.value)
    assert sorted(p.name for p in root.iterdir()) == ["latest", tag_for(10)]
    monkeypatch.setattr(checkpoint, "free_bytes", lambda p: size * 10)
    assert validate(save(root, 20), checksums=True) is None


# -- issue 10.6: SIGKILL at random moments of saves ----------------------------------------------------------------
def saver(root: Path) -> None:
    """Resume from the newest intact checkpoint (as trainer.resume=auto does) and save one step after another."""
    logging.basicConfig(level=logging.WARNING)
    latest = checkpoint.resolve_resume("auto", root)
    step = 0 if latest is None else TrainerState.from_file(latest).step
    if latest is not None:
        for name in ("rank0_state.pt", MODEL, OPTIM):
            safe_load(latest / name)
    print(f"resumed {step}", flush=True)
    engine = FakeEngine(n=200_000)  # about 2.4 MB per save: a kill lands mid-file often
    while True:
        step += 1
        save(root, step, engine, keep_last=2)


@pytest.mark.slow
def test_sigkill_at_random_moments_of_saves_always_leaves_a_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    rng = random.Random(1234)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    last_step = 0
    for cycle in range(4):
        out = tmp_path / f"cycle{cycle}.txt"
        with open(out, "w") as f:
            proc = subprocess.Popen([sys.executable, __file__, str(root)], stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + 60
            while "resumed " not in out.read_text():
                assert proc.poll() is None and time.time() < deadline, out.read_text()[-3000:]
                time.sleep(0.05)
            resumed = int(out.read_text().split("resumed ")[1].split()[0])
            assert resumed >= last_step  # never goes back: the newest complete save is always found
            time.sleep(rng.uniform(0.05, 1.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        found = find_latest(root, checksums=True)
        assert found is not None, f"cycle {cycle}: no complete checkpoint among {sorted(os.listdir(root))}"
        for ckpt in list_checkpoints(root):
            assert validate(ckpt, checksums=True) is None, f"cycle {cycle}: a step_ folder is incomplete: {ckpt}"
        last_step = TrainerState.from_file(found).step
    assert last_step > 1


if __name__ == "__main__":
    saver(Path(sys.argv[1]))
