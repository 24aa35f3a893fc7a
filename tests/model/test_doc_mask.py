"""Packed sequences with model.doc_mask: each document computes what it computes alone."""

import ast
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ftlm import kernels
from ftlm.model import GPT, GPTConfig, KVCache
from ftlm.model import gpt as gpt_module

TRITON_DOCS = "cu_seqlens" in inspect.signature(kernels.flash_attention).parameters
IMPLS = [
    "sdpa",
    "eager",
    pytest.param(
        "triton", marks=pytest.mark.skipif(not TRITON_DOCS, reason="ftlm.kernels.flash_attention has no cu_seqlens yet")
    ),
]
TRITON_GQA = pytest.param(
    "triton", 2, marks=pytest.mark.skipif(not TRITON_DOCS, reason="ftlm.kernels.flash_attention has no cu_seqlens yet")
)  # the interpreter is slow: one GQA ratio here, all of them in tests/kernels

# Three rows of 24 tokens: documents of 1 token, exactly one 16-token block, one block + 1, a whole row.
S = 24
DOCS = [[1, 16, 7], [24], [17, 1, 6]]


def tiny(**kw):
    base = dict(vocab_size=97, max_seq_len=64, n_layer=2, n_head=4, d_model=64, attn_impl="sdpa", norm_impl="torch")
    base.update(kw)
    return GPTConfig(**base)


def cu_seqlens_of(rows, seq):
    starts, offset = [0], 0
    for row in rows:
        assert sum(row) == seq
        for length in row:
            offset += length
            starts.append(offset)
    return torch.tensor(starts, dtype=torch.int32)


def pieces(rows):
    """(row, start, length) of every document."""
    out = []
    for b, row in enumerate(rows):
        start = 0
        for length in row:
            out.append((b, start, length))
            start += length
    return out


def packed_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 97, (len(DOCS), S), generator=g)
    targets = torch.randint(0, 97, (len(DOCS), S), generator=g)
    return idx, targets, cu_seqlens_of(DOCS, S)


@pytest.mark.parametrize(
    "impl,kv",
    [(impl, kv) for impl in ("sdpa", "eager") for kv in (4, 2, 1)] + [TRITON_GQA],
)
def test_packed_sequence_equals_each_document_alone(impl, kv):
    torch.manual_seed(0)
    model = GPT(tiny(attn_impl=impl, n_kv_heads=kv, doc_mask=True, n_layer=1 if impl == "triton" else 2))
    idx, targets, cu = packed_batch()
    n = idx.numel()

    # logits and loss (eval mode: the logits are handed back)
    model.eval()
    logits, loss = model(idx, targets, cu_seqlens=cu)
    total = 0.0
    for b, start, length in pieces(DOCS):
        alone, alone_loss = model(idx[b : b + 1, start : start + length], targets[b : b + 1, start : start + length])
        torch.testing.assert_close(logits[b : b + 1, start : start + length], alone, rtol=0, atol=1e-5)
        total = total + alone_loss * length
    torch.testing.assert_close(loss, total / n, rtol=1e-6, atol=1e-6)

    # every gradient (training mode, the fused cross-entropy's in-place backward)
    model.train()
    model.zero_grad()
    (model(idx, targets, cu_seqlens=cu)[1] * n).backward()
    packed = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    for b, start, length in pieces(DOCS):
        loss = model(idx[b : b + 1, start : start + length], targets[b : b + 1, start : start + length])[1]
        (loss * length).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, rtol=0, atol=1e-5, msg=name)


def test_implementations_agree_on_packed_sequences():
    torch.manual_seed(0)
    idx, targets, cu = packed_batch(1)
    reference = GPT(tiny(attn_impl="eager", n_kv_heads=2)).eval()
    expected = reference(idx, cu_seqlens=cu)[0]
    for impl in [i for i in ("sdpa", "triton") if i != "triton" or TRITON_DOCS]:
        model = GPT(tiny(attn_impl=impl, n_kv_heads=2)).eval()
        model.load_state_dict(reference.state_dict())
        torch.testing.assert_close(model(idx, cu_seqlens=cu)[0], expected, rtol=0, atol=1e-5, msg=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_row_starts_only_equal_plain_causal(impl):
    torch.manual_seed(0)
    model = GPT(tiny(attn_impl=impl)).eval()
    idx, _, _ = packed_batch()
    rows_only = torch.arange(0, idx.numel() + 1, S, dtype=torch.int32)
    torch.testing.assert_close(model(idx, cu_seqlens=rows_only)[0], model(idx)[0], rtol=0, atol=1e-5)


def test_positions_follow_cu_seqlens_and_explicit_positions_are_used():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx, _, cu = packed_batch()
    positions = torch.cat([torch.arange(n) for row in DOCS for n in row]).view(len(DOCS), S)
    derived = model(idx, cu_seqlens=cu)[0]
    torch.testing.assert_close(model(idx, positions=positions, cu_seqlens=cu)[0], derived, rtol=0, atol=0)
    # positions alone: RoPE restarts, attention still crosses documents (so the later documents differ)
    shifted, plain = model(idx, positions=positions)[0], model(idx)[0]
    torch.testing.assert_close(shifted[:, 0], plain[:, 0], rtol=0, atol=1e-6)  # position 0 either way
    assert not torch.allclose(shifted, plain, atol=1e-4)


def test_doc_mask_false_ignores_positions_and_cu_seqlens():
    torch.manual_seed(0)
    model = GPT(tiny(doc_mask=False)).eval()
    idx, _, cu = packed_batch()
    positions = torch.zeros_like(idx)
    plain = model(idx)[0]
    torch.testing.assert_close(model(idx, positions=positions, cu_seqlens=cu)[0], plain, rtol=0, atol=0)
    masked = GPT(tiny(doc_mask=True)).eval()
    masked.load_state_dict(model.state_dict())
    assert not torch.allclose(masked(idx, cu_seqlens=cu)[0], plain, atol=1e-4)


def test_activation_checkpointing_with_documents_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(tiny(n_kv_heads=2))
    idx, targets, cu = packed_batch()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        model(idx, targets, cu_seqlens=cu)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generation_with_the_kv_cache_is_unaffected(impl):
    torch.manual_seed(0)
    model = GPT(tiny(attn_impl=impl, doc_mask=True, n_kv_heads=2)).eval()
    idx = torch.randint(0, 97, (1, 12))
    full = model(idx)[0]
    cache = KVCache(model.cfg, 1, 12, "cpu", torch.float32)
    steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, i : i + 1], cache=cache)[0] for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_bad_cu_seqlens_and_positions_are_refused():
    model = GPT(tiny()).eval()
    idx, _, cu = packed_batch()
    cache = KVCache(model.cfg, 3, S, "cpu", torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens.*KV cache"):
        model(idx, cu_seqlens=cu, cache=cache)
    bad = {
        "int32": cu.long(),
        "start at 0": torch.cat([torch.tensor([1], dtype=torch.int32), cu[1:]]),
        "end at batch": cu[:-1],
        "strictly increasing": torch.tensor([0, 5, 5, 24, 48, 72], dtype=torch.int32),
        "row start": torch.tensor([0, 20, 30, 72], dtype=torch.int32),
    }
    for rule, value in bad.items():
        with pytest.raises(ValueError, match=f"cu_seqlens.*{rule}"):
            model(idx, cu_seqlens=value)
    with pytest.raises(ValueError, match="positions"):
        model(idx, positions=torch.zeros(3, S - 1, dtype=torch.long))


def test_varlen_layout_feeds_each_document_to_the_kernel():
    """The flattened (B*T, H, D) layout that flash_attn_varlen_func and torch's varlen_attn receive (CUDA only),
    checked with a plain PyTorch kernel of the same signature against the eager block-diagonal mask."""

    def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, dropout_p=0.0):
        assert causal and dropout_p == 0.0 and max_q == max_k == max(DOCS[0] + DOCS[1] + DOCS[2])
        out = torch.empty_like(q)
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qd, kd, vd = (x[start:end].transpose(0, 1) for x in (q, k, v))  # (H, L, D)
            out[start:end] = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True).transpose(0, 1)
        return out

    torch.manual_seed(0)
    _, _, cu = packed_batch()
    q, k, v = torch.randn(3, 4, S, 8), torch.randn(3, 2, S, 8), torch.randn(3, 2, S, 8)
    docs = gpt_module.Documents(cu, 3, S)
    got = gpt_module.attend_varlen(reference_varlen, q, k, v, docs, dropout_p=0.0, causal=True)
    torch.testing.assert_close(got, gpt_module.attend_eager(q, k, v, docs, 0.0), rtol=0, atol=1e-5)


def test_a_varlen_kernel_without_enable_gqa_gets_grouped_query_attention():
    """torch 2.11's varlen_attn (the GPU image's) has no enable_gqa, which 2.14's has: the model's call passes it,
    so the older kernel is wrapped (K/V heads repeated), checked with a plain kernel of 2.11's signature."""

    def varlen_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        assert k.shape[1] == q.shape[1] and window_size == (-1, 0)  # no GQA of its own; causal
        out = torch.empty_like(q)
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qd, kd, vd = (x[start:end].transpose(0, 1) for x in (q, k, v))  # (H, L, D)
            out[start:end] = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(0, 1)
        return out

    torch.manual_seed(0)
    _, _, cu = packed_batch()
    docs = gpt_module.Documents(cu, 3, S)
    kernel = gpt_module.varlen_gqa_by_repeat(varlen_2_11)
    for kv in (4, 2, 1):
        q, k, v = torch.randn(3, 4, S, 8), torch.randn(3, kv, S, 8), torch.randn(3, kv, S, 8)
        got = gpt_module.attend_varlen(kernel, q, k, v, docs, window_size=(-1, 0), enable_gqa=kv != 4)
        torch.testing.assert_close(got, gpt_module.attend_eager(q, k, v, docs, 0.0), rtol=0, atol=1e-5)
    with pytest.raises(TypeError):  # what the model's call did to the unwrapped kernel
        gpt_module.attend_varlen(varlen_2_11, q, k, v, docs, window_size=(-1, 0), enable_gqa=True)
    found = gpt_module.torch_varlen_attn()  # this torch's own: taken as it is where it knows enable_gqa
    if found is not None:
        assert ("enable_gqa" in inspect.signature(found).parameters) or found.__name__ == "with_gqa"


def test_implementations_are_picked_once_and_again_on_a_new_device():
    model = GPT(tiny(attn_impl="auto", norm_impl="auto"))
    attn = model.blocks[0].attn
    assert attn.attend_fn is gpt_module.attend_sdpa and model.norm.norm_fn is gpt_module.layer_norm_torch
    model.select_impls(torch.device("cuda"))  # as if built under ZeRO-3's zero.Init on a GPU
    assert attn.attend_fn is gpt_module.attend_triton and model.norm.norm_fn is gpt_module.layer_norm_triton
    sdpa = GPT(tiny(attn_impl="sdpa"))
    sdpa.select_impls(torch.device("cuda"))
    cuda_sdpa = gpt_module.attend_sdpa_varlen if gpt_module.torch_varlen_attn() else gpt_module.attend_sdpa
    assert sdpa.blocks[0].attn.attend_fn is cuda_sdpa
    model.to("meta")  # .to() chooses again for where the weights now are
    assert attn.attend_fn is gpt_module.attend_sdpa and model.norm.norm_fn is gpt_module.layer_norm_torch
    model.to_empty(device="cpu")
    model.select_impls(torch.device("cuda"))
    model.eval()(torch.zeros(1, 4, dtype=torch.long))  # computing on the CPU picks the CPU's implementations
    assert attn.attend_fn is gpt_module.attend_sdpa and model.norm.norm_fn is gpt_module.layer_norm_torch


def test_no_imports_inside_the_model_functions():
    """Imports happen at module import, or once when the implementations are chosen (torch's varlen kernel,
    which loads torch._dynamo); never in a forward pass."""
    tree = ast.parse(Path(gpt_module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "torch_varlen_attn":
            inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert not inner, f"{node.name} imports at line {inner[0].lineno}" if inner else ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["sdpa", "triton"])
def test_packed_bf16_on_gpu_matches_the_mask_reference(impl):
    torch.manual_seed(0)
    idx, _, cu = packed_batch()
    reference = GPT(tiny(attn_impl="eager", n_kv_heads=2)).cuda().to(torch.bfloat16).eval()
    model = GPT(tiny(attn_impl=impl, n_kv_heads=2)).cuda().to(torch.bfloat16).eval()
    model.load_state_dict(reference.state_dict())
    idx, cu = idx.cuda(), cu.cuda()
    expected = reference(idx, cu_seqlens=cu)[0].float()
    got = model(idx, cu_seqlens=cu)[0].float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
