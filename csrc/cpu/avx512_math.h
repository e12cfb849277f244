// AVX-512 float32 log for the CPU gumbel_binarize kernels, in a header of its own so that
// tests/test_gumbel_avx512_log.py can compile it into a small program and check it against
// philox::portable_log on every possible noise word.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "../philox.h"

namespace aim_kernels {

#define AIM_AVX512_TARGET __attribute__((target("avx512f,avx512dq,fma")))

// Natural log of positive normal floats: Cephes logf (the polynomial of philox::portable_log)
// with FMA, the exponent and mantissa from vgetexpps/vgetmantps. Within ~2 ulp, but not
// bit-identical to portable_log (FMA rounds once where portable_log rounds twice).
AIM_AVX512_TARGET inline __m512 log_avx512(__m512 x) {
  // x = m 2^e with m in [sqrt(1/2), sqrt(2)): getmant gives [0.5, 1), doubled below sqrt(1/2).
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p5_1, _MM_MANT_SIGN_src);
  __m512 e = _mm512_add_ps(_mm512_getexp_ps(x), _mm512_set1_ps(1.0f));
  const __mmask16 small = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  m = _mm512_mask_add_ps(m, small, m, m);
  e = _mm512_mask_sub_ps(e, small, e, _mm512_set1_ps(1.0f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 p = _mm512_set1_ps(7.0376836292e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.1514610310e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.1676998740e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.2420140846e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.4249322787e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.6668057665e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.0000714765e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-2.4999993993e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(3.3333331174e-1f));
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, f), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(philox::kLn2Lo), y);
  y = _mm512_fmadd_ps(z, _mm512_set1_ps(-0.5f), y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(philox::kLn2Hi), _mm512_add_ps(f, y));
}

}  // namespace aim_kernels
#endif
