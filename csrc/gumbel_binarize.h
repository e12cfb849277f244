// Host-side pieces of gumbel_binarize shared by the CPU and CUDA kernels: argument checks
// (the Python wrapper raises friendlier errors first; these guard direct op calls) and the
// stream coordinates of a call.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "layout.h"

namespace aim_kernels {

inline void check_gumbel_inputs(const char* op, const at::Tensor& logits, double temperature, bool training,
                                const std::optional<at::Tensor>& seed, int64_t offset) {
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point, got ", logits.scalar_type());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  if (training) {
    TORCH_CHECK(seed.has_value(), op, ": training needs a seed tensor");
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, op, ": seed must be a one-element int64 tensor, got ",
                seed->scalar_type(), " with ", seed->numel(), " elements");
    TORCH_CHECK(seed->device() == logits.device(), op, ": seed must be on logits' device ", logits.device(), ", got ", seed->device());
  }
}

// Stream coordinates of a call: element i takes position offset + i, i.e. word
// (lead + i) % 4 of block first_block + (lead + i) / 4.
struct StreamRange {
  uint64_t first_block;
  int64_t lead;    // offset % 4
  int64_t blocks;  // blocks touched by numel elements
};

inline StreamRange stream_range(int64_t offset, int64_t numel) {
  const int64_t lead = offset & 3;
  return {static_cast<uint64_t>(offset) >> 2, lead, (lead + numel + 3) / 4};
}

}  // namespace aim_kernels
