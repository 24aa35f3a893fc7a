"""Helpers for tests that start real training processes (the deepspeed launcher, or a plain python)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Small and fast on 2 CPU cores; every test adds its own overrides after these.
FAST = [
    "model=tiny",
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.n_kv_heads=2",
    "trainer=demo",
    "trainer.seq_len=32",
    "trainer.micro_batch_size=2",
    "trainer.eval_batches=2",
    "trainer.sample_tokens=4",
    "trainer.warmup_steps=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(cache: Path) -> dict:
    """The environment of a child process: prepared data and streaming caches under `cache`."""
    e = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "TRITON_INTERPRET",
        )
    }
    e.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", FTLM_CACHE=str(cache))
    return e


def run(cmd: list[str], cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def deepspeed_cmd(nprocs: int, overrides: list[str], *launcher_args: str) -> list[str]:
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(nprocs),
        "--master_port",
        str(free_port()),
        *launcher_args,
        "--module",
        "ftlm.train.main",
        *overrides,
    ]


def python_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "ftlm.train.main", *overrides]


def python_prepare_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "ftlm.data.prepare", *overrides]


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar TensorBoard holds for a run: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


# -- resumption tests (test_resume.py) -----------------------------------------------------------------------------
HOOKS = Path(__file__).resolve().parent / "resume_hooks.py"  # ftlm.train.main with test hooks, see its docstring


def hooked_python_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, str(HOOKS), *overrides]


def hooked_deepspeed_cmd(nprocs: int, overrides: list[str]) -> list[str]:
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(nprocs),
        "--master_port",
        str(free_port()),
        str(HOOKS),
        *overrides,
    ]


def run_status(
    cmd: list[str], cache: Path, extra_env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Like run(), with extra environment variables, and returning a failed process instead of raising."""
    e = {**env(cache), **(extra_env or {})}
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


def start(cmd: list[str], cache: Path, output: Path) -> subprocess.Popen:
    """Start a process in its own process group, stdout and stderr to `output`."""
    with open(output, "w") as out:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env(cache), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def newest_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """The scalars of the newest TensorBoard event file only: what the last (resumed) process logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    newest = max((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    acc = EventAccumulator(str(newest), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
