"""layer_norm and rms_norm against float64 references: any rank, hidden sizes that are not powers of two."""

import pytest
import torch

from ftlm import kernels
from ftlm.kernels import reference

GPU = torch.cuda.is_available()
SHAPES = [(2, 3, 5, 96), (7, 1000), (4099,), (2, 1, 3, 4099)]


def run_and_compare(device, rel_err, kind, shape, dtype, tol):
    gen = torch.Generator().manual_seed(sum(shape))
    n = shape[-1]
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    weight = torch.randn(n, generator=gen) * 0.3 + 1
    bias = torch.randn(n, generator=gen) if kind == "layernorm_bias" else None
    dy = torch.randn(shape, generator=gen)

    refs = [t.double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    if kind == "rmsnorm":
        out_ref = reference.rms_norm(refs[0], refs[1], 1e-6)
    else:
        out_ref = reference.layer_norm(*refs, 1e-5)
    out_ref.backward(dy.double())

    ins = [t.to(device, dtype).requires_grad_() if t is not None else None for t in (x, weight, bias)]
    if kind == "rmsnorm":
        out = kernels.rms_norm(ins[0], ins[1], 1e-6)
    else:
        out = kernels.layer_norm(*ins, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    out.backward(dy.to(device, dtype))
    pairs = [("out", out, out_ref)] + [
        (name, got.grad, want.grad) for name, got, want in zip(("dx", "dweight", "dbias"), ins, refs) if got is not None
    ]
    for name, got, want in pairs:
        assert got.dtype == dtype
        err = rel_err(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["layernorm", "layernorm_bias", "rmsnorm"])
def test_matches_reference_fp32(device, rel_err, kind, shape):
    run_and_compare(device, rel_err, kind, shape, torch.float32, 2e-3)


@pytest.mark.parametrize("kind", ["layernorm_bias", "rmsnorm"])
def test_bf16(device, rel_err, kind):
    # bf16 keeps 8 mantissa bits: rounding the output alone gives ~3e-3.
    run_and_compare(device, rel_err, kind, (3, 5, 1000), torch.bfloat16, 1e-2)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["layernorm_bias", "rmsnorm"])
def test_many_rows_gpu(device, rel_err, kind):
    run_and_compare(device, rel_err, kind, (4097, 2048), torch.bfloat16, 1e-2)


def test_non_contiguous_input(device, rel_err):
    x = torch.randn(6, 200, device=device)[:, :100]  # rows of stride 200
    w = torch.randn(100, device=device)
    assert rel_err(kernels.rms_norm(x, w), reference.rms_norm(x.double(), w.double())) < 2e-3


def test_bad_weight_shape(device):
    with pytest.raises(ValueError, match=r"weight must have shape \(96,\)"):
        kernels.layer_norm(torch.randn(4, 96, device=device), torch.ones(95, device=device), None)
