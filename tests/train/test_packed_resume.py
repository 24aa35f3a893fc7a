"""Document-masked training on best-fit packed rows (issue 12): 2 ranks under ZeRO-3 stop and resume bitwise, and the
loader's packing figures reach the log."""

import shutil

import pytest
import torch
from launch_util import FAST, deepspeed_cmd, newest_scalars, run, scalars

pytestmark = pytest.mark.slow

PACKED = FAST + [
    "model.doc_mask=true",
    "data.packing=best_fit",
    "data.packing_buffer=16",
    "model.dropout=0.1",  # the restored RNG streams matter
    "trainer.log_interval=1",
    "trainer.eval_interval=0",
    "trainer.decay_steps=4",  # one schedule for the straight and the resumed run
    "trainer.save_interval=2",
    "trainer.keep_last=5",
    "trainer.max_steps=4",
]


def consolidated(ckpt):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ftlm.checkpoint import weights_only_loading

    with weights_only_loading():
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def test_doc_mask_best_fit_two_ranks_stop_and_resume_bitwise(ftlm_cache, tmp_path):
    straight = tmp_path / "straight"
    run(deepspeed_cmd(2, PACKED + [f"trainer.out_dir={straight}"]), ftlm_cache)
    log = (straight / "train.log").read_text()
    assert "world size 2" in log and "ZeRO stage 3" in log and "| pad " in log
    tb = scalars(straight)
    assert sorted(tb["train/pad_fraction"]) == [1, 2, 3, 4]
    assert all(0 <= v < 1 for v in tb["train/pad_fraction"].values())
    assert "train/cut_doc_share" in tb

    # The same run stopped after step 2: drop its later checkpoint and go on from step 2.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    run(deepspeed_cmd(2, PACKED + [f"trainer.out_dir={resumed}"]), ftlm_cache)
    assert f"resumed from {resumed / 'checkpoints' / 'step_00000002'} at step 2" in (resumed / "train.log").read_text()
    got = newest_scalars(resumed)
    for tag in ("train/loss", "train/grad_norm", "train/pad_fraction"):
        assert got[tag] == {s: tb[tag][s] for s in (3, 4)}, tag
    a = consolidated(straight / "checkpoints" / "step_00000004")
    b = consolidated(resumed / "checkpoints" / "step_00000004")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
