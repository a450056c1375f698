#include "skinny_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "vec_isa.h"

namespace skipgpt::cpu {

#if defined(SKIPGPT_X86_VEC)
SKIPGPT_BEGIN_AVX512
namespace avx512_skinny {
using Vec = avx512_vec::Vec;
#include "skinny_gemm.inc"
}  // namespace avx512_skinny
SKIPGPT_END_ISA

SKIPGPT_BEGIN_AVX2
namespace avx2_skinny {
using Vec = avx2_vec::Vec;
#include "skinny_gemm.inc"
}  // namespace avx2_skinny
SKIPGPT_END_ISA
#endif

bool skinny_linear(const at::Tensor& x, const int64_t* x_rows, int64_t n, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, at::Tensor& y, const int64_t* y_rows, bool accumulate) {
#if defined(SKIPGPT_X86_VEC)
  const Isa isa = cpu_isa();
  if (isa == Isa::kGeneric || n < 1 || n > kSkinnyMaxRows) return false;
  const auto dt = x.scalar_type();
  if (!(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf) || weight.scalar_type() != dt ||
      y.scalar_type() != dt || !weight.is_contiguous() || x.stride(1) != 1 || y.stride(1) != 1)
    return false;
  if (bias.has_value() && (bias->scalar_type() != dt || !bias->is_contiguous())) return false;
  const int64_t K = weight.size(1), N = weight.size(0);
  // The activation rows in fp32, once (n x K floats).
  std::vector<float> xf(n * K), yf(n * N);
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* src = xp + (x_rows != nullptr ? x_rows[i] : i) * x.stride(0);
      for (int64_t k = 0; k < K; ++k) xf[i * K + k] = static_cast<float>(src[k]);
    }
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t ys = y.stride(0);
    // Output features split evenly over the threads; each thread streams its weight rows once.
    at::parallel_for(0, N, 64, [&](int64_t jb, int64_t je) {
      if (isa == Isa::kAvx512)
        avx512_skinny::skinny_dots_rows<scalar_t>(n, xf.data(), K, wp, jb, je, yf.data(), N);
      else
        avx2_skinny::skinny_dots_rows<scalar_t>(n, xf.data(), K, wp, jb, je, yf.data(), N);
      for (int64_t i = 0; i < n; ++i) {
        scalar_t* dst = yp + (y_rows != nullptr ? y_rows[i] : i) * ys;
        const float* src = yf.data() + i * N;
        for (int64_t j = jb; j < je; ++j) {
          float v = src[j];
          if (bp != nullptr) v += static_cast<float>(bp[j]);
          if (accumulate) v += static_cast<float>(dst[j]);
          dst[j] = static_cast<scalar_t>(v);
        }
      }
    });
  };
  if (dt == at::kFloat)
    run(float{});
  else if (dt == at::kBFloat16)
    run(c10::BFloat16{});
  else
    run(c10::Half{});
  return true;
#else
  return false;
#endif
}

}  // namespace skipgpt::cpu
