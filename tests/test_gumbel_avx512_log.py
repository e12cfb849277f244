"""The float32 CPU forward decides the mask from csrc/cpu/avx512_math.h's log_avx512 with a
margin of 1e-4 (csrc/cpu/gumbel_binarize.cpp, kMaskMargin) and takes the exact noise only
for elements closer than that. That is exact only if log_avx512(q) stays well within the
margin of philox::portable_log(q) for every q the stream can produce: this compiles a small
program against the two headers and checks all 2**23 possible values of k = word >> 9."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK_MARGIN = 1e-4

PROGRAM = r"""
#include <cmath>
#include <cstdio>
#include "csrc/cpu/avx512_math.h"
using namespace aim_kernels;
AIM_AVX512_TARGET double worst() {
  double w = 0;
  alignas(64) float approx[16];
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (uint32_t k0 = 0; k0 < (1u << 23); k0 += 16) {
    // The q of gumbel_binarize.cpp's mask_f32_avx512 for words (k0 + lane) << 9.
    const __m512i num = _mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(_mm512_set1_epi32(k0), lane), 1),
                                        _mm512_set1_epi32(1));
    const __m512i den = _mm512_sub_epi32(_mm512_set1_epi32(1 << 24), num);
    _mm512_store_ps(approx, log_avx512(_mm512_div_ps(_mm512_cvtepi32_ps(num), _mm512_cvtepi32_ps(den))));
    for (uint32_t l = 0; l < 16; ++l)
      w = std::fmax(w, std::fabs(double(approx[l]) - double(philox::logistic_noise((k0 + l) << 9))));
  }
  return w;
}
int main() {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512dq")) return 77;
  std::printf("%.9g\n", worst());
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_log_avx512_within_margin_of_portable_log_for_every_word(tmp_path):
    source, binary = tmp_path / "check.cpp", tmp_path / "check"
    source.write_text(PROGRAM)
    subprocess.run(["g++", "-O2", "-std=c++20", "-ffp-contract=off", f"-I{ROOT}", str(source), "-o", str(binary)],
                   check=True, capture_output=True, timeout=120)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    if result.returncode == 77:
        pytest.skip("CPU without AVX-512 (the kernel does not use log_avx512 there)")
    assert result.returncode == 0, result.stderr
    worst = float(result.stdout)
    # The decision adds one float32 rounding of |noise| < 16.7 (2**-20); keep a wide safety factor.
    assert worst + 2**-20 < MASK_MARGIN / 10, worst
