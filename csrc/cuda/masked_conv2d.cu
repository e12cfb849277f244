// masked_conv2d on CUDA: topdown_merge(conv2d(x, weight, bias), mask, prev) with the
// convolution evaluated only where mask != 0.
//
// 1. Compaction: at::nonzero of the mask gives the active positions (n * Ho * Wo + pixel),
//    and a slot map (per output position, its row among them or -1) is scattered from it.
// 2. groups == 1: a gather kernel writes the column matrix of the active rows only
//    (rows x K, K = (c, ky, kx) like weight.reshape(C_out, K); zero outside the image), and
//    cuBLAS multiplies it through at::addmm. Depthwise: one thread per (row, channel) sums
//    its taps directly (no reduction over channels, so no GEMM).
// 3. A scatter-merge kernel writes every output element once, in the output's memory order:
//    the nearest-upsampled prev (index rules of csrc/index_rules.h, as topdown_merge) or 0, and
//    at active positions T(conv) * mask + that, in the accumulation type, rounded once:
//    topdown_merge's arithmetic. Inactive positions are thus bit-identical to the upsampled prev.
// Above dense_crossover_density the dense composition runs instead. Tensors are addressed
// through their (n, c, y, x) strides, so NCHW and channels_last share the kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../index_rules.h"
#include "../masked_conv2d.h"

namespace aim_kernels {
namespace {

constexpr int kThreads = 256;

struct Strides {
  int64_t n, c, y, x;
};

Strides strides_of(const at::Tensor& t) { return Strides{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Input offset of tap (ky, kx) of active position pos, or -1 outside the image (padding).
__device__ __forceinline__ int64_t tap_offset(int64_t pos, int64_t ky, int64_t kx, const ConvGeometry& g, Strides xs) {
  const int64_t HoWo = g.Ho * g.Wo;
  const int64_t n = pos / HoWo, pixel = pos - n * HoWo;
  const int64_t oy = pixel / g.Wo, ox = pixel - oy * g.Wo;
  const int64_t iy = oy * g.sh - g.ph + ky * g.dh, ix = ox * g.sw - g.pw + kx * g.dw;
  if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) return -1;
  return n * xs.n + iy * xs.y + ix * xs.x;
}

__global__ void slot_map_kernel(int32_t* slot, const int64_t* active, int64_t rows) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j < rows) slot[active[j]] = static_cast<int32_t>(j);
}

template <typename T>
__global__ void gather_columns_kernel(T* cols, const T* x, const int64_t* active, int64_t rows, ConvGeometry g, Strides xs) {
  const int64_t taps = g.kh * g.kw, K = g.C * taps;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * K) return;
  const int64_t r = i / K, k = i - r * K;
  const int64_t c = k / taps, t = k - c * taps;
  const int64_t off = tap_offset(active[r], t / g.kw, t % g.kw, g, xs);
  cols[i] = off < 0 ? T(0) : x[off + c * xs.c];
}

template <typename T>
__global__ void depthwise_kernel(T* conv, const T* x, const T* weight, const T* bias, const int64_t* active, int64_t rows,
                                 ConvGeometry g, Strides xs) {
  using acc_t = at::opmath_type<T>;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * g.C) return;
  const int64_t r = i / g.C, c = i - r * g.C;  // (rows x C): consecutive threads, consecutive channels
  acc_t sum = bias ? acc_t(bias[c]) : acc_t(0);
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t off = tap_offset(active[r], ky, kx, g, xs);
      if (off >= 0) sum += acc_t(x[off + c * xs.c]) * acc_t(weight[(c * g.kh + ky) * g.kw + kx]);
    }
  }
  conv[i] = T(sum);
}

// One thread per output element, in the output's memory order. conv: (rows x C_out).
template <typename T, bool kChannelsLast>
__global__ void scatter_merge_kernel(T* out, const T* conv, const T* mask, const T* prev, const int32_t* slot, ConvGeometry g,
                                     Strides ps) {
  using acc_t = at::opmath_type<T>;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t HoWo = g.Ho * g.Wo;
  if (i >= g.N * g.Cout * HoWo) return;
  int64_t n, co, pixel;
  if (kChannelsLast) {
    const int64_t pos = i / g.Cout;
    co = i - pos * g.Cout, n = pos / HoWo, pixel = pos - n * HoWo;
  } else {
    const int64_t plane = i / HoWo;
    pixel = i - plane * HoWo, n = plane / g.Cout, co = plane - n * g.Cout;
  }
  const int64_t y = pixel / g.Wo, x = pixel - y * g.Wo;
  acc_t p = acc_t(0);
  if (prev) {
    const int64_t sy = nearest_source_index(y, g.hs, g.Ho), sx = nearest_source_index(x, g.ws, g.Wo);
    p = acc_t(prev[n * ps.n + co * ps.c + sy * ps.y + sx * ps.x]);
  }
  const int64_t pos = n * HoWo + pixel;
  const int32_t j = slot[pos];
  out[i] = j < 0 ? T(p) : T(acc_t(conv[j * g.Cout + co]) * acc_t(mask[pos]) + p);
}

unsigned blocks_for(int64_t work) { return static_cast<unsigned>((work + kThreads - 1) / kThreads); }

at::Tensor masked_conv2d_cuda(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& mask_in, const std::optional<at::Tensor>& prev_in, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g = conv_geometry(x_in, weight, bias, mask_in, prev_in, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside are not recorded
  const at::MemoryFormat fmt = output_memory_format(x_in);
  at::Tensor out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const double dense_above = dense_crossover_density(g, fmt == at::MemoryFormat::ChannelsLast, true);
  if (dense_above <= 0) return masked_conv2d_dense(x_in, weight, bias, mask_in, prev_in, stride, padding, dilation, groups);
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor active = at::nonzero(mask.reshape({-1}) != 0).reshape({-1});  // NaN is active, as in the dense result
  const int64_t rows = active.numel();  // nonzero synchronizes: the count is known here
  if (static_cast<double>(rows) > dense_above * static_cast<double>(g.positions())) {
    return masked_conv2d_dense(x_in, weight, bias, mask_in, prev_in, stride, padding, dilation, groups);
  }
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor prev = g.has_prev ? prev_in->contiguous(fmt) : at::Tensor();
  const at::Tensor slot = at::full({g.positions()}, -1, x.options().dtype(at::kInt));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (rows > 0) {
    slot_map_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(slot.mutable_data_ptr<int32_t>(), active.const_data_ptr<int64_t>(), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_cuda", [&] {
    at::Tensor conv = at::empty({rows, g.Cout}, x.options());
    if (rows > 0 && g.depthwise) {
      const at::Tensor w = weight.contiguous();
      depthwise_kernel<scalar_t><<<blocks_for(rows * g.C), kThreads, 0, stream>>>(
          conv.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          bias.has_value() ? bias->contiguous().const_data_ptr<scalar_t>() : nullptr, active.const_data_ptr<int64_t>(), rows,
          g, strides_of(x));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (rows > 0) {
      const int64_t K = g.C * g.taps();
      at::Tensor cols = at::empty({rows, K}, x.options());
      gather_columns_kernel<scalar_t><<<blocks_for(rows * K), kThreads, 0, stream>>>(
          cols.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), active.const_data_ptr<int64_t>(), rows, g,
          strides_of(x));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor w = weight.reshape({g.Cout, K}).t();
      if (bias.has_value()) at::addmm_out(conv, *bias, cols, w); else at::mm_out(conv, cols, w);
    }
    const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
    auto merge = channels_last ? scatter_merge_kernel<scalar_t, true> : scatter_merge_kernel<scalar_t, false>;
    merge<<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(), conv.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(),
        g.has_prev ? prev.const_data_ptr<scalar_t>() : nullptr, slot.const_data_ptr<int32_t>(), g,
        g.has_prev ? strides_of(prev) : Strides{0, 0, 0, 0});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aim_kernels, CUDA, m) { m.impl("masked_conv2d", &masked_conv2d_cuda); }

}  // namespace aim_kernels
