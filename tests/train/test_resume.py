"""Checkpoints users can trust: exact resume, another number of ranks, torn saves, SIGTERM, and bad input.

Real training processes on the tiny model (fp32, ZeRO-3 on CPU). Two module fixtures are shared: a straight
8-step run, and a run stopped after 4 steps that saved at steps 2, 3 and 4. The LR schedule has a fixed length
(trainer.decay_steps) so stopping at 4 and going on to 8 follows the same schedule as the straight run, and
dropout is on so the restored RNG streams matter.
"""

import json
import os
import shutil
import signal
import time

import pytest
import torch
from launch_util import (
    FAST,
    deepspeed_cmd,
    hooked_deepspeed_cmd,
    hooked_python_cmd,
    newest_scalars,
    python_cmd,
    run,
    run_status,
    scalars,
    start,
)

from ftlm.train.schedule import lr_multiplier

pytestmark = pytest.mark.slow

K, N = 4, 8  # stop after K steps, compare up to N
COMMON = FAST + ["trainer.log_interval=1", "trainer.eval_interval=0", "trainer.decay_steps=6", "model.dropout=0.1"]
SHARD = "zero_pp_rank_0_mp_rank_00_{}_states.pt"


def train(run_dir, *overrides):
    return [f"trainer.out_dir={run_dir}", *overrides]


@pytest.fixture(scope="module")
def straight(ftlm_cache, tmp_path_factory):
    """An uninterrupted N-step run (one checkpoint, at the end)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run(python_cmd(COMMON + train(run_dir, f"trainer.max_steps={N}", "trainer.save_interval=100")), ftlm_cache)
    return run_dir


@pytest.fixture(scope="module")
def stopped(ftlm_cache, tmp_path_factory):
    """A run that stops after K steps with checkpoints at steps 2, 3 and 4 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    run(
        python_cmd(COMMON + train(run_dir, f"trainer.max_steps={K}", "trainer.save_interval=1", "trainer.keep_last=3")),
        ftlm_cache,
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000002",
        "step_00000003",
        "step_00000004",
    ]  # keep_last=3 deleted step 1
    return run_dir


def wait_for(proc, output, text, timeout=240):
    """Until a started training has written `text` to its output (failing if it exits first)."""
    deadline = time.time() + timeout
    while text not in output.read_text():
        assert proc.poll() is None and time.time() < deadline, output.read_text()[-4000:]
        time.sleep(0.2)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def consolidated_fp32(ckpt):
    """The full fp32 weights of a ZeRO-3 checkpoint, gathered by DeepSpeed's own zero_to_fp32 (not our code)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ftlm.checkpoint import weights_only_loading

    with weights_only_loading():
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def universal_state(folder):
    """Every tensor of a universal checkpoint (parameter/fp32, exp_avg, exp_avg_sq) and its optimizer state."""
    from ftlm.checkpoint import weights_only_loading

    with weights_only_loading():
        tensors = {f"{f.parent.name}/{f.stem}": torch.load(f) for f in sorted((folder / "zero").glob("*/*.pt"))}
        optimizer = torch.load(folder / "zero" / "optimizer_state.pt")
    return {k: v["param"] if isinstance(v, dict) else v for k, v in tensors.items()}, optimizer


def assert_same_universal(a, b):
    ta, oa = universal_state(a)
    tb, ob = universal_state(b)
    assert sorted(ta) == sorted(tb) and len(ta) >= 3 * 10
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{key} differs between {a} and {b}"
    assert any(k.endswith("exp_avg_sq") and ta[k].abs().sum() > 0 for k in ta), "Adam moments are all zero"
    step_a = oa["optimizer_state_dict"]["state"][0]["step"]
    step_b = ob["optimizer_state_dict"]["state"][0]["step"]
    assert int(step_a) == int(step_b) > 0


def no_decay_weight_decay(ckpt_dir):
    """weight_decay of each param group (`no_decay`: norms, embeddings) as saved in a DeepSpeed ZeRO-3 checkpoint."""
    from ftlm.checkpoint import weights_only_loading

    with weights_only_loading():
        sd = torch.load(ckpt_dir / SHARD.format("optim"))
    groups = sd["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]
    return {g["name"]: g["weight_decay"] for g in groups}


# -- 1. exact resume -----------------------------------------------------------------------------------------------
def test_stop_and_resume_matches_a_straight_run_bitwise(ftlm_cache, straight, stopped, tmp_path):
    run_dir = copy_run(stopped, tmp_path / "run")
    proc = run(python_cmd(COMMON + train(run_dir, f"trainer.max_steps={N}", "trainer.save_interval=100")), ftlm_cache)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'} at step 4" in proc.stdout

    want, got = scalars(straight), scalars(run_dir)  # got: steps 1-4 from the stopped run, 5-8 from the resumed one
    for tag in ("train/loss", "train/grad_norm", "train/lr"):
        assert sorted(got[tag]) == list(range(1, N + 1))
        assert got[tag] == want[tag], f"{tag}: resumed {got[tag]} != straight {want[tag]}"
    assert sorted(newest_scalars(run_dir)["train/loss"]) == list(range(K + 1, N + 1))  # really resumed at K

    # The final weights, gathered by DeepSpeed's zero_to_fp32, are identical too.
    a = consolidated_fp32(straight / "checkpoints" / "step_00000008")
    b = consolidated_fp32(run_dir / "checkpoints" / "step_00000008")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- 2. another number of ranks ------------------------------------------------------------------------------------
def test_resume_on_two_ranks_from_one_exactly_on_two_and_back_to_one(ftlm_cache, straight, stopped, tmp_path):
    one = copy_run(stopped, tmp_path / "one")
    step4 = one / "checkpoints" / "step_00000004"
    two, after_two = tmp_path / "two", tmp_path / "after_two"
    proc = run_status(
        hooked_deepspeed_cmd(
            2, COMMON + train(two, f"trainer.resume={step4}", f"trainer.max_steps={N}", "trainer.save_interval=2")
        ),
        ftlm_cache,
        {"FTLM_TEST_SAVE_AFTER_LOAD": str(after_two)},
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    log = (two / "train.log").read_text()
    assert (
        "checkpoint written by 1 ranks, resuming on 2: re-partitioned through DeepSpeed's universal checkpoint "
        "format" in log
    )
    assert "resuming the data loader saved by 1 rank(s) on 2 rank(s): approximate" in log
    assert f"resumed from {step4} at step 4" in log

    # The universal copy is complete and holds exactly the 1-rank checkpoint's weights (checked against
    # DeepSpeed's independent zero_to_fp32 consolidation) ...
    universal = step4 / "universal"
    assert (universal / "manifest.json").is_file() and not (step4 / "universal.tmp").exists()
    reference = consolidated_fp32(step4)
    tensors, _ = universal_state(universal)
    for name, value in reference.items():
        assert torch.equal(tensors[f"{name}/fp32"].view(value.shape), value), name
    # ... and what the two ranks hold right after loading (weights, Adam moments, step) is that same state.
    from ftlm.checkpoint import validate
    from ftlm.train.checkpoint import convert_to_universal

    convert_to_universal(after_two / "after_load", tmp_path / "after_two_universal")
    assert_same_universal(universal, tmp_path / "after_two_universal")
    # DeepSpeed's universal load copies the first param group's settings into all; ours keeps no decay on norms.
    assert (
        no_decay_weight_decay(after_two / "after_load")
        == no_decay_weight_decay(step4)
        == {"decay": 0.1, "no_decay": 0.0}
    )

    # Training went on from there (the loss keeps falling from where the 1-rank run left it, no restart).
    losses = newest_scalars(two)["train/loss"]
    assert sorted(losses) == list(range(K + 1, N + 1))
    assert all(v < scalars(straight)["train/loss"][1] for v in losses.values())

    # Same world size through the launcher: resumed from the 2-rank step 6, steps 7-8 are bitwise the same.
    again = copy_run(two, tmp_path / "again")
    shutil.rmtree(again / "checkpoints" / "step_00000008")
    run(deepspeed_cmd(2, COMMON + train(again, f"trainer.max_steps={N}", "trainer.save_interval=100")), ftlm_cache)
    assert f"resumed from {again / 'checkpoints' / 'step_00000006'} at step 6" in (again / "train.log").read_text()
    resumed, first = newest_scalars(again), newest_scalars(two)
    for tag in ("train/loss", "train/grad_norm", "train/lr"):
        assert resumed[tag] == {s: first[tag][s] for s in (7, 8)}, tag

    # Back: the 2-rank checkpoint at step 8 resumed on one rank.
    step8 = two / "checkpoints" / "step_00000008"
    assert validate(step8) is None and json.loads((step8 / "trainer_state.json").read_text())["world_size"] == 2
    back, after_back = tmp_path / "back", tmp_path / "after_back"
    proc = run_status(
        hooked_python_cmd(COMMON + train(back, f"trainer.resume={two}", f"trainer.max_steps={N + 2}")),
        ftlm_cache,
        {"FTLM_TEST_SAVE_AFTER_LOAD": str(after_back)},
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert (
        "checkpoint written by 2 ranks, resuming on 1: re-partitioned through DeepSpeed's universal checkpoint "
        "format" in proc.stdout
    )
    assert f"resumed from {step8} at step 8" in proc.stdout
    convert_to_universal(after_back / "after_load", tmp_path / "after_back_universal")
    assert_same_universal(step8 / "universal", tmp_path / "after_back_universal")
    assert sorted(newest_scalars(back)["train/loss"]) == [N + 1, N + 2]


# -- 3. torn checkpoints -------------------------------------------------------------------------------------------
def test_killed_mid_save_truncated_and_missing_shards_fall_back(ftlm_cache, straight, stopped, tmp_path):
    run_dir = copy_run(stopped, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    # SIGKILL while saving step 6: every shard of step_00000006.tmp is written, its manifest is not.
    proc = run_status(
        hooked_python_cmd(COMMON + train(run_dir, f"trainer.max_steps={N}", "trainer.save_interval=2")),
        ftlm_cache,
        {"FTLM_TEST_KILL_AT_SEAL": "6"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (ckpts / "step_00000006.tmp" / SHARD.format("optim")).is_file()
    assert not (ckpts / "step_00000006").exists()
    assert (ckpts / "latest").read_text() == "step_00000004"

    # Then the newest complete checkpoint loses half a shard and the one before it a whole file.
    optim4 = ckpts / "step_00000004" / SHARD.format("optim")
    size = optim4.stat().st_size
    os.truncate(optim4, size // 2)
    (ckpts / "step_00000003" / SHARD.format("model")).unlink()

    proc = run(python_cmd(COMMON + train(run_dir, f"trainer.max_steps={N}", "trainer.save_interval=100")), ftlm_cache)
    out = proc.stdout
    assert (
        f"skipping checkpoint {ckpts / 'step_00000004'}: file {SHARD.format('optim')} has {size // 2} bytes, "
        f"expected {size} (truncated?)" in out
    )
    assert f"skipping checkpoint {ckpts / 'step_00000003'}: missing file {SHARD.format('model')}" in out
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in out
    assert f"deleting {ckpts / 'step_00000006.tmp'}, left by a save that did not finish" in out
    assert not list(ckpts.glob("*.tmp"))
    assert (ckpts / "latest").read_text() == "step_00000008"
    # Resumed from step 2, it still retraces the straight run exactly.
    got, want = newest_scalars(run_dir)["train/loss"], scalars(straight)["train/loss"]
    assert got == {s: want[s] for s in range(3, N + 1)}


# -- 4. SIGTERM ----------------------------------------------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(ftlm_cache, tmp_path):
    run_dir = tmp_path / "run"
    overrides = COMMON + train(run_dir, "trainer.max_steps=100000", "trainer.save_interval=100000")
    proc = start(python_cmd(overrides), ftlm_cache, tmp_path / "out.txt")
    try:
        wait_for(proc, tmp_path / "out.txt", "step 3/100000")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "out.txt").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "out.txt").read_text()
    assert "received SIGTERM: saving a checkpoint" in out
    stopped_at = int(out.split("stopped at step ")[1].split()[0])
    assert stopped_at >= 3
    ckpt = run_dir / "checkpoints" / f"step_{stopped_at:08d}"
    assert (ckpt / "manifest.json").is_file()

    # Resumed with another peak rate: the new schedule applies from the first step (not the saved rate).
    proc = run(
        python_cmd(COMMON + train(run_dir, f"trainer.max_steps={stopped_at + 2}", "trainer.lr=1e-3")), ftlm_cache
    )
    assert f"resumed from {ckpt} at step {stopped_at}" in proc.stdout
    resumed = newest_scalars(run_dir)
    assert sorted(resumed["train/loss"]) == [stopped_at + 1, stopped_at + 2]
    assert resumed["train/lr"][stopped_at + 1] == pytest.approx(1e-3 * lr_multiplier(stopped_at, 2, 6, 0.1))


def test_a_diverged_loss_stops_the_run_before_it_saves(ftlm_cache, tmp_path):
    # NaN from the 4th step: steps 1-3 are saved, step 4 never is (its weights are NaN) and nothing is pruned
    run_dir = tmp_path / "run"
    overrides = COMMON + train(run_dir, "trainer.max_steps=6", "trainer.save_interval=1", "trainer.keep_last=2")
    proc = run_status(hooked_python_cmd(overrides), ftlm_cache, {"FTLM_TEST_NAN_FROM": "4"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "ftlm-train: error: the training loss was NaN or infinite on some rank between step 4 and step 4: "
        "stopping without saving (newest checkpoint: step 3;" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]


# -- 5. never deleting, one training per run directory -----------------------------------------------------------
def test_resume_never_sets_the_old_checkpoints_aside(ftlm_cache, stopped, tmp_path):
    run_dir = copy_run(stopped, tmp_path / "run")
    old = {p.name: (p / SHARD.format("optim")).read_bytes() for p in (run_dir / "checkpoints").glob("step_*")}
    proc = run(python_cmd(COMMON + train(run_dir, "trainer.resume=never", "trainer.max_steps=2")), ftlm_cache)
    (aside,) = (run_dir / "set_aside").iterdir()
    assert aside.name.endswith("-resume-never")
    assert f"moved them to {aside}" in proc.stdout
    kept = {p.name: (p / SHARD.format("optim")).read_bytes() for p in (aside / "checkpoints").glob("step_*")}
    assert kept == old  # every earlier checkpoint, byte for byte
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002"]  # the new run's
    assert (aside / "tokenizer.json").is_file() and (aside / "config.yaml").is_file()


def test_a_second_training_on_the_same_run_directory_refuses(ftlm_cache, tmp_path):
    run_dir = tmp_path / "run"
    overrides = COMMON + train(run_dir, "trainer.max_steps=100000", "trainer.save_interval=100000")
    first = start(python_cmd(overrides), ftlm_cache, tmp_path / "first.txt")
    try:
        wait_for(first, tmp_path / "first.txt", "step 1/100000")
        second = run_status(python_cmd(overrides), ftlm_cache)
        assert first.poll() is None  # the first one trains on, undisturbed
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    err = second.stdout + second.stderr
    assert second.returncode != 0
    assert f"{run_dir} is in use by another training (host " in err and f"pid {first.pid}, started" in err
    assert "model tiny:" not in second.stdout  # refused before any work


# -- 6. bad input --------------------------------------------------------------------------------------------------
def test_resume_from_a_path_that_does_not_exist_fails_before_the_model_is_built(ftlm_cache, tmp_path):
    proc = run_status(
        python_cmd(COMMON + train(tmp_path / "run", f"trainer.resume={tmp_path / 'nowhere'}")), ftlm_cache
    )
    assert proc.returncode != 0
    assert f"trainer.resume: checkpoint {tmp_path / 'nowhere'} does not exist" in proc.stdout + proc.stderr
    assert "model tiny:" not in proc.stdout  # failed before the model was built


def test_resume_with_another_model_config_names_the_keys(ftlm_cache, stopped, tmp_path):
    step4 = stopped / "checkpoints" / "step_00000004"
    proc = run_status(
        python_cmd(COMMON + train(tmp_path / "run", f"trainer.resume={step4}", "model.n_layer=3", "model.d_model=96")),
        ftlm_cache,
    )
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert (
        f"checkpoint {step4} was made by another model config: model.n_layer: checkpoint 2, config 3; "
        "model.d_model: checkpoint 64, config 96" in err
    )
    assert "model tiny:" not in proc.stdout


def test_checkpoint_and_tokenizer_disagreeing_is_refused(stopped, tmp_path):
    from ftlm.model import GPTConfig
    from ftlm.train.checkpoint import check_compatible

    step4 = stopped / "checkpoints" / "step_00000004"
    state = json.loads((step4 / "trainer_state.json").read_text())
    model_cfg = GPTConfig.from_dict(state["model_config"])
    check_compatible(step4, model_cfg, state["tokenizer_vocab"], state["tokenizer_sha256"])  # the matching one
    with pytest.raises(
        ValueError,
        match=rf"trained with a tokenizer of {state['tokenizer_vocab']} tokens, but this "
        rf"run's tokenizer .* has {state['tokenizer_vocab'] - 7}",
    ):
        check_compatible(step4, model_cfg, state["tokenizer_vocab"] - 7)
    # A checkpoint without the tokenizer's size (older ones) is still checked against the model's vocabulary.
    del state["tokenizer_vocab"]
    legacy = copy_run(step4, tmp_path / "step_00000004")
    (legacy / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(
        ValueError, match=r"has model.vocab_size=\d+, smaller than this run's tokenizer \(9999 tokens\)"
    ):
        check_compatible(legacy, model_cfg, 9999)


class Evil:
    """Unpickling this runs a shell command (pickled as a call of os.system, so no class of ours is needed)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_a_checkpoint_is_never_run_by_resume(ftlm_cache, stopped, tmp_path):
    """A checkpoint file replaced by a pickle that runs a command (its manifest entry updated to match): resuming
    refuses it by name, without torch's advice to retry with weights_only=False, and the command never runs."""
    from ftlm.checkpoint.format import file_checksum

    run_dir = copy_run(stopped, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "step_00000004"
    marker = tmp_path / "pwned"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in (SHARD.format("model"), SHARD.format("optim"), "rank0_state.pt"):
        torch.save({"state": Evil(marker)}, ckpt / name)
        manifest["files"][name] = (ckpt / name).stat().st_size
        manifest["checksums"][name] = file_checksum(ckpt / name)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))

    proc = run_status(python_cmd(COMMON + train(run_dir, f"trainer.max_steps={N}")), ftlm_cache)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"refusing to load {ckpt}/" in out, out[-4000:]
    assert "trusted source" not in out and "set to `False`" not in out  # torch's advice is never passed on
    assert not marker.exists()


# -- bookkeeping on fake checkpoints (no training) ----------------------------------------------------------------
def fake_checkpoint(root, step, complete=True):
    from ftlm.checkpoint import tag_for
    from ftlm.train.checkpoint import _write_manifest

    ckpt = root / tag_for(step)
    ckpt.mkdir(parents=True)
    (ckpt / "shard.pt").write_bytes(b"x" * (100 + step))
    if complete:
        _write_manifest(ckpt, step=step)
    return ckpt


def test_pruning_leftovers_and_a_rolled_back_run(tmp_path):
    from ftlm.checkpoint import find_latest
    from ftlm.train.checkpoint import prune, remove_unfinished, retire_newer

    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        fake_checkpoint(root, step)
    broken = fake_checkpoint(root, 50, complete=False)
    (root / "step_00000060.tmp").mkdir()
    assert find_latest(root) == root / "step_00000040"  # 50 has no manifest; the .tmp is never a candidate

    prune(root, keep_last=2)  # complete ones beyond the newest two go; the broken one is left for inspection
    assert sorted(p.name for p in root.iterdir()) == [
        "step_00000030",
        "step_00000040",
        "step_00000050",
        "step_00000060.tmp",
    ]
    remove_unfinished(root)
    assert not (root / "step_00000060.tmp").exists() and broken.is_dir()

    # Rolled back to step 30 and saved step 35: the later 40 and 50 must not be what resume=auto picks next,
    # and are kept (moved aside into a folder of their own), not deleted.
    fake_checkpoint(root, 35)
    dest = retire_newer(root, 35)
    assert find_latest(root) == root / "step_00000035"
    assert dest.parent == tmp_path / "set_aside"
    assert (dest / "checkpoints" / "step_00000040" / "shard.pt").is_file()
    assert (dest / "checkpoints" / "step_00000050").is_dir()
