"""Kernel tests run on the GPU when there is one, else on the CPU through Triton's interpreter.

The interpreter is switched on for the whole test process by tests/conftest.py (TRITON_INTERPRET=1, set
before triton is first imported), so ftlm's kernels are defined interpreted from the start.
"""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


def _rel_err(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values in the kernel's output"
    # Floor: an expected tensor that is (almost) zero is compared at the scale of an O(1e-3) per-element value,
    # e.g. dq with a single key, which is 0 exactly in float64 and ~1e-7 from float32 rounding.
    floor = 1e-3 * expected.numel() ** 0.5
    return ((actual - expected).norm() / expected.norm().clamp(min=floor)).item()


@pytest.fixture
def rel_err():
    """||actual - expected|| / ||expected|| in float64 (see the floor above); NaN/inf fail."""
    return _rel_err
