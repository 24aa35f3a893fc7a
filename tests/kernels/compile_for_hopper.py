"""Compiles ftlm's Triton kernels for sm_90 (H100) without a GPU: `python compile_for_hopper.py attention|norm`.

Triton's interpreter accepts code its compiler rejects, so the CPU tests also compile every kernel (and the jit
helpers they call). This runs in its own process without TRITON_INTERPRET: triton.jit decides at definition time
whether a kernel is interpreted, and the test process interprets.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
FLOATS = {"qk_scale", "sm_scale", "eps"}


def compile_kernel(kernel, pointers, constexprs, num_warps):
    """pointers: the type of each pointer argument; other runtime arguments are i32, or fp32 when in FLOATS."""
    jit = kernel
    while not isinstance(jit, JITFunction):  # unwrap triton.autotune
        jit = jit.fn
    runtime = [n for n in jit.arg_names if n not in constexprs]
    assert set(pointers) <= set(runtime), f"{jit.__name__}: unknown pointers {set(pointers) - set(runtime)}"
    assert set(constexprs) <= set(jit.arg_names), f"{jit.__name__}: unknown constexprs"
    signature = {n: pointers.get(n, "fp32" if n in FLOATS else "i32") for n in runtime}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    compiled = triton.compile(
        ASTSource(fn=jit, signature=signature, constexprs=constexprs),
        target=HOPPER,
        options={"num_warps": num_warps, "num_stages": 3},
    )
    assert compiled.asm["cubin"], jit.__name__
    flags = {k: v for k, v in constexprs.items() if k in ("CAUSAL", "DOC")}
    print(f"compiled {jit.__name__} {flags}: {compiled.metadata.shared} bytes of shared memory")


def attention():
    from ftlm.kernels import attention as a

    p, f32p, i32p = "*bf16", "*fp32", "*i32"
    docs = {"DOC_START": i32p, "DOC_END": i32p}
    fwd = {"Q": p, "K": p, "V": p, "Out": p, "LSE": f32p, **docs}
    bwd = {"Q": p, "K": p, "V": p, "DO": p, "LSE": f32p, "DELTA": f32p, **docs}
    compile_kernel(a._attn_bwd_delta, {"Out": p, "DO": p, "DELTA": f32p}, {"D": 96, "BLOCK_D": 128, "BLOCK_M": 64}, 4)
    # Without documents, with documents (causal), and with documents, not causal: each takes other helper branches.
    for causal, doc in ((True, False), (True, True), (False, True)):
        blocks = {"D": 96, "BLOCK_D": 128, "CAUSAL": causal, "DOC": doc, "PRECISION": "tf32"}
        blocks.update(BLOCK_M=64, BLOCK_N=64)
        compile_kernel(a._attn_fwd, fwd, blocks, 4)
        compile_kernel(a._attn_bwd_dkdv, {**bwd, "DK": p, "DV": p}, blocks, 4)
        compile_kernel(a._attn_bwd_dq, {**bwd, "DQ": p}, blocks, 4)


def norm():
    from ftlm.kernels import norm as n

    flags = {"IS_RMS": False, "HAS_BIAS": True, "BLOCK_N": 4096}
    b16, f32p = "*bf16", "*fp32"
    compile_kernel(n._norm_fwd, {"X": b16, "Y": b16, "W": b16, "B": b16, "MEAN": f32p, "RSTD": f32p}, flags, 8)
    pointers = {"DY": b16, "X": b16, "W": b16, "MEAN": f32p, "RSTD": f32p, "DX": b16}
    compile_kernel(n._norm_bwd, {**pointers, "DW_PARTIAL": f32p, "DB_PARTIAL": f32p}, flags, 8)


if __name__ == "__main__":
    {"attention": attention, "norm": norm}[sys.argv[1]]()
