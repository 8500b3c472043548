// CUDA kernel of the weighted masking (DESIGN section 3.3): plain CUDA and the shared core header only, so
// `nvcc -c` builds it without torch. One block per row: the row's keys and selection live in shared memory,
// then the block writes x's row with the drawn positions zeroed, in 16-byte vectors where alignment allows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "weighted_mask_core.h"
#include "weighted_mask_kernel.h"

namespace reclmis {
namespace wm {
namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;  // vectors each thread keeps in flight while copying

__device__ __forceinline__ double to_double(double w) { return w; }
__device__ __forceinline__ double to_double(float w) { return w; }
__device__ __forceinline__ double to_double(__half w) { return __half2float(w); }
__device__ __forceinline__ double to_double(__nv_bfloat16 w) { return __bfloat162float(w); }

template <typename W, typename V>
__global__ void __launch_bounds__(kThreads) weighted_mask_kernel(const WeightedMaskArgs args) {
  extern __shared__ uint64_t keys[];  // [tokens] sort keys, followed by [tokens] selection flags
  bool* drawn = reinterpret_cast<bool*>(keys + args.tokens);
  __shared__ int status;

  const int64_t row = blockIdx.x;
  const int64_t tokens = args.tokens;
  const uint64_t seed = static_cast<uint64_t>(*args.seed);
  uint8_t length_status = 0;
  const int64_t len = clamp_length(args.lengths != nullptr ? args.lengths[row] : tokens, tokens, &length_status);
  const int64_t k = mask_count(len, args.ratio);
  if (threadIdx.x == 0) {
    status = length_status;
  }
  __syncthreads();

  const W* weight = static_cast<const W*>(args.weight) + row * tokens;
  for (int64_t t = threadIdx.x; t < len; t += blockDim.x) {
    const double w = to_double(weight[t]);
    if (!weight_is_valid(w)) {
      atomicOr(&status, kBadWeight);
    }
    keys[t] = sort_key(w, neg_log(uniform(seed, row, t)));
  }
  __syncthreads();

  // Position t is drawn iff fewer than k valid positions precede it in (key, position) order: len^2 / threads
  // comparisons of broadcast shared-memory reads at most, cheap for the few hundred tokens of a row.
  for (int64_t t = threadIdx.x; t < tokens; t += blockDim.x) {
    bool selected = false;
    if (t < len) {
      const uint64_t key = keys[t];
      int64_t rank = 0;
      for (int64_t j = 0; j < len && rank < k; ++j) {
        const uint64_t other = keys[j];
        rank += other < key || (other == key && j < t);
      }
      selected = rank < k;
    }
    drawn[t] = selected;
    args.mask[row * tokens + t] = selected;
  }
  __syncthreads();
  if (threadIdx.x == 0 && args.row_status != nullptr) {
    args.row_status[row] = static_cast<uint8_t>(status);
  }

  // The row of x, kUnroll vectors per thread in flight; drawn positions are written as zeros, never read.
  const uint32_t per_token = static_cast<uint32_t>(args.token_bytes / sizeof(V));
  const uint32_t n = static_cast<uint32_t>(tokens) * per_token;
  const V* src = static_cast<const V*>(args.x) + row * n;
  V* dst = static_cast<V*>(args.out) + row * n;
  for (uint32_t base = threadIdx.x; base < n; base += kUnroll * blockDim.x) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t i = base + u * blockDim.x;
      v[u] = V{};
      if (i < n && !drawn[i / per_token]) {
        v[u] = src[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t i = base + u * blockDim.x;
      if (i < n) {
        dst[i] = v[u];
      }
    }
  }
}

template <typename W, typename V>
cudaError_t launch(const WeightedMaskArgs& args, cudaStream_t stream) {
  const size_t shared = weighted_mask_shared_bytes(args.tokens);
  const auto kernel = weighted_mask_kernel<W, V>;
  if (shared > 48 * 1024) {
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (error != cudaSuccess) {
      return error;
    }
  }
  kernel<<<static_cast<unsigned>(args.batch), kThreads, shared, stream>>>(args);
  return cudaGetLastError();
}

// The widest vector that divides a position of x and to which both x and out are aligned.
template <typename W>
cudaError_t launch_for_weight(const WeightedMaskArgs& args, cudaStream_t stream) {
  const auto fits = [&args](size_t bytes) {
    return args.token_bytes % bytes == 0 && reinterpret_cast<uintptr_t>(args.x) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(args.out) % bytes == 0;
  };
  if (fits(16)) {
    return launch<W, uint4>(args, stream);
  }
  if (fits(8)) {
    return launch<W, uint2>(args, stream);
  }
  if (fits(4)) {
    return launch<W, uint32_t>(args, stream);
  }
  if (fits(2)) {
    return launch<W, uint16_t>(args, stream);
  }
  return launch<W, uint8_t>(args, stream);
}

}  // namespace

size_t weighted_mask_shared_bytes(int64_t tokens) {
  return static_cast<size_t>(tokens) * (sizeof(uint64_t) + sizeof(bool));
}

cudaError_t launch_weighted_mask(const WeightedMaskArgs& args, cudaStream_t stream) {
  switch (args.weight_type) {
    case WeightType::kFloat64:
      return launch_for_weight<double>(args, stream);
    case WeightType::kFloat32:
      return launch_for_weight<float>(args, stream);
    case WeightType::kFloat16:
      return launch_for_weight<__half>(args, stream);
    case WeightType::kBFloat16:
      return launch_for_weight<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace wm
}  // namespace reclmis
