"""Kernel tests run on the GPU when there is one, else on the CPU through Triton's interpreter.

TRITON_INTERPRET=1 is set only for the duration of each kernel test (monkeypatch), so it does not leak
into other test directories of the same pytest process. ftlm's Triton kernels read it at launch time.
"""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def triton_interpreter_on_cpu(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


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
