"""One rank of test_on_rank_0: runs on_rank_0 three ways over gloo and prints what this rank got, a JSON line each."""

import json
import os
import sys
from types import SimpleNamespace

import torch.distributed as dist

from ftlm.data.checks import DataConfigError
from ftlm.train.main import on_rank_0


def main() -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    d = SimpleNamespace(is_main=rank == 0, rank=rank)

    def succeeds():
        return {"made by": rank}

    def refuses():
        raise DataConfigError("data.mix.ko must be a number >= 0, got -1.0")

    def breaks():
        raise OSError(28, "No space left on device")

    for work in (succeeds, refuses, breaks):
        try:
            got = {"returned": on_rank_0(d, work)}
        except Exception as e:
            got = {"raised": type(e).__name__, "message": str(e)}
        print(json.dumps({"rank": rank, "work": work.__name__, **got}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
