"""Run as a separate process (a 'rank' or a 'node') by test_stream.py: build the loaders the way a training rank does,
with RANK/WORLD_SIZE/LOCAL_WORLD_SIZE in the environment, and print a digest of the first batches as JSON."""

import hashlib
import json
import os
import sys

from ftlm.data.stream import build_train_loader, build_val_loaders


def digest(tensors) -> str:
    h = hashlib.sha256()
    for batch in tensors:  # Batch objects
        for t in (batch.inputs, batch.targets, batch.positions, batch.cu_seqlens):
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)  # as under the deepspeed launcher on CPU
    train = build_train_loader(cfg, 64, 4, rank, world, seed=7)
    val = build_val_loaders(cfg, 64, 4, rank, world, max_batches=3)
    batches = [next(train) for _ in range(6)]
    state = train.state_dict()  # a collective: gathers every rank's position
    after = [next(train) for _ in range(3)]
    dist.destroy_process_group()
    print(
        json.dumps(
            {
                "train": digest(batches),
                "val": {k: digest(list(v)) for k, v in val.items()},
                "val_batches": {k: len(v) for k, v in val.items()},
                "state": state,
                "after": digest(after),
            }
        )
    )


if __name__ == "__main__":
    main()
