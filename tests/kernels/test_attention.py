"""flash_attention against a float64 reference: forward and all gradients, awkward shapes, GQA, causal."""

import pytest
import torch

from ftlm import kernels
from ftlm.kernels import reference

GPU = torch.cuda.is_available()


def run_and_compare(
    device, rel_err, b, hq, hkv, t, s, d, causal, dtype=torch.float32, tol=2e-3, scale=None, strided=False
):
    gen = torch.Generator().manual_seed(1000 * t + 10 * hq + d)
    if strided:
        # As in the model: q, k, v are views into one projection output, with rows of stride (hq + 2 hkv) * d.
        assert t == s
        qkv = torch.randn(b, t, hq + 2 * hkv, d, generator=gen)
        q, k, v = (x.transpose(1, 2) for x in qkv.split([hq, hkv, hkv], dim=2))
    else:
        q = torch.randn(b, hq, t, d, generator=gen)
        k = torch.randn(b, hkv, s, d, generator=gen)
        v = torch.randn(b, hkv, s, d, generator=gen)
    do = torch.randn(b, hq, t, d, generator=gen)

    q_ref, k_ref, v_ref = (x.double().requires_grad_() for x in (q, k, v))
    out_ref = reference.flash_attention(q_ref, k_ref, v_ref, causal=causal, softmax_scale=scale)
    out_ref.backward(do.double())

    q, k, v = (x.to(device, dtype).requires_grad_() for x in (q, k, v))
    out = kernels.flash_attention(q, k, v, causal=causal, softmax_scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    out.backward(do.to(device, dtype))
    for name, got, want in (
        ("out", out, out_ref),
        ("dq", q.grad, q_ref.grad),
        ("dk", k.grad, k_ref.grad),
        ("dv", v.grad, v_ref.grad),
    ):
        err = rel_err(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


# Every sequence length with and without the causal mask, GQA ratios 1, 2, 4 spread over them.
SEQ_CASES = [
    (t, causal, (1, 2, 4)[i % 3])
    for i, (t, causal) in enumerate((t, c) for t in (1, 17, 77, 130) for c in (True, False))
]


@pytest.mark.parametrize("t,causal,ratio", SEQ_CASES)
def test_matches_reference_fp32(device, rel_err, t, causal, ratio):
    run_and_compare(device, rel_err, b=1, hq=4, hkv=4 // ratio, t=t, s=t, d=32, causal=causal)


@pytest.mark.parametrize("d,t,causal", [(64, 65, True), (96, 77, True), (128, 33, False)])
def test_head_dims(device, rel_err, d, t, causal):
    run_and_compare(device, rel_err, b=2, hq=2, hkv=1, t=t, s=t, d=d, causal=causal)


def test_gqa_4_long_causal(device, rel_err):
    run_and_compare(device, rel_err, b=1, hq=4, hkv=1, t=130, s=130, d=32, causal=True)


@pytest.mark.parametrize("t,s", [(20, 45), (45, 20)])
def test_causal_queries_aligned_to_the_end_of_keys(device, rel_err, t, s):
    # t > s: the first t - s queries see no key and must output zeros, with zero gradients, not NaN.
    run_and_compare(device, rel_err, b=1, hq=2, hkv=1, t=t, s=s, d=32, causal=True)


def test_non_causal_different_lengths(device, rel_err):
    run_and_compare(device, rel_err, b=1, hq=2, hkv=2, t=33, s=70, d=32, causal=False)


def test_strided_views_and_custom_scale(device, rel_err):
    run_and_compare(device, rel_err, b=2, hq=4, hkv=2, t=40, s=40, d=32, causal=True, strided=True, scale=0.3)


def test_fp16(device, rel_err):
    run_and_compare(device, rel_err, b=1, hq=4, hkv=2, t=77, s=77, d=64, causal=True, dtype=torch.float16, tol=1e-2)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: Triton's CPU interpreter computes bfloat16 dots wrongly")
def test_bf16_gpu(device, rel_err):
    run_and_compare(device, rel_err, b=2, hq=8, hkv=2, t=300, s=300, d=128, causal=True, dtype=torch.bfloat16, tol=2e-2)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("d", [64, 128])
def test_long_sequence_gpu(device, rel_err, d):
    run_and_compare(device, rel_err, b=1, hq=4, hkv=2, t=1031, s=1031, d=d, causal=True, dtype=torch.bfloat16, tol=2e-2)


def test_output_layout_makes_the_models_reshape_free(device):
    q = torch.randn(1, 2, 17, 32, device=device)
    out = kernels.flash_attention(q, q, q)
    merged = out.transpose(1, 2).reshape(1, 17, 64)
    assert merged.data_ptr() == out.data_ptr()


def test_bad_shapes_are_rejected(device):
    q = torch.randn(1, 3, 8, 32, device=device)
    kv = torch.randn(1, 2, 8, 32, device=device)
    with pytest.raises(ValueError, match="must divide q heads"):
        kernels.flash_attention(q, kv, kv)
    with pytest.raises(ValueError, match="same shape"):
        kernels.flash_attention(q, kv, kv[..., :16])
    empty = torch.randn(1, 2, 8, 0, device=device)
    with pytest.raises(ValueError, match="head_dim 0 is outside"):
        kernels.flash_attention(empty, empty, empty)


@pytest.mark.skipif(GPU, reason="the interpreter's bfloat16 refusal: CPU only")
def test_bf16_in_the_interpreter_is_refused_not_garbage():
    q = torch.randn(1, 2, 16, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="interpreter .* bfloat16"):
        kernels.flash_attention(q, q, q)
