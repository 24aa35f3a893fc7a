"""Fused ops. Until the Triton kernels and the extension land, these are the references."""
from ftlm.kernels import reference
from ftlm.kernels.reference import cross_entropy, flash_attention, layer_norm, rms_norm

__all__ = ["flash_attention", "layer_norm", "rms_norm", "cross_entropy", "reference"]
