// Plain-CUDA interface of the weighted-masking kernel (weighted_mask_kernel.cu), free of torch headers so
// that the kernel compiles with nvcc alone; weighted_mask_cuda.cpp is the torch-side launcher.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

namespace reclmis {
namespace wm {

enum class WeightType { kFloat64, kFloat32, kFloat16, kBFloat16 };

struct WeightedMaskArgs {
  const void* x;           // (batch, tokens, token_bytes) contiguous
  const void* weight;      // (batch, tokens) contiguous, of weight_type
  const int64_t* lengths;  // (batch,) or nullptr: every position valid
  void* out;               // like x: x with the masked positions zeroed
  bool* mask;              // (batch, tokens)
  uint8_t* row_status;     // (batch,) status bits per row (kBadWeight, kBadLength), or nullptr
  int64_t batch;
  int64_t tokens;
  int64_t token_bytes;  // bytes of one position of x: channels * element size
  double ratio;         // in [0, 1]
  const int64_t* seed;  // one element on the device: the Philox key, read by every block
  WeightType weight_type;
};

// Dynamic shared memory one block (one row) needs: a key and a selection flag per position.
size_t weighted_mask_shared_bytes(int64_t tokens);

// Enqueues the kernel on `stream`; returns the launch error, if any.
cudaError_t launch_weighted_mask(const WeightedMaskArgs& args, cudaStream_t stream);

}  // namespace wm
}  // namespace reclmis
