// reclmis::weighted_mask: the op schema, the input checks and the CPU kernel (DESIGN section 3.3).
// The CUDA kernel registers itself from weighted_mask_cuda.cpp when the extension is built with CUDA; the
// fake kernel and the autograd formula are registered from Python (reclmis/ops/weighted_mask.py).
//
// The seed is a one-element int64 tensor on x's device, read by the kernels from memory: drawn there with
// torch.randint, it is a fresh draw at every call and at every replay of a CUDA graph, and it never needs
// the host (a seed passed as an int would be baked into a captured graph, which would replay one mask).
#include <Python.h>  // first, as Python requires

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "weighted_mask.h"
#include "weighted_mask_core.h"

namespace reclmis {

void check_weighted_mask_inputs(const at::Tensor& x, const at::Tensor& weight, double ratio,
                                const std::optional<at::Tensor>& lengths, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(x.dim() == 3, "weighted_mask: x must have shape (B, T, C), got ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "weighted_mask: x must be a floating tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == x.size(0) && weight.size(1) == x.size(1),
                    "weighted_mask: weight must have shape (B, T) = (", x.size(0), ", ", x.size(1),
                    ") like x, got ", weight.sizes());
  const auto wtype = weight.scalar_type();
  TORCH_CHECK_TYPE(wtype == at::kDouble || wtype == at::kFloat || wtype == at::kHalf || wtype == at::kBFloat16,
                   "weighted_mask: weight must be float64, float32, float16 or bfloat16, got ", wtype);
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weighted_mask: weight is on ", weight.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(ratio >= 0.0 && ratio <= 1.0, "weighted_mask: ratio must be in [0, 1], got ", ratio);
  if (lengths.has_value()) {
    const at::Tensor& l = *lengths;
    TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == x.size(0), "weighted_mask: lengths must have shape (B,) = (",
                      x.size(0), ",), got ", l.sizes());
    TORCH_CHECK_TYPE(l.scalar_type() == at::kLong || l.scalar_type() == at::kInt,
                     "weighted_mask: lengths must be int64 or int32, got ", l.scalar_type());
    TORCH_CHECK_VALUE(l.device() == x.device(), "weighted_mask: lengths is on ", l.device(), " but x is on ",
                      x.device());
  }
  TORCH_CHECK_VALUE(seed.numel() == 1, "weighted_mask: seed must hold one element, got shape ", seed.sizes());
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "weighted_mask: seed must be int64, got ", seed.scalar_type());
  TORCH_CHECK_VALUE(seed.device() == x.device(), "weighted_mask: seed is on ", seed.device(), " but x is on ",
                    x.device());
}

void raise_on_bad_rows(const uint8_t* row_status, int64_t batch, int64_t tokens) {
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(!(row_status[b] & wm::kBadLength), "weighted_mask: lengths must lie in [0, ", tokens,
                      "] (tokens of x); row ", b, " is out of range");
    TORCH_CHECK_VALUE(!(row_status[b] & wm::kBadWeight), "weighted_mask: weight must be finite and >= 0; row ",
                      b, " holds a negative, NaN or infinite value at a valid position");
  }
}

namespace {

// One row: draw the sample from the keys, mark it in `mask`, copy x's row to `out` with drawn positions zeroed.
// `order` is scratch space of at least `tokens` entries. Returns the row's status bits.
template <typename W>
uint8_t mask_row(const W* weight, int64_t length, int64_t tokens, double ratio, uint64_t seed, int64_t row,
                 int64_t token_bytes, const char* x, char* out, bool* mask,
                 std::vector<std::pair<uint64_t, int64_t>>& order) {
  uint8_t status = 0;
  const int64_t len = wm::clamp_length(length, tokens, &status);
  const int64_t k = wm::mask_count(len, ratio);
  for (int64_t t = 0; t < len; ++t) {
    const double w = static_cast<double>(weight[t]);
    if (!wm::weight_is_valid(w)) {
      status |= wm::kBadWeight;
    }
    order[t] = {wm::sort_key(w, wm::neg_log(wm::uniform(seed, row, t))), t};
  }
  // The k smallest (key, position) pairs; the order is total, so the set does not depend on the algorithm.
  std::nth_element(order.begin(), order.begin() + k, order.begin() + len);
  for (int64_t i = 0; i < k; ++i) {
    mask[order[i].second] = true;
  }
  // Runs of equally masked positions, one memset or memcpy each.
  int64_t start = 0;
  while (token_bytes > 0 && start < tokens) {
    int64_t end = start + 1;
    while (end < tokens && mask[end] == mask[start]) {
      ++end;
    }
    const int64_t offset = start * token_bytes, bytes = (end - start) * token_bytes;
    if (mask[start]) {
      std::memset(out + offset, 0, bytes);
    } else {
      std::memcpy(out + offset, x + offset, bytes);
    }
    start = end;
  }
  return status;
}

std::tuple<at::Tensor, at::Tensor> weighted_mask_cpu(const at::Tensor& x, const at::Tensor& weight, double ratio,
                                                     const std::optional<at::Tensor>& lengths, const at::Tensor& seed,
                                                     bool /*check_weights: the CPU kernel always checks*/) {
  check_weighted_mask_inputs(x, weight, ratio, lengths, seed);
  const uint64_t key = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor lc = lengths.has_value() ? lengths->to(at::kLong).contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  at::Tensor mask = at::zeros(weight.sizes(), x.options().dtype(at::kBool));
  const int64_t batch = x.size(0), tokens = x.size(1);
  const int64_t token_bytes = x.size(2) * static_cast<int64_t>(x.element_size());
  const int64_t* len_ptr = lc.defined() ? lc.const_data_ptr<int64_t>() : nullptr;
  const char* x_ptr = static_cast<const char*>(xc.const_data_ptr());
  char* out_ptr = static_cast<char*>(out.data_ptr());
  bool* mask_ptr = mask.data_ptr<bool>();
  std::vector<uint8_t> row_status(batch, 0);
  // Rows run in parallel, in chunks worth about copying 64 KiB (drawing one position costs about as much as
  // copying 256 bytes); each row's draw depends only on (seed, row), not on the chunking.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, tokens * (token_bytes + 256)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "weighted_mask_cpu", [&] {
    const scalar_t* w_ptr = wc.const_data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      std::vector<std::pair<uint64_t, int64_t>> order(tokens);
      for (int64_t b = begin; b < end; ++b) {
        row_status[b] = mask_row(w_ptr + b * tokens, len_ptr != nullptr ? len_ptr[b] : tokens, tokens, ratio, key,
                                 b, token_bytes, x_ptr + b * tokens * token_bytes, out_ptr + b * tokens * token_bytes,
                                 mask_ptr + b * tokens, order);
      }
    });
  });
  raise_on_bad_rows(row_status.data(), batch, tokens);
  return {out, mask};
}

}  // namespace

TORCH_LIBRARY(reclmis, m) {
  m.def(
      "weighted_mask(Tensor x, Tensor weight, float ratio, Tensor? lengths, Tensor seed, bool check_weights=False)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(reclmis, CPU, m) { m.impl("weighted_mask", &weighted_mask_cpu); }

}  // namespace reclmis

// Importing reclmis._C loads this library, whose static initialisers register the op.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "reclmis::weighted_mask kernels", -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
