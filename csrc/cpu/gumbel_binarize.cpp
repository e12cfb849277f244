// gumbel_binarize on CPU: hard Gumbel mask forward and straight-through backward, the
// logistic noise generated in-kernel from csrc/philox.h and recomputed in backward.
//
// Work is cut into tiles of whole Philox blocks. A tile first fills a small buffer with its
// Philox words (AVX-512 intrinsics where available), then either the exact noise (SIMD
// loops, see AIM_SIMD_CLONES) is applied to the tile's elements in their dtype, or, for
// float32 with AVX-512, fused loops go from the words straight to the mask
// (mask_f32_avx512) or the gradient (st_grad_f32_avx512, also used for the half types).
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
#include "avx512_math.h"

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
// The same words with AVX-512 intrinsics: compilers vectorize fill_words' 32x32->64-bit
// products poorly. Each 64-bit lane carries one block, its counter words in the low 32
// bits: _mm512_mul_epu32 reads only those, so one instruction gives both halves of eight
// products (lo = low half, hi = high half shifted down), and the high halves of the state
// are don't-care bits that no product or stored word ever reads. Three-way XORs are one
// vpternlogd. Four groups of eight blocks per step keep the multiplier busy.
constexpr int kGroups = 4, kLanes = 8;

struct PhiloxState {
  __m512i c0, c1, c2, c3;
};

__attribute__((target("avx512f"))) inline __m512i xor3(__m512i a, __m512i b, __m512i c) {
  return _mm512_ternarylogic_epi32(a, b, c, 0x96);
}

__attribute__((target("avx512f"))) void fill_words_avx512(uint64_t seed, uint64_t first_block, int64_t count,
                                                         uint32_t* __restrict__ out) {
  const __m512i m0 = _mm512_set1_epi64(philox::kM0), m1 = _mm512_set1_epi64(philox::kM1);
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i k0[10], k1[10];  // the key schedule, one vector per round
  uint32_t s0 = static_cast<uint32_t>(seed), s1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r, s0 += philox::kW0, s1 += philox::kW1) {
    k0[r] = _mm512_set1_epi32(static_cast<int>(s0));
    k1[r] = _mm512_set1_epi32(static_cast<int>(s1));
  }
  // Words (w0, w1) and (w2, w3) of a lane's block side by side, then blocks 0-3 and 4-7.
  const __m512i pair_idx = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
  const __m512i low_blocks = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i high_blocks = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  int64_t i = 0;
  for (; i + kGroups * kLanes <= count; i += kGroups * kLanes) {
    PhiloxState s[kGroups];
    for (int g = 0; g < kGroups; ++g) {
      // Round 0 with c2 = c3 = 0: the c2 product is zero.
      const uint64_t first = first_block + static_cast<uint64_t>(i + kLanes * g);
      const __m512i block = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(first)), iota);
      const __m512i p0 = _mm512_mul_epu32(block, m0);
      s[g].c0 = _mm512_xor_si512(_mm512_srli_epi64(block, 32), k0[0]);
      s[g].c1 = _mm512_setzero_si512();
      s[g].c2 = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), k1[0]);
      s[g].c3 = p0;
    }
    for (int r = 1; r < 10; ++r) {
      for (int g = 0; g < kGroups; ++g) {
        const __m512i p0 = _mm512_mul_epu32(s[g].c0, m0), p1 = _mm512_mul_epu32(s[g].c2, m1);
        s[g].c0 = xor3(_mm512_srli_epi64(p1, 32), s[g].c1, k0[r]);
        s[g].c2 = xor3(_mm512_srli_epi64(p0, 32), s[g].c3, k1[r]);
        s[g].c1 = p1;
        s[g].c3 = p0;
      }
    }
    for (int g = 0; g < kGroups; ++g) {
      const __m512i w01 = _mm512_permutex2var_epi32(s[g].c0, pair_idx, s[g].c1);
      const __m512i w23 = _mm512_permutex2var_epi32(s[g].c2, pair_idx, s[g].c3);
      uint32_t* o = out + 4 * (i + kLanes * g);
      _mm512_storeu_si512(o, _mm512_permutex2var_epi64(w01, low_blocks, w23));
      _mm512_storeu_si512(o + 16, _mm512_permutex2var_epi64(w01, high_blocks, w23));
    }
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

#if defined(AIM_AVX512_PHILOX)
// Forward mask of count float32 elements from their Philox words, exactly
// (a + noise >= 0 with noise = philox::logistic_noise(word)) but mostly without the exact
// noise: log_avx512 of the same q (one correctly rounded division, so the same value as in
// logistic_noise) is within 4.8e-7 (about kMaskMargin / 200) of portable_log(q) for every
// one of the 2^23 possible words (tests/test_gumbel_avx512_log.py checks them all), so
// a >= (kMaskMargin - approx) already means a + noise > 0 and a < (-kMaskMargin - approx)
// means a + noise < 0 (the subtraction adds at most one rounding of 2^-20 at |noise| < 16.7).
// The rare lanes in between (about 5e-5 of them) take the exact scalar noise.
constexpr float kMaskMargin = 1e-4f;

AIM_AVX512_TARGET void mask_f32_avx512(const uint32_t* __restrict__ words, const float* __restrict__ a,
                                       float* __restrict__ out, int64_t count) {
  constexpr int64_t kChunk = 256;  // two passes per chunk, as in st_grad_f32_avx512
  const __m512 margin = _mm512_set1_ps(kMaskMargin), neg_margin = _mm512_set1_ps(-kMaskMargin);
  const __m512 one = _mm512_set1_ps(1.0f);
  alignas(64) float approx[kChunk];
  for (int64_t c = 0; c < count; c += kChunk) {
    const int64_t n = std::min(kChunk, count - c);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 live = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
      const __m512i num = _mm512_or_si512(_mm512_srli_epi32(_mm512_maskz_loadu_epi32(live, words + c + i), 8),
                                          _mm512_set1_epi32(1));
      const __m512i den = _mm512_sub_epi32(_mm512_set1_epi32(1 << 24), num);
      _mm512_store_ps(approx + i, log_avx512(_mm512_div_ps(_mm512_cvtepi32_ps(num), _mm512_cvtepi32_ps(den))));
    }
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 live = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
      const __m512 x = _mm512_maskz_loadu_ps(live, a + c + i), noise = _mm512_load_ps(approx + i);
      const __mmask16 one_for_sure = _mm512_cmp_ps_mask(x, _mm512_sub_ps(margin, noise), _CMP_GE_OQ);
      const __mmask16 zero_for_sure = _mm512_cmp_ps_mask(x, _mm512_sub_ps(neg_margin, noise), _CMP_LT_OQ) |
                                      _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);  // NaN logits give 0
      _mm512_mask_storeu_ps(out + c + i, live, _mm512_maskz_mov_ps(one_for_sure, one));
      for (unsigned close = live & ~(one_for_sure | zero_for_sure); close != 0; close &= close - 1) {
        const int64_t j = c + i + __builtin_ctz(close);
        out[j] = a[j] + philox::logistic_noise(words[j]) >= 0.0f ? 1.0f : 0.0f;
      }
    }
  }
}

// The straight-through gradient of the float32 path straight from the Philox words, in
// AVX-512 with FMA: the noise is rebuilt with log_avx512, the exponential is Cephes expf with
// vscalefps, and 1/t is a multiply. No bit-exactness is promised for the gradient (only the
// noise that decides the mask is exact), so this is allowed to round differently from
// portable_log/portable_exp: both are within ~2 ulp, the gradient within float tolerance of
// the reference, at about 70% of the cost of the exact no-FMA path plus its noise pass.

// exp(x) for x in [-87, 0] (NaN passes through).
AIM_AVX512_TARGET inline __m512 exp_nonpositive_avx512(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(philox::kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(philox::kLn2Lo), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// out = g * s (1 - s) / t with s = sigmoid((a + noise) / t); words == nullptr means zero
// noise (evaluation). s (1 - s) = e / (1 + e)^2 with e = exp(-|z|) in (0, 1]: no cancellation.
// Two passes over chunks of kChunk elements (z, then the gradient): as one loop the long
// log -> exp dependency chain per vector filled the out-of-order window (40% slower).
AIM_AVX512_TARGET void st_grad_f32_avx512(const uint32_t* __restrict__ words, const float* __restrict__ a,
                                          const float* __restrict__ g, float* __restrict__ out, int64_t count,
                                          float t) {
  constexpr int64_t kChunk = 256;
  const __m512 inv_t = _mm512_set1_ps(1.0f / t);
  const __m512 neg_zero = _mm512_set1_ps(-0.0f), lowest = _mm512_set1_ps(-87.0f), one = _mm512_set1_ps(1.0f);
  alignas(64) float z_buf[kChunk];
  for (int64_t c = 0; c < count; c += kChunk) {
    const int64_t n = std::min(kChunk, count - c);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 live = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
      __m512 z = _mm512_maskz_loadu_ps(live, a + c + i);
      if (words != nullptr) {
        // q = (2k + 1) / (2^24 - 2k - 1) with k = word >> 9, as philox::logistic_noise.
        const __m512i num = _mm512_or_si512(_mm512_srli_epi32(_mm512_maskz_loadu_epi32(live, words + c + i), 8),
                                            _mm512_set1_epi32(1));
        const __m512i den = _mm512_sub_epi32(_mm512_set1_epi32(1 << 24), num);
        z = _mm512_add_ps(z, log_avx512(_mm512_div_ps(_mm512_cvtepi32_ps(num), _mm512_cvtepi32_ps(den))));
      }
      _mm512_store_ps(z_buf + i, _mm512_mul_ps(z, inv_t));
    }
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 live = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
      // -min(|z|, 87) via max(-87, -|z|); vmaxps returns its second operand for NaN: NaN stays.
      const __m512 z = _mm512_load_ps(z_buf + i);
      const __m512 e = exp_nonpositive_avx512(_mm512_max_ps(lowest, _mm512_or_ps(z, neg_zero)));
      const __m512 d = _mm512_add_ps(one, e);
      const __m512 gt = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, g + c + i), inv_t);
      _mm512_mask_storeu_ps(out + c + i, live, _mm512_div_ps(_mm512_mul_ps(gt, e), _mm512_mul_ps(d, d)));
    }
  }
}
#endif

bool use_avx512() {
#if defined(AIM_AVX512_PHILOX)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

// Calls fn(j_begin, j_end, noise) for consecutive element ranges, noise[k] being the noise
// of element j_begin + k. In evaluation the noise is zero (x + 0 >= 0 is x >= 0, NaN
// included), which keeps one branch-free loop per dtype. With kWords, fn gets the Philox
// words of those elements instead (nullptr in evaluation) and derives what it needs itself.
template <bool kWords = false, typename Fn>
void for_each_tile(int64_t numel, bool training, uint64_t seed, int64_t offset, const Fn& fn) {
  if (!training) {
    static const float zeros[4 * kTileBlocks] = {};
    const int64_t tile = 4 * kTileBlocks;
    at::parallel_for(0, (numel + tile - 1) / tile, kParallelGrainTiles, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if constexpr (kWords) {
          fn(t * tile, std::min(numel, (t + 1) * tile), static_cast<const uint32_t*>(nullptr));
        } else {
          fn(t * tile, std::min(numel, (t + 1) * tile), zeros);
        }
      }
    });
    return;
  }
  const StreamRange range = stream_range(offset, numel);
  const int64_t tiles = (range.blocks + kTileBlocks - 1) / kTileBlocks;
  at::parallel_for(0, tiles, kParallelGrainTiles, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t words[4 * kTileBlocks];
    alignas(64) float noise[kWords ? 1 : 4 * kTileBlocks];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = t * kTileBlocks, count = std::min(kTileBlocks, range.blocks - b0);
      fill_words_fastest(seed, range.first_block + static_cast<uint64_t>(b0), count, words);
      // positions 4 * b0 .. 4 * (b0 + count) of this call's stream are elements - lead ..
      const int64_t j_begin = std::max<int64_t>(0, 4 * b0 - range.lead);
      const int64_t j_end = std::min<int64_t>(numel, 4 * (b0 + count) - range.lead);
      const int64_t first = j_begin + range.lead - 4 * b0;
      if constexpr (kWords) {
        fn(j_begin, j_end, static_cast<const uint32_t*>(words + first));
      } else {
        words_to_noise(words, 4 * count, noise);
        fn(j_begin, j_end, static_cast<const float*>(noise + first));
      }
    }
  });
}

// Runs fn(a, g, out, k, n) on elements jb + k .. jb + k + n of x, g, y as float32 arrays:
// the arrays themselves for float32, tile-sized widened copies for the half types (narrowed
// back into y afterwards).
template <typename scalar_t, typename Fn>
void for_float32_chunks(const scalar_t* x, const scalar_t* g, scalar_t* y, int64_t jb, int64_t je, const Fn& fn) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    fn(x + jb, g + jb, y + jb, 0, je - jb);
  } else {
    alignas(64) float a[4 * kTileBlocks], gf[4 * kTileBlocks], r[4 * kTileBlocks];
    for (int64_t s = jb; s < je; s += 4 * kTileBlocks) {
      const int64_t n = std::min<int64_t>(4 * kTileBlocks, je - s);
      for (int64_t k = 0; k < n; ++k) {
        a[k] = float(x[s + k]);
        gf[k] = float(g[s + k]);
      }
      fn(a, gf, r, s - jb, n);
      for (int64_t k = 0; k < n; ++k) y[s + k] = scalar_t(r[k]);
    }
  }
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
#if defined(AIM_AVX512_PHILOX)
      if (std::is_same_v<scalar_t, float> && training && use_avx512()) {
        // Generic (auto) so that the discarded `if constexpr` branch is not instantiated.
        for_each_tile<true>(numel, training, seed_value(training, seed), offset,
                            [&](auto jb, int64_t je, const uint32_t* words) {
                              if constexpr (std::is_same_v<scalar_t, float>) {
                                mask_f32_avx512(words, x + jb, y + jb, je - jb);
                              }
                            });
        return;
      }
#endif
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
      const float t = static_cast<float>(temperature);
      const uint64_t seed_bits = seed_value(training, seed);
      if constexpr (std::is_same_v<acc_t, double>) {
        for_each_tile(numel, training, seed_bits, offset, [&](int64_t jb, int64_t je, const float* noise) {
          for (int64_t j = jb; j < je; ++j) {
            const double z = (x[j] + double(noise[j - jb])) / temperature;
            y[j] = g[j] * philox::logistic_derivative(z) / temperature;
          }
        });
      } else if (use_avx512()) {
#if defined(AIM_AVX512_PHILOX)
        for_each_tile<true>(numel, training, seed_bits, offset, [&](int64_t jb, int64_t je, const uint32_t* words) {
          for_float32_chunks(x, g, y, jb, je, [&](const float* a, const float* gf, float* r, int64_t k, int64_t n) {
            st_grad_f32_avx512(words == nullptr ? nullptr : words + k, a, gf, r, n, t);
          });
        });
#endif
      } else {
        for_each_tile(numel, training, seed_bits, offset, [&](int64_t jb, int64_t je, const float* noise) {
          for_float32_chunks(x, g, y, jb, je, [&](const float* a, const float* gf, float* r, int64_t k, int64_t n) {
            st_grad_f32(a, noise + k, gf, r, n, t);
          });
        });
      }
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
