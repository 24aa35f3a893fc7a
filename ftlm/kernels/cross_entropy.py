"""Fused softmax cross-entropy over the vocabulary, backed by the native extension ftlm._C.

Forward: one pass per row computes its log-sum-exp and loss (float32 arithmetic whatever the logits'
dtype); only the per-row log-sum-exp is kept. Backward: the gradient (softmax - onehot) * dloss / count
is written as ONE logits-sized tensor in the logits' dtype; with inplace_backward=True it overwrites the
logits themselves, so no logits-sized buffer is allocated at all. F.cross_entropy, by contrast, keeps a
logits-sized log-softmax for its backward and then allocates the gradient.

Without the extension (or without its CUDA kernels on a CUDA tensor) this warns once and uses
ftlm.kernels.reference.cross_entropy.
"""

import torch

from ftlm.kernels import ext, reference


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, inplace_backward):
        loss_per_row, lse = ext.extension().cross_entropy_forward(logits, targets, ignore_index)
        # Like the reference: the mean over non-ignored targets, and 0 when every target is ignored.
        count = (targets != ignore_index).sum().clamp(min=1)
        ctx.save_for_backward(logits, targets, lse, count)
        ctx.ignore_index, ctx.inplace_backward = ignore_index, inplace_backward
        return loss_per_row.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse, count = ctx.saved_tensors
        grad_scale = (grad_loss.float() / count).reshape(1)
        grad = ext.extension().cross_entropy_backward(
            logits, targets, lse, grad_scale, ctx.ignore_index, ctx.inplace_backward
        )
        if ctx.inplace_backward:
            # Anything else that saved these logits must notice they were overwritten.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None


def cross_entropy(logits, targets, ignore_index=-100, inplace_backward=False):
    """Mean cross-entropy over the targets that are not ignore_index (0 when all are ignored).

    logits: (..., V) float32/float16/bfloat16 (float64 takes PyTorch's path: the kernels accumulate in float32);
    targets: (...) integer class ids. Returns a float32 scalar (float64 for float64 logits).
    A target outside [0, V) that is not ignore_index is an error on the CPU; the CUDA kernel makes the loss NaN
    instead (raising there would abort the whole CUDA context), which the trainer's non-finite-loss check reports.
    inplace_backward=True writes the gradient into the logits' memory during backward: use it only when
    nothing reads the logits after the backward pass (a training step that discards them).
    """
    if logits.dim() == 0 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"cross_entropy: targets of shape {tuple(targets.shape)} do not match logits of shape "
            f"{tuple(logits.shape)} (expected targets of shape {tuple(logits.shape[:-1])})"
        )
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"cross_entropy: logits must be a floating-point tensor, got {logits.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"cross_entropy: targets must be integer class ids, got {targets.dtype}")
    targets = targets.to(torch.int64)  # every integer dtype, on either path (F.cross_entropy takes int64 only)
    if logits.dtype == torch.float64 or not ext.supports(logits.device):
        return reference.cross_entropy(logits, targets, ignore_index)
    shape = logits.shape
    logits2d = logits.reshape(-1, shape[-1])
    if not logits2d.is_contiguous():
        logits2d = logits2d.contiguous()
    targets1d = targets.reshape(-1).contiguous()
    return CrossEntropyFunction.apply(logits2d, targets1d, int(ignore_index), bool(inplace_backward))
