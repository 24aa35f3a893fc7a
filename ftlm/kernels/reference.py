"""Plain PyTorch versions of every fused op in ftlm.kernels, with the same signatures.

They are the ground truth the kernels are tested against, and the fallback on machines
where a kernel cannot run.
"""

import math

import torch
import torch.nn.functional as F

from ftlm.kernels._utils import check_cu_seqlens


def _at_least_fp32(x):
    """Half-precision inputs are computed in float32; float64 stays float64 (the tests' ground truth)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def flash_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None):
    """q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hkv dividing Hq. Returns q's shape.

    Causal with T != S: the queries are the last T positions of the keys' sequence (decoding with a cache).
    cu_seqlens: int32 document starts over the flattened B*S tokens (flash-attn varlen convention; T == S):
    each query sees only keys of its own document, through an explicit block-diagonal mask.
    """
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q, k, "reference.flash_attention")
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, S)
    b, t, s = q.shape[0], q.shape[-2], k.shape[-2]
    mask = torch.ones(1, 1, t, s, dtype=torch.bool, device=q.device)
    if causal:
        # Queries are aligned to the end of the keys, as in decoding with a cache.
        mask = mask.tril(diagonal=s - t)
    if cu_seqlens is not None:
        starts = torch.zeros(b * s, dtype=torch.long, device=q.device)
        starts[cu_seqlens[:-1].long()] = 1
        doc = starts.cumsum(0).view(b, 1, s)  # document number of each token
        mask = mask & (doc[..., :, None] == doc[..., None, :])  # (B, 1, S, S): block-diagonal
    # With causal t > s the first t - s queries see no key at all: they output zeros (not NaN), with zero gradients.
    sees_nothing = ~mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~mask & ~sees_nothing, float("-inf"))
    probs = torch.softmax(_at_least_fp32(scores), dim=-1).masked_fill(sees_nothing, 0.0).to(q.dtype)
    return torch.matmul(probs, v)


def layer_norm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x, weight, eps=1e-6):
    xf = _at_least_fp32(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * _at_least_fp32(weight)).to(x.dtype)


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean loss over the targets that are not ignore_index (0 when every target is ignored)."""
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    total = F.cross_entropy(_at_least_fp32(logits), targets, ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum().clamp(min=1)
    return total / count
