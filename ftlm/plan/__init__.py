"""Compute planning: FLOPs per token, peak FLOP/s of known GPUs, ZeRO-3 memory, and the `ftlm-plan` command."""

from ftlm.plan.flops import flops_per_token, matmul_params, training_flops
from ftlm.plan.hardware import GPUS, UnknownGPU, gpu_by_key, peak_flops_per_device


def main(argv=None):
    """Console script `ftlm-plan` (the command line lives in ftlm.plan.cli)."""
    from ftlm.plan.cli import main as cli_main

    return cli_main(argv)


__all__ = [
    "flops_per_token",
    "matmul_params",
    "training_flops",
    "peak_flops_per_device",
    "gpu_by_key",
    "GPUS",
    "UnknownGPU",
    "main",
]
