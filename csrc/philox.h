// The random stream of gumbel_binarize, written once as host/device code for the C++ CPU
// and CUDA kernels; aim_kernels/reference.py (PyTorch) and aim_kernels/triton/gumbel_binarize.py
// (Triton) implement the same definition step by step and are tested bit for bit against it.
//
// Stream definition
// -----------------
// Generator: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11; Random123's philox4x32_R
// with R = 10), 64-bit key, 128-bit counter, four 32-bit output words per counter.
//   key     k0 = low 32 bits of seed, k1 = high 32 bits of seed (seed as a uint64).
//   counter stream position n (uint64) lives in block b = n / 4, counter words
//           (c0, c1, c2, c3) = (low 32 bits of b, high 32 bits of b, 0, 0),
//           and uses output word n % 4 of that block.
// Element i of a call (row-major index) takes position n = offset + i.
// Uniform: k = word >> 9 (top 23 bits); u = (2k + 1) / 2^24, so u and 1 - u are both exact
//   float32 values in [2^-24, 1 - 2^-24]: strictly inside (0, 1), the noise always finite.
// Noise: logistic noise log(u) - log(1 - u), computed as portable_log(q) with
//   q = (2k + 1) / (2^24 - 2k - 1), one correctly rounded float32 division of two exact values.
//
// What is exact across backends
// -----------------------------
// The Philox words and u are integer/exact arithmetic. libm, CUDA and Triton logs differ in
// the last bit, so the noise does not use them: portable_log is Cephes' logf built only from
// IEEE-754 float32 +, -, *, / (correctly rounded everywhere) with bit tricks for the exponent,
// evaluated in one fixed order. Kernels must not contract a*b+c into an FMA (CPU:
// -ffp-contract=off; CUDA: the __f*_rn intrinsics below; Triton: enable_fp_fusion=False), so
// the noise, and hence the mask (logit + noise >= 0, whose sign is exact in IEEE addition),
// are bit-identical on CPU, CUDA, Triton and the PyTorch reference. The straight-through
// gradient is not bit-exact: CUDA, Triton and the C++ fallback use portable_exp the same way
// (bit-identical among themselves), the C++ AVX-512 path FMA log/exp (faster, also within
// 2 ulp), the reference torch.sigmoid; they agree within float tolerance.
#pragma once

#include <cstdint>
#include <cstring>

#include "index_rules.h"  // AIM_HOST_DEVICE

namespace aim_kernels {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key schedule increments

struct Words {
  uint32_t w0, w1, w2, w3;
};

AIM_HOST_DEVICE uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
AIM_HOST_DEVICE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint32_t hi0 = mulhi(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mulhi(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return {c0, c1, c2, c3};
}

// The four words of stream block b (positions 4b .. 4b + 3) for a 64-bit seed.
AIM_HOST_DEVICE Words stream_block(uint64_t seed, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// IEEE float32 operations that are never fused, on any compiler flags.
AIM_HOST_DEVICE float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
AIM_HOST_DEVICE float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
AIM_HOST_DEVICE float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
AIM_HOST_DEVICE uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}
AIM_HOST_DEVICE float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// ln 2 split so that e * kLn2Hi is exact for |e| < 2^9 (Cephes).
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;

// Natural log of a positive normal float (Cephes logf, within 2 ulp), exactly as
// reference.portable_log.
AIM_HOST_DEVICE float portable_log(float x) {
  const uint32_t bits = bits_of(x);
  const uint32_t mantissa = bits & 0x007FFFFFu;
  // x = m * 2^e with m in [0.5, 1); below sqrt(1/2) (0x3F3504F3) take 2m in [1, sqrt 2) and
  // e - 1 instead. Decided and applied on the bits (the same values as comparing m and
  // computing m + m), because a float compare-and-select keeps AVX2 compilers from vectorizing.
  const bool small = mantissa < 0x003504F3u;
  const int32_t e = static_cast<int32_t>(bits >> 23) - (small ? 127 : 126);
  const float m = add(float_of(mantissa | (small ? 0x3F800000u : 0x3F000000u)), -1.0f);  // exact (Sterbenz)
  const float z = mul(m, m);
  float p = 7.0376836292e-2f;
  p = add(mul(p, m), -1.1514610310e-1f);
  p = add(mul(p, m), 1.1676998740e-1f);
  p = add(mul(p, m), -1.2420140846e-1f);
  p = add(mul(p, m), 1.4249322787e-1f);
  p = add(mul(p, m), -1.6668057665e-1f);
  p = add(mul(p, m), 2.0000714765e-1f);
  p = add(mul(p, m), -2.4999993993e-1f);
  p = add(mul(p, m), 3.3333331174e-1f);
  float y = mul(mul(p, m), z);
  const float fe = static_cast<float>(e);
  y = add(y, mul(fe, kLn2Lo));
  y = add(y, mul(z, -0.5f));
  const float r = add(m, y);
  return add(r, mul(fe, kLn2Hi));
}

// Logistic noise log(u) - log(1 - u) of one Philox word (see the stream definition above).
AIM_HOST_DEVICE float logistic_noise(uint32_t word) {
  // Through int32 (values < 2^24, exact): uint32-to-float has no AVX2 instruction.
  const int32_t k = static_cast<int32_t>(word >> 9);
  const float num = static_cast<float>(2 * k + 1);
  const float den = static_cast<float>((1 << 24) - 2 * k - 1);
  return portable_log(div(num, den));
}

// exp(-|z|) (Cephes expf, within 2 ulp) with |z| clamped to 87, where 2^n stays a normal
// float; NaN is taken as 87 too, so the float-to-int conversion below is always defined.
// The clamp is an integer min on |z|'s bits: a float compare there makes compilers branch
// and stop vectorizing.
AIM_HOST_DEVICE float portable_exp_neg_abs(float z) {
  const uint32_t abs_bits = bits_of(z) & 0x7FFFFFFFu;
  float x = float_of((abs_bits < 0x42AE0000u ? abs_bits : 0x42AE0000u) | 0x80000000u);  // -min(|z|, 87)
  // n = floor(x / ln 2 + 1/2) in [-126, 0], floor as truncation plus a correction (which,
  // unlike floorf, compilers vectorize without -fno-trapping-math).
  const float t = add(mul(x, 1.44269504088896341f), 0.5f);
  int32_t ni = static_cast<int32_t>(t);
  ni -= static_cast<float>(ni) > t ? 1 : 0;
  const float n = static_cast<float>(ni);
  float r = add(x, -mul(n, kLn2Hi));
  r = add(r, -mul(n, kLn2Lo));
  const float r2 = mul(r, r);
  float p = 1.9875691500e-4f;
  p = add(mul(p, r), 1.3981999507e-3f);
  p = add(mul(p, r), 8.3334519073e-3f);
  p = add(mul(p, r), 4.1665795894e-2f);
  p = add(mul(p, r), 1.6666665459e-1f);
  p = add(mul(p, r), 5.0000001201e-1f);
  p = add(add(mul(p, r2), r), 1.0f);
  const float scale = float_of(static_cast<uint32_t>(ni + 127) << 23);
  return mul(p, scale);
}

// d sigmoid(z) / dz = sigmoid(z) (1 - sigmoid(z)) = e / (1 + e)^2 with e = exp(-|z|) in (0, 1]:
// no cancellation in either tail. NaN z gives NaN. Branch-free, so loops over it vectorize.
AIM_HOST_DEVICE float logistic_derivative(float z) {
  const float e = portable_exp_neg_abs(z);
  const float d = add(1.0f, e);
  const float out = div(e, mul(d, d));
  const uint32_t nan_mask = 0u - static_cast<uint32_t>(z != z);  // all ones for NaN z: pass it through
  return float_of((bits_of(z) & nan_mask) | (bits_of(out) & ~nan_mask));
}

// float64 version (gradcheck precision): the platform exp; not part of the bit-exact contract.
AIM_HOST_DEVICE double logistic_derivative(double z) {
  const double e = exp(z > 0.0 ? -z : z);
  return e / ((1.0 + e) * (1.0 + e));
}

}  // namespace philox
}  // namespace aim_kernels
