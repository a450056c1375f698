// Vector math shared by the CPU kernels: exp of non-positive arguments (softmax, SiLU) in a
// scalar form and an AVX2+FMA form, and the run-time choice between them (by CPU feature).
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace skipgpt::cpu {

// exp for x <= 0 (Cephes-style polynomial after range reduction); exactly 0 below -87
// (masked keys are -inf). Relative error ~2e-7. Scalar form, and an AVX2 form for 8 lanes.
inline float exp_nonpos(float x) {
  const bool tiny = x < -87.0f;
  x = std::max(x, -87.0f);
  const float t = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - t * 0.693145751953125f - t * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(t) + 127) << 23);
  return tiny ? 0.0f : p * scale;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpos_avx2(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(t, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(t, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(t), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Leaves the upper halves of the vector registers clean (vzeroupper). Every AVX entry point
// calls it before returning to, or tail-calling, code built for the baseline ISA: GCC 12
// dropped the vzeroupper before a tail call, and the dirty state then made MKL's SSE GEMV path
// (what sgemv takes on this AMD CPU) run 2x slower for the rest of the process.
__attribute__((target("avx"))) inline void clear_upper_avx() { _mm256_zeroupper(); }

#endif

// Chosen once by CPU feature (not CPU model: an AVX2 AMD EPYC must get the AVX2 path).
inline bool use_avx2() {
#if defined(__x86_64__)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

}  // namespace skipgpt::cpu
