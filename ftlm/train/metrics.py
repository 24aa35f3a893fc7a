"""What the run reports: log lines, TensorBoard scalars and text, throughput and step-time breakdown."""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger("ftlm")


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """Rank 0 logs INFO to the console and to run_dir/train.log; other ranks only warnings."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter(
        "%(asctime)s %(levelname)s %(message)s"
        if rank == 0
        else f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        "%H:%M:%S",
    )
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank == 0 and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "streaming"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class StepTimer:
    """Wall time per phase of a step (data wait, forward, backward, optimizer).

    On a GPU each phase must be synchronised to be measured, which stalls the launch queue; so only the steps
    marked with `measure_next(True)` (the one before each log line) are timed, and the others run untouched.
    """

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.totals = defaultdict(float)
        self.measuring = False

    def measure_next(self, on: bool) -> None:
        self.measuring = on

    @contextmanager
    def phase(self, name: str):
        if not self.measuring:
            yield
            return
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.totals[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


class Metrics:
    """TensorBoard on rank 0 plus a per-interval throughput meter."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        is_main: bool,
        world_size: int,
        tokens_per_step: int,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        start_step: int = 0,
    ):
        self.writer = None
        if enabled and is_main:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, drop what a crashed run logged after its last checkpoint: those steps are redone.
            self.writer = SummaryWriter(
                log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        self.world_size = world_size
        self.tokens_per_step = tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.interval_start = time.perf_counter()
        self.interval_steps = 0

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, value: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, value, step)

    def tick(self) -> None:
        self.interval_steps += 1

    def throughput(self) -> dict[str, float]:
        """Tokens per second over the steps since the last call (all ranks together, and per device)."""
        elapsed = max(time.perf_counter() - self.interval_start, 1e-9)
        tokens_per_sec = self.tokens_per_step * self.interval_steps / elapsed
        per_device = tokens_per_sec / self.world_size
        out = {
            "train/tokens_per_sec": tokens_per_sec,
            "train/tokens_per_sec_per_device": per_device,
            "train/step_time_s": elapsed / max(1, self.interval_steps),
        }
        if self.flops_per_token and self.peak_flops:
            out["train/mfu"] = per_device * self.flops_per_token / self.peak_flops
        self.interval_start, self.interval_steps = time.perf_counter(), 0
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    gib = 2**30
    return {
        "memory/allocated_gib": torch.cuda.memory_allocated(device) / gib,
        "memory/reserved_gib": torch.cuda.memory_reserved(device) / gib,
        "memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
    }
