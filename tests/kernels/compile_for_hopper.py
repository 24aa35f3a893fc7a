"""Compiles ftlm's Triton kernels for sm_90 (H100) without a GPU: `python compile_for_hopper.py attention|norm`.

Triton's interpreter accepts code its compiler rejects, so the CPU tests also compile every kernel. This runs
in its own process because the interpreter (triton 3.9) leaves triton.language patched after a run, which
breaks compilation later in the same process.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, types, constexprs, num_warps):
    jit = triton.runtime.jit.JITFunction(fn)
    names = jit.arg_names
    assert len(types) + len(constexprs) == len(names), f"{fn.__name__}: {len(names)} arguments"
    signature = dict(zip(names, types + ["constexpr"] * len(constexprs)))
    compiled = triton.compile(
        ASTSource(fn=jit, signature=signature, constexprs=constexprs),
        target=HOPPER,
        options={"num_warps": num_warps, "num_stages": 3},
    )
    assert compiled.asm["cubin"], fn.__name__
    print(f"compiled {fn.__name__}: {compiled.metadata.shared} bytes of shared memory")


def attention():
    from ftlm.kernels import attention as a

    p, f32p, i32, f32 = "*bf16", "*fp32", "i32", "fp32"
    blocks = {"D": 96, "BLOCK_D": 128, "CAUSAL": True, "PRECISION": "tf32", "BLOCK_M": 64, "BLOCK_N": 64}
    compile_kernel(a._attn_fwd, [p] * 4 + [f32p] + [i32] * 16 + [f32], blocks, 4)
    compile_kernel(a._attn_bwd_delta, [p, p, f32p] + [i32] * 8, {"D": 96, "BLOCK_D": 128, "BLOCK_M": 64}, 4)
    compile_kernel(a._attn_bwd_dkdv, [p] * 4 + [f32p] * 2 + [p] * 2 + [i32] * 23 + [f32] * 2, blocks, 4)
    compile_kernel(a._attn_bwd_dq, [p] * 4 + [f32p] * 2 + [p] + [i32] * 19 + [f32] * 2, blocks, 4)


def norm():
    from ftlm.kernels import norm as n

    flags = {"IS_RMS": False, "HAS_BIAS": True, "BLOCK_N": 4096}
    compile_kernel(n._norm_fwd, ["*bf16"] * 4 + ["*fp32"] * 2 + ["i32"] * 3 + ["fp32"], flags, 8)
    compile_kernel(n._norm_bwd, ["*bf16"] * 3 + ["*fp32"] * 2 + ["*bf16"] + ["*fp32"] * 2 + ["i32"] * 6, flags, 8)


if __name__ == "__main__":
    {"attention": attention, "norm": norm}[sys.argv[1]]()
