"""Fused ops: Triton attention and norms, and the cross-entropy of the native extension ftlm._C.

Importing this package is cheap and works without triton or a GPU: the Triton modules are imported on
first use. Plain PyTorch versions of every op live in ftlm.kernels.reference.
"""

from ftlm.kernels import reference
from ftlm.kernels.cross_entropy import cross_entropy

__all__ = ["flash_attention", "layer_norm", "rms_norm", "cross_entropy", "reference"]


def _triton_unavailable(op, error):
    return RuntimeError(
        f"ftlm.kernels.{op} needs triton, which could not be imported ({error}); install triton or "
        "choose model.attn_impl=sdpa / model.norm_impl=torch."
    )


def flash_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None):
    """Softmax attention; q: (B, Hq, T, D), k and v: (B, Hkv, S, D) with Hkv dividing Hq. cu_seqlens: int32
    document starts over the flattened B*S tokens (flash-attn varlen convention) for document masking; T == S.
    See attention.py."""
    try:
        from ftlm.kernels.attention import flash_attention as impl
    except ImportError as e:
        raise _triton_unavailable("flash_attention", e) from e
    return impl(q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens)


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last dimension (bias may be None). See norm.py."""
    try:
        from ftlm.kernels.norm import layer_norm as impl
    except ImportError as e:
        raise _triton_unavailable("layer_norm", e) from e
    return impl(x, weight, bias, eps)


def rms_norm(x, weight, eps=1e-6):
    """RMSNorm over the last dimension. See norm.py."""
    try:
        from ftlm.kernels.norm import rms_norm as impl
    except ImportError as e:
        raise _triton_unavailable("rms_norm", e) from e
    return impl(x, weight, eps)
