// gumbel_binarize on CPU: hard Gumbel mask forward and straight-through backward, the
// logistic noise generated in-kernel from csrc/philox.h and recomputed in backward.
//
// Work is cut into tiles of whole Philox blocks. A tile first fills small buffers with its
// Philox words and their noise (SIMD loops, see AIM_SIMD_CLONES), then a loop applies the
// noise to the tile's elements in their dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../gumbel_binarize.h"
#include "../philox.h"

namespace aim_kernels {
namespace {

constexpr int64_t kTileBlocks = 512;  // 2048 positions, an 8 KB noise buffer per task
// Split across threads only from 16 tiles (32K elements, ATen's own grain size) up: below
// that, waking a second thread costs more than the work.
constexpr int64_t kParallelGrainTiles = 16;

// Compiled for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and the baseline; the loader picks one
// by CPU. -ffp-contract=off still holds in every clone: no FMA, the stream stays exact.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AIM_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AIM_SIMD_CLONES
#endif

// Philox words of blocks first_block .. first_block + count - 1 (count <= kTileBlocks), four
// per block in stream order. 32-bit lanes only (the block index as its low word plus a
// carry into the high word), so the vectorized loop carries no 64-bit lanes.
AIM_SIMD_CLONES void fill_words(uint64_t seed, uint64_t first_block, int64_t count, uint32_t* __restrict__ out) {
  const uint32_t base_lo = static_cast<uint32_t>(first_block), base_hi = static_cast<uint32_t>(first_block >> 32);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  // int64 index: with -fwrapv an int32 4 * i may wrap, and the stores stop looking contiguous.
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t c0 = base_lo + static_cast<uint32_t>(i);
    const uint32_t c1 = base_hi + (c0 < base_lo ? 1u : 0u);
    const philox::Words w = philox::philox4x32_10(c0, c1, 0u, 0u, k0, k1);
    out[4 * i + 0] = w.w0;
    out[4 * i + 1] = w.w1;
    out[4 * i + 2] = w.w2;
    out[4 * i + 3] = w.w3;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define AIM_AVX512_PHILOX 1
// The same words with AVX-512 intrinsics, 16 blocks per step: compilers vectorize
// fill_words' 32x32->64-bit products poorly, and this runs it about twice as fast. Each
// vector lane is one block: the products of even and odd 32-bit lanes come from two
// _mm512_mul_epu32 and are blended back into hi/lo words; the four word vectors are then
// transposed so that each block's four words are stored consecutively (stream order).
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

__attribute__((target("avx512f"))) void fill_words_avx512(uint64_t seed, uint64_t first_block, int64_t count,
                                                         uint32_t* __restrict__ out) {
  const uint32_t base_lo = static_cast<uint32_t>(first_block), base_hi = static_cast<uint32_t>(first_block >> 32);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(philox::kM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(philox::kM1));
  const __m512i lo_v = _mm512_set1_epi32(static_cast<int>(base_lo)), hi_v = _mm512_set1_epi32(static_cast<int>(base_hi));
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base_lo + static_cast<uint32_t>(i))), iota);
    __m512i c1 = _mm512_mask_add_epi32(hi_v, _mm512_cmplt_epu32_mask(c0, lo_v), hi_v, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      if (r > 0) {
        k0 += philox::kW0;
        k1 += philox::kW1;
      }
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0, m0, hi0, lo0);
      mulhilo16(c2, m1, hi1, lo1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
      c1 = lo1;
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
      c3 = lo0;
    }
    // 128-bit lane k of u_j holds block 4k + j's four words; regroup to blocks 0-3, 4-7, ...
    const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
    const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
    const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
    const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
    const __m512i a01 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i a23 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i b01 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i b23 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));
    uint32_t* o = out + 4 * i;
    _mm512_storeu_si512(o, _mm512_shuffle_i32x4(a01, a23, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512(o + 16, _mm512_shuffle_i32x4(a01, a23, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_si512(o + 32, _mm512_shuffle_i32x4(b01, b23, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512(o + 48, _mm512_shuffle_i32x4(b01, b23, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  fill_words(seed, first_block + static_cast<uint64_t>(i), count - i, out + 4 * i);
}
#endif

void fill_words_fastest(uint64_t seed, uint64_t first_block, int64_t count, uint32_t* out) {
#if defined(AIM_AVX512_PHILOX)
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  if (has_avx512) return fill_words_avx512(seed, first_block, count, out);
#endif
  fill_words(seed, first_block, count, out);
}

// Logistic noise of n words. A separate pass: fused with fill_words the interleaved float
// stores made the loop slower than the two passes together.
AIM_SIMD_CLONES void words_to_noise(const uint32_t* __restrict__ words, int64_t n, float* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = philox::logistic_noise(words[i]);
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
    at::parallel_for(0, (numel + tile - 1) / tile, kParallelGrainTiles, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) fn(t * tile, std::min(numel, (t + 1) * tile), zeros);
    });
    return;
  }
  const StreamRange range = stream_range(offset, numel);
  const int64_t tiles = (range.blocks + kTileBlocks - 1) / kTileBlocks;
  at::parallel_for(0, tiles, kParallelGrainTiles, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t words[4 * kTileBlocks];
    alignas(64) float noise[4 * kTileBlocks];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = t * kTileBlocks, count = std::min(kTileBlocks, range.blocks - b0);
      fill_words_fastest(seed, range.first_block + static_cast<uint64_t>(b0), count, words);
      words_to_noise(words, 4 * count, noise);
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
  const auto fmt = output_memory_format(logits_in);
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
  const auto fmt = output_memory_format(logits_in);
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
