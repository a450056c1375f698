// The row-wise vector passes of row_ops.inc (route_norm's statistics and normalised write, the
// MLP's SiLU-mul), compiled for AVX-512 (avx512_rows::) and AVX2 (avx2_rows::) on x86. Included
// by route_norm.cpp and linear_ops.cpp; the functions are inline (or templates), so the two
// translation units share one definition.
#pragma once
#include <cstdint>

#include "vec_isa.h"

namespace skipgpt::cpu {

#if defined(SKIPGPT_X86_VEC)
SKIPGPT_BEGIN_AVX512
namespace avx512_rows {
using Vec = avx512_vec::Vec;
#include "row_ops.inc"
}  // namespace avx512_rows
SKIPGPT_END_ISA

SKIPGPT_BEGIN_AVX2
namespace avx2_rows {
using Vec = avx2_vec::Vec;
#include "row_ops.inc"
}  // namespace avx2_rows
SKIPGPT_END_ISA
#endif

}  // namespace skipgpt::cpu
