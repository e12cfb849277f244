// Host-side pieces of topdown_merge shared by the CPU and CUDA kernels: input checks
// (the Python wrapper raises friendlier errors first; these guard direct op calls) and the
// layout rule for outputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace aim_kernels {

// Output layout follows feat: channels_last only when feat is channels_last-dense and not
// also plain-contiguous. aim_kernels/_library.py memory_format_of is the same rule.
inline at::MemoryFormat merge_memory_format(const at::Tensor& feat) {
  if (feat.dim() == 4 && !feat.is_contiguous() && feat.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

inline void check_merge_inputs(const at::Tensor& feat, const at::Tensor& mask, const std::optional<at::Tensor>& prev) {
  TORCH_CHECK(feat.dim() == 4, "topdown_merge: feat must be 4-D (N, C, H, W), got ", feat.sizes());
  TORCH_CHECK(mask.dim() == 4, "topdown_merge: mask must be 4-D, got ", mask.sizes());
  TORCH_CHECK(at::isFloatingType(feat.scalar_type()), "topdown_merge: feat must be floating point, got ", feat.scalar_type());
  TORCH_CHECK(mask.scalar_type() == feat.scalar_type(), "topdown_merge: mask dtype ", mask.scalar_type(), " != feat dtype ", feat.scalar_type());
  TORCH_CHECK(mask.device() == feat.device(), "topdown_merge: mask and feat must be on the same device");
  TORCH_CHECK(mask.size(0) == feat.size(0) && mask.size(2) == feat.size(2) && mask.size(3) == feat.size(3) &&
                  (mask.size(1) == 1 || mask.size(1) == feat.size(1)),
              "topdown_merge: mask must be (N, 1 or C, H, W) matching feat ", feat.sizes(), ", got ", mask.sizes());
  if (prev.has_value()) {
    const at::Tensor& p = *prev;
    TORCH_CHECK(p.dim() == 4 && p.size(0) == feat.size(0) && p.size(1) == feat.size(1), "topdown_merge: prev must be (N, C, h, w) matching feat ", feat.sizes(), ", got ", p.sizes());
    TORCH_CHECK(p.scalar_type() == feat.scalar_type(), "topdown_merge: prev dtype ", p.scalar_type(), " != feat dtype ", feat.scalar_type());
    TORCH_CHECK(p.device() == feat.device(), "topdown_merge: prev and feat must be on the same device");
    TORCH_CHECK(p.size(2) <= feat.size(2) && p.size(3) <= feat.size(3), "topdown_merge: prev ", p.sizes(), " must not be larger than feat ", feat.sizes());
    TORCH_CHECK(feat.size(2) * feat.size(3) == 0 || p.size(2) * p.size(3) > 0, "topdown_merge: prev has an empty spatial size");
  }
}

}  // namespace aim_kernels
