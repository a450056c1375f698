// A GEMV-like kernel for the compacted linear layers when only a few rows execute (decode).
// ATen sends such shapes to MKL's sgemv, which on AMD CPUs runs its generic SSE path at about
// half the memory bandwidth; here the weight streams once through AVX-512/AVX2 FMAs for all rows.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace skipgpt::cpu {

// Row counts up to this use skinny_linear; larger ones are GEMMs and go to ATen. (On the AMD
// EPYC of BENCHMARKS.md, MKL reaches ~130 GFLOP/s only from about 16 rows on.)
constexpr int64_t kSkinnyMaxRows = 16;

// For i < n: y[y_row(i)] = (accumulate ? y[y_row(i)] : 0) + x[x_row(i)] @ weight^T (+ bias), in fp32
// and rounded once to y's dtype; x_row(i) = x_rows ? x_rows[i] : i, likewise y_row.
// x [*, K] and y [*, N] need unit column stride, weight [N, K] and bias [N] contiguous, all of
// one dtype. Returns false, having done nothing, when the kernel does not apply (n out of
// range, no AVX2, other layouts): the caller then uses ATen.
bool skinny_linear(const at::Tensor& x, const int64_t* x_rows, int64_t n, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, at::Tensor& y, const int64_t* y_rows, bool accumulate);

}  // namespace skipgpt::cpu
