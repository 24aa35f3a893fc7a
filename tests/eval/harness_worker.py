"""One rank of `ftlm.eval.harness.run_tasks` on a ZeRO-3 engine under torchrun, for tests/eval/test_harness.py:

    python -m torch.distributed.run --nproc-per-node 2 tests/eval/harness_worker.py <model dir> <tasks dir> <out dir>

ZeRO-3 keeps a slice of every parameter on each rank and gathers them collectively in each forward pass, so the
ranks must run equally many forward passes: unequal numbers would hang. Writes <out>/ranks.json (each rank's results
and forward passes, then what a second run reports when rank 1 raises in it) and <out>/weights.safetensors (the
engine's weights, gathered, to score them on one rank).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(model_dir: str, tasks_dir: str, out: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    from ftlm.checkpoint import load
    from ftlm.config import compose
    from ftlm.eval import harness
    from ftlm.train.engine import build_ds_config, build_engine, build_model, init_distributed, shutdown_distributed

    loaded = load(model_dir)  # the config and tokenizer; the engine starts from its own random weights
    small = ["micro_batch_size=2", "grad_accum=1", "seq_len=32", "warmup_steps=0", "max_steps=2"]
    full = compose(["deepspeed=zero3"] + [f"trainer.{o}" for o in small])
    d = init_distributed("cpu")
    ds_config = build_ds_config(full.trainer, full.deepspeed, d.world_size, "fp32")
    torch.manual_seed(0)
    engine, _ = build_engine(build_model(loaded.model.cfg, ds_config, d), full.trainer, full.deepspeed, ds_config, d)
    assert next(engine.module.parameters()).numel() == 0  # partitioned: no rank holds a whole parameter
    calls = []
    engine.module.register_forward_pre_hook(lambda module, args: calls.append(1))

    tasks = ["ko_mc", "ko_ppl", "ko_gen"]
    results = harness.run_tasks(engine, loaded.tokenizer, tasks, None, "cpu", d.rank, d.world_size, tasks_dir, 3)
    report = {"results": results, "calls": len(calls)}

    # Again, with rank 1 raising after its first forward pass (in ko_mc): rank 0 must not wait for it forever.
    if d.rank == 1:
        forward = harness.FtlmLM._forward
        state = {"calls": 0}

        def failing_forward(self, *args, **kwargs):
            logits = forward(self, *args, **kwargs)
            state["calls"] += 1
            if state["calls"] == 1:
                raise RuntimeError("injected failure after a forward pass")
            return logits

        harness.FtlmLM._forward = failing_forward
    try:
        harness.run_tasks(engine, loaded.tokenizer, tasks, None, "cpu", d.rank, d.world_size, tasks_dir, 3)
        report["failed"] = None
    except harness.HarnessError as e:
        report["failed"] = {"results": e.results, "failures": e.failures}

    gathered: list = [None] * d.world_size
    dist.all_gather_object(gathered, report)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        if d.rank == 0:
            weights = {k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()}
            save_file(weights, str(Path(out) / "weights.safetensors"))
    if d.rank == 0:
        (Path(out) / "ranks.json").write_text(json.dumps(gathered))
    shutdown_distributed()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(*sys.argv[1:4])
