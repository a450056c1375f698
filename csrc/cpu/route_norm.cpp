// route_norm: both router decisions and the attention RMSNorm in one pass over h, then the
// in-order compaction of each module's executing rows. compact: the compaction alone.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "row_ops.h"
#include "vec_isa.h"

namespace skipgpt::cpu {

namespace {

// Executing rows first in ascending order, then the others (also ascending): a stable
// partition, so the tail of idx is deterministic.
int64_t compact_into(const uint8_t* execute, int64_t T, int64_t* idx) {
  int64_t n = 0;
  for (int64_t r = 0; r < T; ++r) n += execute[r];
  int64_t a = 0, b = n;
  for (int64_t r = 0; r < T; ++r) idx[execute[r] ? a++ : b++] = r;
  return n;
}

template <typename scalar_t>
void route_norm_rows(const at::Tensor& h, const scalar_t* nw, double eps, const float* rw, const float* rb,
                     double threshold, const bool* valid, scalar_t* xn, uint8_t* ex_attn, uint8_t* ex_mlp) {
  const int64_t T = h.size(0), d = h.size(1), rs = h.stride(0);
  const scalar_t* hp = h.data_ptr<scalar_t>();
  const float *w0 = rw, *w1 = rw + d;
  const Isa isa = cpu_isa();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* row = hp + r * rs;
      scalar_t* o = xn + r * d;
#if defined(SKIPGPT_X86_VEC)
      if constexpr (!std::is_same_v<scalar_t, double>) {  // (the vector loads widen fp32/bf16/fp16)
        if (isa != Isa::kGeneric) {
          // One read of the row feeds the norm statistic and both router margins.
          float st[3];
          if (isa == Isa::kAvx512)
            avx512_rows::row_stats<scalar_t>(row, w0, w1, d, st);
          else
            avx2_rows::row_stats<scalar_t>(row, w0, w1, d, st);
          const bool ok = valid == nullptr || valid[r];
          ex_attn[r] = ok && (st[1] + rb[0]) > threshold;
          ex_mlp[r] = ok && (st[2] + rb[1]) > threshold;
          const float inv = 1.0f / std::sqrt(st[0] / static_cast<float>(d) + static_cast<float>(eps));
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (isa == Isa::kAvx512)
              avx512_rows::write_norm_f32(row, nw, inv, d, o);
            else
              avx2_rows::write_norm_f32(row, nw, inv, d, o);
          } else {  // as HF: normalise in fp32, round to the input dtype, then scale
            for (int64_t j = 0; j < d; ++j)
              o[j] = static_cast<scalar_t>(static_cast<float>(nw[j]) *
                                           static_cast<float>(static_cast<scalar_t>(static_cast<float>(row[j]) * inv)));
          }
          continue;
        }
      }
#endif
      // Generic: fp32 in 8 independent lanes, so the compiler vectorises the three reductions
      // (no -ffast-math).
      float ls[8] = {}, l0[8] = {}, l1[8] = {};
      int64_t j = 0;
      for (; j + 8 <= d; j += 8)
        for (int l = 0; l < 8; ++l) {
          const float x = static_cast<float>(row[j + l]);
          ls[l] += x * x;
          l0[l] += x * w0[j + l];
          l1[l] += x * w1[j + l];
        }
      float ss = 0, m0 = 0, m1 = 0;
      for (int l = 0; l < 8; ++l) {
        ss += ls[l];
        m0 += l0[l];
        m1 += l1[l];
      }
      for (; j < d; ++j) {
        const float x = static_cast<float>(row[j]);
        ss += x * x;
        m0 += x * w0[j];
        m1 += x * w1[j];
      }
      const bool ok = valid == nullptr || valid[r];
      ex_attn[r] = ok && (m0 + rb[0]) > threshold;
      ex_mlp[r] = ok && (m1 + rb[1]) > threshold;
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
      for (int64_t j = 0; j < d; ++j) {
        // As HF: normalise in fp32, round to the input dtype, then scale by the weight.
        const float y = static_cast<float>(static_cast<scalar_t>(static_cast<float>(row[j]) * inv));
        o[j] = static_cast<scalar_t>(static_cast<float>(nw[j]) * y);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_norm_cpu(
    const at::Tensor& h_in, const at::Tensor& norm_weight, double eps, const at::Tensor& router_weight,
    const at::Tensor& router_bias, double threshold, const std::optional<at::Tensor>& row_valid) {
  const char* op = "skipgpt::route_norm";
  check_cpu(h_in, op, "h");
  check_float_dtype(h_in, op, "h");
  const auto [T, d] = check_route_norm_args(h_in, norm_weight, router_weight, router_bias, row_valid, op, on_cpu(op));
  // Unit column stride is what the row loop needs; any row stride is fine.
  const at::Tensor h = h_in.stride(1) == 1 ? h_in : h_in.contiguous();
  const auto nw = norm_weight.contiguous();
  const auto rw = router_weight.contiguous();
  const auto rb = router_bias.contiguous();
  const at::Tensor valid = row_valid.has_value() ? row_valid->reshape({T}).contiguous() : at::Tensor();
  auto x_norm = at::empty({T, d}, h.options().memory_format(at::MemoryFormat::Contiguous));
  std::vector<uint8_t> ex_attn(T), ex_mlp(T);
  const bool* vp = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "route_norm", [&] {
    route_norm_rows<scalar_t>(h, nw.data_ptr<scalar_t>(), eps, rw.data_ptr<float>(), rb.data_ptr<float>(), threshold,
                              vp, x_norm.data_ptr<scalar_t>(), ex_attn.data(), ex_mlp.data());
  });
  auto lopt = h.options().dtype(at::kLong);
  auto attn_idx = at::empty({T}, lopt), mlp_idx = at::empty({T}, lopt);
  auto attn_count = at::scalar_tensor(compact_into(ex_attn.data(), T, attn_idx.data_ptr<int64_t>()), lopt);
  auto mlp_count = at::scalar_tensor(compact_into(ex_mlp.data(), T, mlp_idx.data_ptr<int64_t>()), lopt);
  return {x_norm, attn_idx, attn_count, mlp_idx, mlp_count};
}

std::tuple<at::Tensor, at::Tensor> compact_cpu(const at::Tensor& mask) {
  const char* op = "skipgpt::compact";
  check_cpu(mask, op, "mask");
  const auto m = mask.reshape({-1}).to(at::kBool).contiguous();
  const int64_t T = m.numel();
  auto lopt = mask.options().dtype(at::kLong);
  auto idx = at::empty({T}, lopt);
  const int64_t n = compact_into(reinterpret_cast<const uint8_t*>(m.data_ptr<bool>()), T, idx.data_ptr<int64_t>());
  return {idx, at::scalar_tensor(n, lopt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(skipgpt, CPU, m) {
  m.impl("route_norm", &route_norm_cpu);
  m.impl("compact", &compact_cpu);
}

}  // namespace skipgpt::cpu
