"""Two ranks of `ftlm.train.checkpoint.save` on a ZeRO-3 engine under torchrun, for test_checkpoint_safety.py:

    python -m torch.distributed.run --nproc-per-node 2 tests/train/save_worker.py <out dir>

Saves step 1; then saves step 2 with rank 1's disk "full" (its optimizer shard fails to write, inside DeepSpeed's
save_checkpoint, which runs collectives after it); then saves step 2 again with room. Writes <out>/rank<r>.json: the
error each save raised on that rank (null if none).
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import torch


def main(out: str) -> None:
    from ftlm.checkpoint.format import TrainerState
    from ftlm.config import compose
    from ftlm.model import GPTConfig
    from ftlm.train import checkpoint
    from ftlm.train.engine import build_ds_config, build_engine, build_model, init_distributed, shutdown_distributed

    small = ["micro_batch_size=2", "grad_accum=1", "seq_len=32", "warmup_steps=0", "max_steps=2"]
    full = compose(["deepspeed=zero3"] + [f"trainer.{o}" for o in small])
    d = init_distributed("cpu")
    ds_config = build_ds_config(full.trainer, full.deepspeed, d.world_size, "fp32")
    cfg = GPTConfig(vocab_size=256, n_layer=1, n_head=2, d_model=32, max_seq_len=32, attn_impl="sdpa")
    torch.manual_seed(0)
    engine, _ = build_engine(build_model(cfg, ds_config, d), full.trainer, full.deepspeed, ds_config, d)
    root = Path(out) / "checkpoints"

    def save(step: int) -> str | None:
        state = TrainerState(step=step, tokens_seen=step * 64, world_size=d.world_size, model_config=vars(cfg))
        try:
            checkpoint.save(engine, root, step, state, {"position": step}, 0, d.rank)
            return None
        except checkpoint.CheckpointSaveError as e:
            return str(e)

    report = {"step1": save(1)}
    real_save = torch.save
    if d.rank == 1:

        def full_disk(obj, f, *args, **kwargs):
            if "optim_states" in str(f):
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            return real_save(obj, f, *args, **kwargs)

        torch.save = full_disk
    report["step2_full"] = save(2)
    torch.save = real_save
    report["step2_again"] = save(2)
    (Path(out) / f"rank{d.rank}.json").write_text(json.dumps(report))
    shutdown_distributed()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1])
