// gumbel_binarize on CPU: hard Gumbel mask forward and straight-through backward, the
// logistic noise generated in-kernel from csrc/philox.h and recomputed in backward.
//
// Work is cut into tiles of whole Philox blocks. A tile first fills a small float buffer
// with its noise (fill_noise: Philox + portable_log, compiled for AVX-512/AVX2/baseline and
// picked at load time, so the integer rounds and the log polynomial run in SIMD lanes),
// then a second loop applies it to the tile's elements in their dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../gumbel_binarize.h"
#include "../philox.h"

namespace aim_kernels {
namespace {

constexpr int64_t kTileBlocks = 512;  // 2048 positions, an 8 KB noise buffer per task

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AIM_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AIM_SIMD_CLONES
#endif

// Noise of the 4 * count positions of blocks first_block .. first_block + count - 1.
AIM_SIMD_CLONES void fill_noise(uint64_t seed, uint64_t first_block, int64_t count, float* __restrict__ out) {
  for (int64_t i = 0; i < count; ++i) {
    const philox::Words w = philox::stream_block(seed, first_block + static_cast<uint64_t>(i));
    out[4 * i + 0] = philox::logistic_noise(w.w0);
    out[4 * i + 1] = philox::logistic_noise(w.w1);
    out[4 * i + 2] = philox::logistic_noise(w.w2);
    out[4 * i + 3] = philox::logistic_noise(w.w3);
  }
}

// Straight-through gradient of count elements in float32: the portable_exp path.
AIM_SIMD_CLONES void st_grad_f32(const float* __restrict__ a, const float* __restrict__ noise,
                                 const float* __restrict__ g, float* __restrict__ out, int64_t count, float t) {
  for (int64_t i = 0; i < count; ++i) {
    const float z = philox::div(philox::add(a[i], noise[i]), t);
    out[i] = philox::div(philox::mul(g[i], philox::logistic_derivative(z)), t);
  }
}

// Calls fn(j_begin, j_end, noise) for consecutive element ranges, noise[k] being the noise
// of element j_begin + k. In evaluation the noise is zero (x + 0 >= 0 is x >= 0, NaN
// included), which keeps one branch-free loop per dtype.
template <typename Fn>
void for_each_tile(int64_t numel, bool training, uint64_t seed, int64_t offset, const Fn& fn) {
  if (!training) {
    static const float zeros[4 * kTileBlocks] = {};
    const int64_t tile = 4 * kTileBlocks;
    at::parallel_for(0, (numel + tile - 1) / tile, 4, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) fn(t * tile, std::min(numel, (t + 1) * tile), zeros);
    });
    return;
  }
  const StreamRange range = stream_range(offset, numel);
  const int64_t tiles = (range.blocks + kTileBlocks - 1) / kTileBlocks;
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    alignas(64) float noise[4 * kTileBlocks];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = t * kTileBlocks, count = std::min(kTileBlocks, range.blocks - b0);
      fill_noise(seed, range.first_block + static_cast<uint64_t>(b0), count, noise);
      // positions 4 * b0 .. 4 * (b0 + count) of this call's stream are elements - lead ..
      const int64_t j_begin = std::max<int64_t>(0, 4 * b0 - range.lead);
      const int64_t j_end = std::min<int64_t>(numel, 4 * (b0 + count) - range.lead);
      fn(j_begin, j_end, noise + (j_begin + range.lead - 4 * b0));
    }
  });
}

uint64_t seed_value(bool training, const std::optional<at::Tensor>& seed) {
  return training ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
}

at::Tensor gumbel_binarize_cpu(const at::Tensor& logits_in, double temperature, bool training,
                               const std::optional<at::Tensor>& seed, int64_t offset) {
  check_gumbel_inputs("gumbel_binarize", logits_in, temperature, training, seed, offset);
  const auto fmt = merge_memory_format(logits_in);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  const int64_t numel = logits.numel();
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gumbel_binarize_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      scalar_t* y = out.mutable_data_ptr<scalar_t>();
      for_each_tile(numel, training, seed_value(training, seed), offset, [&](int64_t jb, int64_t je, const float* noise) {
        // The sign of an IEEE sum is exact, so this is the same decision on every backend.
        for (int64_t j = jb; j < je; ++j) y[j] = scalar_t(acc_t(x[j]) + acc_t(noise[j - jb]) >= acc_t(0) ? 1 : 0);
      });
    });
  }
  return fmt == at::MemoryFormat::Contiguous ? out : out.contiguous(fmt);
}

at::Tensor gumbel_binarize_backward_cpu(const at::Tensor& grad_in, const at::Tensor& logits_in, double temperature,
                                        bool training, const std::optional<at::Tensor>& seed, int64_t offset) {
  check_gumbel_inputs("gumbel_binarize_backward", logits_in, temperature, training, seed, offset);
  TORCH_CHECK(grad_in.sizes() == logits_in.sizes(), "gumbel_binarize_backward: grad_out ", grad_in.sizes(),
              " must match logits ", logits_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == logits_in.scalar_type(), "gumbel_binarize_backward: grad_out dtype ",
              grad_in.scalar_type(), " != logits dtype ", logits_in.scalar_type());
  const auto fmt = merge_memory_format(logits_in);
  const at::Tensor logits = logits_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  const int64_t numel = logits.numel();
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gumbel_binarize_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      scalar_t* y = out.mutable_data_ptr<scalar_t>();
      // Generic (auto) so that the discarded `if constexpr` branches are not instantiated.
      for_each_tile(numel, training, seed_value(training, seed), offset, [&](auto jb, int64_t je, const float* noise) {
        if constexpr (std::is_same_v<acc_t, double>) {
          const double t = temperature;
          for (int64_t j = jb; j < je; ++j) {
            const double z = (x[j] + double(noise[j - jb])) / t;
            y[j] = g[j] * philox::logistic_derivative(z) / t;
          }
        } else if constexpr (std::is_same_v<scalar_t, float>) {
          st_grad_f32(x + jb, noise, g + jb, y + jb, je - jb, static_cast<float>(temperature));
        } else {
          // Half types: widen a tile's worth to float32, run the float32 path, narrow.
          alignas(64) float a[4 * kTileBlocks], gf[4 * kTileBlocks], r[4 * kTileBlocks];
          for (int64_t s = jb; s < je; s += 4 * kTileBlocks) {
            const int64_t n = std::min<int64_t>(4 * kTileBlocks, je - s);
            for (int64_t k = 0; k < n; ++k) {
              a[k] = float(x[s + k]);
              gf[k] = float(g[s + k]);
            }
            st_grad_f32(a, noise + (s - jb), gf, r, n, static_cast<float>(temperature));
            for (int64_t k = 0; k < n; ++k) y[s + k] = scalar_t(r[k]);
          }
        }
      });
    });
  }
  return fmt == at::MemoryFormat::Contiguous ? out : out.contiguous(fmt);
}

}  // namespace

TORCH_LIBRARY_IMPL(aim_kernels, CPU, m) {
  m.impl("gumbel_binarize", &gumbel_binarize_cpu);
  m.impl("gumbel_binarize_backward", &gumbel_binarize_backward_cpu);
}

}  // namespace aim_kernels
