"""A decoder-only GPT: token embedding, pre-norm blocks (causal self-attention + MLP), final norm, LM head.

Rotary position embeddings use the "rotate half" layout (GPT-NeoX, Hugging Face Llama), so exported
weights need no permutation. Attention and norms dispatch to one of several implementations chosen by
`attn_impl` / `norm_impl`; every implementation computes the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_IMPLS = ("auto", "triton", "sdpa", "flash_attn", "eager")
NORM_IMPLS = ("auto", "triton", "torch")
FLASH_ATTN_HINT = "pip install 'ftlm[flash]' (or: pip install flash-attn --no-build-isolation) on a CUDA machine"


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the offending key."""


@dataclass
class GPTConfig:
    name: str = "custom"  # preset name, for logs and run names
    vocab_size: int = 32000
    max_seq_len: int = 2048
    n_layer: int = 12
    n_head: int = 12
    n_kv_heads: int | None = None  # None: as many as n_head (plain multi-head attention)
    d_model: int = 768
    d_ff: int | None = None  # None: 4*d_model for gelu, 8/3*d_model rounded up to 256 for swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | swiglu
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    attn_impl: str = "auto"
    norm_impl: str = "auto"

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.d_ff is None:
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

    def validate(self):
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"model.{key}: {msg}")

        for key in ("vocab_size", "max_seq_len", "n_layer", "n_head", "n_kv_heads", "d_model", "d_ff"):
            need(int(getattr(self, key)) > 0, key, f"must be a positive integer, got {getattr(self, key)}")
        need(self.d_model % self.n_head == 0, "d_model", f"{self.d_model} is not divisible by n_head={self.n_head}")
        need(
            self.n_head % self.n_kv_heads == 0,
            "n_kv_heads",
            f"n_head={self.n_head} is not divisible by n_kv_heads={self.n_kv_heads}",
        )
        need(self.head_dim % 2 == 0, "n_head", f"head_dim={self.head_dim} must be even for rotary embeddings")
        need(self.norm in ("layernorm", "rmsnorm"), "norm", f"'{self.norm}' is not one of layernorm, rmsnorm")
        need(self.mlp in ("gelu", "swiglu"), "mlp", f"'{self.mlp}' is not one of gelu, swiglu")
        need(self.attn_impl in ATTN_IMPLS, "attn_impl", f"'{self.attn_impl}' is not one of {', '.join(ATTN_IMPLS)}")
        need(self.norm_impl in NORM_IMPLS, "norm_impl", f"'{self.norm_impl}' is not one of {', '.join(NORM_IMPLS)}")
        need(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        if self.attn_impl == "flash_attn":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                raise ConfigError(
                    f"model.attn_impl: 'flash_attn' is not installed. Install it with: {FLASH_ATTN_HINT}, "
                    "or choose attn_impl=auto"
                ) from None

    def num_params(self, include_embedding: bool = True) -> int:
        """Closed-form parameter count; the model's actual count must equal it."""
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


class Norm(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind, self.eps, self.impl = cfg.norm, cfg.norm_eps, cfg.norm_impl
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.norm == "layernorm" and cfg.bias else None

    def forward(self, x):
        if resolve_norm_impl(self.impl, x.device) == "triton":
            from ftlm import kernels

            if self.kind == "rmsnorm":
                return kernels.rms_norm(x, self.weight, self.eps)
            return kernels.layer_norm(x, self.weight, self.bias, self.eps)
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def rope_cache(cfg: GPTConfig, start: int, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for positions start .. start+length-1."""
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32) / cfg.head_dim)
    )
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (seq, head_dim), rotate-half layout
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos, sin: (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


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
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual = True  # scaled init, see GPT._init_weights

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(
            [cfg.n_head * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim], dim=-1
        )
        q = q.view(b, t, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = k.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = self.attend(q, k, v)
        y = y.transpose(1, 2).reshape(b, t, cfg.d_model)
        return F.dropout(self.proj(y), cfg.dropout, self.training)

    def attend(self, q, k, v):
        impl = resolve_attn_impl(self.cfg.attn_impl, q.device)
        decoding = q.shape[2] != k.shape[2]  # queries sit at the end of a longer cached sequence
        p = self.cfg.dropout if self.training else 0.0
        if impl == "triton" and not decoding and p == 0.0:
            from ftlm import kernels

            return kernels.flash_attention(q, k, v, causal=True)
        if impl == "flash_attn" and not decoding:
            from flash_attn import flash_attn_func  # checked at config time

            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, causal=True)
            return out.transpose(1, 2)
        if impl == "eager":
            return self.eager(q, k, v, p)
        mask = None
        if decoding:
            t, s = q.shape[2], k.shape[2]
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1]
        )

    def eager(self, q, k, v, p):
        n_rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        t, s = q.shape[2], k.shape[2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype)
        return F.dropout(probs, p, self.training) @ v


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        # For swiglu, one matmul produces the gate and the up projection side by side.
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff * (2 if cfg.mlp == "swiglu" else 1), bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.fc_out.residual = True

    def forward(self, x):
        h = self.fc_in(x)
        if self.cfg.mlp == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return F.dropout(self.fc_out(h), self.cfg.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.norm1, self.attn = Norm(cfg), Attention(cfg, layer)
        self.norm2, self.mlp = Norm(cfg), MLP(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.norm1(x), cos, sin, cache)
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

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = self.cfg.init_std
            if getattr(module, "residual", False):
                # GPT-2 / Megatron: each residual branch's output scaled by 1/sqrt(2 * n_layer)
                std = std / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache: KVCache | None = None, ignore_index: int = -100):
        """idx: (B, T) token ids. Returns (logits, loss); loss is None without targets.

        With targets in training mode, backward overwrites the returned logits with their gradient.

        With a cache, idx holds only the new tokens and positions continue from cache.length.
        """
        b, t = idx.shape
        start = cache.length if cache is not None else 0
        if start + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + t} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = rope_cache(self.cfg, start, t, idx.device)
        x = F.dropout(self.embed(idx), self.cfg.dropout, self.training)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache)
        x = self.norm(x)
        if cache is not None:
            cache.length += t
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if targets is None:
            return F.linear(x, weight), None
        logits = F.linear(x, weight)
        from ftlm import kernels

        # In training nothing reads the logits after backward, so their gradient may take their memory:
        # one logits-sized buffer (vocab x tokens, the largest activation) less at peak.
        loss = kernels.cross_entropy(
            logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index, inplace_backward=self.training
        )
        return logits, loss
