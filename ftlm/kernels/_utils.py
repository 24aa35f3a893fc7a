"""Checks shared by ftlm's kernels and their plain PyTorch references.

Imports no triton at module level: ftlm.kernels.reference uses these checks and must work without it.
"""

import os

import torch


def check_device(x, interpreted):
    """Raise a clear error when Triton kernels built in this mode cannot run on x's device.

    interpreted: whether the kernels were built for Triton's interpreter, i.e. TRITON_INTERPRET=1 was set when
    triton and the kernel module were first imported (triton.jit decides at definition time).
    """
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu":
        if interpreted:
            return
        late = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        raise RuntimeError(
            "ftlm.kernels: the Triton kernels need a CUDA tensor; on the CPU they run only under "
            "Triton's interpreter. Set TRITON_INTERPRET=1 (slow, for tests) "
            + ("before triton is first imported (it was set too late), " if late else "")
            + "or choose model.attn_impl=sdpa / model.norm_impl=torch."
        )
    raise RuntimeError(
        f"ftlm.kernels: the Triton kernels do not support device '{x.device.type}'; "
        "choose model.attn_impl=sdpa / model.norm_impl=torch."
    )


def check_cu_seqlens(cu_seqlens, q, k, op="flash_attention"):
    """Raise ValueError unless cu_seqlens follows the flash-attn varlen convention for q (B, Hq, S, D) and
    k (B, Hkv, S, D): int32, 1-D, on q's device, strictly increasing, starting at 0, ending at B*S and
    containing every row start i*S.

    Costs one device-to-host copy of four flags (more only to describe an error).
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        got = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"{op}: cu_seqlens must be a 1-D tensor of document starts; got {got}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{op}: cu_seqlens must be int32 (flash-attn varlen convention); got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    batch, seq = q.shape[0], q.shape[2]
    if k.shape[2] != seq:
        raise ValueError(
            f"{op}: cu_seqlens needs queries and keys of the same length (one packed sequence per row); "
            f"got q length {seq} and k length {k.shape[2]}"
        )
    total = batch * seq
    if cu_seqlens.numel() < 2:
        raise ValueError(
            f"{op}: cu_seqlens must hold at least [0, batch*seq] = [0, {total}]; got {cu_seqlens.tolist()}"
        )
    row_starts = torch.arange(batch, device=cu_seqlens.device, dtype=torch.int32) * seq
    flags = torch.stack(
        [
            cu_seqlens[0] == 0,
            cu_seqlens[-1] == total,
            (cu_seqlens[1:] > cu_seqlens[:-1]).all(),
            torch.isin(row_starts, cu_seqlens).all(),
        ]
    ).tolist()
    starts_at_zero, ends_at_total, increasing, has_rows = flags
    if not starts_at_zero:
        raise ValueError(f"{op}: cu_seqlens must start at 0; got {cu_seqlens[0].item()}")
    if not ends_at_total:
        raise ValueError(
            f"{op}: cu_seqlens must end at batch*seq = {batch}*{seq} = {total}; got {cu_seqlens[-1].item()}"
        )
    if not increasing:
        i = int((cu_seqlens[1:] <= cu_seqlens[:-1]).nonzero()[0, 0])
        raise ValueError(
            f"{op}: cu_seqlens must be strictly increasing; entry {i + 1} ({cu_seqlens[i + 1].item()}) follows "
            f"{cu_seqlens[i].item()}"
        )
    if not has_rows:
        missing = row_starts[~torch.isin(row_starts, cu_seqlens)].tolist()
        raise ValueError(
            f"{op}: cu_seqlens must contain every row start i*seq (seq = {seq}): documents do not cross rows; "
            f"missing {missing[:8]}"
        )


def doc_bounds(cu_seqlens, batch, seq):
    """Per token of the flattened (batch*seq) sequence: where its document starts and ends (exclusive), counted
    from the start of its row. Two int32 tensors of shape (batch*seq,). cu_seqlens must be valid (check_cu_seqlens)."""
    total = batch * seq
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    # output_size: no device-to-host copy to learn the result's length.
    start = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
    end = torch.repeat_interleave(cu[1:], lengths, output_size=total)
    row0 = torch.arange(total, device=cu.device) // seq * seq
    return (start - row0).to(torch.int32), (end - row0).to(torch.int32)
