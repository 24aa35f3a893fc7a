"""One rank of the ZeRO-3 freezing test (tests/hf/test_freeze.py starts two).

    python tests/hf/freeze_worker.py <out.json> <stage> <persistence_threshold>

Trains a tiny GPT with AdamW (weight decay 0.1) under DeepSpeed (bf16 with FREEZE_BF16=1), train_only=new_rows
for 5 optimizer steps (2 micro-steps each), then unfreezes for 2 more. Rank 0 writes the largest change of the old
rows, of the new rows and of a block weight after each stage, gathered from every rank's partitions.
"""

from __future__ import annotations

import json
import os
import sys


def main(out: str, stage: int, threshold: int) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch

    from ftlm.hf import FrozenWeights
    from ftlm.model import GPT, GPTConfig
    from ftlm.train.engine import shutdown_distributed, skip_cpu_inference_comm_build

    torch.set_num_threads(1)
    # As the trainer does on CPU: without it DeepSpeed JIT-compiles its shared-memory all-reduce here (a minute of
    # g++ on a fresh machine, and a wait forever on the lock file a newer torch leaves in ~/.cache/torch_extensions).
    skip_cpu_inference_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    cfg = GPTConfig(vocab_size=192, max_seq_len=32, n_layer=2, n_head=4, n_kv_heads=2, d_model=64, norm="rmsnorm",
                    mlp="swiglu", tie_embeddings=False, attn_impl="sdpa", norm_impl="torch")  # fmt: skip
    n_old = 150
    torch.manual_seed(0)
    model = GPT(cfg)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": threshold},
        "bf16": {"enabled": os.environ.get("FREEZE_BF16") == "1"},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    frozen = FrozenWeights(engine, "new_rows", n_old_rows=n_old)
    gen = torch.Generator().manual_seed(100 + rank)

    def train(optimizer_steps: int) -> None:
        for _ in range(optimizer_steps * 2):
            batch = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen)
            _, loss = engine(batch[:, :-1], batch[:, 1:])
            engine.backward(loss)
            frozen.before_step()
            engine.step()
            frozen.after_step()

    names = ("embed.weight", "lm_head.weight", "blocks.0.attn.qkv.weight", "blocks.1.norm1.weight")
    params = dict(engine.module.named_parameters())

    def gathered() -> dict[str, torch.Tensor]:
        """The working weights (bf16 with FREEZE_BF16=1) as the forward pass sees them, gathered from every rank."""
        with deepspeed.zero.GatheredParameters([params[n] for n in names]) if stage == 3 else _nothing():
            return {n: params[n].detach().float().clone() for n in names}

    start = gathered()

    def changes() -> dict[str, float]:
        now = gathered()
        d = {n: (now[n] - start[n]).abs() for n in names}
        return {
            "embed_old": d["embed.weight"][:n_old].max().item(),
            "embed_new": d["embed.weight"][n_old:].max().item(),
            "head_old": d["lm_head.weight"][:n_old].max().item(),
            "head_new": d["lm_head.weight"][n_old:].max().item(),
            "block": d["blocks.0.attn.qkv.weight"].max().item(),
            "norm": d["blocks.1.norm1.weight"].max().item(),
            "drift": frozen.max_drift() if frozen.active else None,
            "block_exp_avg": exp_avg(params["blocks.0.attn.qkv.weight"]),
        }

    def exp_avg(p) -> float:
        from deepspeed.utils import safe_get_full_optimizer_state, safe_get_local_optimizer_state

        m = safe_get_local_optimizer_state(p, "exp_avg") if stage == 3 else safe_get_full_optimizer_state(p, "exp_avg")
        m = m.abs().max().reshape(1)
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
        return m.item()

    train(5)
    assert engine.global_steps == 5, engine.global_steps
    frozen_stage = changes()
    frozen.release()
    train(2)
    unfrozen = changes()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"frozen": frozen_stage, "unfrozen": unfrozen, "world": torch.distributed.get_world_size()}, f)
    shutdown_distributed()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
