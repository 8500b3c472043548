// Torch-side helpers shared by the CPU kernel and the CUDA launcher of reclmis::weighted_mask.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace reclmis {

// Shapes, dtypes, devices, ratio and the seed tensor (one int64 element on x's device); errors name the
// argument (ValueError / TypeError in Python).
void check_weighted_mask_inputs(const at::Tensor& x, const at::Tensor& weight, double ratio,
                                const std::optional<at::Tensor>& lengths, const at::Tensor& seed);

// Raises a ValueError naming the first row whose status bits (wm::kBadWeight, wm::kBadLength) are set.
void raise_on_bad_rows(const uint8_t* row_status, int64_t batch, int64_t tokens);

}  // namespace reclmis
