// Index rules shared by the CPU and CUDA kernels, written once as host/device code so the
// CPU tests exercise exactly what the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define AIM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AIM_HOST_DEVICE inline
#endif

namespace aim_kernels {

// One axis of F.interpolate(mode="nearest"): sizes and the float32 scale ATen derives from
// them. Kernels build it once per call so the hot loop does no division.
// `expansion` (out / in) only seeds footprint_begin's search, which then corrects itself
// against the exact rule, so no kernel needs a division per pixel.
struct NearestAxis {
  int64_t in_size;
  int64_t out_size;
  float scale;
  double expansion;
};

AIM_HOST_DEVICE NearestAxis make_nearest_axis(int64_t in_size, int64_t out_size) {
  return NearestAxis{in_size, out_size, static_cast<float>(in_size) / static_cast<float>(out_size),
                     in_size > 0 ? static_cast<double>(out_size) / static_cast<double>(in_size) : 0.0};
}

// Source index of F.interpolate(mode="nearest") along one axis, bit for bit ATen's rule
// (ATen/native/UpSample.h nearest_idx with no scale given): identity and x2 are exact
// integer cases; otherwise scale = float(in) / out and src = min(floor(float(dst) * scale), in - 1),
// in float32 arithmetic, which is why a "ratio 3" is not always dst / 3.
AIM_HOST_DEVICE int64_t source_index(const NearestAxis& axis, int64_t dst) {
  if (axis.out_size == axis.in_size) return dst;
  if (axis.out_size == 2 * axis.in_size) return dst >> 1;
  const int64_t src = static_cast<int64_t>(floorf(static_cast<float>(dst) * axis.scale));
  return src < axis.in_size - 1 ? src : axis.in_size - 1;
}

AIM_HOST_DEVICE int64_t nearest_source_index(int64_t dst, int64_t in_size, int64_t out_size) {
  return source_index(make_nearest_axis(in_size, out_size), dst);
}

// First destination index whose source index is >= src. The rule is monotone, so the
// footprint of source pixel s (all destinations that read it) is
// [footprint_begin(s), footprint_begin(s + 1)); footprint_begin(in_size) == out_size.
// Start from the real-valued inverse and correct it against the exact rule.
AIM_HOST_DEVICE int64_t footprint_begin(const NearestAxis& axis, int64_t src) {
  const int64_t in_size = axis.in_size, out_size = axis.out_size;
  if (out_size == in_size) return src;
  if (out_size == 2 * in_size) return 2 * src;
  int64_t dst = static_cast<int64_t>(ceil(static_cast<double>(src) * axis.expansion));
  dst = dst < 0 ? 0 : (dst > out_size ? out_size : dst);
  while (dst > 0 && source_index(axis, dst - 1) >= src) --dst;
  while (dst < out_size && source_index(axis, dst) < src) ++dst;
  return dst;
}

AIM_HOST_DEVICE int64_t footprint_begin(int64_t src, int64_t in_size, int64_t out_size) {
  return footprint_begin(make_nearest_axis(in_size, out_size), src);
}

// Most destinations any one source pixel feeds along an axis (0 for an empty axis): the
// bound a gather kernel's unrolled footprint loop must cover.
AIM_HOST_DEVICE int64_t max_footprint(int64_t in_size, int64_t out_size) {
  if (in_size == 0) return 0;
  if (out_size == in_size) return 1;
  if (out_size == 2 * in_size) return 2;
  const NearestAxis axis = make_nearest_axis(in_size, out_size);
  int64_t longest = 0, begin = 0;
  for (int64_t s = 0; s < in_size; ++s) {
    const int64_t end = footprint_begin(axis, s + 1);
    longest = end - begin > longest ? end - begin : longest;
    begin = end;
  }
  return longest;
}

}  // namespace aim_kernels
