// Scalar math and x86 helpers shared by the CPU kernels: exp of non-positive arguments
// (softmax, SiLU; each vec_isa.h Vec has the same polynomial in its lanes), the upper-register
// clearing every AVX entry point ends with, and the AVX2 feature test.
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
// (masked keys are -inf). Relative error ~2e-7.
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
