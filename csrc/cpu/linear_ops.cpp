// The compacted GEMM ops: gather_linear, linear_scatter_add_ and skip_mlp_. GEMMs go through
// ATen (MKL / oneDNN) on compacted, contiguous row blocks; the gather rides on a pass that
// already exists (the norm) and the scatter-add is the epilogue of the last GEMM. When every
// row executes, the last GEMM accumulates straight into h (no scatter at all).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "row_ops.h"
#include "skinny_gemm.h"
#include "vec_isa.h"
#include "vec_math.h"

namespace skipgpt::cpu {

namespace {

// h[idx[i]] += y[i] for i < n (rows unique: no atomics).
void scatter_add_rows(at::Tensor& h, const at::Tensor& y, const int64_t* idx, int64_t n) {
  const int64_t d = h.size(1), rs = h.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "scatter_add_rows", [&] {
    scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        scalar_t* dst = hp + idx[i] * rs;
        const scalar_t* src = yp + i * d;
        for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<scalar_t>(static_cast<float>(dst[j]) + static_cast<float>(src[j]));
      }
    });
  });
}

// out (+)= a @ weight^T (+ bias) through ATen, the output features split evenly over the
// threads: each slice is one single-threaded MKL call on a column block of out. On the dev
// machine this is 3-6% faster than one multi-threaded MKL call for compacted blocks of 16-512
// rows (up to 20% at 16 rows), and never slower.
void gemm_split_n(at::Tensor& out, const at::Tensor& a, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  bool accumulate) {
  constexpr int64_t kMinCols = 64;  // narrower slices are not worth a call each
  const int64_t N = weight.size(0);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / kMinCols));
  auto slice = [&](int64_t p) {
    // Worker threads do not inherit the caller's dispatch state: keep these nested calls below
    // autograd (the weights are parameters that require grad).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t n0 = N * p / parts, len = N * (p + 1) / parts - n0;
    at::Tensor o = out.narrow(1, n0, len);
    const at::Tensor wt = weight.narrow(0, n0, len).t();
    if (accumulate) {
      at::addmm_out(o, o, a, wt);
      if (bias.has_value()) o.add_(bias->narrow(0, n0, len));
    } else if (bias.has_value()) {
      at::addmm_out(o, bias->narrow(0, n0, len), a, wt);
    } else {
      at::mm_out(o, a, wt);
    }
  };
  if (parts == 1) return slice(0);
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) slice(p);
  });
}

// The last GEMM of a module, y = a @ W^T (+ bias), added into rows idx[:n] of h.
void gemm_scatter_add(at::Tensor& h, const at::Tensor& a, const int64_t* idx, int64_t n, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias) {
  // A few rows (decode): the skinny kernel adds straight into h's rows.
  if (skinny_linear(a, nullptr, n, weight, bias, h, idx, /*accumulate=*/true)) return;
  if (n == h.size(0)) {
    // idx is ascending and unique, so n == T means the identity: accumulate in place.
    gemm_split_n(h, a, weight, bias, /*accumulate=*/true);
    return;
  }
  at::Tensor y = at::empty({n, weight.size(0)}, a.options().memory_format(at::MemoryFormat::Contiguous));
  gemm_split_n(y, a, weight, bias, /*accumulate=*/false);
  scatter_add_rows(h, y, idx, n);
}

at::Tensor gather_linear_cpu(const at::Tensor& x_in, const at::Tensor& idx, const at::Tensor& count,
                             const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& head_norm_weight, double head_norm_eps,
                             const std::optional<at::Tensor>& cos_in, const std::optional<at::Tensor>& sin_in,
                             int64_t head_dim, bool whole_norm) {
  const char* op = "skipgpt::gather_linear";
  check_cpu(x_in, op, "x");
  check_float_dtype(x_in, op, "x");
  const GatherLinearDims dims = check_gather_linear_args(x_in, idx, count, weight, bias, head_norm_weight, cos_in,
                                                         sin_in, head_dim, whole_norm, op, on_cpu(op));
  const int64_t T = dims.T, N = dims.N, hd = dims.head_dim, rd = dims.rot_dim;
  const bool rope = hd > 0;
  const at::Tensor hnw = head_norm_weight.has_value() ? head_norm_weight->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t n = read_count_and_check_idx(idx, count, T, op);
  auto out = at::empty({T, N}, x_in.options());
  if (n < T) out.narrow(0, n, T - n).zero_();
  if (n == 0) return out;

  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const auto idx_c = idx.contiguous();
  const int64_t* ip = idx_c.data_ptr<int64_t>();
  auto q = out.narrow(0, 0, n);
  // A few rows (decode): the skinny kernel reads them in place; otherwise gather, then GEMM.
  if (!skinny_linear(x, ip, n, weight, bias, q, nullptr, /*accumulate=*/false)) {
    const at::Tensor xc = n == T ? x : gather_rows(x, ip, n);
    gemm_split_n(q, xc, weight, bias, /*accumulate=*/false);
  }
  if (!rope) return out;
  const auto cf = cos_in->to(at::kFloat).contiguous(), sf = sin_in->to(at::kFloat).contiguous();
  const bool same = cos_in->scalar_type() == x_in.scalar_type() && sin_in->scalar_type() == x_in.scalar_type();
  const float* cp = cf.data_ptr<float>();
  const float* sp = sf.data_ptr<float>();
  const float* hw = hnw.defined() ? hnw.data_ptr<float>() : nullptr;
  const float heps = static_cast<float>(head_norm_eps);
  const int64_t H = N / hd, half = rd / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "gather_linear", [&] {
    scalar_t* qp = out.data_ptr<scalar_t>();
    const auto round = [](float v) { return static_cast<float>(static_cast<scalar_t>(v)); };
    at::parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
      std::vector<float> t(hd);
      for (int64_t i = b; i < e; ++i) {
        const float* c = cp + ip[i] * rd;  // RoPE at the row's true position
        const float* s = sp + ip[i] * rd;
        float row_inv = 1.0f;
        if (hw != nullptr && whole_norm) {  // OLMo 2: one RMS over the whole projected row
          float ss = 0;
          for (int64_t j = 0; j < N; ++j) {
            const float v = static_cast<float>(qp[i * N + j]);
            ss += v * v;
          }
          row_inv = 1.0f / std::sqrt(ss / N + heps);
        }
        for (int64_t hh = 0; hh < H; ++hh) {
          scalar_t* v = qp + i * N + hh * hd;
          for (int64_t j = 0; j < hd; ++j) t[j] = static_cast<float>(v[j]);
          if (hw != nullptr && whole_norm) {
            // As OLMo 2's norm: the weight times the fp32 normalised value, rounded once.
            const float* w = hw + hh * hd;
            for (int64_t j = 0; j < hd; ++j) t[j] = round(w[j] * (t[j] * row_inv));
          } else if (hw != nullptr) {
            float ss = 0;
            for (int64_t j = 0; j < hd; ++j) ss += t[j] * t[j];
            const float inv = 1.0f / std::sqrt(ss / hd + heps);
            // As the Llama-style norm: the normalised value rounded, times the weight, rounded.
            for (int64_t j = 0; j < hd; ++j) t[j] = round(hw[j] * round(t[j] * inv));
          }
          for (int64_t j = 0; j < half; ++j) {
            // As HF in the model's dtype: round(x * cos) + round(rotate_half(x) * sin), rounded
            // (cos/sin in another dtype promote the products, as in torch: one rounding).
            const auto rd_ = [&](float x) { return same ? round(x) : x; };
            v[j] = static_cast<scalar_t>(rd_(t[j] * c[j]) - rd_(t[j + half] * s[j]));
            v[j + half] = static_cast<scalar_t>(rd_(t[j + half] * c[j + half]) + rd_(t[j] * s[j + half]));
          }
          if (hw != nullptr) {  // partial RoPE: the unrotated features keep their normalised value
            for (int64_t j = rd; j < hd; ++j) v[j] = static_cast<scalar_t>(t[j]);
          }
        }
      }
    });
  });
  return out;
}

// h[idx[i]] += out_scale * post_norm(y[i]) for i < n: the epilogue of the scatter-adding ops when
// the family has a post-norm or a multiplier. The norm as Gemma's and OLMo 2's: fp32 statistics,
// times the weight in fp32, rounded once; then the multiplier and the add, each rounded.
template <typename scalar_t>
void scatter_add_epilogue(at::Tensor& h, const at::Tensor& y, const int64_t* idx, int64_t n, const scalar_t* pw,
                          float eps, float scale) {
  const int64_t d = h.size(1), hs = h.stride(0);
  scalar_t* hp = h.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {  // the rows idx[i] are distinct: no two threads share one
      const scalar_t* row = yp + i * d;
      scalar_t* dst = hp + idx[i] * hs;
      float inv = 1.0f;
      if (pw != nullptr) {
        float ss = 0;
        for (int64_t j = 0; j < d; ++j) ss += static_cast<float>(row[j]) * static_cast<float>(row[j]);
        inv = 1.0f / std::sqrt(ss / d + eps);
      }
      for (int64_t j = 0; j < d; ++j) {
        float v = static_cast<float>(row[j]);
        if (pw != nullptr) v = static_cast<float>(static_cast<scalar_t>(v * inv * static_cast<float>(pw[j])));
        if (scale != 1.0f) v = static_cast<float>(static_cast<scalar_t>(v * scale));
        dst[j] = static_cast<scalar_t>(static_cast<float>(dst[j]) + v);
      }
    }
  });
}

// y = x @ w^T (+ b) for the n rows of x: the skinny kernel for a few rows, else ATen's GEMM.
at::Tensor linear_rows(const at::Tensor& x, int64_t n, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  auto y = at::empty({n, w.size(0)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (!skinny_linear(x, nullptr, n, w, b, y, nullptr, false)) gemm_split_n(y, x, w, b, false);
  return y;
}

void epilogue_scatter_add(at::Tensor& h, const at::Tensor& y, const int64_t* ip, int64_t n,
                          const std::optional<at::Tensor>& post_norm_weight, double post_norm_eps, double out_scale) {
  const at::Tensor pw = post_norm_weight.has_value() ? post_norm_weight->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "scatter_add_epilogue", [&] {
    scatter_add_epilogue<scalar_t>(h, y, ip, n, pw.defined() ? pw.data_ptr<scalar_t>() : nullptr,
                                   static_cast<float>(post_norm_eps), static_cast<float>(out_scale));
  });
}

void linear_scatter_add_cpu(at::Tensor& h, const at::Tensor& a, const at::Tensor& idx, const at::Tensor& count,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& post_norm_weight, double post_norm_eps, double out_scale) {
  const char* op = "skipgpt::linear_scatter_add_";
  check_cpu(h, op, "h");
  check_float_dtype(h, op, "h");
  const int64_t T = check_linear_scatter_add_args(h, a, idx, count, weight, bias, op, on_cpu(op)).T;
  check_epilogue_args(h, post_norm_weight, post_norm_eps, out_scale, op, on_cpu(op));
  const int64_t n = read_count_and_check_idx(idx, count, T, op);
  if (n == 0) return;  // no weight byte is read
  const auto idx_c = idx.contiguous();
  if (!post_norm_weight.has_value() && out_scale == 1.0) {
    gemm_scatter_add(h, a.narrow(0, 0, n), idx_c.data_ptr<int64_t>(), n, weight, bias);
    return;
  }
  const at::Tensor a_n = a.narrow(0, 0, n).contiguous();
  epilogue_scatter_add(h, linear_rows(a_n, n, weight, bias), idx_c.data_ptr<int64_t>(), n, post_norm_weight,
                       post_norm_eps, out_scale);
}

template <typename scalar_t>
void gather_norm_rows(const at::Tensor& h, const int64_t* idx, int64_t n, const scalar_t* w, float eps, scalar_t* x) {
  const int64_t d = h.size(1), rs = h.stride(0);
  const scalar_t* hp = h.data_ptr<scalar_t>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const scalar_t* row = hp + idx[i] * rs;
      if (w == nullptr) {  // no input norm (OLMo 2): the rows themselves
        std::copy(row, row + d, x + i * d);
        continue;
      }
      float ss = 0;
      for (int64_t j = 0; j < d; ++j) ss += static_cast<float>(row[j]) * static_cast<float>(row[j]);
      const float inv = 1.0f / std::sqrt(ss / d + eps);
      scalar_t* o = x + i * d;
      for (int64_t j = 0; j < d; ++j)
        o[j] = static_cast<scalar_t>(static_cast<float>(w[j]) * static_cast<float>(static_cast<scalar_t>(static_cast<float>(row[j]) * inv)));
    }
  });
}

// g[j] = silu(g[j]) * u[j] in fp32 (the generic path; row_ops.inc has the vector one).
void silu_mul_scalar(float* g, const float* u, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float x = g[j], e = exp_nonpos(-std::fabs(x)), inv = 1.0f / (1.0f + e);
    g[j] = x * (x >= 0 ? inv : e * inv) * u[j];
  }
}

// g[j] = gelu_tanh(g[j]) * u[j], in fp32, rounded once (GeGLU, Gemma).
template <typename scalar_t>
void gelu_tanh_mul(scalar_t* g, const scalar_t* u, int64_t n) {
  constexpr float k0 = 0.7978845608028654f, k1 = 0.044715f;  // sqrt(2 / pi)
  for (int64_t j = 0; j < n; ++j) {
    const float x = static_cast<float>(g[j]);
    const float a = 0.5f * x * (1.0f + std::tanh(k0 * (x + k1 * x * x * x)));
    g[j] = static_cast<scalar_t>(a * static_cast<float>(u[j]));
  }
}

void skip_mlp_cpu(at::Tensor& h, const at::Tensor& idx, const at::Tensor& count,
                  const std::optional<at::Tensor>& norm_weight, double eps, const at::Tensor& gate_weight,
                  const at::Tensor& up_weight, const at::Tensor& down_weight, c10::string_view activation,
                  const std::optional<at::Tensor>& post_norm_weight, double post_norm_eps, double out_scale) {
  const char* op = "skipgpt::skip_mlp_";
  check_cpu(h, op, "h");
  check_float_dtype(h, op, "h");
  const auto [T, d, I] =
      check_skip_mlp_args(h, idx, count, norm_weight, gate_weight, up_weight, down_weight, op, on_cpu(op));
  const Activation act = check_activation(activation, op);
  check_epilogue_args(h, post_norm_weight, post_norm_eps, out_scale, op, on_cpu(op));
  const int64_t n = read_count_and_check_idx(idx, count, T, op);
  if (n == 0) return;  // no weight byte is read
  const auto idx_c = idx.contiguous();
  const int64_t* ip = idx_c.data_ptr<int64_t>();
  const at::Tensor nw = norm_weight.has_value() ? norm_weight->contiguous() : at::Tensor();
  auto x = at::empty({n, d}, h.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "skip_mlp_norm", [&] {
    gather_norm_rows<scalar_t>(h, ip, n, nw.defined() ? nw.data_ptr<scalar_t>() : nullptr, static_cast<float>(eps),
                               x.data_ptr<scalar_t>());
  });
  // gate and up: the skinny kernel for a few rows (decode), else ATen's GEMM.
  auto gate = at::empty({n, I}, x.options()), up = at::empty({n, I}, x.options());
  if (!skinny_linear(x, nullptr, n, gate_weight, std::nullopt, gate, nullptr, false))
    gemm_split_n(gate, x, gate_weight, std::nullopt, false);
  if (!skinny_linear(x, nullptr, n, up_weight, std::nullopt, up, nullptr, false))
    gemm_split_n(up, x, up_weight, std::nullopt, false);
  if (act == Activation::kGeluTanh) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "skip_mlp_gelu_mul", [&] {
      scalar_t* g = gate.data_ptr<scalar_t>();
      const scalar_t* u = up.data_ptr<scalar_t>();
      at::parallel_for(0, n * I, 4096, [&](int64_t b, int64_t e) { gelu_tanh_mul<scalar_t>(g + b, u + b, e - b); });
    });
  } else if (h.scalar_type() == at::kFloat) {  // vectorised exp (libm's expf is scalar)
    float* g = gate.data_ptr<float>();
    const float* u = up.data_ptr<float>();
    const Isa isa = cpu_isa();
    at::parallel_for(0, n * I, 4096, [&](int64_t b, int64_t e) {
#if defined(SKIPGPT_X86_VEC)
      if (isa == Isa::kAvx512) return avx512_rows::silu_mul_f32(g + b, u + b, e - b);
      if (isa == Isa::kAvx2) return avx2_rows::silu_mul_f32(g + b, u + b, e - b);
#endif
      silu_mul_scalar(g + b, u + b, e - b);
    });
  } else AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "skip_mlp_silu_mul", [&] {
    scalar_t* g = gate.data_ptr<scalar_t>();
    const scalar_t* u = up.data_ptr<scalar_t>();
    at::parallel_for(0, n * I, 4096, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const float gv = static_cast<float>(g[j]);
        g[j] = static_cast<scalar_t>(gv / (1.0f + std::exp(-gv)) * static_cast<float>(u[j]));
      }
    });
  });
  if (!post_norm_weight.has_value() && out_scale == 1.0) {
    gemm_scatter_add(h, gate, ip, n, down_weight, std::nullopt);
    return;
  }
  epilogue_scatter_add(h, linear_rows(gate, n, down_weight, std::nullopt), ip, n, post_norm_weight, post_norm_eps,
                       out_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(skipgpt, CPU, m) {
  m.impl("gather_linear", &gather_linear_cpu);
  m.impl("q_proj_rope", &gather_linear_cpu);  // the old name of gather_linear
  m.impl("linear_scatter_add_", &linear_scatter_add_cpu);
  m.impl("skip_mlp_", &skip_mlp_cpu);
}

}  // namespace skipgpt::cpu
