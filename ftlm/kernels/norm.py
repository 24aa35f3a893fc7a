"""Fused LayerNorm and RMSNorm over the last dimension, in Triton.

Forward: one program per row reads the row once, writes the normalised row, and saves the row's mean
and reciprocal standard deviation (mean only for LayerNorm). Backward: a fixed number of programs each
walks a contiguous run of rows, writing dx and accumulating its share of dweight/dbias in registers;
the per-program partial sums are then added by one small torch reduction. No atomics, deterministic.

Any hidden size works: the row is padded to the next power of two and masked. Arithmetic is float32
whatever the input dtype. On a CPU tensor the kernels run only under Triton's interpreter, chosen when this
module is imported (TRITON_INTERPRET=1 before triton is first imported; see attention.py).
"""

import torch
import triton
import triton.language as tl

from ftlm.kernels._utils import check_device

MAX_HIDDEN = 65536  # one row must fit in one program's registers
# The mode the @triton.jit definitions below are built in (triton reads TRITON_INTERPRET at definition time).
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _norm_fwd(
    X,
    Y,
    W,
    B,
    MEAN,
    RSTD,
    stride_x,
    stride_y,
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        centered = x
    else:
        mean = tl.sum(x, 0) / N
        centered = tl.where(mask, x - mean, 0.0)
        tl.store(MEAN + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 0) / N + eps)
    tl.store(RSTD + row, rstd)
    y = centered * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(
    DY,
    X,
    W,
    MEAN,
    RSTD,
    DX,
    DW_PARTIAL,
    DB_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    M,
    N,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for i in range(0, row_end - row_start):
        row64 = row_start + i
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        if IS_RMS:
            x_hat = x * rstd
        else:
            x_hat = tl.where(mask, (x - tl.load(MEAN + row64)) * rstd, 0.0)
        w_dy = w * dy
        c1 = tl.sum(x_hat * w_dy, 0) / N
        if IS_RMS:
            dx = (w_dy - x_hat * c1) * rstd
        else:
            c2 = tl.sum(w_dy, 0) / N
            dx = (w_dy - (x_hat * c1 + c2)) * rstd
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat
        if HAS_BIAS:
            db_acc += dy
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid.to(tl.int64) * N + cols, db_acc, mask=mask)


def _num_warps(block_n):
    return 4 if block_n <= 1024 else 8 if block_n <= 4096 else 16


def _backward_programs(device, rows):
    if device.type == "cuda":
        # Enough programs to fill every SM a few times over; the partial sums stay small (programs x N).
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))  # interpreter: few programs, each walking many rows


def _as_rows(x):
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


class NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, is_rms):
        shape, n = x.shape, x.shape[-1]
        x2 = _as_rows(x)
        m = x2.shape[0]
        block_n = triton.next_power_of_2(n)
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
        rstd = torch.empty(m, device=x.device, dtype=torch.float32)
        mean = rstd if is_rms else torch.empty(m, device=x.device, dtype=torch.float32)
        has_bias = bias is not None
        if m > 0:
            _norm_fwd[(m,)](
                x2,
                y,
                weight,
                bias if has_bias else weight,
                mean,
                rstd,
                x2.stride(0),
                y.stride(0),
                n,
                eps,
                IS_RMS=is_rms,
                HAS_BIAS=has_bias,
                BLOCK_N=block_n,
                num_warps=_num_warps(block_n),
            )
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        ctx.is_rms, ctx.shape = is_rms, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        has_bias = bias is not None
        dy2 = _as_rows(dy)
        dx = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
        programs = _backward_programs(x2.device, m)
        dw_partial = torch.zeros((programs, n), device=x2.device, dtype=torch.float32)
        db_partial = torch.zeros((programs, n), device=x2.device, dtype=torch.float32) if has_bias else dw_partial
        if m > 0:
            block_n = triton.next_power_of_2(n)
            _norm_bwd[(programs,)](
                dy2,
                x2,
                weight,
                mean,
                rstd,
                dx,
                dw_partial,
                db_partial,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                m,
                n,
                triton.cdiv(m, programs),
                IS_RMS=ctx.is_rms,
                HAS_BIAS=has_bias,
                BLOCK_N=block_n,
                num_warps=_num_warps(block_n),
            )
        dw = dw_partial.sum(0).to(weight.dtype)
        db = db_partial.sum(0).to(bias.dtype) if has_bias else None
        return dx.view(ctx.shape), dw, db, None, None


def _check(x, weight, bias, name):
    n = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(
            f"{name}: weight must have shape ({n},) to match the last dim of x {tuple(x.shape)}; "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{name}: bias must have shape ({n},); got {tuple(bias.shape)}")
    if n > MAX_HIDDEN:
        raise ValueError(f"{name}: hidden size {n} is larger than the supported {MAX_HIDDEN}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: x must be float32, float16 or bfloat16; got {x.dtype}")
    for t in (weight, bias):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: x is on {x.device} but a parameter is on {t.device}")
    check_device(x, INTERPRETED)


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last dimension of x; bias may be None."""
    _check(x, weight, bias, "layer_norm")
    return NormFunction.apply(x, weight, bias, float(eps), False)


def rms_norm(x, weight, eps=1e-6):
    """RMSNorm over the last dimension of x: x / sqrt(mean(x^2) + eps) * weight."""
    _check(x, weight, None, "rms_norm")
    return NormFunction.apply(x, weight, None, float(eps), True)
