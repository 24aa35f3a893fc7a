"""Benchmarks of ftlm's kernels against PyTorch, printed as markdown tables for benchmarks/RESULTS.md.

    python benchmarks/kernels.py            # on a CUDA GPU: ceilings, correctness, then every table
    python benchmarks/kernels.py --only attention --dtype bf16
    python benchmarks/kernels.py --only doc_attention --doc-seq 8192 --doc-mean 1024
    python benchmarks/kernels.py --smoke    # anywhere: a tiny correctness check (CPU: Triton's interpreter)

Method: the two ceilings are measured first (a large bf16 matmul, a large device-to-device copy); every kernel
is checked against a reference on the GPU before it is timed; times are triton.testing.do_bench medians.
FLOP counts follow FlashAttention's convention: forward 4*B*H*T*S*D (halved when causal), backward 2.5x forward.
The document-masked table (cu_seqlens; documents of exponentially distributed length, cut at row ends) counts
only the query-key pairs inside documents, and compares with full causal attention on the same tokens and with
torch.nn.attention.varlen / flash_attn_varlen_func where importable.
"""

import argparse
import datetime
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftlm import kernels  # noqa: E402
from ftlm.kernels import ext, reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench(fn, grad_to_none=None):
    """Median milliseconds of fn()."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def table(title, header, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    sys.stdout.flush()


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-12)).item()


def check(name, err, tol):
    status = "ok" if err < tol and math.isfinite(err) else "FAILED"
    print(f"  check {name}: relative error {err:.2e} (tolerance {tol:.0e}) {status}")
    if status != "ok":
        raise SystemExit(f"{name} is wrong on this GPU; not timing it")


# ------------------------------------------------------------------------------------------------ ceilings


def ceilings(dtype):
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    matmul_tflops = 2 * n**3 / bench(lambda a=a, b=b: a @ b) / 1e9
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / bench(lambda dst=dst, src=src: dst.copy_(src)) / 1e6
    del a, b, src, dst
    table(
        "Ceilings",
        ["what", "measured"],
        [
            [f"dense {dtype} matmul 8192^3", f"{matmul_tflops:.0f} TFLOP/s"],
            ["device-to-device copy, 1 GiB (read + write)", f"{copy_gbs:.0f} GB/s"],
        ],
    )
    return matmul_tflops, copy_gbs


# ----------------------------------------------------------------------------------------------- attention


def sdpa_backend(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    return run


def eager(q, k, v):
    return reference.flash_attention(q, k, v, causal=True)


def attention_tables(dtype, matmul_tflops, seqs, head_dims, d_model=2048, tokens=16384):
    from torch.nn.attention import SDPBackend

    impls = {
        "ftlm triton": kernels.flash_attention,
        "sdpa flash": sdpa_backend(SDPBackend.FLASH_ATTENTION),
        "sdpa cudnn": sdpa_backend(SDPBackend.CUDNN_ATTENTION),
        "eager": eager,
    }

    # Correctness on the GPU first, against float32 math on upcast inputs.
    q, k, v = (torch.randn(2, h, 1000, 128, device="cuda", dtype=dtype, requires_grad=True) for h in (8, 2, 2))
    out = kernels.flash_attention(q, k, v)
    do = torch.randn_like(out)
    out.backward(do)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = reference.flash_attention(qf, kf, vf)
    ref.backward(do.float())
    for name, a, b in (
        ("attention out", out, ref),
        ("attention dq", q.grad, qf.grad),
        ("attention dk", k.grad, kf.grad),
        ("attention dv", v.grad, vf.grad),
    ):
        check(name, rel_err(a, b), 2e-2 if dtype != torch.float32 else 2e-3)

    for d in head_dims:
        heads = d_model // d
        rows = []
        for t in seqs:
            batch = max(1, tokens // t)
            fwd_flops = 4 * batch * heads * t * t * d / 2
            q, k, v = (
                torch.randn(batch, heads, t, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)
            )
            do = torch.randn_like(q)
            result = {}
            for name, fn in impls.items():
                try:
                    fwd = bench(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v))
                    both = bench(lambda fn=fn, q=q, k=k, v=v, do=do: fn(q, k, v).backward(do), grad_to_none=[q, k, v])
                    result[name] = (fwd_flops / fwd / 1e9, 3.5 * fwd_flops / both / 1e9)
                except (RuntimeError, torch.OutOfMemoryError) as e:  # a backend without this shape, or OOM
                    result[name] = None
                    print(f"  {name} at seq {t}, head dim {d}: {str(e).splitlines()[0][:100]}")
                torch.cuda.empty_cache()
            sdpa = [result[n] for n in ("sdpa flash", "sdpa cudnn") if result[n]]
            best_fwd = max((r[0] for r in sdpa), default=float("nan"))
            best_both = max((r[1] for r in sdpa), default=float("nan"))
            ours = result["ftlm triton"] or (float("nan"), float("nan"))
            cells = [f"{r[0]:.0f} / {r[1]:.0f}" if r else "n/a" for r in result.values()]
            rows.append(
                [
                    t,
                    f"{batch}x{heads}",
                    *cells,
                    f"{ours[0] / best_fwd:.2f}x / {ours[1] / best_both:.2f}x",
                    f"{100 * ours[0] / matmul_tflops:.0f}%",
                ]
            )
            del q, k, v, do
        table(
            f"Attention, causal, {dtype}, head dim {d}: TFLOP/s forward / forward+backward",
            ["seq", "batch x heads", *impls, "ours vs best SDPA", "ours fwd vs matmul peak"],
            rows,
        )


# -------------------------------------------------------------------------------- document-masked attention


def packed_documents(batch, seq, mean_len, seed=0):
    """cu_seqlens (int32, on the CPU) for `batch` rows of `seq` tokens packed with documents whose lengths are
    exponentially distributed with mean `mean_len` (at least 1 token); a row's last document is cut at its end."""
    gen = torch.Generator().manual_seed(seed)
    starts = []
    for row in range(batch):
        pos = 0
        while pos < seq:
            starts.append(row * seq + pos)
            length = max(1, math.ceil(torch.empty(1).exponential_(1 / mean_len, generator=gen).item()))
            pos += length
    return torch.tensor(starts + [batch * seq], dtype=torch.int32)


def causal_pairs(cu_seqlens):
    """Query-key pairs a causal document-masked attention computes: sum over documents of L (L + 1) / 2."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    return (lengths * (lengths + 1) / 2).sum().item()


def varlen_impls(cu_seqlens, max_len):
    """Torch's and flash-attn's varlen attention where importable, on packed (B*S, H, D) tensors; causal."""
    impls = {}
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}

        def torch_varlen(q, k, v):
            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **causal)

        impls["torch varlen_attn"] = torch_varlen
    except ImportError as e:
        print(f"  torch.nn.attention.varlen is not available ({e}): not compared")
    try:
        from flash_attn import flash_attn_varlen_func

        def flash_varlen(q, k, v):
            return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=True)

        impls["flash_attn_varlen_func"] = flash_varlen
    except ImportError as e:
        print(f"  flash_attn is not installed ({e}): not compared")
    return impls


def doc_attention_rows(dtype, batch, seq, heads, d, cu, max_len, doc_flops_per_head):
    """One table row per implementation at one head dim: ms and useful TFLOP/s, forward / forward+backward."""
    # (B, S, H, D) in memory, as the model's projection leaves it: a free (B, H, S, D) view for ftlm, a free
    # (B*S, H, D) view for the varlen kernels.
    leaves = [torch.randn(batch, seq, heads, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
    do = torch.randn(batch, seq, heads, d, device="cuda", dtype=dtype)

    def bhsd(x):
        return x.transpose(1, 2)

    def packed(x):
        return x.view(batch * seq, heads, d)

    impls = {
        "ftlm triton, documents": lambda q, k, v: bhsd(
            kernels.flash_attention(bhsd(q), bhsd(k), bhsd(v), cu_seqlens=cu)
        ),
        "ftlm triton, full causal": lambda q, k, v: bhsd(kernels.flash_attention(bhsd(q), bhsd(k), bhsd(v))),
    }
    for name, fn in varlen_impls(cu, max_len).items():
        impls[name] = lambda q, k, v, fn=fn: fn(packed(q), packed(k), packed(v)).view(batch, seq, heads, d)
    ours = impls["ftlm triton, documents"](*leaves)
    for name, fn in list(impls.items())[2:]:  # the varlen kernels compute the same thing
        try:
            check(f"ftlm against {name}, head dim {d}", rel_err(ours, fn(*leaves)), 2e-2)
        except RuntimeError as e:  # e.g. a build without this head dim
            print(f"  {name} at head dim {d}: {str(e).splitlines()[0][:100]}; not timed")
            del impls[name]
    del ours
    ms = {}
    for name, fn in impls.items():
        try:
            fwd = bench(lambda fn=fn: fn(*leaves))
            both = bench(lambda fn=fn: fn(*leaves).backward(do), grad_to_none=leaves)
            ms[name] = (fwd, both)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            print(f"  {name} at head dim {d}: {str(e).splitlines()[0][:100]}")
        torch.cuda.empty_cache()
    doc_flops = batch * heads * doc_flops_per_head
    ours_fwd, ours_both = ms.get("ftlm triton, documents", (float("nan"), float("nan")))
    return [
        [
            d,
            name,
            f"{fwd:.2f} / {both:.2f}",
            f"{doc_flops / fwd / 1e9:.0f} / {3.5 * doc_flops / both / 1e9:.0f}",
            f"{fwd / ours_fwd:.2f}x / {both / ours_both:.2f}x",
        ]
        for name, (fwd, both) in ms.items()
    ]


def doc_attention_table(dtype, matmul_tflops, seq, mean_len, head_dims, d_model=2048, tokens=16384):
    """Document-masked causal attention (cu_seqlens) against full causal attention and the varlen kernels."""
    batch = max(1, tokens // seq)
    cu_cpu = packed_documents(batch, seq, mean_len)
    cu = cu_cpu.cuda()
    lengths = cu_cpu[1:] - cu_cpu[:-1]
    max_len = int(lengths.max())

    # Correctness on the GPU first: the kernel with documents against float32 math on a smaller packing.
    small_cu = packed_documents(2, 1000, 100, seed=1).cuda()
    q, k, v = (torch.randn(2, h, 1000, 64, device="cuda", dtype=dtype, requires_grad=True) for h in (8, 2, 2))
    out = kernels.flash_attention(q, k, v, cu_seqlens=small_cu)
    do = torch.randn_like(out)
    out.backward(do)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = reference.flash_attention(qf, kf, vf, cu_seqlens=small_cu)
    ref.backward(do.float())
    for name, a, b in (("out", out, ref), ("dq", q.grad, qf.grad), ("dk", k.grad, kf.grad), ("dv", v.grad, vf.grad)):
        check(f"document-masked attention {name}", rel_err(a, b), 2e-2 if dtype != torch.float32 else 2e-3)
    del q, k, v, do, qf, kf, vf, out, ref

    rows = []
    for d in head_dims:
        rows += doc_attention_rows(dtype, batch, seq, d_model // d, d, cu, max_len, 4 * d * causal_pairs(cu_cpu))
    table(
        f"Document-masked causal attention, {dtype}, {batch} x {seq} tokens, {len(lengths)} documents "
        f"(mean {lengths.double().mean():.0f}, max {max_len} tokens); ms and useful TFLOP/s (document pairs only), "
        f"forward / forward+backward; matmul peak {matmul_tflops:.0f} TFLOP/s",
        ["head dim", "implementation", "ms", "useful TFLOP/s", "time vs ftlm with documents"],
        rows,
    )


# ------------------------------------------------------------------------------------------------- norms


def unfused_layer_norm(x, w, b, eps=1e-5):
    mean = x.float().mean(-1, keepdim=True)
    var = (x.float() - mean).pow(2).mean(-1, keepdim=True)
    return ((x.float() - mean) * torch.rsqrt(var + eps) * w.float() + b.float()).to(x.dtype)


def unfused_rms_norm(x, w, eps=1e-6):
    return reference.rms_norm(x, w, eps)


def norm_tables(dtype, copy_gbs, hiddens, rows_count=16384):
    size = torch.tensor([], dtype=dtype).element_size()
    for kind in ("layernorm", "rmsnorm"):
        if kind == "layernorm":
            impls = {
                "ftlm triton": lambda x, w, b: kernels.layer_norm(x, w, b),
                "torch F.layer_norm": lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b),
                "unfused torch": unfused_layer_norm,
            }
        else:
            impls = {
                "ftlm triton": lambda x, w, b: kernels.rms_norm(x, w),
                "torch F.rms_norm": lambda x, w, b: F.rms_norm(x, x.shape[-1:], w, 1e-6),
                "unfused torch": lambda x, w, b: unfused_rms_norm(x, w),
            }
        table_rows = []
        for n in hiddens:
            x = torch.randn(rows_count, n, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
            dy = torch.randn_like(x)
            ours = impls["ftlm triton"](x, w, b)
            ours.backward(dy)
            got = [ours, x.grad, w.grad] + ([b.grad] if kind == "layernorm" else [])
            xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, b))
            want = impls["unfused torch"](xf, wf, bf)
            want.backward(dy.float())
            for name, a, e in zip(("out", "dx", "dweight", "dbias"), got, [want, xf.grad, wf.grad, bf.grad]):
                check(f"{kind} {name} hidden {n}", rel_err(a, e), 2e-2 if dtype != torch.float32 else 2e-3)
            fwd_bytes = 2 * rows_count * n * size  # read x, write y
            both_bytes = fwd_bytes + 3 * rows_count * n * size  # + read x and dy, write dx
            cells, ms_both = [], {}
            for name, fn in impls.items():
                fwd = bench(lambda fn=fn, x=x, w=w, b=b: fn(x, w, b))
                both = bench(lambda fn=fn, x=x, w=w, b=b, dy=dy: fn(x, w, b).backward(dy), grad_to_none=[x, w, b])
                ms_both[name] = both
                cells.append(f"{fwd_bytes / fwd / 1e6:.0f} / {both_bytes / both / 1e6:.0f}")
            ours_fwd_gbs = float(cells[0].split(" / ")[0])
            table_rows.append(
                [
                    n,
                    *cells,
                    f"{100 * ours_fwd_gbs / copy_gbs:.0f}%",
                    f"{ms_both['unfused torch'] / ms_both['ftlm triton']:.1f}x",
                ]
            )
            del x, w, b, dy
        table(
            f"{kind}, {rows_count} rows, {dtype}: GB/s forward / forward+backward",
            ["hidden", *impls, "ours fwd vs copy", "fwd+bwd speed-up vs unfused"],
            table_rows,
        )


# ----------------------------------------------------------------------------------------- cross-entropy


def cross_entropy_table(dtype, vocabs, rows_count=16384):
    if not (ext.has_extension() and ext.extension().has_cuda()):
        print("\nftlm._C has no CUDA kernels here: build it with FTLM_CUDA=1 to benchmark the cross-entropy")
        return
    impls = {
        "ftlm (in-place backward)": lambda x, t: kernels.cross_entropy(x, t, inplace_backward=True),
        "ftlm": lambda x, t: kernels.cross_entropy(x, t),
        "F.cross_entropy": lambda x, t: F.cross_entropy(x, t),
        "F.cross_entropy on .float()": lambda x, t: F.cross_entropy(x.float(), t),
    }
    rows = []
    for vocab in vocabs:
        logits = torch.randn(rows_count, vocab, device="cuda", dtype=dtype) * 3
        targets = torch.randint(0, vocab, (rows_count,), device="cuda")
        targets[::17] = -100
        x = logits.clone().requires_grad_()
        kernels.cross_entropy(x * 1, targets).backward()
        xf = logits.float().requires_grad_()
        reference.cross_entropy(xf, targets).backward()
        check(f"cross-entropy gradient vocab {vocab}", rel_err(x.grad, xf.grad), 2e-2)
        del x, xf
        buffer_mb = logits.numel() * logits.element_size() / 2**20
        cells = []
        for fn in impls.values():
            # The timed region starts from logits that need grad, as after the LM head; the `* 1` copy stands
            # in for the LM head's output so in-place backward never touches the shared input.
            x = logits.clone().requires_grad_()
            ms = bench(lambda fn=fn, x=x, targets=targets: fn(x * 1, targets).backward(), grad_to_none=[x])
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(x * 1, targets).backward()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            cells.append(f"{ms:.2f} ms, {peak / buffer_mb:.1f}x")
            del x
            torch.cuda.empty_cache()
        rows.append([vocab, f"{buffer_mb:.0f} MiB", *cells])
        del logits
    table(
        f"Cross-entropy, {rows_count} rows, {dtype}, forward+backward: time, peak extra memory in logits buffers",
        ["vocab", "one logits buffer", *impls],
        rows,
    )


# ------------------------------------------------------------------------------------------------- smoke


def smoke():
    """A tiny correctness check of every op, on the GPU when there is one, else through Triton's interpreter."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    torch.manual_seed(0)
    q = torch.randn(1, 4, 37, 64, device=device, requires_grad=True)
    kv = [torch.randn(1, 2, 37, 64, device=device, requires_grad=True) for _ in range(2)]
    out = kernels.flash_attention(q, *kv)
    out.sum().backward()
    check("attention forward", rel_err(out, reference.flash_attention(q.double(), *(t.double() for t in kv))), 2e-3)
    # Documents of 1, 19 and 17 tokens in row 0 and one of 37 in row 1: forward and every gradient.
    cu = torch.tensor([0, 1, 20, 37, 74], dtype=torch.int32, device=device)
    q2 = torch.randn(2, 4, 37, 64, device=device, requires_grad=True)
    kv2 = [torch.randn(2, 2, 37, 64, device=device, requires_grad=True) for _ in range(2)]
    out = kernels.flash_attention(q2, *kv2, cu_seqlens=cu)
    do = torch.randn_like(out)
    out.backward(do)
    want = [t.detach().double().requires_grad_() for t in (q2, *kv2)]
    ref = reference.flash_attention(*want, cu_seqlens=cu)
    ref.backward(do.double())
    for name, a, b in zip(
        ("out", "dq", "dk", "dv"), [out, q2.grad, *(t.grad for t in kv2)], [ref, *(t.grad for t in want)]
    ):
        check(f"document-masked attention {name}", rel_err(a, b), 2e-3)
    x = torch.randn(5, 300, device=device)
    w = torch.randn(300, device=device)
    check(
        "layer_norm", rel_err(kernels.layer_norm(x, w, None), reference.layer_norm(x.double(), w.double(), None)), 2e-3
    )
    check("rms_norm", rel_err(kernels.rms_norm(x, w), reference.rms_norm(x.double(), w.double())), 2e-3)
    logits, targets = torch.randn(6, 1000, device=device), torch.randint(0, 1000, (6,), device=device)
    want = reference.cross_entropy(logits.double(), targets).item()
    check("cross_entropy", abs(kernels.cross_entropy(logits, targets).item() - want) / want, 1e-4)
    print(f"smoke test passed on {device} (ftlm._C {'loaded' if ext.has_extension() else 'missing: fallback used'})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny correctness check only (works on the CPU)")
    parser.add_argument(
        "--only",
        choices=["attention", "doc_attention", "norms", "cross_entropy"],
        action="append",
        help="run only these tables (repeatable)",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--seqs", default="1024,2048,4096,8192,16384", help="attention sequence lengths")
    parser.add_argument("--head-dims", default="64,128", help="attention head dims")
    parser.add_argument("--doc-seq", type=int, default=8192, help="document-masked attention: sequence length")
    parser.add_argument("--doc-mean", type=int, default=1024, help="document-masked attention: mean document length")
    parser.add_argument("--hiddens", default="1024,2048,4096,8192", help="norm hidden sizes")
    parser.add_argument("--vocabs", default="32768,65536,131072", help="cross-entropy vocabulary sizes")
    args = parser.parse_args()
    if args.smoke:
        smoke()
        return
    if not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py measures GPU kernels and no CUDA GPU is visible here; nothing was measured. "
            "Run `python benchmarks/kernels.py --smoke` for a CPU correctness check."
        )
        return
    dtype = DTYPES[args.dtype]
    only = set(args.only or ["attention", "doc_attention", "norms", "cross_entropy"])
    print(
        f"# ftlm kernels on {torch.cuda.get_device_name()} ({datetime.date.today().isoformat()}), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, dtype {dtype}"
    )
    matmul_tflops, copy_gbs = ceilings(dtype if dtype != torch.float32 else torch.bfloat16)
    if "attention" in only:
        attention_tables(
            dtype, matmul_tflops, [int(s) for s in args.seqs.split(",")], [int(d) for d in args.head_dims.split(",")]
        )
    if "doc_attention" in only:
        doc_attention_table(
            dtype, matmul_tflops, args.doc_seq, args.doc_mean, [int(d) for d in args.head_dims.split(",")]
        )
    if "norms" in only:
        norm_tables(dtype, copy_gbs, [int(n) for n in args.hiddens.split(",")])
    if "cross_entropy" in only:
        cross_entropy_table(dtype, [int(v) for v in args.vocabs.split(",")])


if __name__ == "__main__":
    main()
