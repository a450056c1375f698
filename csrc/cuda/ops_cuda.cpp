// CUDA implementations of the skipgpt op schemas (declared in csrc/registration.cpp): the CUDA
// side of the argument checks (the device, the dtypes the kernels take, alignment and size
// limits; the rest is shared with the CPU in ../op_args.h), output allocation, and launches on
// the current stream.
//
// Nothing here reads a device value on the host: counts stay on the device and the kernels
// read them, so a layer's forward can be captured in a CUDA graph. The price is that the
// contract "idx[:count] holds ascending unique rows" is the caller's to keep on CUDA (route_norm
// and compact produce exactly that); the CPU kernels check it, which needs the values on host.
// The GEMM ops run on tensor cores and take bfloat16 or float16.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "../op_args.h"
#include "kernels.h"

namespace skipgpt::cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kF32;
    case at::kBFloat16:
      return DType::kBF16;
    case at::kHalf:
      return DType::kF16;
    default:
      TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " like the other inputs, got ",
              t.device());
}

// The first argument of an op (h, x or q): a CUDA tensor, in one of the dtypes the op's kernels
// take (`tensor_cores`: the GEMMs, bfloat16 or float16 only). Its device guards the launch.
void check_first(const at::Tensor& t, bool tensor_cores, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  const auto s = t.scalar_type();
  if (!tensor_cores)
    check_float_dtype(t, op, name);
  else
    TORCH_CHECK(s == at::kBFloat16 || s == at::kHalf, op, ": ", name,
                " must be bfloat16 or float16 on CUDA (the GEMMs run on tensor cores), got ", dtype_name(s));
}

// The device check the shared argument checks (op_args.h) run on every other tensor argument.
auto on_device_of(const at::Tensor& ref, const char* op) {
  return [&ref, op](const at::Tensor& t, const char* name) { check_cuda(t, ref, op, name); };
}

// Row-major with unit column stride, 16-byte aligned rows (the GEMMs' async copies).
void check_rows16(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, op, ": ", name, " must be 2-D with unit stride in its last dimension, got strides ",
              t.strides());
  TORCH_CHECK((t.stride(0) * t.element_size()) % 16 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op,
              ": ", name, " rows must start on 16-byte boundaries (row stride ", t.stride(0), ")");
}

// The kernels read idx[i] at i; its values are the caller's contract on CUDA (reading them
// would sync with the host).
void check_idx_contiguous(const at::Tensor& idx, const char* op) {
  TORCH_CHECK(idx.is_contiguous(), op, ": idx must be contiguous");
}

// Tensor-core tiles are 16 bytes: every dimension of a GEMM weight a multiple of 8.
void check_gemm_weight(const at::Tensor& w, const char* op, const char* name) {
  TORCH_CHECK(w.size(0) % 8 == 0 && w.size(1) % 8 == 0, op, ": ", name,
              "'s dimensions must be multiples of 8 on CUDA (16-byte tensor-core tiles), got ", w.sizes());
}

// ATen's CUDAContext.h needs the cuBLAS/cuSPARSE headers, which a build machine may lack;
// the runtime API gives the one property we need.
int num_sms(int device) {
  int n = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(e == cudaSuccess, "skipgpt: cannot read the multiprocessor count: ", cudaGetErrorString(e));
  return n;
}

void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(e));
}

constexpr const char* kNeedsSm90a =
    "needs a compute-capability 9.0 GPU and a build with 9.0a (and not plain 9.0) in TORCH_CUDA_ARCH_LIST; unset "
    "it, or set it to mma";

// Before a GEMM launch: the mainloop SKIPGPT_CUDA_GEMM asks for can run here.
void check_gemm_mainloop(const char* op) {
  const GemmMainloop m = gemm_mainloop();
  TORCH_CHECK(m != GemmMainloop::kUnknown, op, ": SKIPGPT_CUDA_GEMM must be unset, auto, mma, wgmma, wgmma-ws or wgmma-tma, got '",
              std::getenv("SKIPGPT_CUDA_GEMM"), "'");
  TORCH_CHECK(m != GemmMainloop::kUnavailable, op, ": SKIPGPT_CUDA_GEMM=wgmma(-ws/-tma) ", kNeedsSm90a);
}

// Weights feed 16-byte async copies: contiguous and 16-byte aligned (a view at an odd offset
// into a larger buffer is copied once).
at::Tensor aligned16(const at::Tensor& w) {
  at::Tensor c = w.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// The compaction packs two 31-bit counts and a flag into one 64-bit status word.
void check_rows_limit(int64_t T, const char* op) {
  TORCH_CHECK(T < (int64_t{1} << 31), op, ": at most 2^31 - 1 rows on CUDA, got ", T);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_norm_cuda(
    const at::Tensor& h_in, const at::Tensor& norm_weight, double eps, const at::Tensor& router_weight,
    const at::Tensor& router_bias, double threshold, const std::optional<at::Tensor>& row_valid) {
  const char* op = "skipgpt::route_norm";
  check_first(h_in, /*tensor_cores=*/false, op, "h");
  const c10::cuda::CUDAGuard guard(h_in.device());
  const auto [T, d] =
      check_route_norm_args(h_in, norm_weight, router_weight, router_bias, row_valid, op, on_device_of(h_in, op));
  check_rows_limit(T, op);
  const at::Tensor valid = row_valid.has_value() ? row_valid->reshape({T}).contiguous() : at::Tensor();
  const at::Tensor h = h_in.stride(1) == 1 ? h_in : h_in.contiguous();
  const auto nw = norm_weight.contiguous(), rw = router_weight.contiguous(), rb = router_bias.contiguous();
  auto x_norm = at::empty({T, d}, h.options().memory_format(at::MemoryFormat::Contiguous));
  auto lopt = h.options().dtype(at::kLong);
  auto attn_idx = at::empty({T}, lopt), mlp_idx = at::empty({T}, lopt);
  auto attn_count = at::empty({}, lopt), mlp_count = at::empty({}, lopt);
  auto ws = at::zeros({route_norm_workspace_words(T)}, lopt);
  RouteNormParams p;
  p.h = h.data_ptr();
  p.h_stride = h.stride(0);
  p.norm_weight = nw.data_ptr();
  p.eps = static_cast<float>(eps);
  p.router_weight = rw.data_ptr<float>();
  p.router_bias = rb.data_ptr<float>();
  p.threshold = static_cast<float>(threshold);
  p.row_valid = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  p.x_norm = x_norm.data_ptr();
  p.attn_idx = attn_idx.data_ptr<int64_t>();
  p.attn_count = attn_count.data_ptr<int64_t>();
  p.mlp_idx = mlp_idx.data_ptr<int64_t>();
  p.mlp_count = mlp_count.data_ptr<int64_t>();
  p.workspace = reinterpret_cast<uint64_t*>(ws.data_ptr<int64_t>());
  p.T = T;
  p.d = d;
  check_launch(launch_route_norm(p, dtype_of(h), c10::cuda::getCurrentCUDAStream().stream()), op);
  return {x_norm, attn_idx, attn_count, mlp_idx, mlp_count};
}

std::tuple<at::Tensor, at::Tensor> compact_cuda(const at::Tensor& mask) {
  const char* op = "skipgpt::compact";
  TORCH_CHECK(mask.is_cuda(), op, ": mask must be a CUDA tensor, got device ", mask.device());
  const c10::cuda::CUDAGuard guard(mask.device());
  const auto m = mask.reshape({-1}).to(at::kBool).contiguous();
  const int64_t T = m.numel();
  check_rows_limit(T, op);
  auto lopt = m.options().dtype(at::kLong);
  auto idx = at::empty({T}, lopt), count = at::empty({}, lopt);
  auto ws = at::zeros({route_norm_workspace_words(T)}, lopt);
  RouteNormParams p;
  p.mask = m.data_ptr<bool>();
  p.attn_idx = idx.data_ptr<int64_t>();
  p.attn_count = count.data_ptr<int64_t>();
  p.workspace = reinterpret_cast<uint64_t*>(ws.data_ptr<int64_t>());
  p.T = T;
  check_launch(launch_compact(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {idx, count};
}

at::Tensor gather_linear_cuda(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& count,
                              const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& head_norm_weight, double head_norm_eps,
                              const std::optional<at::Tensor>& cos_in, const std::optional<at::Tensor>& sin_in,
                              int64_t head_dim, bool whole_norm) {
  const char* op = "skipgpt::gather_linear";
  check_first(x, /*tensor_cores=*/true, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [T, d, N, hd, rd] = check_gather_linear_args(x, idx, count, weight_in, bias, head_norm_weight, cos_in,
                                                          sin_in, head_dim, whole_norm, op, on_device_of(x, op));
  const bool rope = hd > 0;
  check_rows16(x, op, "x");
  check_gemm_weight(weight_in, op, "weight");
  check_idx_contiguous(idx, op);
  const at::Tensor hnw = head_norm_weight.has_value() ? head_norm_weight->contiguous() : at::Tensor();
  const auto weight = aligned16(weight_in);
  const auto cs = rope ? cos_in->to(x.scalar_type()).contiguous() : at::Tensor();
  const auto sn = rope ? sin_in->to(x.scalar_type()).contiguous() : at::Tensor();
  const auto b = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto out = at::empty({T, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  // The whole-row norm's per-row statistic (the row pass writes it before it normalises).
  const bool row_norm = whole_norm && hnw.defined();
  const auto row_inv = row_norm ? at::empty({T}, x.options().dtype(at::kFloat)) : at::Tensor();
  const GemmParams p{.A = x.data_ptr(), .lda = x.stride(0), .a_idx = idx.data_ptr<int64_t>(), .W = weight.data_ptr(),
                     .bias = b.defined() ? b.data_ptr() : nullptr, .out = out.data_ptr(), .ldo = N,
                     .count = count.data_ptr<int64_t>(), .M = T, .N = N, .K = d,
                     .cos = rope ? cs.data_ptr() : nullptr, .sin = rope ? sn.data_ptr() : nullptr,
                     .head_norm_weight = hnw.defined() ? hnw.data_ptr() : nullptr,
                     .head_norm_eps = static_cast<float>(head_norm_eps), .head_dim = static_cast<int>(hd),
                     .rot_dim = static_cast<int>(rd), .row_inv = row_norm ? row_inv.data_ptr<float>() : nullptr};
  check_gemm_mainloop(op);
  check_launch(launch_gemm(p, rope ? Epilogue::kRope : Epilogue::kStore, dtype_of(x),
                       c10::cuda::getCurrentCUDAStream().stream()),
           op);
  return out;
}

at::Tensor sparse_query_attention_cuda(const at::Tensor& q_in, const at::Tensor& idx, const at::Tensor& count,
                                       const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& q_pos,
                                       const std::optional<at::Tensor>& key_valid, int64_t kv_offset, int64_t seq_len,
                                       double scale, int64_t window, double softcap) {
  const char* op = "skipgpt::sparse_query_attention";
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be finite and >= 0 (0 = none), got ", softcap);
  check_first(q_in, /*tensor_cores=*/false, op, "q");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto [T, B, Hq, Hkv, Lk, hd] = check_attention_args(q_in, idx, count, k_in, v_in, q_pos, key_valid, kv_offset,
                                                            seq_len, window, op, on_device_of(q_in, op));
  TORCH_CHECK(Hq / Hkv <= 8 && hd <= 256, op, ": the CUDA kernel supports up to 8 query heads per KV head and head_dim <= 256, got ",
              Hq / Hkv, " and ", hd);
  // q_pos's values are the caller's contract here (reading them would sync with the host).
  check_idx_contiguous(idx, op);
  const at::Tensor kv_valid = key_valid.has_value() ? key_valid->contiguous() : at::Tensor();
  const at::Tensor q = q_in.stride(1) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  const auto pos = q_pos.contiguous();
  auto out = at::empty({T, Hq * hd}, q.options().memory_format(at::MemoryFormat::Contiguous));
  AttentionParams p;
  p.q = q.data_ptr();
  p.q_stride = q.stride(0);
  p.idx = idx.data_ptr<int64_t>();
  p.count = count.data_ptr<int64_t>();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.k_strides[i] = k.stride(i);
    p.v_strides[i] = v.stride(i);
  }
  p.q_pos = pos.data_ptr<int64_t>();
  p.key_valid = kv_valid.defined() ? kv_valid.data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.T = T;
  p.B = B;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.Lk = Lk;
  p.hd = hd;
  p.kv_offset = kv_offset;
  p.seq_len = seq_len;
  p.window = window;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.splits = attention_splits(T, Hkv, Lk, num_sms(q.get_device()));
  at::Tensor scratch;
  if (p.splits > 1) {
    scratch = at::empty({T * Hq * p.splits * (hd + 2)}, q.options().dtype(at::kFloat));
    p.partial_o = scratch.data_ptr<float>();
    p.partial_ml = p.partial_o + T * Hq * p.splits * hd;
  }
  const AttentionMma kind = attention_mma_kind();
  TORCH_CHECK(kind != AttentionMma::kUnknown, op, ": SKIPGPT_CUDA_ATTN must be unset, auto, mma, wgmma or wgmma-overlap, got '",
              std::getenv("SKIPGPT_CUDA_ATTN"), "'");
  TORCH_CHECK(kind != AttentionMma::kUnavailable, op, ": SKIPGPT_CUDA_ATTN=wgmma(-overlap) ", kNeedsSm90a);
  check_launch(launch_attention(p, dtype_of(q), c10::cuda::getCurrentCUDAStream().stream()), op);
  return out;
}

// h[idx[i]] += a[i] @ W^T (+ bias) for i < count: the O projection and the MLP's down
// projection, one launch each.
void gemm_scatter_add(at::Tensor& h, const void* a, int64_t lda, int64_t K, const at::Tensor& weight,
                      const void* bias, const at::Tensor& idx, const at::Tensor& count, cudaStream_t stream,
                      const char* op) {
  const GemmParams p{.A = a, .lda = lda, .W = weight.data_ptr(), .bias = bias, .out = h.data_ptr(),
                     .ldo = h.stride(0), .out_idx = idx.data_ptr<int64_t>(), .count = count.data_ptr<int64_t>(),
                     .M = h.size(0), .N = h.size(1), .K = K};
  check_gemm_mainloop(op);
  check_launch(launch_gemm(p, Epilogue::kScatterAdd, dtype_of(h), stream), op);
}

// The epilogue of linear_scatter_add_ and skip_mlp_ beyond a plain scatter-add (a post-norm,
// an output multiplier): the projection is stored for the executing rows, then one row kernel
// norms, scales and scatter-adds it (the norm needs whole rows, which a GEMM tile does not hold).
bool has_epilogue(const std::optional<at::Tensor>& post_norm_weight, double out_scale) {
  return post_norm_weight.has_value() || out_scale != 1.0;
}

void gemm_norm_scatter_add(at::Tensor& h, const void* a, int64_t lda, int64_t K, const at::Tensor& weight,
                           const void* bias, const at::Tensor& idx, const at::Tensor& count,
                           const std::optional<at::Tensor>& post_norm_weight, double post_norm_eps, double out_scale,
                           cudaStream_t stream, const char* op) {
  const int64_t T = h.size(0), d = h.size(1);
  auto y = at::empty({T, d}, h.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t* cnt = count.data_ptr<int64_t>();
  const GemmParams p{.A = a, .lda = lda, .W = weight.data_ptr(), .bias = bias, .out = y.data_ptr(), .ldo = d,
                     .count = cnt, .M = T, .N = d, .K = K};
  check_gemm_mainloop(op);
  check_launch(launch_gemm(p, Epilogue::kStore, dtype_of(h), stream), op);
  const auto nw = post_norm_weight.has_value() ? post_norm_weight->contiguous() : at::Tensor();
  const NormScatterAddParams e{.h = h.data_ptr(), .h_stride = h.stride(0), .y = y.data_ptr(),
                               .idx = idx.data_ptr<int64_t>(), .count = cnt,
                               .norm_weight = nw.defined() ? nw.data_ptr() : nullptr,
                               .eps = static_cast<float>(post_norm_eps), .out_scale = static_cast<float>(out_scale),
                               .T = T, .d = d};
  check_launch(launch_norm_scatter_add(e, dtype_of(h), stream), op);
}

void linear_scatter_add_cuda(at::Tensor& h, const at::Tensor& a, const at::Tensor& idx, const at::Tensor& count,
                             const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& post_norm_weight, double post_norm_eps, double out_scale) {
  const char* op = "skipgpt::linear_scatter_add_";
  check_first(h, /*tensor_cores=*/true, op, "h");
  const c10::cuda::CUDAGuard guard(h.device());
  check_linear_scatter_add_args(h, a, idx, count, weight_in, bias, op, on_device_of(h, op));
  check_epilogue_args(h, post_norm_weight, post_norm_eps, out_scale, op, on_device_of(h, op));
  check_rows16(h, op, "h");
  check_rows16(a, op, "a");
  check_gemm_weight(weight_in, op, "weight");
  check_idx_contiguous(idx, op);
  const auto weight = aligned16(weight_in);
  const auto b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (has_epilogue(post_norm_weight, out_scale)) {
    gemm_norm_scatter_add(h, a.data_ptr(), a.stride(0), a.size(1), weight, b.defined() ? b.data_ptr() : nullptr, idx,
                          count, post_norm_weight, post_norm_eps, out_scale, stream, op);
    return;
  }
  gemm_scatter_add(h, a.data_ptr(), a.stride(0), a.size(1), weight, b.defined() ? b.data_ptr() : nullptr, idx, count,
                   stream, op);
}

void skip_mlp_cuda(at::Tensor& h, const at::Tensor& idx, const at::Tensor& count,
                   const std::optional<at::Tensor>& norm_weight_opt, double eps, const at::Tensor& gate_in,
                   const at::Tensor& up_in, const at::Tensor& down_in, c10::string_view activation,
                   const std::optional<at::Tensor>& post_norm_weight, double post_norm_eps, double out_scale) {
  const char* op = "skipgpt::skip_mlp_";
  check_first(h, /*tensor_cores=*/true, op, "h");
  const c10::cuda::CUDAGuard guard(h.device());
  const auto [T, d, I] =
      check_skip_mlp_args(h, idx, count, norm_weight_opt, gate_in, up_in, down_in, op, on_device_of(h, op));
  const Activation act_kind = check_activation(activation, op);
  check_epilogue_args(h, post_norm_weight, post_norm_eps, out_scale, op, on_device_of(h, op));
  check_rows16(h, op, "h");
  for (const auto& [w, name] : {NamedTensor{&gate_in, "gate_weight"}, NamedTensor{&up_in, "up_weight"},
                                NamedTensor{&down_in, "down_weight"}})
    check_gemm_weight(*w, op, name);
  check_idx_contiguous(idx, op);
  const auto nw = norm_weight_opt.has_value() ? norm_weight_opt->contiguous() : at::Tensor();
  const auto gate = aligned16(gate_in), up = aligned16(up_in), down = aligned16(down_in);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto x = at::empty({T, d}, h.options().memory_format(at::MemoryFormat::Contiguous));
  auto act = at::empty({T, I}, h.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t* cnt = count.data_ptr<int64_t>();
  const GatherNormParams g{.h = h.data_ptr(), .h_stride = h.stride(0), .idx = idx.data_ptr<int64_t>(), .count = cnt,
                           .norm_weight = nw.defined() ? nw.data_ptr() : nullptr, .eps = static_cast<float>(eps),
                           .x = x.data_ptr(), .T = T, .d = d};
  check_launch(launch_gather_norm(g, dtype_of(h), stream), op);
  check_gemm_mainloop(op);
  if (act_kind == Activation::kSilu) {
    const GemmParams gate_up{.A = x.data_ptr(), .lda = d, .W = gate.data_ptr(), .W1 = up.data_ptr(),
                             .out = act.data_ptr(), .ldo = I, .count = cnt, .M = T, .N = I, .K = d};
    check_launch(launch_gemm(gate_up, Epilogue::kSiluMul, dtype_of(h), stream), op);
  } else {  // GeLU-tanh: gate and up stored, then one elementwise pass
    auto up_out = at::empty({T, I}, h.options().memory_format(at::MemoryFormat::Contiguous));
    for (const auto& [w, out] : {std::pair{&gate, &act}, std::pair{&up, &up_out}}) {
      const GemmParams p{.A = x.data_ptr(), .lda = d, .W = w->data_ptr(), .out = out->data_ptr(), .ldo = I,
                         .count = cnt, .M = T, .N = I, .K = d};
      check_launch(launch_gemm(p, Epilogue::kStore, dtype_of(h), stream), op);
    }
    const GeluMulParams e{.gate = act.data_ptr(), .up = up_out.data_ptr(), .out = act.data_ptr(), .count = cnt,
                          .T = T, .I = I};
    check_launch(launch_gelu_mul(e, dtype_of(h), stream), op);
  }
  if (has_epilogue(post_norm_weight, out_scale)) {
    gemm_norm_scatter_add(h, act.data_ptr(), I, I, down, nullptr, idx, count, post_norm_weight, post_norm_eps,
                          out_scale, stream, op);
    return;
  }
  gemm_scatter_add(h, act.data_ptr(), I, I, down, nullptr, idx, count, stream, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(skipgpt, CUDA, m) {
  m.impl("route_norm", &route_norm_cuda);
  m.impl("compact", &compact_cuda);
  m.impl("gather_linear", &gather_linear_cuda);
  m.impl("q_proj_rope", &gather_linear_cuda);  // the old name of gather_linear
  m.impl("sparse_query_attention", &sparse_query_attention_cuda);
  m.impl("linear_scatter_add_", &linear_scatter_add_cuda);
  m.impl("skip_mlp_", &skip_mlp_cuda);
}

}  // namespace skipgpt::cuda
