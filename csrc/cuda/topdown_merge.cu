// topdown_merge on CUDA: out = feat * mask + nearest_upsample(prev), and its backward.
//
// Forward: one thread per pack of VEC consecutive output elements in memory order; each
// input is read once and the output written once. Packs are 16 bytes (128-bit loads and
// stores) whenever the innermost extent (H*W for NCHW, C for channels_last) is a multiple
// of VEC and every pointer is 16-byte aligned, so a pack never straddles a plane or pixel.
//
// Backward: one thread (NCHW) or one group of lanes (channels_last) owns a source pixel of
// prev and every output pixel in its footprint, across its channels. grad_prev is then a
// register sum over the footprint (gather: no atomics, fixed order), and a broadcast mask's
// grad_mask is summed over channels in registers in the same pass that writes grad_feat.
// NCHW splits the channels into chunks (blockIdx.y) when there are too few source pixels to
// fill the GPU (an H100 ran 16x256x28x28 <- 14x14 at 0.13 of peak bandwidth with one thread
// per pixel looping over all 256 channels: 3136 threads); a broadcast mask's per-chunk sums
// then go to a float workspace that a second kernel adds up in chunk order (deterministic).
// Footprints longer than kMaxFootprint along an axis (ratios above 4) take two passes:
// grad_feat/grad_mask per output pixel, then a gather of grad_prev that reads grad_out again.
//
// Index arithmetic runs in I = int32_t when every tensor has fewer than 2^31 elements and in
// int64_t otherwise: 64-bit integer division is a called subroutine on the GPU, and its calls
// cost registers (ptxas reported small spills with int64 decoding everywhere).
//
// fp32 results match ATen bit for bit: the multiply and the add round separately
// (nvcc runs with --fmad=false), as in the reference's two eager kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "../index_rules.h"
#include "../topdown_merge.h"

namespace aim_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxFootprint = 4;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Sizes of one call. (hs, ws) is the source grid of the backward gather; it is (H, W)
// itself when there is no prev (each output pixel is its own footprint).
struct Dims {
  int64_t N, C, H, W, hs, ws;
  bool mask_full, has_prev;
  NearestAxis ys, xs;
};

unsigned int blocks_for(int64_t threads) {
  return static_cast<unsigned int>(std::clamp<int64_t>((threads + kThreads - 1) / kThreads, 1, INT_MAX));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, typename I, int VEC, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kThreads) merge_forward_kernel(T* __restrict__ out, const T* __restrict__ feat,
                                                                 const T* __restrict__ mask,
                                                                 const T* __restrict__ prev, Dims d) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  const I C = d.C, H = d.H, W = d.W, hs = d.hs, ws = d.ws, HW = H * W;
  const int64_t packs = d.N * d.C * d.H * d.W / VEC;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < packs; i += int64_t(gridDim.x) * blockDim.x) {
    const I e = I(i) * VEC;
    const P f = *reinterpret_cast<const P*>(feat + e);
    P o;
    if constexpr (!CHANNELS_LAST) {
      const I plane = e / HW, hw = e - plane * HW, n = plane / C;
      I y = hw / W, x = hw - y * W;
      const P m = *reinterpret_cast<const P*>(mask + (d.mask_full ? e : n * HW + hw));
      const T* prev_plane = d.has_prev ? prev + plane * hs * ws : nullptr;
      I sy = d.has_prev ? I(source_index(d.ys, y)) : I(0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc_t v = acc_t(f.v[k]) * acc_t(m.v[k]);
        if (d.has_prev) v = v + acc_t(prev_plane[sy * ws + I(source_index(d.xs, x))]);
        o.v[k] = T(v);
        if (++x == W && k + 1 < VEC) {
          x = 0;
          ++y;
          if (d.has_prev) sy = I(source_index(d.ys, y));
        }
      }
    } else {
      const I pix = e / C, c = e - pix * C;
      const I ny = pix / W, x = pix - ny * W, n = ny / H, y = ny - n * H;
      P m;
      if (d.mask_full) {
        m = *reinterpret_cast<const P*>(mask + e);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) m.v[k] = mask[pix];
      }
      P p;
      if (d.has_prev) {
        const I src_pix = (n * hs + I(source_index(d.ys, y))) * ws + I(source_index(d.xs, x));
        p = *reinterpret_cast<const P*>(prev + src_pix * C + c);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc_t v = acc_t(f.v[k]) * acc_t(m.v[k]);
        if (d.has_prev) v = v + acc_t(p.v[k]);
        o.v[k] = T(v);
      }
    }
    *reinterpret_cast<P*>(out + e) = o;
  }
}

// The footprint of source pixel (sy, sx), walked as K x K unrolled slots; slots past the
// footprint's end are invalid. Only the four bounds live in registers: a slot's pixel
// index (within one H x W plane) is recomputed where it is used.
template <typename I, int K>
struct Footprint {
  I y0, y1, x0, x1, W;

  __device__ Footprint(I sy, I sx, const Dims& d)
      : y0(I(footprint_begin(d.ys, sy))),
        y1(I(footprint_begin(d.ys, sy + 1))),
        x0(I(footprint_begin(d.xs, sx))),
        x1(I(footprint_begin(d.xs, sx + 1))),
        W(I(d.W)) {}

  __device__ bool valid(int k) const { return y0 + k / K < y1 && x0 + k % K < x1; }
  __device__ I pix(int k) const { return (y0 + k / K) * W + x0 + k % K; }
};

// NCHW: one thread per source pixel (n, sy, sx), looping over channels. Neighbouring
// threads take neighbouring footprints along a row, so loads coalesce.
template <typename T, typename I, int K, bool WRITE_GRAD_PREV>
__global__ void __launch_bounds__(kThreads) merge_backward_nchw_kernel(const T* __restrict__ grad,
                                                                       const T* __restrict__ feat,
                                                                       const T* __restrict__ mask,
                                                                       T* __restrict__ grad_feat,
                                                                       T* __restrict__ grad_mask,
                                                                       T* __restrict__ grad_prev, Dims d,
                                                                       at::opmath_type<T>* __restrict__ mask_partial) {
  using acc_t = at::opmath_type<T>;
  const I C = d.C, HW = d.H * d.W, hs = d.hs, ws = d.ws;
  const I chunk = (C + I(gridDim.y) - 1) / I(gridDim.y);  // as the launcher splits the channels
  const I c_begin = I(blockIdx.y) * chunk, c_end = c_begin + chunk < C ? c_begin + chunk : C;
  const int64_t sources = d.N * d.hs * d.ws;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < sources; i += int64_t(gridDim.x) * blockDim.x) {
    const I t = I(i) / ws, sx = I(i) - t * ws, n = t / hs, sy = t - n * hs;
    const Footprint<I, K> fp(sy, sx, d);
    acc_t mask_value[K * K], mask_grad[K * K];
#pragma unroll
    for (int k = 0; k < K * K; ++k) {
      mask_grad[k] = 0;
      mask_value[k] = (!d.mask_full && fp.valid(k)) ? acc_t(mask[n * HW + fp.pix(k)]) : acc_t(0);
    }
    for (I c = c_begin; c < c_end; ++c) {
      const I plane = n * C + c, base = plane * HW;
      acc_t prev_grad = 0;
#pragma unroll
      for (int k = 0; k < K * K; ++k) {
        if (!fp.valid(k)) continue;
        const I off = base + fp.pix(k);
        const acc_t g = acc_t(grad[off]), f = acc_t(feat[off]);
        if (d.mask_full) {
          grad_feat[off] = T(g * acc_t(mask[off]));
          grad_mask[off] = T(g * f);
        } else {
          grad_feat[off] = T(g * mask_value[k]);
          mask_grad[k] += g * f;
        }
        prev_grad += g;
      }
      if constexpr (WRITE_GRAD_PREV) grad_prev[(plane * hs + sy) * ws + sx] = T(prev_grad);
    }
    if (!d.mask_full && gridDim.y == 1) {
#pragma unroll
      for (int k = 0; k < K * K; ++k) {
        if (fp.valid(k)) grad_mask[n * HW + fp.pix(k)] = T(mask_grad[k]);
      }
    } else if (!d.mask_full) {
      acc_t* partial = mask_partial + (I(blockIdx.y) * I(d.N) + n) * HW;  // < N*C*H*W/8: fits I
#pragma unroll
      for (int k = 0; k < K * K; ++k) {
        if (fp.valid(k)) partial[fp.pix(k)] = mask_grad[k];
      }
    }
  }
}

// grad_mask of a broadcast mask from the NCHW kernel's per-chunk channel sums, in chunk order.
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_mask_partials_kernel(const at::opmath_type<T>* __restrict__ partial,
                                                                     T* __restrict__ grad_mask, int64_t pixels,
                                                                     int chunks) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pixels; i += int64_t(gridDim.x) * blockDim.x) {
    at::opmath_type<T> sum = 0;
    for (int j = 0; j < chunks; ++j) sum += partial[j * pixels + i];
    grad_mask[i] = T(sum);
  }
}

// Channel chunks for the NCHW backward: enough threads to fill the GPU (about 2^17), at
// least 8 channels per thread so that each still amortizes its footprint setup.
int64_t nchw_channel_chunks(int64_t sources, int64_t C) {
  constexpr int64_t kTargetThreads = int64_t(1) << 17;
  const int64_t wanted = (kTargetThreads + sources - 1) / sources;
  return std::clamp<int64_t>(std::min(wanted, C / 8), 1, 65535);
}

// channels_last: a group of 2^group_shift <= 32 lanes owns one source pixel;
// lane j handles the channel packs j, j + group, ... A broadcast mask's per-pixel channel
// sums are combined across the group with shuffles, so every lane of a warp runs the same
// number of outer iterations.
template <typename T, typename I, int VEC, int K, bool WRITE_GRAD_PREV>
__global__ void __launch_bounds__(kThreads) merge_backward_nhwc_kernel(const T* __restrict__ grad,
                                                                       const T* __restrict__ feat,
                                                                       const T* __restrict__ mask,
                                                                       T* __restrict__ grad_feat,
                                                                       T* __restrict__ grad_mask,
                                                                       T* __restrict__ grad_prev, Dims d, int group_shift) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  const I C = d.C, HW = d.H * d.W, hs = d.hs, ws = d.ws;
  const int64_t sources = d.N * d.hs * d.ws;
  const int group = 1 << group_shift;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int lane = threadIdx.x & (group - 1);
  const int64_t groups_per_grid = (int64_t(gridDim.x) * blockDim.x) >> group_shift;
  const int64_t first_group_of_warp_offset = (threadIdx.x % 32) >> group_shift;
  for (int64_t src = tid >> group_shift; src - first_group_of_warp_offset < sources; src += groups_per_grid) {
    const bool active = src < sources;
    const I s = active ? I(src) : I(0);
    const I t = s / ws, sx = s - t * ws, n = t / hs, sy = t - n * hs;
    const Footprint<I, K> fp(sy, sx, d);
    acc_t mask_value[K * K], mask_grad[K * K];
#pragma unroll
    for (int k = 0; k < K * K; ++k) {
      mask_grad[k] = 0;
      mask_value[k] = (active && !d.mask_full && fp.valid(k)) ? acc_t(mask[n * HW + fp.pix(k)]) : acc_t(0);
    }
    for (I c = I(lane) * VEC; active && c < C; c += I(group) * VEC) {
      acc_t prev_grad[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) prev_grad[v] = 0;
#pragma unroll
      for (int k = 0; k < K * K; ++k) {
        if (!fp.valid(k)) continue;
        const I off = (n * HW + fp.pix(k)) * C + c;
        const P g = *reinterpret_cast<const P*>(grad + off);
        const P f = *reinterpret_cast<const P*>(feat + off);
        P gf;
        if (d.mask_full) {
          const P m = *reinterpret_cast<const P*>(mask + off);
          P gm;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            gf.v[v] = T(acc_t(g.v[v]) * acc_t(m.v[v]));
            gm.v[v] = T(acc_t(g.v[v]) * acc_t(f.v[v]));
          }
          *reinterpret_cast<P*>(grad_mask + off) = gm;
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            gf.v[v] = T(acc_t(g.v[v]) * mask_value[k]);
            mask_grad[k] += acc_t(g.v[v]) * acc_t(f.v[v]);
          }
        }
        *reinterpret_cast<P*>(grad_feat + off) = gf;
#pragma unroll
        for (int v = 0; v < VEC; ++v) prev_grad[v] += acc_t(g.v[v]);
      }
      if constexpr (WRITE_GRAD_PREV) {
        P gp;
#pragma unroll
        for (int v = 0; v < VEC; ++v) gp.v[v] = T(prev_grad[v]);
        *reinterpret_cast<P*>(grad_prev + ((n * hs + sy) * ws + sx) * C + c) = gp;
      }
    }
    if (!d.mask_full) {
#pragma unroll
      for (int k = 0; k < K * K; ++k) {
        acc_t v = mask_grad[k];
        for (int offset = group / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, group);
        if (active && lane == 0 && fp.valid(k)) grad_mask[n * HW + fp.pix(k)] = T(v);
      }
    }
  }
}

// Second pass for long footprints: one thread per grad_prev element, in memory order.
template <typename T, typename I, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kThreads) gather_grad_prev_kernel(const T* __restrict__ grad,
                                                                    T* __restrict__ grad_prev, Dims d) {
  using acc_t = at::opmath_type<T>;
  const I C = d.C, H = d.H, W = d.W, hs = d.hs, ws = d.ws;
  const int64_t total = d.N * d.C * d.hs * d.ws;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    I n, c, sy, sx, rest;
    if constexpr (CHANNELS_LAST) {
      rest = I(i) / C;
      c = I(i) - rest * C;
      const I row = rest / ws;
      sx = rest - row * ws;
      n = row / hs;
      sy = row - n * hs;
    } else {
      rest = I(i) / ws;
      sx = I(i) - rest * ws;
      const I plane = rest / hs;
      sy = rest - plane * hs;
      n = plane / C;
      c = plane - n * C;
    }
    const I y0 = I(footprint_begin(d.ys, sy)), y1 = I(footprint_begin(d.ys, sy + 1));
    const I x0 = I(footprint_begin(d.xs, sx)), x1 = I(footprint_begin(d.xs, sx + 1));
    acc_t sum = 0;
    for (I y = y0; y < y1; ++y) {
      for (I x = x0; x < x1; ++x) {
        const I off = CHANNELS_LAST ? ((n * H + y) * W + x) * C + c : ((n * C + c) * H + y) * W + x;
        sum += acc_t(grad[off]);
      }
    }
    grad_prev[i] = T(sum);
  }
}

template <typename T, typename I>
void launch_gather_grad_prev(const T* grad, T* gprev, const Dims& d, bool channels_last, cudaStream_t stream) {
  const unsigned int blocks = blocks_for(d.N * d.C * d.hs * d.ws);
  if (channels_last) gather_grad_prev_kernel<T, I, true><<<blocks, kThreads, 0, stream>>>(grad, gprev, d);
  else gather_grad_prev_kernel<T, I, false><<<blocks, kThreads, 0, stream>>>(grad, gprev, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Every tensor of the call has fewer than 2^31 elements: 32-bit index arithmetic is exact.
bool fits_int32(const Dims& d) { return d.N * std::max<int64_t>(d.C, 1) * d.H * d.W <= INT32_MAX; }

template <typename T, typename I>
void launch_forward(T* out, const T* feat, const T* mask, const T* prev, const Dims& d, bool channels_last,
                    cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t inner = channels_last ? d.C : d.H * d.W;
  const bool vectorize = inner % VEC == 0 && aligned16(out) && aligned16(feat) && aligned16(mask) &&
                         (!d.has_prev || aligned16(prev));
  const int64_t numel = d.N * d.C * d.H * d.W;
  const unsigned int blocks = blocks_for(numel / (vectorize ? VEC : 1));
  if (channels_last) {
    if (vectorize) merge_forward_kernel<T, I, VEC, true><<<blocks, kThreads, 0, stream>>>(out, feat, mask, prev, d);
    else merge_forward_kernel<T, I, 1, true><<<blocks, kThreads, 0, stream>>>(out, feat, mask, prev, d);
  } else {
    if (vectorize) merge_forward_kernel<T, I, VEC, false><<<blocks, kThreads, 0, stream>>>(out, feat, mask, prev, d);
    else merge_forward_kernel<T, I, 1, false><<<blocks, kThreads, 0, stream>>>(out, feat, mask, prev, d);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename I, int K, bool WRITE_GRAD_PREV>
void launch_backward_fused(const T* grad, const T* feat, const T* mask, T* gfeat, T* gmask, T* gprev, const Dims& d,
                           bool channels_last, const at::TensorOptions& options, cudaStream_t stream) {
  const int64_t sources = d.N * d.hs * d.ws;
  if (!channels_last) {
    using acc_t = at::opmath_type<T>;
    const int64_t chunks = nchw_channel_chunks(sources, d.C);
    const int64_t pixels = d.N * d.H * d.W;
    const bool partial_sums = chunks > 1 && !d.mask_full;
    const at::Tensor workspace =  // allocated only when used: a backward call's host time counts
        partial_sums ? at::empty({chunks * pixels}, options.dtype(c10::CppTypeToScalarType<acc_t>::value)) : at::Tensor();
    const dim3 grid(blocks_for(sources), static_cast<unsigned int>(chunks));
    merge_backward_nchw_kernel<T, I, K, WRITE_GRAD_PREV><<<grid, kThreads, 0, stream>>>(
        grad, feat, mask, gfeat, gmask, gprev, d, partial_sums ? workspace.mutable_data_ptr<acc_t>() : nullptr);
    if (partial_sums) {
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_mask_partials_kernel<T><<<blocks_for(pixels), kThreads, 0, stream>>>(workspace.const_data_ptr<acc_t>(), gmask,
                                                                               pixels, static_cast<int>(chunks));
    }
  } else {
    constexpr int VEC = 16 / sizeof(T);
    const bool vectorize = d.C % VEC == 0 && aligned16(grad) && aligned16(feat) && aligned16(mask) &&
                           aligned16(gfeat) && aligned16(gmask) && (!WRITE_GRAD_PREV || aligned16(gprev));
    const int vec = vectorize ? VEC : 1;
    const int64_t packs = (d.C + vec - 1) / vec;
    int group_shift = 0;
    while (group_shift < 5 && (int64_t(1) << group_shift) < packs) ++group_shift;
    const unsigned int blocks = blocks_for(sources << group_shift);
    if (vectorize) {
      merge_backward_nhwc_kernel<T, I, VEC, K, WRITE_GRAD_PREV>
          <<<blocks, kThreads, 0, stream>>>(grad, feat, mask, gfeat, gmask, gprev, d, group_shift);
    } else {
      merge_backward_nhwc_kernel<T, I, 1, K, WRITE_GRAD_PREV>
          <<<blocks, kThreads, 0, stream>>>(grad, feat, mask, gfeat, gmask, gprev, d, group_shift);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename I>
void launch_backward(const T* grad, const T* feat, const T* mask, T* gfeat, T* gmask, T* gprev, const Dims& d,
                     bool channels_last, const at::TensorOptions& options, cudaStream_t stream) {
  if (!d.has_prev) {
    launch_backward_fused<T, I, 1, false>(grad, feat, mask, gfeat, gmask, gprev, d, channels_last, options, stream);
    return;
  }
  const int64_t longest = std::max(max_footprint(d.hs, d.H), max_footprint(d.ws, d.W));
  if (longest <= 2) {
    launch_backward_fused<T, I, 2, true>(grad, feat, mask, gfeat, gmask, gprev, d, channels_last, options, stream);
  } else if (longest <= kMaxFootprint) {
    launch_backward_fused<T, I, kMaxFootprint, true>(grad, feat, mask, gfeat, gmask, gprev, d, channels_last, options, stream);
  } else {
    Dims per_pixel = d;  // every output pixel its own footprint: grad_feat and grad_mask only
    per_pixel.hs = d.H;
    per_pixel.ws = d.W;
    per_pixel.ys = make_nearest_axis(d.H, d.H);
    per_pixel.xs = make_nearest_axis(d.W, d.W);
    launch_backward_fused<T, I, 1, false>(grad, feat, mask, gfeat, gmask, gprev, per_pixel, channels_last, options, stream);
    launch_gather_grad_prev<T, I>(grad, gprev, d, channels_last, stream);
  }
}

Dims dims_of(const MergeGeometry& g) {
  return Dims{g.N, g.C, g.H, g.W, g.hs, g.ws, g.mask_full, g.has_prev, make_nearest_axis(g.hs, g.H),
              make_nearest_axis(g.ws, g.W)};
}

at::Tensor topdown_merge_cuda(const at::Tensor& feat, const at::Tensor& mask, const std::optional<at::Tensor>& prev) {
  const c10::cuda::CUDAGuard guard(feat.device());
  const MergeForward f = prepare_merge_forward(feat, mask, prev);
  if (f.out.numel() == 0) return f.out;
  const Dims d = dims_of(f.geometry);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.feat.scalar_type(), "topdown_merge_cuda", [&] {
    auto launch = fits_int32(d) ? launch_forward<scalar_t, int32_t> : launch_forward<scalar_t, int64_t>;
    launch(f.out.mutable_data_ptr<scalar_t>(), f.feat.const_data_ptr<scalar_t>(), f.mask.const_data_ptr<scalar_t>(),
           d.has_prev ? f.prev.const_data_ptr<scalar_t>() : nullptr, d, f.fmt == at::MemoryFormat::ChannelsLast, stream);
  });
  return f.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topdown_merge_backward_cuda(const at::Tensor& grad,
                                                                           const std::optional<at::Tensor>& feat,
                                                                           const std::optional<at::Tensor>& mask,
                                                                           int64_t mask_channels, at::IntArrayRef prev_size) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const MergeBackward b = prepare_merge_backward(grad, feat, mask, mask_channels, prev_size);
  if (b.grad.numel() == 0) return {b.gfeat, b.gmask, b.gprev};
  const Dims d = dims_of(b.geometry);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool channels_last = b.fmt == at::MemoryFormat::ChannelsLast;
  if (!b.want_feat_grad && !b.want_mask_grad) {  // grad_prev alone: a gather of grad_out, nothing else read
    if (d.has_prev) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.grad.scalar_type(), "topdown_merge_backward_cuda", [&] {
        auto launch = fits_int32(d) ? launch_gather_grad_prev<scalar_t, int32_t> : launch_gather_grad_prev<scalar_t, int64_t>;
        launch(b.grad.const_data_ptr<scalar_t>(), b.gprev.mutable_data_ptr<scalar_t>(), d, channels_last, stream);
      });
    }
    return {b.gfeat, b.gmask, b.gprev};
  }
  // One of grad_feat / grad_mask not wanted: the fused kernel still computes it, into scratch,
  // from a stand-in for the input that was not saved: grad_out itself where the shapes agree
  // (its second read hits the cache), else zeros of the broadcast mask's size (1/C of grad_out).
  const auto layout = b.grad.options().memory_format(b.fmt);
  const at::Tensor feat_in = b.want_mask_grad ? b.feat : b.grad;
  const at::Tensor mask_in = b.want_feat_grad ? b.mask
                             : d.mask_full    ? b.grad
                                              : at::zeros({d.N, 1, d.H, d.W}, layout);
  const at::Tensor gfeat = b.want_feat_grad ? b.gfeat : at::empty_like(feat_in);
  const at::Tensor gmask = b.want_mask_grad ? b.gmask : at::empty_like(mask_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.grad.scalar_type(), "topdown_merge_backward_cuda", [&] {
    auto launch = fits_int32(d) ? launch_backward<scalar_t, int32_t> : launch_backward<scalar_t, int64_t>;
    launch(b.grad.const_data_ptr<scalar_t>(), feat_in.const_data_ptr<scalar_t>(), mask_in.const_data_ptr<scalar_t>(),
           gfeat.mutable_data_ptr<scalar_t>(), gmask.mutable_data_ptr<scalar_t>(),
           d.has_prev ? b.gprev.mutable_data_ptr<scalar_t>() : nullptr, d, channels_last, b.grad.options(), stream);
  });
  return {b.gfeat, b.gmask, b.gprev};
}

}  // namespace

TORCH_LIBRARY_IMPL(aim_kernels, CUDA, m) {
  m.impl("topdown_merge", &topdown_merge_cuda);
  m.impl("topdown_merge_backward", &topdown_merge_backward_cuda);
}

}  // namespace aim_kernels
