// Host-side pieces of masked_conv2d shared by the CPU and CUDA kernels: input checks (the
// Python wrapper raises friendlier errors first; these guard direct op calls), the geometry
// of one call, the density above which the dense path runs, and that dense path.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <optional>

#include "layout.h"

namespace aim_kernels {

struct ConvGeometry {
  int64_t N, C, H, W;        // input
  int64_t Cout, kh, kw;      // weight
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t Ho, Wo;            // output (and mask)
  int64_t hs, ws;            // prev, or the output grid itself when there is none
  bool depthwise, has_prev;
  int64_t positions() const { return N * Ho * Wo; }
  int64_t taps() const { return kh * kw; }
};

inline ConvGeometry conv_geometry(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& mask, const std::optional<at::Tensor>& prev, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && mask.dim() == 4, "masked_conv2d: x, weight and mask must be 4-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "masked_conv2d: stride, padding, dilation must have 2 entries");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 && padding[1] >= 0,
              "masked_conv2d: stride and dilation must be >= 1, padding >= 0");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "masked_conv2d: x must be floating point, got ", x.scalar_type());
  for (const at::Tensor* t : {&weight, &mask}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), "masked_conv2d: weight and mask must have x's dtype and device");
  }
  ConvGeometry g{};
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.Cout = weight.size(0), g.kh = weight.size(2), g.kw = weight.size(3);
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  g.depthwise = groups > 1;
  TORCH_CHECK(groups == 1 || (groups == g.C && g.Cout == g.C && weight.size(1) == 1),
              "masked_conv2d: groups must be 1 or depthwise (groups == C_in == C_out), got groups=", groups);
  TORCH_CHECK(weight.size(1) * groups == g.C, "masked_conv2d: weight ", weight.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "masked_conv2d: input ", x.sizes(), " is smaller than the (dilated) kernel");
  TORCH_CHECK(mask.size(0) == g.N && mask.size(1) == 1 && mask.size(2) == g.Ho && mask.size(3) == g.Wo,
              "masked_conv2d: mask must be (", g.N, ", 1, ", g.Ho, ", ", g.Wo, "), got ", mask.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.Cout && bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "masked_conv2d: bias must be (C_out,) with x's dtype and device");
  }
  g.has_prev = prev.has_value();
  g.hs = g.Ho, g.ws = g.Wo;
  if (g.has_prev) {
    const at::Tensor& p = *prev;
    TORCH_CHECK(p.dim() == 4 && p.size(0) == g.N && p.size(1) == g.Cout && p.size(2) <= g.Ho && p.size(3) <= g.Wo &&
                    p.size(2) > 0 && p.size(3) > 0,
                "masked_conv2d: prev must be (N, C_out, h, w) with 0 < h <= ", g.Ho, ", 0 < w <= ", g.Wo, ", got ", p.sizes());
    TORCH_CHECK(p.scalar_type() == x.scalar_type() && p.device() == x.device(), "masked_conv2d: prev must have x's dtype and device");
    g.hs = p.size(2), g.ws = p.size(3);
  }
  return g;
}

// Active fraction of the mask above which computing only the active positions is no faster
// than the dense convolution, per shape class. Measured on the 2-core development machine
// (Xeon, AVX-512, MKL; one thread: two threads stalled on the shared machine) with
// benchmarks/bench_masked_conv2d.py: i.i.d. masks, the ResNet-50 and ConvNeXt-T stage shapes
// at batch 8, benchmarks/results/masked_conv2d_t1.json. Sparse/dense time ratios:
// - 1x1, NCHW: 0.84-2.1 at density 0.5, 0.83-1.5 at 0.75 (crossing 1 at 0.5-0.63: 0.45);
// - 1x1, channels_last: 1.7-2.5 at 0.5, 0.8-1.4 at 0.75 (crossing at ~0.7: 0.6);
// - 3x3, both layouts: 1.45-1.6 at 0.5, 0.94-1.01 at 0.75 (crossing at ~0.73: 0.6);
// - depthwise 7x7, channels_last: 1.7-2.1 at 0.1, 0.99-1.36 at 0.25 (oneDNN's dense depthwise
//   convolution is memory-bound and vectorized over positions, the sparse one only over
//   channels): 0.15;
// - depthwise 7x7, NCHW: 0.99-1.45 at 0.05, 0.59-0.69 at 0.1 (per-position reads across
//   planes): 0.03.
// AIM_KERNELS_MASKED_CONV_DENSE_ABOVE=<fraction> overrides it (read per call), so tests and
// benchmarks can run the sparse kernels at every density ("2" never takes the dense path).
// On CUDA (H100, benchmarks/gpu_masked_conv2d.py, results/gpu_masked_conv2d{,_b64}.json,
// C++ backend) the sparse path lost to cuDNN + topdown_merge in every row at batch 8: every
// case, layout and density down to 0.05, fp32 and bf16 (0.02-0.84x: compaction, its host sync
// and four launches cost more than the whole dense call, 0.02-0.1 ms). At batch 64 it won
// only for depthwise 7x7 at density <= 0.1 (1.0-1.55x: NCHW at every width, channels_last
// fp32 at 96 and 192 channels) and in one lone 1x1 row at density 0.75 (1.21x); every other
// row lost (0.01-0.94x). So 0: the dense composition at any density, chosen before the count,
// with no host sync (the caller can still force the sparse kernels).
inline double dense_crossover_density(const ConvGeometry& g, bool channels_last, bool cuda) {
  if (const char* forced = std::getenv("AIM_KERNELS_MASKED_CONV_DENSE_ABOVE")) return std::atof(forced);
  if (cuda) return 0.;
  if (g.depthwise) return channels_last ? 0.15 : 0.03;
  if (g.taps() == 1 && !channels_last) return 0.45;
  return 0.6;
}

// The dense composition: conv2d, then topdown_merge through the dispatcher (whichever
// backend serves it), in the output layout the op promises.
inline at::Tensor masked_conv2d_dense(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& mask, const std::optional<at::Tensor>& prev, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static auto merge = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("aim_kernels::topdown_merge", "")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  const at::Tensor conv = at::conv2d(x, weight, bias, stride, padding, dilation, groups);
  return merge.call(conv, mask, prev).contiguous(output_memory_format(x));
}

}  // namespace aim_kernels
