"""A decoder-only GPT: token embedding, pre-norm blocks (causal self-attention + MLP), final norm, LM head.

Rotary position embeddings use the "rotate half" layout (GPT-NeoX, Hugging Face Llama), so exported
weights need no permutation; `rotary_pct` < 1 rotates only the first dims of each head (GPT-NeoX partial
rotary). `parallel_residual` adds the attention and the MLP of a block to its input side by side (GPT-NeoX).

Attention and norms dispatch to one of several implementations chosen by `attn_impl` / `norm_impl`; every
implementation computes the same function. The choice is made once, when the model is built and again when
it moves to another kind of device (`.to()`, or a forward on a device other than the one it was picked for,
as under DeepSpeed ZeRO-3, whose parameters may live on the CPU while the computation runs on the GPU).

Packed sequences (`doc_mask`): with `cu_seqlens` (flash-attn varlen convention over the flattened B*T
tokens) each token attends only to earlier tokens of its own document, and RoPE uses each token's position
within its document.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftlm import kernels
from ftlm.kernels._utils import check_cu_seqlens, doc_bounds

try:  # optional: pip install 'ftlm[flash]'
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None


ATTN_IMPLS = ("auto", "triton", "sdpa", "flash_attn", "eager")
NORM_IMPLS = ("auto", "triton", "torch")
GELU_APPROX = ("tanh", "none")
NEW_TOKEN_INITS = ("subtoken_mean", "vocab_mean", "normal")
FLASH_ATTN_HINT = "pip install 'ftlm[flash]' (or: pip install flash-attn --no-build-isolation) on a CUDA machine"


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the offending key."""


@dataclass
class GPTConfig:
    """The model's shape and implementation choices; conf/model/base.yaml documents every key.

    Also the Hydra structured-config schema of the `model` group (registered as model/schema), so the
    defaults here are base.yaml's values.
    """

    name: str = "custom"  # preset name, for logs and run names
    vocab_size: int | None = None  # None: the tokenizer's vocabulary rounded up to 64 (the trainer fills it in)
    max_seq_len: int = 2048
    n_layer: int = 12
    n_head: int = 12
    n_kv_heads: int | None = None  # None: as many as n_head (plain multi-head attention)
    d_model: int = 768
    d_ff: int | None = None  # None: 4*d_model for gelu, 8/3*d_model rounded up to 256 for swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | swiglu
    gelu_approx: str = "tanh"  # tanh | none (exact erf GELU, as GPT-NeoX / Polyglot-Ko)
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0  # fraction of head_dim that RoPE rotates (the first dims; GPT-NeoX rotary_pct)
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX use_parallel_residual)
    tie_embeddings: bool = True
    bias: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    doc_mask: bool = True  # attend within documents and restart RoPE positions when forward gets cu_seqlens
    new_token_init: str = "subtoken_mean"  # rows added when the vocabulary grows: subtoken_mean | vocab_mean | normal
    attn_impl: str = "auto"
    norm_impl: str = "auto"

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.d_ff is None and isinstance(self.d_model, int):
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else 256 * math.ceil(8 * self.d_model / 3 / 256)
        self.validate()

    @classmethod
    def from_dict(cls, d: dict, prefix: str = "model") -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}")
        return cls(**d)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates: int(head_dim * rotary_pct), as transformers' GPT-NeoX."""
        return int(self.head_dim * self.rotary_pct)

    def validate(self):
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"model.{key}: {msg}")

        def one_of(key, choices):
            value = getattr(self, key)
            need(value in choices, key, f"'{value}' is not one of {', '.join(choices)}")

        for key in ("vocab_size", "max_seq_len", "n_layer", "n_head", "n_kv_heads", "d_model", "d_ff"):
            value = getattr(self, key)
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            hint = " (null means the tokenizer's vocabulary: set it before building a model)" if value is None else ""
            need(ok, key, f"must be a positive integer, got {value}{hint}")
        need(self.d_model % self.n_head == 0, "d_model", f"{self.d_model} is not divisible by n_head={self.n_head}")
        need(
            self.n_head % self.n_kv_heads == 0,
            "n_kv_heads",
            f"n_head={self.n_head} is not divisible by n_kv_heads={self.n_kv_heads}",
        )
        need(
            self.rotary_pct != 1.0 or self.head_dim % 2 == 0,
            "n_head",
            f"head_dim={self.head_dim} must be even for rotary embeddings",
        )
        need(
            0.0 < self.rotary_pct <= 1.0 and self.rotary_dim >= 2 and self.rotary_dim % 2 == 0,
            "rotary_pct",
            f"{self.rotary_pct} of head_dim={self.head_dim} gives {self.rotary_dim} rotated dims; "
            "rotary_pct must be in (0, 1] and rotate an even number (at least 2) of dims",
        )
        one_of("norm", ("layernorm", "rmsnorm"))
        one_of("mlp", ("gelu", "swiglu"))
        one_of("gelu_approx", GELU_APPROX)
        one_of("new_token_init", NEW_TOKEN_INITS)
        one_of("attn_impl", ATTN_IMPLS)
        one_of("norm_impl", NORM_IMPLS)
        for key in ("parallel_residual", "tie_embeddings", "bias", "doc_mask"):
            need(isinstance(getattr(self, key), bool), key, f"must be true or false, got {getattr(self, key)!r}")
        need(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        need(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        need(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        if self.attn_impl == "flash_attn" and flash_attn_func is None:
            raise ConfigError(
                f"model.attn_impl: 'flash_attn' is not installed. Install it with: {FLASH_ATTN_HINT}, "
                "or choose attn_impl=auto"
            )

    def num_params(self, include_embedding: bool = True) -> int:
        """Closed-form parameter count; the model's actual count must equal it.

        parallel_residual, rotary_pct, gelu_approx and doc_mask change the function, not the weights: every
        block keeps two norms, one QKV and one output projection, and one MLP whatever they are.
        """
        d, ff, hd = self.d_model, self.d_ff, self.head_dim
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = d * (self.n_head + 2 * self.n_kv_heads) * hd + d * d
        mlp = d * ff * (3 if self.mlp == "swiglu" else 2)
        if self.bias:
            attn += (self.n_head + 2 * self.n_kv_heads) * hd + d
            mlp += ff * (2 if self.mlp == "swiglu" else 1) + d
        n = self.n_layer * (attn + mlp + 2 * norm) + norm
        if include_embedding:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        elif not self.tie_embeddings:
            n += self.vocab_size * d  # the untied LM head is a matmul like any other
        return n


def resolve_attn_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "triton" if device.type == "cuda" else "sdpa"
    return impl


def resolve_norm_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


# ---------------------------------------------------------------- norms


def layer_norm_torch(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm_torch(x, weight, bias, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def layer_norm_triton(x, weight, bias, eps):
    return kernels.layer_norm(x, weight, bias, eps)


def rms_norm_triton(x, weight, bias, eps):
    return kernels.rms_norm(x, weight, eps)


NORM_FNS = {
    ("layernorm", "torch"): layer_norm_torch,
    ("rmsnorm", "torch"): rms_norm_torch,
    ("layernorm", "triton"): layer_norm_triton,
    ("rmsnorm", "triton"): rms_norm_triton,
}


class Norm(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg, self.eps = cfg, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.norm == "layernorm" and cfg.bias else None
        self.select(torch.device("cpu"))

    def select(self, device: torch.device):
        self.norm_fn = NORM_FNS[(self.cfg.norm, resolve_norm_impl(self.cfg.norm_impl, device))]

    def forward(self, x):
        return self.norm_fn(x, self.weight, self.bias, self.eps)


# ---------------------------------------------------------------- rotary position embeddings


def rope_angles(cfg: GPTConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles. positions: (T,) or (B, T) integers -> cos, sin: (..., T, rotary_dim)."""
    rot = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, device=positions.device, dtype=torch.float32) / rot))
    angles = positions.float()[..., None] * inv_freq  # (..., T, rot/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, rot), rotate-half layout
    return angles.cos(), angles.sin()


def rope_cache(cfg: GPTConfig, start: int, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions start .. start+length-1: each (length, rotary_dim)."""
    return rope_angles(cfg, torch.arange(start, start + length, device=device))


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos, sin: (T, R) or (B, 1, T, R), R <= D even.

    Rotates the first R dims of each head (rotate-half within them) and passes the other D - R through.
    """
    r = cos.shape[-1]
    x_rot = x[..., :r]  # (B, H, T, R)
    x1, x2 = x_rot.chunk(2, dim=-1)  # (B, H, T, R/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, T, R)
    out = (x_rot.float() * cos + rotated.float() * sin).to(x.dtype)  # (B, H, T, R)
    if r == x.shape[-1]:
        return out
    return torch.cat([out, x[..., r:]], dim=-1)  # (B, H, T, D)


# ---------------------------------------------------------------- documents of a packed batch


class Documents:
    """Where the documents of a packed (B, T) batch start, with what each attention implementation needs.

    Built once per forward from a validated cu_seqlens; the dense mask and the longest document are computed
    on first use and shared by every layer.
    """

    def __init__(self, cu_seqlens: torch.Tensor, batch: int, seq: int):
        self.cu_seqlens, self.batch, self.seq = cu_seqlens, batch, seq
        start, _ = doc_bounds(cu_seqlens, batch, seq)  # (B*T,) each token's document start within its row
        self.start = start.view(batch, seq)  # (B, T)
        self._mask = None
        self._max_len = None

    def positions(self) -> torch.Tensor:
        """(B, T) int64: each token's position within its document."""
        return torch.arange(self.seq, device=self.start.device) - self.start.long()  # (B, T)

    @property
    def mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool: query i sees key j when j <= i and j lies in i's document (j >= its start)."""
        if self._mask is None:
            j = torch.arange(self.seq, device=self.start.device)  # (T,)
            causal = j[None, :] <= j[:, None]  # (T, T)
            in_doc = j[None, None, :] >= self.start[:, :, None]  # (B, T, T)
            self._mask = (causal & in_doc)[:, None]  # (B, 1, T, T)
        return self._mask

    @property
    def max_len(self) -> int:
        """The longest document (one device-to-host copy, on first use)."""
        if self._max_len is None:
            self._max_len = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        return self._max_len


# ---------------------------------------------------------------- attention implementations
# Each takes q (B, Hq, T, D), k and v (B, Hkv, S, D), docs (Documents or None; never with S != T) and the
# dropout probability, and returns (B, Hq, T, D). With S > T (decoding with a KV cache) the queries are the
# last T positions of the keys' sequence.


def decode_mask(q, k):
    """(T, S) bool: query i (at position S - T + i) sees keys j <= S - T + i."""
    t, s = q.shape[2], k.shape[2]
    return torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)


def attend_varlen(kernel, q, k, v, docs: Documents, **kwargs):
    """A flash-attn style varlen kernel (flash_attn_varlen_func, torch's varlen_attn) on (B, H, T, D) tensors."""
    b, _, t, _ = q.shape
    q, k, v = (x.transpose(1, 2).flatten(0, 1) for x in (q, k, v))  # (B*T, H, D) each: the flattened tokens
    out = kernel(q, k, v, docs.cu_seqlens, docs.cu_seqlens, docs.max_len, docs.max_len, **kwargs)  # (B*T, Hq, D)
    return out.view(b, t, *out.shape[1:]).transpose(1, 2)  # (B, Hq, T, D)


def attend_sdpa(q, k, v, docs: Documents | None, p: float):
    gqa = q.shape[1] != k.shape[1]
    if docs is not None:  # the block-diagonal causal mask, (B, 1, T, T) booleans
        return F.scaled_dot_product_attention(q, k, v, attn_mask=docs.mask, dropout_p=p, enable_gqa=gqa)
    decoding = q.shape[2] != k.shape[2]
    mask = decode_mask(q, k) if decoding else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=not decoding, enable_gqa=gqa)


_torch_varlen = []  # [varlen_attn or None] once looked up


def torch_varlen_attn():
    """torch.nn.attention.varlen.varlen_attn (flash-attention varlen, CUDA), or None where this torch lacks it.

    Imported when a model is first set up for a CUDA device, never at import time: it loads torch._dynamo
    (seconds).
    """
    if not _torch_varlen:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        if varlen_attn is not None and "enable_gqa" not in inspect.signature(varlen_attn).parameters:
            varlen_attn = varlen_gqa_by_repeat(varlen_attn)  # torch 2.11 (the GPU image's); 2.14 has it
        _torch_varlen.append(varlen_attn)
    return _torch_varlen[0]


def varlen_gqa_by_repeat(varlen_attn):
    """A varlen_attn without enable_gqa (older torch) given it: K/V heads repeated up to the query heads' count."""

    def with_gqa(q, k, v, *args, enable_gqa: bool = False, **kwargs):  # q (N, Hq, D), k and v (N, Hkv, D)
        if enable_gqa and k.shape[1] != q.shape[1]:
            n_rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (N, Hq, D)
        return varlen_attn(q, k, v, *args, **kwargs)

    return with_gqa


def attend_sdpa_varlen(q, k, v, docs: Documents | None, p: float):
    """sdpa on CUDA: packed documents in fp16/bf16 through torch's varlen kernel, all else as attend_sdpa."""
    if docs is not None and q.dtype in (torch.float16, torch.bfloat16) and p == 0.0:
        gqa = q.shape[1] != k.shape[1]
        return attend_varlen(torch_varlen_attn(), q, k, v, docs, window_size=(-1, 0), enable_gqa=gqa)  # causal
    return attend_sdpa(q, k, v, docs, p)


def attend_eager(q, k, v, docs: Documents | None, p: float):
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, Hq, S, D)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, Hq, T, S)
    mask = docs.mask if docs is not None else decode_mask(q, k)  # (B, 1, T, T) or (T, S)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype)  # (B, Hq, T, S)
    return F.dropout(probs, p, p > 0) @ v  # (B, Hq, T, D)


def attend_triton(q, k, v, docs: Documents | None, p: float):
    if q.shape[2] != k.shape[2] or p > 0:  # the kernel has no dropout, and decoding's one query gains nothing
        return attend_sdpa(q, k, v, docs, p)
    return kernels.flash_attention(q, k, v, causal=True, cu_seqlens=None if docs is None else docs.cu_seqlens)


def attend_flash_attn(q, k, v, docs: Documents | None, p: float):
    if q.shape[2] != k.shape[2]:
        return attend_sdpa(q, k, v, docs, p)
    if docs is None:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, T, H, D) each: flash-attn's layout
        return flash_attn_func(q, k, v, dropout_p=p, causal=True).transpose(1, 2)  # (B, T, Hq, D) -> (B, Hq, T, D)
    return attend_varlen(flash_attn_varlen_func, q, k, v, docs, dropout_p=p, causal=True)


ATTENTION_FNS = {"sdpa": attend_sdpa, "eager": attend_eager, "triton": attend_triton, "flash_attn": attend_flash_attn}


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to max_len."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0  # positions filled so far

    def update(self, layer: int, k, v):
        t = k.shape[2]
        self.k[layer][:, :, self.length : self.length + t] = k
        self.v[layer][:, :, self.length : self.length + t] = v
        end = self.length + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, Hkv, length + t, D) each


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual = True  # scaled init, see GPT._init_weights
        self.select(torch.device("cpu"))

    def select(self, device: torch.device):
        impl = resolve_attn_impl(self.cfg.attn_impl, device)
        if impl == "sdpa" and device.type == "cuda" and torch_varlen_attn() is not None:
            self.attend_fn = attend_sdpa_varlen
        else:
            self.attend_fn = ATTENTION_FNS[impl]

    def forward(self, x, cos, sin, cache: KVCache | None = None, docs: Documents | None = None):
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(
            [cfg.n_head * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim], dim=-1
        )  # (B, T, Hq*D), (B, T, Hkv*D), (B, T, Hkv*D)
        q = q.view(b, t, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = k.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, D): every position so far
        y = self.attend_fn(q, k, v, docs, cfg.dropout if self.training else 0.0)  # (B, Hq, T, D)
        y = y.transpose(1, 2).reshape(b, t, cfg.d_model)  # (B, T, Hq*D)
        return F.dropout(self.proj(y), cfg.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        # For swiglu, one matmul produces the gate and the up projection side by side.
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff * (2 if cfg.mlp == "swiglu" else 1), bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.fc_out.residual = True

    def forward(self, x):
        h = self.fc_in(x)  # (B, T, d_ff) or (B, T, 2*d_ff) for swiglu
        if self.cfg.mlp == "swiglu":
            gate, up = h.chunk(2, dim=-1)  # (B, T, d_ff) each
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.cfg.gelu_approx)
        return F.dropout(self.fc_out(h), self.cfg.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.norm1, self.attn = Norm(cfg), Attention(cfg, layer)
        self.norm2, self.mlp = Norm(cfg), MLP(cfg)

    def forward(self, x, cos, sin, cache=None, docs=None):
        h = self.attn(self.norm1(x), cos, sin, cache, docs)
        if self.parallel_residual:  # GPT-NeoX: both branches read the block's input (summed in its order)
            return self.mlp(self.norm2(x)) + h + x
        x = x + h
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = Norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # Under DeepSpeed's zero.Init the parameters already sit where ZeRO put them; elsewhere on the CPU.
        self.select_impls(self.embed.weight.device)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = self.cfg.init_std
            if getattr(module, "residual", False):
                # GPT-2 / Megatron: each residual branch's output scaled by 1/sqrt(2 * n_layer)
                std = std / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def select_impls(self, device: torch.device):
        """Pick every layer's attention and norm implementation for computing on `device` (attn_impl/norm_impl)."""
        self.impl_device_type = torch.device(device).type
        for module in self.modules():
            if isinstance(module, (Attention, Norm)):
                module.select(torch.device(device))

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() all pass through here: choose again for the device the weights now live on.
        super()._apply(fn, recurse)
        self.select_impls(self.embed.weight.device)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: KVCache | None = None,
        ignore_index: int = -100,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns (logits (B, T, vocab) or None, loss or None).

        loss: the mean cross-entropy over targets (B, T) that are not ignore_index; None without targets.
        logits: None when training with targets (module in training mode, autograd on): the fused
        cross-entropy's backward then writes the logits' gradient into their memory (one vocab x tokens
        buffer less at peak), so they would not survive backward. Use eval mode (or no_grad) for both.

        With cfg.doc_mask (otherwise both are ignored):
          positions: (B, T) integer position of each token within its document, for RoPE;
          cu_seqlens: (n+1,) int32 document starts over the flattened B*T tokens (0, every document start
            including every row start, B*T): each token attends to earlier tokens of its own document only.
            Without positions, they follow from cu_seqlens.
        With a cache, idx holds only the new tokens and positions continue from cache.length; cu_seqlens
        cannot be combined with a cache (ValueError).
        """
        b, t = idx.shape
        if idx.device.type != self.impl_device_type:  # e.g. ZeRO-3 with its parameters offloaded to the CPU
            self.select_impls(idx.device)
        if cu_seqlens is not None and cache is not None:
            raise ValueError(
                "cu_seqlens: document masking is for packed training sequences and cannot be combined with a "
                "KV cache (generation attends to its whole cached sequence); pass one or the other"
            )
        start = cache.length if cache is not None else 0
        if start + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")
        docs = None
        if not self.cfg.doc_mask:
            positions = None
        else:
            if cu_seqlens is not None:
                tokens = idx[:, None, :, None]  # (B, 1, T, 1): the (batch, heads, seq, dim) layout the check reads
                check_cu_seqlens(cu_seqlens, tokens, tokens, op="GPT.forward")
                docs = Documents(cu_seqlens, b, t)
                if positions is None:
                    positions = docs.positions()  # (B, T)
            if positions is not None and (tuple(positions.shape) != (b, t) or positions.is_floating_point()):
                raise ValueError(
                    f"positions: must be integers of idx's shape {(b, t)}; "
                    f"got {positions.dtype} of shape {tuple(positions.shape)}"
                )
        if positions is None:
            cos, sin = rope_cache(self.cfg, start, t, idx.device)  # (T, R) each
        else:
            cos, sin = rope_angles(self.cfg, positions)  # (B, T, R) each
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, R): one angle per token, shared by the heads
        x = F.dropout(self.embed(idx), self.cfg.dropout, self.training)  # (B, T, d_model)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, None, docs, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, docs)
        x = self.norm(x)
        if cache is not None:
            cache.length += t
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight)  # (B, T, vocab)
        if targets is None:
            return logits, None
        # In training nothing reads the logits after backward, so their gradient may take their memory:
        # one logits-sized buffer (vocab x tokens, the largest activation) less at peak.
        inplace = self.training and torch.is_grad_enabled()
        loss = kernels.cross_entropy(
            logits.view(-1, logits.shape[-1]),  # (B*T, vocab)
            targets.reshape(-1),  # (B*T,)
            ignore_index,
            inplace_backward=inplace,
        )
        return (None if inplace else logits), loss
