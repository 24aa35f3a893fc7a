"""FlashAttention-2 style attention in Triton: tiled online-softmax forward, recomputing backward.

The forward never materialises the (T, S) score matrix: each program owns a block of queries, streams
blocks of keys and values through an online softmax, and stores the output plus one log-sum-exp per
query row. The backward recomputes the probabilities from that log-sum-exp: one kernel per key block
accumulates dK and dV over every query head that shares the key head (grouped-query attention, no
atomics), one kernel per query block accumulates dQ.

Causal masking aligns the queries to the END of the keys (query i sees keys j <= i + S - T), as in
ftlm.kernels.reference. A query that sees no key at all (only possible when T > S) outputs zeros.

Document masking (cu_seqlens, flash-attn's varlen convention over the flattened B*S tokens; T == S): a
query sees only keys of its own document. The host turns cu_seqlens into each token's document start
and end within its row; a block of queries then visits only the key blocks from its first row's
document start, and a block of keys only the query blocks up to its last key's document end, so the
blocks of other documents are skipped, not computed and masked. The key/query ranges and the mask are
jit helpers shared by the three kernels.

Internally scores are kept in base 2 (scaled by log2(e)) so the kernels use exp2; the stored
log-sum-exp is in the same base-2 units.

On a CPU tensor the kernels run only under Triton's interpreter, which triton.jit chooses when this
module is imported: set TRITON_INTERPRET=1 before triton is first imported (tests/conftest.py does).
"""

import math
import weakref

import torch
import triton
import triton.language as tl

from ftlm.kernels._utils import check_cu_seqlens, check_device, doc_bounds

LOG2E = 1.4426950408889634
# The mode the @triton.jit definitions below are built in (triton reads TRITON_INTERPRET at definition time).
INTERPRETED = bool(triton.knobs.runtime.interpret)
# The interpreter is slow per program and per operation: few, moderately large blocks keep tests fast
# while sequences like 77 or 130 still cross several partial blocks.
INTERPRETER_BLOCK_M = 32
INTERPRETER_BLOCK_N = 32


def _configs(block_ms, block_ns, stages):
    """Autotune candidates: on the GPU 16 per kernel (tuning a new shape costs seconds, not minutes; configs
    that do not fit in shared memory are skipped by the autotuner); under the interpreter one fixed config."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": INTERPRETER_BLOCK_M, "BLOCK_N": INTERPRETER_BLOCK_N}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in block_ms
        for bn in block_ns
        for w in (4, 8)
        for s in stages
    ]


_TUNE_KEY = ["T", "S", "BLOCK_D", "CAUSAL", "DOC", "N_REP"]


# ---------------------------------------------------------------------------------------------------
# Shared jit helpers: which keys a query block visits, which queries a key block visits, the mask.


@triton.jit
def _key_range(
    start_m,
    b,
    T,
    S,
    DOC_START,
    DOC_END,
    CAUSAL: tl.constexpr,
    DOC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """For the query block start_m: the keys [lo, hi) it visits (lo a multiple of BLOCK_N), and the block-aligned
    keys [full_lo, full_hi) that every one of its rows sees (blocks there need no mask)."""
    first = start_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, T) - 1
    shift = S - T  # query i sees keys j <= i + shift
    lo = 0
    hi = S
    full_lo = 0
    full_hi = S
    if CAUSAL:
        hi = tl.minimum(last + 1 + shift, S)
        full_hi = tl.minimum(first + 1 + shift, S)
    if DOC:
        # Document starts do not decrease along a row: the first row reaches back furthest, the last row least.
        lo = tl.load(DOC_START + b * S + first)
        full_lo = tl.load(DOC_START + b * S + last)
        if not CAUSAL:
            hi = tl.load(DOC_END + b * S + last)
            full_hi = tl.load(DOC_END + b * S + first)
    lo = lo // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, 0)
    full_lo = (full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    return lo, hi, full_lo, full_hi


@triton.jit
def _query_range(
    start_n,
    b,
    T,
    S,
    DOC_START,
    DOC_END,
    CAUSAL: tl.constexpr,
    DOC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """For the key block starting at start_n: the queries [lo, hi) that see any of its keys (lo a multiple of
    BLOCK_M), and the range [full_lo, full_hi) of rows that see all of them (query blocks inside need no mask)."""
    last = tl.minimum(start_n + BLOCK_N, S) - 1
    shift = S - T
    lo = 0
    hi = T
    full_lo = 0
    full_hi = T + BLOCK_M  # rows past T have probability 0 (lse = +inf) and need no mask
    if CAUSAL:
        lo = tl.maximum(start_n - shift, 0)
        full_lo = tl.maximum(last - shift, 0)
    if DOC:
        hi = tl.load(DOC_END + b * S + last)
        full_hi = tl.load(DOC_END + b * S + start_n)
        full_hi = tl.where(full_hi == T, T + BLOCK_M, full_hi)
        if not CAUSAL:
            lo = tl.load(DOC_START + b * S + start_n)
            full_lo = tl.load(DOC_START + b * S + last)
    lo = lo // BLOCK_M * BLOCK_M
    full_lo = (full_lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    return lo, hi, full_lo, full_hi


@triton.jit
def _visible(rows, cols, S, shift, row_start, row_end, CAUSAL: tl.constexpr, DOC: tl.constexpr):
    """Whether query `rows` sees key `cols` (broadcastable index tensors; row_start/row_end shaped like rows)."""
    keep = cols < S
    if CAUSAL:
        keep = keep & (cols <= rows + shift)
    if DOC:
        keep = keep & (cols >= row_start)
        if not CAUSAL:
            keep = keep & (cols < row_end)
    return keep


@triton.jit
def _row_docs(DOC_START, DOC_END, b, S, rows, T, DOC: tl.constexpr):
    """Each query row's document start and end within its row (placeholders without document masking)."""
    if DOC:
        ok = rows < T
        row_start = tl.load(DOC_START + b * S + rows, mask=ok, other=0)
        row_end = tl.load(DOC_END + b * S + rows, mask=ok, other=0)
    else:
        row_start = rows
        row_end = rows
    return row_start, row_end


# ---------------------------------------------------------------------------------------------------
# Kernels


@triton.autotune(_configs((64, 128), (64, 128), (3, 4)), key=_TUNE_KEY)
@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    LSE,
    DOC_START,
    DOC_END,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_ot,
    H,
    T,
    S,
    N_REP,
    qk_scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Causal: the last query blocks see the most keys; launching them first shortens the tail of the grid.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    h_kv = (h // N_REP).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=(offs_m[:, None] < T) & d_ok[None, :],
        other=0.0,
    )
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi, full_lo, full_hi = _key_range(start_m, b, T, S, DOC_START, DOC_END, CAUSAL, DOC, BLOCK_M, BLOCK_N)
    row_start, row_end = _row_docs(DOC_START, DOC_END, b, S, offs_m, T, DOC)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(
            k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=(cols[None, :] < S) & d_ok[:, None], other=0.0
        )
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if (start_n < full_lo) | (start_n >= full_hi):
            keep = _visible(offs_m[:, None], cols[None, :], S, S - T, row_start[:, None], row_end[:, None], CAUSAL, DOC)
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with every key masked so far keeps m = -inf; exponentiate against 0 instead to avoid inf - inf.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=(cols[:, None] < S) & d_ok[None, :], other=0.0
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    # +inf marks a row with no visible key: the backward's exp2(score - lse) is then 0 everywhere.
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    row_ok = offs_m < T
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        acc.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _attn_bwd_delta(
    Out,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_dob,
    stride_doh,
    stride_dot,
    H,
    T,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d O_id dO_id, the row term of the softmax backward."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.autotune(_configs((32, 64), (64, 128), (2, 3)), key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DOC_START,
    DOC_END,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dkb,
    stride_dkh,
    stride_dks,
    stride_dvb,
    stride_dvh,
    stride_dvs,
    H,
    H_KV,
    T,
    S,
    N_REP,
    qk_scale,
    sm_scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One key block of one key head; loops over every query head of its group and the query blocks that see it."""
    start_n = tl.program_id(0) * BLOCK_N
    bh_kv = tl.program_id(1)
    b = (bh_kv // H_KV).to(tl.int64)
    h_kv = bh_kv % H_KV

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n[:, None] < S) & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + h_kv.to(tl.int64) * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + h_kv.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo, hi, full_lo, full_hi = _query_range(start_n, b, T, S, DOC_START, DOC_END, CAUSAL, DOC, BLOCK_M, BLOCK_N)
    for g in range(N_REP):
        h = (h_kv * N_REP + g).to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * H + h) * T
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_mask = (offs_m[:, None] < T) & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
            # Rows past T get lse = +inf, hence probability 0.
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < T, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < T, other=0.0)
            qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            p_t = tl.math.exp2(qk_t - lse[None, :])
            if CAUSAL or DOC:  # otherwise every block sees every key (keys past S are never stored)
                partial = start_m < full_lo
                if DOC:
                    partial = partial | (start_m + BLOCK_M > full_hi)
                if partial:
                    row_start, row_end = _row_docs(DOC_START, DOC_END, b, S, offs_m, T, DOC)
                    keep = _visible(
                        offs_m[None, :], offs_n[:, None], S, S - T, row_start[None, :], row_end[None, :], CAUSAL, DOC
                    )
                    p_t = tl.where(keep, p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)

    dk = dk * sm_scale
    bh_kv64 = h_kv.to(tl.int64)
    tl.store(
        DK + b * stride_dkb + bh_kv64 * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + b * stride_dvb + bh_kv64 * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.autotune(_configs((64, 128), (32, 64), (2, 3)), key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    DOC_START,
    DOC_END,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    H,
    T,
    S,
    N_REP,
    qk_scale,
    sm_scale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One query block of one query head; loops over the key blocks it can see."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)  # heaviest first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    h_kv = (h // N_REP).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = (offs_m[:, None] < T) & d_ok[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0
    )
    row_base = bh.to(tl.int64) * T
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < T, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < T, other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi, full_lo, full_hi = _key_range(start_m, b, T, S, DOC_START, DOC_END, CAUSAL, DOC, BLOCK_M, BLOCK_N)
    row_start, row_end = _row_docs(DOC_START, DOC_END, b, S, offs_m, T, DOC)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask_t = (cols[None, :] < S) & d_ok[:, None]
        k_t = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=kv_mask_t, other=0.0)
        v_t = tl.load(v_base + cols[None, :] * stride_vs + offs_d[:, None], mask=kv_mask_t, other=0.0)
        qk = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk - lse[:, None])
        if (start_n < full_lo) | (start_n >= full_hi):
            keep = _visible(offs_m[:, None], cols[None, :], S, S - T, row_start[:, None], row_end[:, None], CAUSAL, DOC)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=PRECISION)

    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=q_mask,
    )


# ---------------------------------------------------------------------------------------------------
# Launching


def _precision(dtype):
    # A float32 dot defaults to tf32 on the GPU; keep full precision when the caller asked for float32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"flash_attention: q, k, v must be (batch, heads, seq, head_dim); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"flash_attention: k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: batch and head_dim of q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"flash_attention: kv heads ({k.shape[1]}) must divide q heads ({q.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"flash_attention: q, k, v must share one dtype among float32, float16, bfloat16; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if not 0 < q.shape[3] <= 256:
        raise ValueError(f"flash_attention: head_dim {q.shape[3]} is outside the supported 1..256")
    if INTERPRETED and q.dtype == torch.bfloat16:
        # Triton's CPU interpreter computes bfloat16 tl.dot wrongly (outputs off by 1e8, no error): refuse rather
        # than return garbage. A GPU runs bfloat16; the interpreter is for tests, in float32 or float16.
        raise ValueError(
            "flash_attention: Triton's CPU interpreter (TRITON_INTERPRET=1) computes bfloat16 matmuls wrongly; "
            "use float32 or float16 there, or attn_impl=sdpa"
        )
    check_device(q, INTERPRETED)


# The model calls flash_attention once per layer with the same cu_seqlens: check it (a device-to-host copy)
# and expand it into per-token bounds once per batch. Keyed on the tensor itself and its version counter, so
# an in-place change is seen.
_last_docs = {"ref": None, "key": None, "bounds": None}


def _docs(cu_seqlens, q, k):
    if not isinstance(cu_seqlens, torch.Tensor):
        check_cu_seqlens(cu_seqlens, q, k)  # raises, naming what it got
    key = (cu_seqlens._version, q.shape[0], q.shape[2], k.shape[2], q.device)
    ref = _last_docs["ref"]
    if ref is not None and ref() is cu_seqlens and _last_docs["key"] == key:
        return _last_docs["bounds"]
    check_cu_seqlens(cu_seqlens, q, k)
    bounds = doc_bounds(cu_seqlens, q.shape[0], q.shape[2])
    _last_docs.update(ref=weakref.ref(cu_seqlens), key=key, bounds=bounds)
    return bounds


def _forward(q, k, v, causal, sm_scale, docs):
    B, H, T, D = q.shape
    H_KV, S = k.shape[1], k.shape[2]
    # Output laid out as (B, T, H, D) in memory: the caller's transpose(1, 2).reshape(B, T, H * D) is then free.
    o = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    if T == 0 or B * H == 0:
        return o, lse
    doc_start, doc_end = docs if docs is not None else (lse, lse)  # unread without documents
    _attn_fwd[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
        q,
        k,
        v,
        o,
        lse,
        doc_start,
        doc_end,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(o),
        H,
        T,
        S,
        H // H_KV,
        sm_scale * LOG2E,
        D=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        CAUSAL=causal,
        DOC=docs is not None,
        PRECISION=_precision(q.dtype),
    )
    return o, lse


def _backward(q, k, v, o, lse, do, causal, sm_scale, docs):
    B, H, T, D = q.shape
    H_KV, S = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    do = _last_dim_contiguous(do)
    dq = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if T == 0 or S == 0 or B * H == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    delta_block = 32 if INTERPRETED else 64
    _attn_bwd_delta[(triton.cdiv(T, delta_block), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, T, D=D, BLOCK_D=block_d, BLOCK_M=delta_block
    )
    doc_start, doc_end = docs if docs is not None else (lse, lse)  # unread without documents
    common = dict(D=D, BLOCK_D=block_d, CAUSAL=causal, DOC=docs is not None, PRECISION=_precision(q.dtype))
    n_rep = H // H_KV
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * H_KV)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        doc_start,
        doc_end,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        *_strides(dk),
        *_strides(dv),
        H,
        H_KV,
        T,
        S,
        n_rep,
        sm_scale * LOG2E,
        sm_scale,
        **common,
    )
    _attn_bwd_dq[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        doc_start,
        doc_end,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        *_strides(dq),
        H,
        T,
        S,
        n_rep,
        sm_scale * LOG2E,
        sm_scale,
        **common,
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, doc_start, doc_end):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        docs = None if doc_start is None else (doc_start, doc_end)
        o, lse = _forward(q, k, v, causal, sm_scale, docs)
        ctx.save_for_backward(q, k, v, o, lse, *(docs or ()))
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *docs = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.causal, ctx.sm_scale, tuple(docs) or None)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None):
    """Softmax attention. q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hkv dividing Hq. Returns q's shape.

    With causal=True and T != S the queries are the LAST T positions of the keys' sequence.
    cu_seqlens: int32 document starts over the flattened B*S tokens (0, every document start including each row
    start i*S, then B*S; T == S): each query attends only to keys of its own document (causally when causal).
    """
    _check_inputs(q, k, v)
    sm_scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    doc_start, doc_end = _docs(cu_seqlens, q, k) if cu_seqlens is not None else (None, None)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), sm_scale, doc_start, doc_end)
