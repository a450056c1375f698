// One vector interface (`Vec`: fp32 lanes, loads that widen bf16/fp16, FMA, reductions, exp)
// per x86 instruction set, so a kernel is written once and compiled once per ISA: between
// SKIPGPT_BEGIN_AVX512 / SKIPGPT_END_ISA every function is built for AVX-512 and
// `avx512_vec::Vec` is the 16-lane interface; likewise AVX2 with 8 lanes. Which one runs is
// chosen at run time by CPU feature (cpu_isa()). Every AVX entry point must end with
// clear_upper_avx() (vec_math.h).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "vec_math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define SKIPGPT_X86_VEC 1
#if defined(__clang__)
#define SKIPGPT_BEGIN_AVX512 \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c\"))), apply_to = function)")
#define SKIPGPT_BEGIN_AVX2 _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define SKIPGPT_END_ISA _Pragma("clang attribute pop")
#else
// GCC 12's AVX-512 intrinsics self-initialise their "undefined" operands, which -Wall reports.
#define SKIPGPT_BEGIN_AVX512                                               \
  _Pragma("GCC push_options")                                              \
  _Pragma("GCC target(\"avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c\")") \
  _Pragma("GCC diagnostic push")                                           \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")                   \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define SKIPGPT_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")") _Pragma("GCC diagnostic push")
#define SKIPGPT_END_ISA _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#endif

SKIPGPT_BEGIN_AVX512
namespace skipgpt::cpu::avx512_vec {
struct Vec {
  using reg = __m512;
  static constexpr int kWidth = 16;
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline reg load(const c10::BFloat16* p) {  // bf16 is the high half of an fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static inline reg load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static inline void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static inline reg set1(float x) { return _mm512_set1_ps(x); }
  static inline reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static inline reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static inline reg neg_abs(reg x) { return _mm512_or_ps(x, _mm512_set1_ps(-0.0f)); }  // -|x|
  static inline reg select_neg(reg x, reg if_neg, reg otherwise) {                    // x < 0 ? .. : ..
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), otherwise, if_neg);
  }
  static inline float reduce_max(reg x) { return _mm512_reduce_max_ps(x); }
  static inline float reduce_add(reg x) { return _mm512_reduce_add_ps(x); }
  // exp for x <= 0, the polynomial of exp_nonpos; exactly 0 below -87 (and for -inf); NaN stays
  // NaN (max_ps returns its second operand when either is NaN), as the scalar exp_nonpos does.
  static inline reg exp_nonpos(reg x) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
    const reg t = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                       _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    reg r = _mm512_fnmadd_ps(t, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(t, _mm512_set1_ps(1.428606765330187045e-06f), r);
    reg p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(t), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(e));
  }
};
}  // namespace skipgpt::cpu::avx512_vec
SKIPGPT_END_ISA

SKIPGPT_BEGIN_AVX2
namespace skipgpt::cpu::avx2_vec {
struct Vec {
  using reg = __m256;
  static constexpr int kWidth = 8;
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline reg load(const c10::BFloat16* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static inline reg load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static inline reg set1(float x) { return _mm256_set1_ps(x); }
  static inline reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static inline reg neg_abs(reg x) { return _mm256_or_ps(x, _mm256_set1_ps(-0.0f)); }  // -|x|
  static inline reg select_neg(reg x, reg if_neg, reg otherwise) {                    // x < 0 ? .. : ..
    return _mm256_blendv_ps(otherwise, if_neg, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
  }
  static inline float reduce_max(reg x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static inline float reduce_add(reg x) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  // exp for x <= 0, the polynomial of exp_nonpos; exactly 0 below -87 (and for -inf); NaN stays
  // NaN (max_ps returns its second operand when either is NaN), as the scalar exp_nonpos does.
  static inline reg exp_nonpos(reg x) {
    const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
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
};
}  // namespace skipgpt::cpu::avx2_vec
SKIPGPT_END_ISA
#endif  // x86

namespace skipgpt::cpu {

// The vector ISA the CPU kernels use (by CPU feature, not model: an AVX2 AMD EPYC gets AVX2,
// an AVX-512 one AVX-512). The environment variable SKIPGPT_CPU_ISA=avx2|generic caps the
// choice (native, the default, takes the best), read once per process (the tests run every
// path this way).
enum class Isa { kGeneric, kAvx2, kAvx512 };
inline Isa cpu_isa() {
#if defined(SKIPGPT_X86_VEC)
  static const Isa isa = [] {
    const bool avx2 = use_avx2() && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    Isa best = avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kGeneric;
    const char* cap = std::getenv("SKIPGPT_CPU_ISA");
    if (cap == nullptr || std::strcmp(cap, "") == 0 || std::strcmp(cap, "native") == 0) return best;
    if (std::strcmp(cap, "generic") == 0) return Isa::kGeneric;
    if (std::strcmp(cap, "avx2") == 0) return best == Isa::kAvx512 ? Isa::kAvx2 : best;
    TORCH_WARN("SKIPGPT_CPU_ISA=", cap, " is not one of native, avx2, generic: ignored");
    return best;
  }();
  return isa;
#else
  return Isa::kGeneric;
#endif
}

}  // namespace skipgpt::cpu
