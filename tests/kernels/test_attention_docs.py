"""Document masking (cu_seqlens): a packed sequence computes exactly what each document computes alone."""

import pytest
import torch

from ftlm import kernels
from ftlm.kernels import reference

# Documents per row, in tokens. The interpreter's blocks are 32 x 32: documents of 1 token, exactly one block
# (aligned and not), one block + 1, one spanning its whole row.
ROWS = [[32, 33, 1, 1, 13], [80], [1, 1, 47, 31]]


def cu_seqlens_of(rows, device):
    starts, offset = [0], 0
    for lengths in rows:
        for n in lengths:
            offset += n
            starts.append(offset)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def inputs(b, hq, hkv, s, d, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d), (b, hq, s, d)]
    return [torch.randn(shape, generator=gen).to(device) for shape in shapes]


def packed_and_separate(attention, rows, q, k, v, do, causal=True):
    """Outputs and gradients of one packed call and of one call per document, in the same layout."""
    results = []
    for packed in (True, False):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        if packed:
            out = attention(*leaves, causal=causal, cu_seqlens=cu_seqlens_of(rows, q.device))
            out.backward(do)
        else:
            outs = torch.zeros_like(q)
            for b, lengths in enumerate(rows):
                start = 0
                for n in lengths:
                    piece = [x[b : b + 1, :, start : start + n] for x in leaves]
                    o = attention(*piece, causal=causal)
                    o.backward(do[b : b + 1, :, start : start + n])
                    outs[b, :, start : start + n] = o.detach()[0]
                    start += n
            out = outs
        results.append([out.detach()] + [x.grad for x in leaves])
    return results


def assert_close(packed, separate, tol):
    for name, got, want in zip(("out", "dq", "dk", "dv"), packed, separate):
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        err = (got - want).abs().max().item()
        assert err <= tol, f"{name}: max abs difference {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_packed_equals_each_document_alone(device, ratio):
    # One key head (the interpreter is slow per program); several key heads: test_kernel_matches_reference.
    q, k, v, do = inputs(3, ratio, 1, 80, 16, device, seed=ratio)
    packed, separate = packed_and_separate(kernels.flash_attention, ROWS, q, k, v, do)
    assert_close(packed, separate, 1e-5)


def test_packed_equals_each_document_alone_non_causal(device):
    q, k, v, do = inputs(3, 2, 1, 80, 16, device, seed=7)
    packed, separate = packed_and_separate(kernels.flash_attention, ROWS, q, k, v, do, causal=False)
    assert_close(packed, separate, 1e-5)


def test_reference_packed_equals_each_document_alone():
    q, k, v, do = (x.double() for x in inputs(3, 4, 2, 80, 16, "cpu", seed=3))
    packed, separate = packed_and_separate(reference.flash_attention, ROWS, q, k, v, do)
    assert_close(packed, separate, 1e-12)


def test_kernel_matches_reference(device, rel_err):
    q, k, v, do = inputs(3, 4, 2, 80, 16, device, seed=4)
    cu = cu_seqlens_of(ROWS, device)
    want = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    out_ref = reference.flash_attention(*want, cu_seqlens=cu.cpu())
    out_ref.backward(do.cpu().double())
    got = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = kernels.flash_attention(*got, cu_seqlens=cu)
    out.backward(do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), [out] + [x.grad for x in got], [out_ref] + [x.grad for x in want]):
        assert rel_err(a, b) < 2e-3, name


def test_only_row_starts_equals_plain_causal(device):
    q, k, v, do = inputs(2, 2, 1, 77, 16, device, seed=5)
    results = []
    for cu in (None, torch.tensor([0, 77, 154], dtype=torch.int32, device=device)):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = kernels.flash_attention(*leaves, cu_seqlens=cu)
        out.backward(do)
        results.append([out.detach()] + [x.grad for x in leaves])
    assert_close(*results, 1e-6)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")  # the first document's rows, under the interpreter
def test_blocks_of_earlier_documents_are_skipped_not_computed(device):
    # Documents [0, 128) and [128, 160): 128 is a multiple of every block size, so no block of the second
    # document's queries (keys) holds a key (query) of the first. NaN in the first document would reach the
    # second's outputs and gradients through any such block that was computed and then masked (0 * NaN = NaN).
    q, k, v, do = inputs(1, 2, 1, 160, 16, device, seed=6)
    poisoned = [x.clone() for x in (q, k, v, do)]
    for x in poisoned:
        x[:, :, :128] = float("nan")
    rows = [[128, 32]]
    packed, _ = packed_and_separate(kernels.flash_attention, rows, *poisoned)
    alone = [x[:, :, 128:] for x in (q, k, v, do)]
    (second,) = packed_and_separate(kernels.flash_attention, [[32]], *alone)[1:]
    assert_close([x[:, :, 128:] for x in packed], second, 1e-5)


@pytest.mark.parametrize("op", [kernels.flash_attention, reference.flash_attention], ids=["triton", "reference"])
def test_bad_cu_seqlens(device, op):
    q = torch.randn(2, 2, 8, 16, device=device)
    cases = [
        (torch.tensor([0, 8, 16], device=device), "cu_seqlens must be int32"),
        ((0, 8, 16), "cu_seqlens must be a 1-D tensor"),
        (torch.tensor([[0, 8, 16]], dtype=torch.int32, device=device), "cu_seqlens must be a 1-D tensor"),
        ([0, 8, 8, 16], "cu_seqlens must be strictly increasing; entry 2 \\(8\\) follows 8"),
        ([0, 8, 5, 16], "strictly increasing"),
        ([1, 8, 16], "cu_seqlens must start at 0; got 1"),
        ([0, 8, 15], "cu_seqlens must end at batch\\*seq = 2\\*8 = 16; got 15"),
        ([0, 3, 16], "cu_seqlens must contain every row start i\\*seq .*missing \\[8\\]"),
        ([0], "at least"),
    ]
    for cu, message in cases:
        if isinstance(cu, list):
            cu = torch.tensor(cu, dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match=message):
            op(q, q, q, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens needs queries and keys of the same length"):
        op(q, torch.randn(2, 2, 9, 16, device=device), torch.randn(2, 2, 9, 16, device=device), cu_seqlens=cu)


def test_cu_seqlens_changed_in_place_is_checked_and_used_again(device):
    # The bounds are computed once per cu_seqlens tensor (the model's layers share one); an in-place change
    # must not reuse them.
    q, k, v, _ = inputs(1, 2, 1, 40, 16, device, seed=8)
    cu = torch.tensor([0, 10, 40], dtype=torch.int32, device=device)
    first = kernels.flash_attention(q, k, v, cu_seqlens=cu)
    cu[1] = 25
    second = kernels.flash_attention(q, k, v, cu_seqlens=cu)
    want = reference.flash_attention(q.double(), k.double(), v.double(), cu_seqlens=cu)
    assert (second.double() - want).abs().max().item() <= 1e-5
    assert (first - second).abs().max().item() > 1e-3
    cu[1] = 50
    with pytest.raises(ValueError, match="strictly increasing"):
        kernels.flash_attention(q, k, v, cu_seqlens=cu)
