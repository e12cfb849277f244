// Host-side pieces of topdown_merge shared by the CPU and CUDA kernels: input checks (the
// Python wrapper raises friendlier errors first; these guard direct op calls), inputs brought
// to the output layout, outputs allocated.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "layout.h"

namespace aim_kernels {

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

// Sizes of one call. Without prev, the "source" grid is the output grid itself (hs = H, ws = W).
struct MergeGeometry {
  int64_t N, C, H, W, hs, ws;
  bool mask_full, has_prev;
};

// sizes: feat's (N, C, H, W); mask_channels: 1 (broadcast) or C.
inline MergeGeometry merge_geometry(at::IntArrayRef sizes, int64_t mask_channels, bool has_prev, int64_t hs, int64_t ws) {
  const int64_t C = sizes[1];
  return MergeGeometry{sizes[0], C, sizes[2], sizes[3], has_prev ? hs : sizes[2],
                       has_prev ? ws : sizes[3], mask_channels == C && C != 1, has_prev};
}

// Forward: inputs in the output layout (copied only if they are not), the output allocated.
struct MergeForward {
  at::MemoryFormat fmt;
  at::Tensor feat, mask, prev, out;  // prev undefined when absent
  MergeGeometry geometry;
};

inline MergeForward prepare_merge_forward(const at::Tensor& feat_in, const at::Tensor& mask_in,
                                          const std::optional<at::Tensor>& prev_in) {
  check_merge_inputs(feat_in, mask_in, prev_in);
  const auto fmt = output_memory_format(feat_in);
  const bool has_prev = prev_in.has_value();
  at::Tensor feat = feat_in.contiguous(fmt), mask = mask_in.contiguous(fmt);
  at::Tensor prev = has_prev ? prev_in->contiguous(fmt) : at::Tensor();
  at::Tensor out = at::empty(feat.sizes(), feat.options().memory_format(fmt));
  const MergeGeometry g = merge_geometry(feat.sizes(), mask.size(1), has_prev, has_prev ? prev.size(2) : 0, has_prev ? prev.size(3) : 0);
  return MergeForward{fmt, feat, mask, prev, out, g};
}

// Backward: the same for grad_out, feat and mask, and the three gradients, in grad_out's layout.
// A gradient is computed only when the input it reads is passed (grad_feat reads mask, grad_mask
// reads feat, grad_prev needs prev_size = [h, w]); one not asked for is an empty tensor. For an
// empty grad_out the gradients are already final.
struct MergeBackward {
  at::MemoryFormat fmt;
  at::Tensor grad, feat, mask, gfeat, gmask, gprev;  // feat / mask undefined when not passed
  bool want_feat_grad, want_mask_grad;
  MergeGeometry geometry;
};

inline MergeBackward prepare_merge_backward(const at::Tensor& grad_in, const std::optional<at::Tensor>& feat_in,
                                            const std::optional<at::Tensor>& mask_in, int64_t mask_channels,
                                            at::IntArrayRef prev_size) {
  TORCH_CHECK(grad_in.dim() == 4, "topdown_merge_backward: grad_out must be 4-D (N, C, H, W), got ", grad_in.sizes());
  TORCH_CHECK(at::isFloatingType(grad_in.scalar_type()), "topdown_merge_backward: grad_out must be floating point");
  const int64_t N = grad_in.size(0), C = grad_in.size(1), H = grad_in.size(2), W = grad_in.size(3);
  TORCH_CHECK(mask_channels == 1 || mask_channels == C, "topdown_merge_backward: mask_channels must be 1 or ", C,
              ", got ", mask_channels);
  for (const auto* t : {&feat_in, &mask_in}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->device() == grad_in.device() && (*t)->scalar_type() == grad_in.scalar_type(),
                  "topdown_merge_backward: feat and mask must have grad_out's device and dtype");
    }
  }
  TORCH_CHECK(!feat_in.has_value() || feat_in->sizes() == grad_in.sizes(), "topdown_merge_backward: feat ",
              feat_in.has_value() ? feat_in->sizes() : at::IntArrayRef(), " must match grad_out ", grad_in.sizes());
  TORCH_CHECK(!mask_in.has_value() || mask_in->sizes() == at::IntArrayRef({N, mask_channels, H, W}),
              "topdown_merge_backward: mask must be (N, mask_channels, H, W) matching grad_out ", grad_in.sizes());
  TORCH_CHECK(prev_size.empty() || prev_size.size() == 2, "topdown_merge_backward: prev_size must be [] or [h, w]");
  const bool has_prev = prev_size.size() == 2;
  const auto fmt = output_memory_format(grad_in);
  const at::Tensor grad = grad_in.contiguous(fmt);
  const at::Tensor feat = feat_in.has_value() ? feat_in->contiguous(fmt) : at::Tensor();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous(fmt) : at::Tensor();
  const MergeGeometry g = merge_geometry(grad.sizes(), mask_channels, has_prev, has_prev ? prev_size[0] : 0,
                                         has_prev ? prev_size[1] : 0);
  TORCH_CHECK(g.hs >= 0 && g.ws >= 0 && g.hs <= g.H && g.ws <= g.W && (g.H * g.W == 0 || g.hs * g.ws > 0),
              "topdown_merge_backward: invalid prev_size ", prev_size);
  const auto options = grad.options();
  at::Tensor gfeat = mask.defined() ? at::empty(grad.sizes(), options.memory_format(fmt)) : at::empty({0}, options);
  at::Tensor gmask = feat.defined() ? at::empty({N, mask_channels, H, W}, options.memory_format(fmt)) : at::empty({0}, options);
  at::Tensor gprev = has_prev ? at::empty({N, C, g.hs, g.ws}, options.memory_format(fmt)) : at::empty({0}, options);
  if (grad.numel() == 0) {
    gmask.zero_();
    gprev.zero_();
  }
  return MergeBackward{fmt, grad, feat, mask, gfeat, gmask, gprev, mask.defined(), feat.defined(), g};
}

}  // namespace aim_kernels
