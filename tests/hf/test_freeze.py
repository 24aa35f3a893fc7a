"""trainer.train_only = embeddings | new_rows: frozen weights bit-identical (plain PyTorch and ZeRO with 2 ranks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftlm.hf import FrozenWeights, freeze_mask
from ftlm.model import GPT, GPTConfig

WORKER = Path(__file__).with_name("freeze_worker.py")
REPO = Path(__file__).resolve().parents[2]


def tiny(tie: bool = False) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=128, max_seq_len=32, n_layer=1, n_head=2, d_model=32, norm="rmsnorm", mlp="swiglu",
                         tie_embeddings=tie, attn_impl="sdpa", norm_impl="torch"))  # fmt: skip


def test_freeze_mask_names_what_stays():
    model = tiny()
    assert freeze_mask(model, "all") == {}
    emb = freeze_mask(model, "embeddings")
    assert "embed.weight" not in emb and "lm_head.weight" not in emb and emb["blocks.0.attn.qkv.weight"] is None
    rows = freeze_mask(model, "new_rows", n_old_rows=100)
    assert rows["embed.weight"] == 100 and rows["lm_head.weight"] == 100 and rows["norm.weight"] is None
    with pytest.raises(ValueError, match="trainer.train_only='some'"):
        freeze_mask(model, "some")
    with pytest.raises(ValueError, match="needs the number of old rows"):
        freeze_mask(model, "new_rows")


@pytest.mark.parametrize("train_only", ["new_rows", "embeddings"])
def test_plain_pytorch_frozen_weights_stay_bit_identical_under_adamw(train_only):
    model = tiny(tie=train_only == "new_rows")
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # decay moves zero-gradient weights
    frozen = FrozenWeights(model, train_only, n_old_rows=100)
    gen = torch.Generator().manual_seed(0)

    def steps(n):
        for _ in range(n):
            batch = torch.randint(0, 128, (2, 9), generator=gen)
            _, loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            frozen.before_step()
            opt.step()
            opt.zero_grad()
            frozen.after_step()

    steps(5)
    now = model.state_dict()
    if train_only == "new_rows":
        assert torch.equal(now["embed.weight"][:100], start["embed.weight"][:100])
        assert not torch.equal(now["embed.weight"][100:], start["embed.weight"][100:])
    else:
        assert not torch.equal(now["embed.weight"], start["embed.weight"])
        assert not torch.equal(now["lm_head.weight"], start["lm_head.weight"])
    for k in start:
        if k not in ("embed.weight", "lm_head.weight"):
            assert torch.equal(now[k], start[k]), k
    assert frozen.max_drift() == 0.0
    # the optimizer never saw a gradient for them: Adam's first moment is exactly zero there
    qkv = model.blocks[0].attn.qkv.weight
    assert torch.count_nonzero(opt.state[qkv]["exp_avg"]) == 0

    frozen.release()
    steps(2)
    assert not torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
# ZeRO-3 with a persistence threshold of 100 elements: the norms stay gathered between steps ("persistent"), the
# matrices are partitioned, so both of ZeRO-3's ways of holding a parameter are covered in one run; in bf16, so the
# fp32 master slices and the bf16 working slices must both be restored.
@pytest.mark.parametrize("stage,threshold,bf16", [(3, 100, True), (2, 0, False)], ids=["zero3_bf16", "zero2_fp32"])
def test_frozen_rows_bit_identical_with_two_ranks(tmp_path, stage, threshold, bf16):
    out, port = tmp_path / "result.json", _free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    base.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu", FREEZE_BF16=str(int(bf16)))  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), str(stage), str(threshold)],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:  # a timed-out rank must not outlive the test (it would hold its port and a core)
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    result = json.loads(out.read_text())
    frozen, unfrozen = result["frozen"], result["unfrozen"]
    print(f"\nZeRO-{stage} ({'bf16' if bf16 else 'fp32'}, persistence threshold {threshold}), 2 ranks: {result}")
    assert result["world"] == 2
    assert frozen["embed_old"] == 0.0 and frozen["head_old"] == 0.0  # bit-identical after 5 steps
    assert frozen["block"] == 0.0 and frozen["norm"] == 0.0 and frozen["drift"] == 0.0
    assert frozen["block_exp_avg"] == 0.0  # the optimizer never saw a gradient for a frozen weight
    assert frozen["embed_new"] > 0 and frozen["head_new"] > 0  # the new rows did train
    assert unfrozen["embed_old"] > 0 and unfrozen["block"] > 0 and unfrozen["norm"] > 0  # unfreeze switches
