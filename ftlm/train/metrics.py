"""What the run reports: log lines, TensorBoard scalars and text, throughput and step-time breakdown."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger("ftlm")


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO to the console, other ranks only warnings; the run's train.log comes with attach_log_file.

    Until then rank 0's records wait in memory: a run refused by its checks writes nothing into the run directory.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
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
    if rank == 0:
        root.addHandler(_PendingFile())
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "streaming"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _PendingFile(logging.handlers.MemoryHandler):
    """Holds log records until the run's file is known to be writable (capacity far above a run's start)."""

    def __init__(self):
        super().__init__(capacity=100_000, flushLevel=logging.CRITICAL + 1)

    def shouldFlush(self, record) -> bool:
        return self.target is not None and super().shouldFlush(record)


def attach_log_file(run_dir: Path) -> None:
    """Start run_dir/train.log (appending on resume) with every record logged so far."""
    root = logging.getLogger()
    file = logging.FileHandler(run_dir / "train.log")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for h in list(root.handlers):
        if isinstance(h, _PendingFile):
            h.setTarget(file)
            h.flush()
            root.removeHandler(h)
    root.addHandler(file)


def close_logging() -> None:
    """Detach and close the run's log file, so what runs after (Hydra launching a sweep's next job) is not in it."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, (logging.FileHandler, _PendingFile)):
            root.removeHandler(h)
            h.close()


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
    """Training metrics: the loss window, TensorBoard on rank 0, the console line, throughput and MFU.

    `record` keeps the loss on the device (no synchronisation); `log` runs at log boundaries only, reduces the window
    over the ranks and reports it.
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        is_main: bool,
        world_size: int,
        tokens_per_step: int,
        device: torch.device,
        max_steps: int,
        log_interval: int,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        start_step: int = 0,
    ):
        self.writer = None
        if enabled and is_main:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, drop what a crashed run logged after its last checkpoint: those steps are redone. From step 0
            # (a run that lost every checkpoint, or resume=never), everything an earlier run logged here is dropped.
            self.writer = SummaryWriter(
                log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else 0
            )
        self.world_size = world_size
        self.tokens_per_step = tokens_per_step
        self.device, self.max_steps, self.log_interval = device, max_steps, log_interval
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.interval_start = time.perf_counter()
        self.interval_steps = 0
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.window = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, micro-batches
        # micro-batches whose loss was NaN or inf since the last boundary check (the trainer reads it there)
        self.nonfinite = torch.zeros(1, dtype=torch.float64, device=device)
        self.losses: dict[int, float] = {}  # step -> mean training loss, at each log line

    def due(self, step: int) -> bool:
        return due(step, self.log_interval, self.max_steps)

    def record(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss, added on the device."""
        loss = loss.detach().double()
        self.window += torch.stack([loss, torch.ones((), dtype=torch.float64, device=self.device)])
        self.nonfinite += (~torch.isfinite(loss)).double()

    def tick(self) -> None:
        self.interval_steps += 1

    def log(self, step: int, values: dict[str, float]) -> float:
        """Reduce the loss window over the ranks, write it with `values` to TensorBoard and print the step's line."""
        import torch.distributed as dist

        dist.all_reduce(self.window)
        mean_loss = (self.window[0] / self.window[1]).item()
        self.window.zero_()
        values = {"train/loss": mean_loss, **values, **self.throughput(), **memory_stats(self.device)}
        self.scalars(values, step)
        self.losses[step] = mean_loss
        log.info(self.format_line(step, values))
        return mean_loss

    def format_line(self, step: int, values: dict[str, float]) -> str:
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(1, step - self.start_step) * (self.max_steps - step)
        parts = [
            f"step {step}/{self.max_steps} ({100 * step / self.max_steps:.0f}%)",
            f"loss {values['train/loss']:.4f}",
            f"lr {values['train/lr']:.2e}",
            f"grad norm {values['train/grad_norm']:.3f}",
            f"{values['train/tokens_per_sec']:,.0f} tokens/s",
        ]
        if "train/mfu" in values:
            parts.append(f"MFU {values['train/mfu']:.1%}")
        if "train/pad_fraction" in values:
            parts.append(f"pad {values['train/pad_fraction']:.1%}")
        parts.append(f"ETA {duration(eta)}")
        return " | ".join(parts)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, value: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, value, step)

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

    def summary(self) -> None:
        losses = list(self.losses.values())
        if len(losses) >= 2:
            log.info(
                "loss went from %.4f to %.4f (%.0f%% of the first logged value)",
                losses[0],
                losses[-1],
                100 * losses[-1] / losses[0],
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic task runs after `step`: every `every` steps and after the last one (0 turns it off)."""
    return every > 0 and (step % every == 0 or step == last)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    gib = 2**30
    return {
        "memory/allocated_gib": torch.cuda.memory_allocated(device) / gib,
        "memory/reserved_gib": torch.cuda.memory_reserved(device) / gib,
        "memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
    }
