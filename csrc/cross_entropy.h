// Fused softmax cross-entropy over the vocabulary: declarations shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace ftlm {

// logits (N, V) float32/float16/bfloat16, contiguous; targets (N,) int64.
// Returns (loss per row, log-sum-exp per row), both float32 (N,). Rows whose target is ignore_index get loss 0.
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                             int64_t ignore_index);

// Writes d(loss)/d(logits) = (softmax(logits) - onehot(target)) * grad_scale into `grad`, which may be `logits`
// itself (each element is read before it is written). Rows whose target is ignore_index get zeros.
void cross_entropy_backward_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                const at::Tensor& grad_scale, int64_t ignore_index, at::Tensor& grad);

#ifdef FTLM_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                              int64_t ignore_index);
void cross_entropy_backward_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                 const at::Tensor& grad_scale, int64_t ignore_index, at::Tensor& grad);
#endif

}  // namespace ftlm
