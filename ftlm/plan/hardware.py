"""Known accelerators: dense (no 2:4 sparsity) peak FLOP/s per precision and memory, from the vendors' datasheets.

MFU is measured against these peaks. `FTLM_PEAK_TFLOPS` (in TFLOP/s) overrides the table for any device,
including one it does not know.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
T = 1e12


@dataclass(frozen=True)
class GPU:
    key: str  # short name for `ftlm-plan --gpu`
    pattern: str  # regex matched against torch.cuda.get_device_name(), lower-cased
    memory_gib: float  # device memory
    peaks: dict  # precision (bf16 / fp16 / fp32) -> dense peak FLOP/s; fp32 is the non-tensor-core rate


# Ordered: the first pattern that matches wins, so specific names (H100 PCIe, A100 40GB) come before general ones.
GPUS = (
    GPU("h100-pcie", r"h100.*pcie", 80, {"bf16": 756 * T, "fp16": 756 * T, "fp32": 51.2 * T}),
    GPU("h100-nvl", r"h100.*nvl", 94, {"bf16": 835 * T, "fp16": 835 * T, "fp32": 60 * T}),
    GPU("h100", r"h100|h800", 80, {"bf16": 989 * T, "fp16": 989 * T, "fp32": 67 * T}),  # SXM
    GPU("h200", r"h200|gh200", 141, {"bf16": 989 * T, "fp16": 989 * T, "fp32": 67 * T}),
    GPU("b200", r"b200", 180, {"bf16": 2250 * T, "fp16": 2250 * T, "fp32": 80 * T}),
    GPU("a100-40gb", r"a100.*40gb", 40, {"bf16": 312 * T, "fp16": 312 * T, "fp32": 19.5 * T}),
    GPU("a100", r"a100|a800", 80, {"bf16": 312 * T, "fp16": 312 * T, "fp32": 19.5 * T}),
    GPU("a10g", r"a10g", 24, {"bf16": 70 * T, "fp16": 70 * T, "fp32": 35 * T}),  # AWS g5 datasheet
    GPU("a10", r"\ba10\b", 24, {"bf16": 125 * T, "fp16": 125 * T, "fp32": 31.2 * T}),
    GPU("a40", r"\ba40\b", 48, {"bf16": 149.7 * T, "fp16": 149.7 * T, "fp32": 37.4 * T}),
    GPU("l40s", r"l40s", 48, {"bf16": 362 * T, "fp16": 362 * T, "fp32": 91.6 * T}),
    GPU("l40", r"\bl40\b", 48, {"bf16": 181 * T, "fp16": 181 * T, "fp32": 90.5 * T}),
    GPU("l4", r"\bl4\b", 24, {"bf16": 121 * T, "fp16": 121 * T, "fp32": 30.3 * T}),
    GPU("v100-16gb", r"v100.*16gb", 16, {"fp16": 125 * T, "fp32": 15.7 * T}),  # Volta: no bf16 tensor cores
    GPU("v100", r"v100", 32, {"fp16": 125 * T, "fp32": 15.7 * T}),
    GPU("t4", r"\bt4\b", 16, {"fp16": 65 * T, "fp32": 8.1 * T}),
    GPU("rtx4090", r"rtx 4090", 24, {"bf16": 165 * T, "fp16": 165 * T, "fp32": 82.6 * T}),  # fp32 accumulate
    GPU("rtx3090", r"rtx 3090", 24, {"bf16": 71 * T, "fp16": 71 * T, "fp32": 35.6 * T}),  # fp32 accumulate
    GPU("rtx6000-ada", r"rtx 6000 ada", 48, {"bf16": 364 * T, "fp16": 364 * T, "fp32": 91.1 * T}),
    GPU("mi300x", r"mi300x|mi325x", 192, {"bf16": 1307 * T, "fp16": 1307 * T, "fp32": 163.4 * T}),
    GPU("mi250x", r"mi250x", 128, {"bf16": 383 * T, "fp16": 383 * T, "fp32": 47.9 * T}),
)
GPUS_BY_KEY = {g.key: g for g in GPUS}
PEAK_ENV = "FTLM_PEAK_TFLOPS"

_warned: set[tuple[str, str]] = set()


class UnknownGPU(ValueError):
    """A GPU name the table does not know; the message lists the known ones and the way around it."""


def gpu_by_key(key: str) -> GPU:
    k = key.lower().replace("_", "-").replace(" ", "-")
    if k in GPUS_BY_KEY:
        return GPUS_BY_KEY[k]
    for gpu in GPUS:  # also accept a full device name such as "NVIDIA H100 80GB HBM3"
        if re.search(gpu.pattern, key.lower()):
            return gpu
    raise UnknownGPU(
        f"unknown GPU '{key}'; known: {', '.join(GPUS_BY_KEY)}. "
        "For another GPU pass --peak-tflops (its dense bf16 peak) and --gpu-memory-gib"
    )


def gpu_for_device_name(name: str) -> GPU | None:
    lowered = name.lower()
    return next((g for g in GPUS if re.search(g.pattern, lowered)), None)


def peak_from_env() -> float | None:
    value = os.environ.get(PEAK_ENV)
    if not value:
        return None
    try:
        tflops = float(value)
    except ValueError:
        raise ValueError(f"{PEAK_ENV}='{value}' is not a number (TFLOP/s, e.g. {PEAK_ENV}=989)") from None
    if tflops <= 0:
        raise ValueError(f"{PEAK_ENV}={value} must be positive (TFLOP/s)")
    return tflops * T


def peak_flops_per_device(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of `device` at `precision` (bf16 | fp16 | fp32), for MFU.

    `FTLM_PEAK_TFLOPS` wins when set. Otherwise None on a CPU, and None with one warning (per device name)
    for a GPU the table does not know or a precision it has no tensor cores for (bf16 on a V100).
    """
    override = peak_from_env()
    if override is not None:
        return override
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    gpu = gpu_for_device_name(name)
    peak = gpu.peaks.get(precision) if gpu else None
    if peak is None and (name, precision) not in _warned:
        _warned.add((name, precision))
        why = "is not in ftlm's table" if gpu is None else f"has no {precision} peak in ftlm's table"
        log.warning(
            "GPU '%s' %s, so MFU is not reported; set %s to its dense %s peak in TFLOP/s to report it",
            name,
            why,
            PEAK_ENV,
            precision,
        )
    return peak
