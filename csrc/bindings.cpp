// Python bindings of ftlm._C: checks the arguments once, then dispatches to the CPU or CUDA kernel.
#include "cross_entropy.h"

#include <ATen/ops/empty_like.h>
// The pybind11 type casters for tensors, without the whole C++ frontend that torch/extension.h pulls in
// (several times faster to compile).
#include <torch/csrc/utils/pybind.h>

namespace ftlm {
namespace {

void check_common(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2, "cross_entropy: logits must be 2-D (rows, vocab), got ", logits.dim(), "-D");
  TORCH_CHECK(logits.is_contiguous(), "cross_entropy: logits must be contiguous");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kDouble,
              "cross_entropy: logits must be float32, float16, bfloat16 or float64, got ", logits.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), "cross_entropy: targets must be 1-D with ",
              logits.size(0), " entries, got shape ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "cross_entropy: targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.is_contiguous(), "cross_entropy: targets must be contiguous");
  TORCH_CHECK(targets.device() == logits.device(), "cross_entropy: targets are on ", targets.device(),
              " but logits on ", logits.device());
  TORCH_CHECK(logits.size(1) > 0, "cross_entropy: the vocabulary dimension is empty");
}

bool is_cuda(const at::Tensor& t) {
  if (!t.is_cuda()) {
    TORCH_CHECK(t.device().is_cpu(), "cross_entropy: unsupported device ", t.device());
    return false;
  }
#ifdef FTLM_WITH_CUDA
  return true;
#else
  TORCH_CHECK(false, "cross_entropy: ftlm._C was built without CUDA; rebuild with FTLM_CUDA=1");
#endif
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  check_common(logits, targets);
#ifdef FTLM_WITH_CUDA
  if (is_cuda(logits)) return cross_entropy_forward_cuda(logits, targets, ignore_index);
#else
  is_cuda(logits);
#endif
  return cross_entropy_forward_cpu(logits, targets, ignore_index);
}

at::Tensor backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                    const at::Tensor& grad_scale, int64_t ignore_index, bool inplace) {
  check_common(logits, targets);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == logits.size(0) && lse.scalar_type() == at::kFloat &&
                  lse.is_contiguous() && lse.device() == logits.device(),
              "cross_entropy: lse must be a contiguous float32 tensor of ", logits.size(0), " rows on ", logits.device());
  TORCH_CHECK(grad_scale.numel() == 1 && grad_scale.scalar_type() == at::kFloat &&
                  grad_scale.device() == logits.device(),
              "cross_entropy: grad_scale must be a one-element float32 tensor on ", logits.device());
  at::Tensor grad = inplace ? logits : at::empty_like(logits);
#ifdef FTLM_WITH_CUDA
  if (is_cuda(logits)) {
    cross_entropy_backward_cuda(logits, targets, lse, grad_scale, ignore_index, grad);
    return grad;
  }
#else
  is_cuda(logits);
#endif
  cross_entropy_backward_cpu(logits, targets, lse, grad_scale, ignore_index, grad);
  return grad;
}

bool has_cuda() {
#ifdef FTLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace ftlm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ftlm native kernels: fused softmax cross-entropy (CPU, and CUDA when built with it)";
  m.def("cross_entropy_forward", &ftlm::forward, pybind11::arg("logits"), pybind11::arg("targets"),
        pybind11::arg("ignore_index"),
        "(logits (N, V), targets (N,) int64, ignore_index) -> (loss per row float32 (N,), log-sum-exp float32 (N,))");
  m.def("cross_entropy_backward", &ftlm::backward, pybind11::arg("logits"), pybind11::arg("targets"),
        pybind11::arg("lse"), pybind11::arg("grad_scale"), pybind11::arg("ignore_index"), pybind11::arg("inplace"),
        "gradient (softmax - onehot) * grad_scale as one logits-sized tensor of logits' dtype; with inplace=True it "
        "is written into logits and logits is returned");
  m.def("has_cuda", &ftlm::has_cuda, "whether the CUDA kernels were compiled in");
}
