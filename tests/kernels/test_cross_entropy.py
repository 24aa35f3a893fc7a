"""cross_entropy (native extension ftlm._C) against a float64 reference, and the fallback without it."""

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from ftlm import kernels
from ftlm.kernels import ext, reference

GPU = torch.cuda.is_available()
VOCAB = 50257  # GPT-2's: odd, so the CUDA kernel takes its unvectorised path too


def make_inputs(rows, vocab, seed, ignored=(1, 4)):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[list(ignored)] = -100
    return logits, targets


def compare(device, rel_err, logits, targets, dtype, tol, inplace_backward=False, ignore_index=-100):
    ref_logits = logits.to(dtype).double().requires_grad_()  # the reference sees the same rounded inputs
    ref_loss = reference.cross_entropy(ref_logits, targets, ignore_index)
    ref_loss.backward()

    leaf = logits.to(device, dtype).requires_grad_()
    # inplace_backward overwrites its input, so give it a non-leaf copy; the gradient still reaches the leaf.
    x = leaf * 1 if inplace_backward else leaf
    loss = kernels.cross_entropy(x, targets.to(device), ignore_index, inplace_backward=inplace_backward)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert leaf.grad.dtype == dtype
    assert abs(loss.item() - ref_loss.item()) <= tol * max(abs(ref_loss.item()), 1e-3)
    err = rel_err(leaf.grad, ref_logits.grad)
    assert err < tol, f"gradient: relative error {err:.2e} >= {tol:.0e}"


def test_extension_is_built_and_loaded():
    assert ext.has_extension(), (
        "ftlm._C is not built: run `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)"
    )
    from ftlm import _C

    assert callable(_C.cross_entropy_forward) and callable(_C.cross_entropy_backward)
    assert isinstance(_C.has_cuda(), bool)


needs_ext = pytest.mark.skipif(not ext.has_extension(), reason="ftlm._C is not built (see the test above)")


@needs_ext
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_matches_reference(device, rel_err, dtype, tol, inplace_backward):
    logits, targets = make_inputs(9, VOCAB, seed=11 if inplace_backward else 12)
    compare(device, rel_err, logits, targets, dtype, tol, inplace_backward)


@needs_ext
def test_fp32_is_accurate_far_beyond_the_tolerance(device, rel_err):
    logits, targets = make_inputs(6, VOCAB, seed=3)
    compare(device, rel_err, logits, targets, torch.float32, 1e-5)


@needs_ext
def test_any_leading_shape_and_other_ignore_index(device, rel_err):
    logits, targets = make_inputs(2 * 5, 333, seed=4)
    targets[targets == -100] = 7  # -100 is an ordinary (invalid) value here, so make it a real class ...
    targets[[0, 3]] = 0  # ... and ignore class 0 instead
    compare(device, rel_err, logits.view(2, 5, 333), targets.view(2, 5), torch.float32, 2e-3, ignore_index=0)


@needs_ext
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_all_targets_ignored(device, inplace_backward):
    logits = torch.randn(5, 1000, device=device, requires_grad=True)
    x = logits * 1 if inplace_backward else logits
    loss = kernels.cross_entropy(x, torch.full((5,), -100, device=device), inplace_backward=inplace_backward)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@needs_ext
def test_masked_vocabulary_entries(device, rel_err):
    logits, targets = make_inputs(6, 4099, seed=5)
    logits[:, 4000:] = float("-inf")  # e.g. padded vocabulary entries
    targets = targets % 4000
    targets[2] = -100
    compare(device, rel_err, logits, targets, torch.float32, 2e-3)


@needs_ext
def test_extension_api(device):
    from ftlm import _C

    logits, targets = make_inputs(7, 1001, seed=6)
    logits, targets = logits.to(device, torch.bfloat16), targets.to(device)
    loss, lse = _C.cross_entropy_forward(logits, targets, -100)
    assert loss.dtype == lse.dtype == torch.float32 and loss.shape == lse.shape == (7,)
    want_lse = torch.logsumexp(logits.double(), dim=1)
    assert torch.allclose(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    keep = targets != -100
    want_loss = torch.where(keep, want_lse - logits.double().gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    assert torch.allclose(loss.double(), want_loss, rtol=1e-5, atol=1e-5)

    scale = torch.tensor([0.25], device=device)
    expected = (torch.softmax(logits.double(), 1) - F.one_hot(targets.clamp(min=0), 1001)) * 0.25
    expected[~keep] = 0
    grad = _C.cross_entropy_backward(logits, targets, lse, scale, -100, False)
    assert grad.dtype == torch.bfloat16 and grad.data_ptr() != logits.data_ptr()
    assert torch.allclose(grad.double(), expected, atol=2e-3)
    # In place: the ONE logits-sized tensor of the backward is the logits buffer itself.
    same = _C.cross_entropy_backward(logits, targets, lse, scale, -100, True)
    assert same.data_ptr() == logits.data_ptr()
    assert torch.equal(same, grad)


@needs_ext
def test_invalid_target_is_an_error_on_cpu():
    from ftlm import _C

    with pytest.raises(RuntimeError, match="target 12 at row 1 is outside"):
        _C.cross_entropy_forward(torch.randn(3, 12), torch.tensor([0, 12, 3]), -100)
    with pytest.raises(RuntimeError, match="must be int64"):
        _C.cross_entropy_forward(torch.randn(3, 12), torch.tensor([0, 1, 3], dtype=torch.int32), -100)


@pytest.mark.parametrize("extension", [True, False], ids=["ftlm._C", "fallback"])
def test_target_dtypes_behave_alike_with_and_without_the_extension(monkeypatch, extension):
    if not extension:
        monkeypatch.setattr(ext, "_module", None)  # as if ftlm._C were missing (the fallback's own state)
    logits, targets = torch.randn(5, 7), torch.tensor([0, 6, 3, -100, 2])
    expected = F.cross_entropy(logits, targets)
    for dtype in (torch.int32, torch.int16):
        assert torch.allclose(kernels.cross_entropy(logits, targets.to(dtype)), expected)
    assert torch.allclose(
        kernels.cross_entropy(logits, targets.clamp(min=0).to(torch.uint8)),
        F.cross_entropy(logits, targets.clamp(min=0)),
    )
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(ValueError, match="targets must be integer class ids"):
            kernels.cross_entropy(logits, targets.to(dtype))


def test_float64_logits_stay_float64():
    logits = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 10, 3, -100, 2, 5])
    loss = kernels.cross_entropy(logits, targets)
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, F.cross_entropy(logits, targets), rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda x: kernels.cross_entropy(x, targets), (logits,))


def test_fallback_without_extension_warns_once(monkeypatch, rel_err):
    monkeypatch.setattr(ext, "_module", ext._UNSET)
    monkeypatch.setitem(sys.modules, "ftlm._C", None)  # makes `from ftlm import _C` raise ImportError
    monkeypatch.delattr("ftlm._C", raising=False)
    logits, targets = make_inputs(4, 1000, seed=7, ignored=(1,))
    logits.requires_grad_()
    with pytest.warns(RuntimeWarning, match="ftlm._C could not be imported"):
        loss = kernels.cross_entropy(logits, targets)
    assert not ext.has_extension()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        again = kernels.cross_entropy(logits, targets)
    loss.backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref_loss = reference.cross_entropy(ref_logits, targets)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5 and again.item() == loss.item()
    assert rel_err(logits.grad, ref_logits.grad) < 1e-5


@pytest.mark.skipif(not (GPU and ext.has_extension()), reason="needs a CUDA GPU and ftlm._C")
def test_cuda_kernels_built_and_save_memory():
    from ftlm import _C

    assert _C.has_cuda(), "ftlm._C has no CUDA kernels: rebuild with FTLM_CUDA=1"
    rows, vocab = 4096, 32768
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda")

    def peak(fn):
        x = logits.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x, targets).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    buffer = logits.numel() * logits.element_size()
    ours = peak(lambda x, t: kernels.cross_entropy(x * 1, t, inplace_backward=True))
    theirs = peak(lambda x, t: F.cross_entropy(x * 1, t))
    assert ours + buffer <= theirs, (ours / buffer, theirs / buffer)
