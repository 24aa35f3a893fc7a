// CUDA kernels of the fused cross-entropy: one thread block per row, float32 accumulation, an online
// max/sum per thread merged across the block, 16-byte vector loads when the row allows it.
#include "cross_entropy.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

namespace ftlm {
namespace {

constexpr int kMaxThreads = 1024;

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t val[kVec];
};

// The running (max, sum of exp(x - max)) of one thread. -inf inputs add nothing; NaN makes the sum NaN.
struct MaxSum {
  float max;
  float sum;
};

__device__ __forceinline__ void online_add(MaxSum& a, float x) {
  if (x > a.max) {
    a.sum = a.sum * __expf(a.max - x) + 1.f;
    a.max = x;
  } else if (x != -INFINITY) {
    a.sum += __expf(x - a.max);
  }
}

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, a.sum + b.sum};
  return {m, a.sum * __expf(a.max - m) + b.sum * __expf(b.max - m)};
}

// Reduces over the block; every thread gets the result.
__device__ MaxSum block_reduce(MaxSum v) {
  __shared__ MaxSum warp_results[kMaxThreads / 32];
  __shared__ MaxSum result;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) {
    MaxSum other{__shfl_down_sync(0xffffffff, v.max, offset), __shfl_down_sync(0xffffffff, v.sum, offset)};
    v = merge(v, other);
  }
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    v = lane < warps ? warp_results[lane] : MaxSum{-INFINITY, 0.f};
    for (int offset = 16; offset > 0; offset /= 2) {
      MaxSum other{__shfl_down_sync(0xffffffff, v.max, offset), __shfl_down_sync(0xffffffff, v.sum, offset)};
      v = merge(v, other);
    }
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

template <typename scalar_t, int kVec>
__global__ void forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                               float* __restrict__ loss, float* __restrict__ lse, int64_t vocab, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * vocab;
  MaxSum acc{-INFINITY, 0.f};
  const int64_t packs = vocab / kVec;
  const auto* xp = reinterpret_cast<const Pack<scalar_t, kVec>*>(x);
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const Pack<scalar_t, kVec> p = xp[i];
#pragma unroll
    for (int k = 0; k < kVec; ++k) online_add(acc, static_cast<float>(p.val[k]));
  }
  for (int64_t i = packs * kVec + threadIdx.x; i < vocab; i += blockDim.x) online_add(acc, static_cast<float>(x[i]));
  acc = block_reduce(acc);
  if (threadIdx.x == 0) {
    const float row_lse = acc.max + logf(acc.sum);
    lse[row] = row_lse;
    const int64_t t = targets[row];
    if (t == ignore_index) {
      loss[row] = 0.f;
    } else if (t < 0 || t >= vocab) {
      loss[row] = NAN;  // an invalid target poisons the loss instead of aborting the whole CUDA context
    } else {
      loss[row] = row_lse - static_cast<float>(x[t]);
    }
  }
}

template <typename scalar_t, int kVec>
__global__ void backward_kernel(const scalar_t* logits, const int64_t* __restrict__ targets,
                                const float* __restrict__ lse, const float* __restrict__ grad_scale, scalar_t* grad,
                                int64_t vocab, int64_t ignore_index) {
  // logits and grad may alias: every element is read and then written by the same thread.
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * vocab;
  scalar_t* g = grad + row * vocab;
  const int64_t t = targets[row];
  const bool ignored = t == ignore_index;
  const float scale = ignored ? 0.f : *grad_scale;
  const float row_lse = lse[row];
  const int64_t packs = vocab / kVec;
  const auto* xp = reinterpret_cast<const Pack<scalar_t, kVec>*>(x);
  auto* gp = reinterpret_cast<Pack<scalar_t, kVec>*>(g);
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    Pack<scalar_t, kVec> p = xp[i];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t j = i * kVec + k;
      const float prob = ignored ? 0.f : __expf(static_cast<float>(p.val[k]) - row_lse);
      p.val[k] = static_cast<scalar_t>((prob - (j == t ? 1.f : 0.f)) * scale);
    }
    gp[i] = p;
  }
  for (int64_t j = packs * kVec + threadIdx.x; j < vocab; j += blockDim.x) {
    const float prob = ignored ? 0.f : __expf(static_cast<float>(x[j]) - row_lse);
    g[j] = static_cast<scalar_t>((prob - (j == t ? 1.f : 0.f)) * scale);
  }
}

int threads_for(int64_t vocab) {
  // Enough threads that each handles a few 16-byte packs; a whole warp at least.
  int threads = 32;
  while (threads < kMaxThreads && threads * 32 < vocab) threads *= 2;
  return threads;
}

template <typename scalar_t>
bool can_vectorize(const void* ptr, int64_t vocab, int vec) {
  return vocab % vec == 0 && reinterpret_cast<uintptr_t>(ptr) % (sizeof(scalar_t) * vec) == 0;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                              int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {loss, lse};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_forward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int threads = threads_for(vocab);
    if (can_vectorize<scalar_t>(x, vocab, kVec)) {
      forward_kernel<scalar_t, kVec><<<rows, threads, 0, stream>>>(x, targets.data_ptr<int64_t>(), loss.data_ptr<float>(),
                                                                   lse.data_ptr<float>(), vocab, ignore_index);
    } else {
      forward_kernel<scalar_t, 1><<<rows, threads, 0, stream>>>(x, targets.data_ptr<int64_t>(), loss.data_ptr<float>(),
                                                               lse.data_ptr<float>(), vocab, ignore_index);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

void cross_entropy_backward_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                 const at::Tensor& grad_scale, int64_t ignore_index, at::Tensor& grad) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_backward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const int threads = threads_for(vocab);
    if (can_vectorize<scalar_t>(x, vocab, kVec) && can_vectorize<scalar_t>(g, vocab, kVec)) {
      backward_kernel<scalar_t, kVec><<<rows, threads, 0, stream>>>(x, targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                                                    grad_scale.data_ptr<float>(), g, vocab, ignore_index);
    } else {
      backward_kernel<scalar_t, 1><<<rows, threads, 0, stream>>>(x, targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                                                grad_scale.data_ptr<float>(), g, vocab, ignore_index);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ftlm
