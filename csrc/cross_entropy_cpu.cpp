// CPU kernels of the fused cross-entropy: rows in parallel (at::parallel_for), float32 accumulation.
#include "cross_entropy.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace ftlm {
namespace {

// The row is read in chunks that stay in cache: a chunk's max, then its exp-sum against the running max,
// so each element is loaded from memory once and exponentiated once (an element-wise online softmax would
// need two exps per element).
constexpr int64_t kChunk = 2048;

template <typename scalar_t>
float row_logsumexp(const scalar_t* x, int64_t vocab) {
  // Sums are kept in double: summing tens of thousands of floats one by one in float32 loses ~1e-4.
  float running_max = -std::numeric_limits<float>::infinity();
  double sum = 0.0;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t end = std::min(start + kChunk, vocab);
    float chunk_max = -std::numeric_limits<float>::infinity();
    bool has_nan = false;
    for (int64_t j = start; j < end; ++j) {
      const float v = static_cast<float>(x[j]);
      chunk_max = v > chunk_max ? v : chunk_max;
      has_nan |= std::isnan(v);
    }
    if (has_nan) return std::numeric_limits<float>::quiet_NaN();
    if (chunk_max > running_max) {
      sum *= std::exp(running_max - chunk_max);  // exp(-inf) = 0 on the first chunk
      running_max = chunk_max;
    }
    if (running_max == -std::numeric_limits<float>::infinity()) continue;  // everything -inf so far
    double chunk_sum = 0.0;
    for (int64_t j = start; j < end; ++j) chunk_sum += std::exp(static_cast<float>(x[j]) - running_max);
    sum += chunk_sum;
  }
  return running_max + static_cast<float>(std::log(sum));
}

// About 32k elements per task, as ATen does for element-wise work.
int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                             int64_t ignore_index) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  const int64_t* target = targets.data_ptr<int64_t>();
  float* loss_out = loss.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_forward_cpu", [&] {
    const scalar_t* data = logits.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* x = data + r * vocab;
        const float row_lse = row_logsumexp(x, vocab);
        lse_out[r] = row_lse;
        const int64_t t = target[r];
        if (t == ignore_index) {
          loss_out[r] = 0.f;
          continue;
        }
        TORCH_CHECK(t >= 0 && t < vocab, "cross_entropy: target ", t, " at row ", r, " is outside [0, ", vocab,
                    ") and is not ignore_index (", ignore_index, ")");
        loss_out[r] = row_lse - static_cast<float>(x[t]);
      }
    });
  });
  return {loss, lse};
}

void cross_entropy_backward_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                const at::Tensor& grad_scale, int64_t ignore_index, at::Tensor& grad) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const int64_t* target = targets.data_ptr<int64_t>();
  const float* lse_in = lse.data_ptr<float>();
  const float scale = grad_scale.item<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_backward_cpu", [&] {
    const scalar_t* x_all = logits.data_ptr<scalar_t>();
    scalar_t* g_all = grad.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* x = x_all + r * vocab;
        scalar_t* g = g_all + r * vocab;
        const int64_t t = target[r];
        if (t == ignore_index) {
          std::fill(g, g + vocab, scalar_t(0));
          continue;
        }
        // Read the target's logit before the row may be overwritten (grad may alias logits).
        const float x_target = static_cast<float>(x[t]);
        const float row_lse = lse_in[r];
        for (int64_t j = 0; j < vocab; ++j) g[j] = static_cast<scalar_t>(std::exp(static_cast<float>(x[j]) - row_lse) * scale);
        g[t] = static_cast<scalar_t>((std::exp(x_target - row_lse) - 1.f) * scale);
      }
    });
  });
}

}  // namespace ftlm
