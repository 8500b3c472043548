// CUDA launcher of reclmis::weighted_mask: checks, allocation and the stream, then the torch-free kernel of
// weighted_mask_kernel.cu. Built only into a CUDA extension.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "weighted_mask.h"
#include "weighted_mask_kernel.h"

namespace reclmis {
namespace {

wm::WeightType weight_type(at::ScalarType type) {
  switch (type) {
    case at::kDouble:
      return wm::WeightType::kFloat64;
    case at::kFloat:
      return wm::WeightType::kFloat32;
    case at::kHalf:
      return wm::WeightType::kFloat16;
    default:  // bfloat16, the one dtype left after check_weighted_mask_inputs
      return wm::WeightType::kBFloat16;
  }
}

// Bad weights and lengths are recorded per row on the device. Reading them back costs a host sync, so it
// happens only when check_weights is set (reclmis.ops.weighted_mask sets it in eager mode, or always with
// RECLMIS_CHECK_WEIGHTS=1), and never while a CUDA graph is being captured; otherwise the kernel treats an invalid weight as zero and
// clamps an out-of-range length. The seed stays on the device: the kernel reads it, so a captured launch
// takes the seed of each replay.
std::tuple<at::Tensor, at::Tensor> weighted_mask_cuda(const at::Tensor& x, const at::Tensor& weight, double ratio,
                                                      const std::optional<at::Tensor>& lengths,
                                                      const at::Tensor& seed, bool check_weights) {
  check_weighted_mask_inputs(x, weight, ratio, lengths, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // currentStreamCaptureStatusMayInitCtx is the capture query of every torch from 2.11 on (2.11 has no
  // isStreamCapturingMayInitCtx); the CUDA context exists here, since x lives on the device.
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  TORCH_CHECK(!(check_weights && capturing),
              "weighted_mask: check_weights=True reads the row checks back to the host, which a CUDA graph "
              "capture does not allow; unset it (or RECLMIS_CHECK_WEIGHTS) for captured steps");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor lc = lengths.has_value() ? lengths->to(at::kLong).contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  at::Tensor mask = at::empty(weight.sizes(), x.options().dtype(at::kBool));
  const int64_t batch = x.size(0), tokens = x.size(1);
  const int64_t token_bytes = x.size(2) * static_cast<int64_t>(x.element_size());
  if (batch == 0 || tokens == 0) {
    return {out, mask};
  }
  int max_shared = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device()));
  TORCH_CHECK_VALUE(wm::weighted_mask_shared_bytes(tokens) <= static_cast<size_t>(max_shared),
                    "weighted_mask: T = ", tokens, " positions exceed the CUDA kernel's shared memory (",
                    max_shared / (sizeof(uint64_t) + sizeof(bool)), " positions at most)");
  TORCH_CHECK_VALUE(tokens * token_bytes <= std::numeric_limits<int32_t>::max(),
                    "weighted_mask: one row of x holds more than 2 GiB, shape ", x.sizes());
  at::Tensor row_status = check_weights ? at::empty({batch}, x.options().dtype(at::kByte)) : at::Tensor();

  wm::WeightedMaskArgs args{};
  args.x = xc.const_data_ptr();
  args.weight = wc.const_data_ptr();
  args.lengths = lc.defined() ? lc.const_data_ptr<int64_t>() : nullptr;
  args.out = out.data_ptr();
  args.mask = mask.data_ptr<bool>();
  args.row_status = check_weights ? row_status.data_ptr<uint8_t>() : nullptr;
  args.batch = batch;
  args.tokens = tokens;
  args.token_bytes = token_bytes;
  args.ratio = ratio;
  args.seed = seed.const_data_ptr<int64_t>();
  args.weight_type = weight_type(wc.scalar_type());
  C10_CUDA_CHECK(wm::launch_weighted_mask(args, stream));

  if (check_weights) {
    const at::Tensor status = row_status.cpu();
    raise_on_bad_rows(status.const_data_ptr<uint8_t>(), batch, tokens);
  }
  return {out, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(reclmis, CUDA, m) { m.impl("weighted_mask", &weighted_mask_cuda); }

}  // namespace reclmis
