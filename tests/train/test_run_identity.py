"""A run's identity is fixed once it starts (issue 16): resume keeps the run's tokenizer, a refused resume writes
nothing, trainer.resume=never moves checkpoints aside, and two trainings never share a run directory."""

import hashlib
import json
import shutil
import socket
import subprocess
import sys

import pytest
from launch_util import FAST, python_cmd, run, run_status

pytestmark = pytest.mark.slow

QUICK = FAST + ["trainer.eval_interval=0", "trainer.log_interval=1", "trainer.sample_tokens=2"]


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corpus(folder, extra=""):
    """A small custom corpus of two streams (the embedded corpus's own files), optionally with one more document."""
    from ftlm.data.corpus import english_documents, korean_documents

    folder.mkdir(parents=True, exist_ok=True)
    for lang, documents in (("ko", korean_documents), ("en", english_documents)):
        docs = [d["text"] for d in documents()][:60]  # small: every preparation here is a fresh one
        if extra and lang == "en":
            docs.append(extra)
        with open(folder / f"{lang}.jsonl", "w") as f:
            for text in docs:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return [
        "data=custom",
        f"data.sources.ko=[{folder / 'ko.jsonl'}]",
        f"data.sources.en=[{folder / 'en.jsonl'}]",
        f"data.out_dir={folder.parent / 'prepared'}",
        "data.tokenizer.vocab_size=1024",
        "data.tokenizer.sample_chars=200000",  # about the whole corpus (base.yaml asks for far more)
    ]


@pytest.fixture(scope="module")
def two_steps(ftlm_cache, tmp_path_factory):
    """A run on a custom corpus that saved step 2 (copy it before changing it)."""
    root = tmp_path_factory.mktemp("identity")
    data = corpus(root / "corpus")
    run_dir = root / "run"
    run(python_cmd(QUICK + data + [f"trainer.out_dir={run_dir}", "trainer.max_steps=2"]), ftlm_cache)
    assert (run_dir / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    assert not (run_dir / "run.lock").exists()  # released at the end
    return root, data


def files_under(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "override,said",
    [
        (
            "data.tokenizer.vocab_size=2048",
            [
                "this run's tokenizer is fixed",
                "data.tokenizer.vocab_size: run 1024, now 2048",
                "start a new run with its own trainer.run_name",
            ],
        ),
        # DeepSpeed would look for optimizer files of another name and fail with a traceback, after config.yaml
        ("trainer.precision=bf16", ["was trained in fp32, and this run would train in bf16", "trainer.precision=fp32"]),
        ("deepspeed=zero2", ["written under ZeRO stage 3, and this run uses stage 2", "set deepspeed.stage=3"]),
        ("trainer.max_steps=1", ["trainer.max_steps=1 is before the step of the checkpoint", "would train nothing"]),
    ],
)
def test_a_refused_resume_writes_nothing(ftlm_cache, two_steps, tmp_path, override, said):
    """Resuming with another tokenizer setting, precision or ZeRO stage fails before the run directory or the data
    cache is touched."""
    root, data = two_steps
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    run_dir = work / "run"
    data = [o.replace(str(root), str(work)) for o in data]
    before_run, before_data = files_under(run_dir), files_under(work / "prepared")
    steps = [] if override.startswith("trainer.max_steps") else ["trainer.max_steps=4"]
    proc = run_status(python_cmd(QUICK + data + [f"trainer.out_dir={run_dir}", *steps, override]), ftlm_cache)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert all(s in out for s in said), out[-3000:]
    assert files_under(run_dir) == before_run  # config.yaml, tokenizer.json, train.log, checkpoints: untouched
    assert files_under(work / "prepared") == before_data  # the shared data cache too
    assert not (run_dir / "run.lock").exists()


def test_resume_after_a_source_change_keeps_the_run_tokenizer(ftlm_cache, two_steps, tmp_path):
    root, _ = two_steps
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    run_dir = work / "run"
    tokenizer = sha(run_dir / "tokenizer.json")
    # The corpus changes: a new English document (which a retrained tokenizer would learn from).
    data = corpus(work / "corpus", extra="A brand new document about tokenizers and vocabularies. " * 20)
    proc = run(python_cmd(QUICK + data + [f"trainer.out_dir={run_dir}", "trainer.max_steps=3"]), ftlm_cache)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} at step 2" in proc.stdout
    assert sha(run_dir / "tokenizer.json") == tokenizer
    state = json.loads((run_dir / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["tokenizer_sha256"] == tokenizer


def test_resume_never_moves_checkpoints_aside(ftlm_cache, two_steps, tmp_path):
    root, data = two_steps
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    run_dir = work / "run"
    data = [o.replace(str(root), str(work)) for o in data]
    old = sha(run_dir / "checkpoints" / "step_00000002" / "trainer_state.json")
    proc = run(
        python_cmd(QUICK + data + [f"trainer.out_dir={run_dir}", "trainer.max_steps=1", "trainer.resume=never"]),
        ftlm_cache,
    )
    assert "trainer.resume=never: this run directory already had 1 checkpoint(s) (step_00000002)" in proc.stdout
    (aside,) = (run_dir / "set_aside").iterdir()
    assert sha(aside / "checkpoints" / "step_00000002" / "trainer_state.json") == old  # kept, not deleted
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000001"]
    # the curves go with their checkpoints: the new run's TensorBoard holds its own steps only
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def loss_steps(folder):
        acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        return [e.step for e in acc.Scalars("train/loss")]

    assert loss_steps(aside) == [1, 2] and loss_steps(run_dir) == [1]


def test_a_second_training_on_a_held_run_directory_refuses(ftlm_cache, two_steps, tmp_path):
    root, data = two_steps
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        from ftlm.train.rundir import RunLock

        lock = RunLock(run_dir)
        lock._info = lambda: {"host": socket.gethostname(), "pid": holder.pid, "started": "earlier", "token": "x"}
        lock.acquire()
        proc = run_status(python_cmd(QUICK + data + [f"trainer.out_dir={run_dir}", "trainer.max_steps=1"]), ftlm_cache)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert f"{run_dir} is in use by another training" in out and f"pid {holder.pid}" in out
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()


def test_tokenizer_settings_that_say_the_same_are_the_same(tmp_path):
    """A run whose config said sample_shares: null (base.yaml before it wrote {}) resumes under {}; a real change
    is still refused."""
    from omegaconf import OmegaConf

    from ftlm.checkpoint import TrainerState
    from ftlm.config import ConfigError
    from ftlm.train.main import check_same_tokenizer_settings

    tok = {"path": None, "extend_from": None, "vocab_size": 1024, "sample_shares": None, "special_tokens": []}
    TrainerState(step=2, tokens_seen=0, world_size=1, model_config={}, config={"data": {"tokenizer": tok}}).write(
        tmp_path / "trainer_state.json"
    )
    now = dict(tok, sample_shares={})
    check_same_tokenizer_settings(tmp_path, OmegaConf.create({"data": {"tokenizer": now}}))
    with pytest.raises(ConfigError, match="data.tokenizer.sample_shares: run None, now {'ko': 1.0}"):
        check_same_tokenizer_settings(
            tmp_path, OmegaConf.create({"data": {"tokenizer": dict(tok, sample_shares={"ko": 1.0})}})
        )
