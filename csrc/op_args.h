// The device-independent argument checks of the ops, written once for the CPU wrappers
// (csrc/cpu/*.cpp) and the CUDA ones (csrc/cuda/ops_cuda.cpp), so that both devices refuse the
// same arguments with the same message.
//
// Each check_<op>_args calls the device's `on_device(tensor, name)` on every tensor argument
// but the first (the wrapper checks that one itself, with the dtypes its kernels take), then
// checks shapes, the dtypes that must match, the in-place ops' aliasing rules and the position
// ranges, and returns the op's dimensions. A device's wrapper adds only what is its own: the
// device, the dtypes its kernels take, alignment and size limits (CUDA), and the values in idx
// and q_pos (the CPU reads them; on CUDA that would be a host sync). compact has no
// device-independent check (any mask is flattened and read as bool). Nothing here reads tensor
// data, so every check is safe under CUDA graph capture.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

namespace skipgpt {

// Positions (kv_offset + key index, q_pos, the window) stay in [0, 2^62]: the kernels compute
// pos - kv_offset and pos - window + 1 - kv_offset in int64, which then cannot overflow (far
// past any real context).
constexpr int64_t kMaxPosition = int64_t{1} << 62;

// -- one argument --------------------------------------------------------------------------------
// torch's name of a dtype (float32, int64, ...), not ScalarType's (Float, Long, ...). (The pair
// holds std::string in older torch, std::string_view in newer.)
inline std::string dtype_name(at::ScalarType s) { return std::string(c10::getDtypeNames(s).first); }

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", dtype_name(want), ", got ",
              dtype_name(t.scalar_type()));
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dtype_name(s));
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
}

// `why`, when given, says where the expected shape comes from.
inline void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* op, const char* name,
                        const char* why = nullptr) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must be ", want, why != nullptr ? " (" : "",
              why != nullptr ? why : "", why != nullptr ? ")" : "", ", got ", t.sizes());
}

// A weight [rows, cols] of ref's dtype; rows < 0: any number of rows (returned).
inline int64_t check_weight(const at::Tensor& w, int64_t rows, int64_t cols, const at::Tensor& ref, const char* op,
                            const char* name, const char* ref_name) {
  check_same_dtype(w, ref, op, name, ref_name);
  TORCH_CHECK(w.dim() == 2 && (rows < 0 || w.size(0) == rows) && w.size(1) == cols, op, ": ", name, " must be [",
              rows < 0 ? std::string("out_features") : std::to_string(rows), ", ", cols, "], got ", w.sizes());
  return w.size(0);
}

inline void check_bias(const std::optional<at::Tensor>& bias, int64_t n, const at::Tensor& ref, const char* op,
                       const char* ref_name) {
  if (!bias.has_value()) return;
  check_same_dtype(*bias, ref, op, "bias", ref_name);
  check_shape(*bias, {n}, op, "bias");
}

// The executing rows' metadata: int64 idx [T] and a one-value int64 count. Their values are the
// device's to check (or to trust).
inline void check_idx_args(const at::Tensor& idx, const at::Tensor& count, int64_t T, const char* op) {
  check_dtype(idx, at::kLong, op, "idx");
  check_dtype(count, at::kLong, op, "count");
  TORCH_CHECK(count.numel() == 1, op, ": count must hold one value, got shape ", count.sizes());
  check_dim(idx, 1, op, "idx");
  TORCH_CHECK(idx.size(0) == T, op, ": idx must have ", T, " entries (one per row), got ", idx.size(0));
}

using NamedTensor = std::pair<const at::Tensor*, const char*>;

inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// on_device(t, name) for every given argument (absent optionals are skipped).
template <typename OnDevice>
void check_devices(OnDevice&& on_device, std::initializer_list<NamedTensor> args) {
  for (const auto& [t, name] : args)
    if (t != nullptr && t->defined()) on_device(*t, name);
}

// -- the in-place ops' aliasing rules ------------------------------------------------------------
// linear_scatter_add_ and skip_mlp_ add rows into h without atomics, so no two elements of h may
// share memory (an expand()ed h would lose updates), and no input the op reads (a, the weights,
// the bias, the norm weight, idx, count) may share memory with h (it would be read after h's rows
// were written: a bias that is a row of h, or a weight that is h, gives wrong sums). The internal
// check is exact for the layout the ops take (h: 2-D, unit stride in its last dimension); the
// input-vs-h check is a conservative byte-range test (column blocks of one buffer that share no
// element are refused too).

// [first, last] byte addresses a tensor's elements can occupy (numel() > 0).
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
  const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size()) - 1};
}

// h of an in-place op: 2-D, unit stride in its last dimension, no two elements in one place.
inline void check_inplace_target(const at::Tensor& h, const char* op) {
  check_dim(h, 2, op, "h");
  TORCH_CHECK(h.stride(1) == 1, op, ": h is updated in place and must have unit stride in its last dimension, got "
              "strides ", h.strides());
  // Rows of a unit-stride 2-D h are disjoint iff each starts at or past the previous one's end.
  const bool disjoint = h.size(0) <= 1 || h.size(1) == 0 || h.stride(0) >= h.size(1);
  TORCH_CHECK(disjoint, op, ": h is updated in place and must not have elements that share memory (e.g. an "
              "expand()ed tensor), got shape ", h.sizes(), " and strides ", h.strides(), "; clone() it first");
}

// Every read-only input of an in-place op, by name, against h.
inline void check_inputs_apart_from_h(const at::Tensor& h, std::initializer_list<NamedTensor> inputs, const char* op) {
  if (h.numel() == 0) return;
  const auto [h0, h1] = byte_span(h);
  for (const auto& [t, name] : inputs) {
    if (t == nullptr || !t->defined() || t->numel() == 0 || !h.is_alias_of(*t)) continue;
    const auto [t0, t1] = byte_span(*t);
    TORCH_CHECK(t1 < h0 || h1 < t0, op, ": ", name, " must not share memory with h, which is updated in place; "
                "clone() it first");
  }
}

// -- one function per op -------------------------------------------------------------------------
struct RouteNormDims {
  int64_t T, d;
};

template <typename OnDevice>
RouteNormDims check_route_norm_args(const at::Tensor& h, const at::Tensor& norm_weight, const at::Tensor& router_weight,
                                    const at::Tensor& router_bias, const std::optional<at::Tensor>& row_valid,
                                    const char* op, OnDevice&& on_device) {
  check_devices(on_device, {{&norm_weight, "norm_weight"}, {&router_weight, "router_weight"},
                            {&router_bias, "router_bias"}, {opt_ptr(row_valid), "row_valid"}});
  check_dim(h, 2, op, "h");
  const int64_t T = h.size(0), d = h.size(1);
  check_same_dtype(norm_weight, h, op, "norm_weight", "h");
  check_shape(norm_weight, {d}, op, "norm_weight", "h's width");
  // The router margins are fp32 whatever the model's dtype.
  check_dtype(router_weight, at::kFloat, op, "router_weight");
  check_dtype(router_bias, at::kFloat, op, "router_bias");
  check_shape(router_weight, {2, d}, op, "router_weight");
  check_shape(router_bias, {2}, op, "router_bias");
  if (row_valid.has_value()) {
    check_dtype(*row_valid, at::kBool, op, "row_valid");
    TORCH_CHECK(row_valid->numel() == T, op, ": row_valid must have ", T, " entries (one per row of h), got ",
                row_valid->numel());
  }
  return {T, d};
}

struct GatherLinearDims {
  int64_t T, d, N;
  int64_t head_dim;  // 0: a plain projection (no cos/sin)
  int64_t rot_dim;   // the rotated features of a head (cos.size(1)), <= head_dim
};

template <typename OnDevice>
GatherLinearDims check_gather_linear_args(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& count,
                                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& head_norm_weight,
                                          const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                                          int64_t head_dim, bool whole_norm, const char* op, OnDevice&& on_device) {
  check_devices(on_device, {{&weight, "weight"}, {opt_ptr(bias), "bias"}, {opt_ptr(head_norm_weight), "head_norm_weight"},
                            {opt_ptr(cos), "cos"}, {opt_ptr(sin), "sin"}, {&idx, "idx"}, {&count, "count"}});
  check_dim(x, 2, op, "x");
  const int64_t T = x.size(0), d = x.size(1);
  const int64_t N = check_weight(weight, -1, d, x, op, "weight", "x");
  check_bias(bias, N, x, op, "x");
  // RoPE: cos and sin come together or not at all, head_norm_weight only with them; they are
  // [T, rot_dim] with an even rot_dim <= head_dim, and head_dim tiles the N output features.
  TORCH_CHECK(cos.has_value() == sin.has_value(), op, ": cos and sin must be given together (RoPE) or both "
              "omitted (a plain projection)");
  TORCH_CHECK(cos.has_value() || !head_norm_weight.has_value(), op,
              ": head_norm_weight needs cos and sin (it normalises RoPE heads)");
  TORCH_CHECK(head_dim >= 0, op, ": head_dim must be >= 0 (0: cos.size(1)), got ", head_dim);
  int64_t hd = 0, rd = 0;
  if (cos.has_value()) {
    for (const auto& [t, name] : {NamedTensor{&*cos, "cos"}, NamedTensor{&*sin, "sin"}}) {
      TORCH_CHECK(t->dim() == 2 && t->size(0) == T, op, ": ", name, " must be [", T, ", rotary_dim], got ", t->sizes());
      check_float_dtype(*t, op, name);
    }
    rd = cos->size(1);
    TORCH_CHECK(sin->size(1) == rd, op, ": sin must be [", T, ", ", rd, "] like cos, got ", sin->sizes());
    hd = head_dim > 0 ? head_dim : rd;
    TORCH_CHECK(rd > 0 && rd % 2 == 0 && rd <= hd, op, ": cos.size(1) = ", rd,
                " (the rotated features of a head) must be even, > 0 and <= head_dim = ", hd);
    TORCH_CHECK(N % hd == 0, op, ": weight's ", N, " output features must be a multiple of head_dim = ", hd);
  } else {
    TORCH_CHECK(head_dim == 0 && !whole_norm, op, ": head_dim and whole_norm need cos and sin (RoPE heads)");
  }
  if (head_norm_weight.has_value()) {
    check_same_dtype(*head_norm_weight, x, op, "head_norm_weight", "x");
    if (whole_norm) {
      check_shape(*head_norm_weight, {N}, op, "head_norm_weight", "N (whole_norm: the whole projected row)");
    } else {
      check_shape(*head_norm_weight, {hd}, op, "head_norm_weight", "head_dim");
    }
  } else {
    TORCH_CHECK(!whole_norm, op, ": whole_norm needs head_norm_weight");
  }
  check_idx_args(idx, count, T, op);
  return {T, d, N, hd, rd};
}

struct AttentionDims {
  int64_t T, B, Hq, Hkv, Lk, hd;
};

template <typename OnDevice>
AttentionDims check_attention_args(const at::Tensor& q, const at::Tensor& idx, const at::Tensor& count,
                                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
                                   const std::optional<at::Tensor>& key_valid, int64_t kv_offset, int64_t seq_len,
                                   int64_t window, const char* op, OnDevice&& on_device) {
  check_devices(on_device, {{&k, "k"}, {&v, "v"}, {&q_pos, "q_pos"}, {opt_ptr(key_valid), "key_valid"},
                            {&idx, "idx"}, {&count, "count"}});
  check_dim(q, 2, op, "q");
  check_dim(k, 4, op, "k");
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  const int64_t T = q.size(0), B = k.size(0), Hkv = k.size(1), Lk = k.size(2), hd = k.size(3);
  TORCH_CHECK(hd > 0 && Hkv > 0, op, ": k must be [B, Hkv, Lk, head_dim] with Hkv, head_dim > 0, got ", k.sizes());
  TORCH_CHECK(q.size(1) % (Hkv * hd) == 0, op, ": q's width ", q.size(1), " must be a multiple of Hkv * head_dim = ",
              Hkv * hd, " (GQA)");
  TORCH_CHECK(seq_len > 0 && B * seq_len == T, op, ": seq_len must satisfy B * seq_len == T (", B, " * ", seq_len,
              " vs ", T, ")");
  TORCH_CHECK(kv_offset >= 0 && kv_offset <= kMaxPosition - Lk, op,
              ": kv_offset (the cache position of key 0) must be in [0, 2^62 - Lk] = [0, ", kMaxPosition - Lk,
              "], got ", kv_offset);
  TORCH_CHECK(window >= 0 && window <= kMaxPosition, op, ": window must be in [0, 2^62] (0 = none), got ", window);
  check_dtype(q_pos, at::kLong, op, "q_pos");
  check_shape(q_pos, {T}, op, "q_pos", "one position per row");
  if (key_valid.has_value()) {
    check_dtype(*key_valid, at::kBool, op, "key_valid");
    check_shape(*key_valid, {B, Lk}, op, "key_valid");
  }
  check_idx_args(idx, count, T, op);
  return {T, B, q.size(1) / hd, Hkv, Lk, hd};
}

struct LinearScatterAddDims {
  int64_t T, d, K;
};

template <typename OnDevice>
LinearScatterAddDims check_linear_scatter_add_args(const at::Tensor& h, const at::Tensor& a, const at::Tensor& idx,
                                                   const at::Tensor& count, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const char* op,
                                                   OnDevice&& on_device) {
  check_devices(on_device, {{&a, "a"}, {&weight, "weight"}, {opt_ptr(bias), "bias"}, {&idx, "idx"}, {&count, "count"}});
  check_inplace_target(h, op);
  const int64_t T = h.size(0), d = h.size(1);
  check_same_dtype(a, h, op, "a", "h");
  TORCH_CHECK(a.dim() == 2 && a.size(0) == T, op, ": a must be [", T, ", in_features], got ", a.sizes());
  const int64_t K = a.size(1);
  check_weight(weight, d, K, h, op, "weight", "h");
  check_bias(bias, d, h, op, "h");
  check_idx_args(idx, count, T, op);
  check_inputs_apart_from_h(h, {{&a, "a"}, {&weight, "weight"}, {opt_ptr(bias), "bias"}, {&idx, "idx"}, {&count, "count"}},
                            op);
  return {T, d, K};
}

// The optional epilogue of the scatter-adding ops: a post-norm weight like h's width, a finite
// epsilon and multiplier.
template <typename OnDevice>
void check_epilogue_args(const at::Tensor& h, const std::optional<at::Tensor>& post_norm_weight, double post_norm_eps,
                         double out_scale, const char* op, OnDevice&& on_device) {
  if (post_norm_weight.has_value()) {
    check_devices(on_device, {{opt_ptr(post_norm_weight), "post_norm_weight"}});
    check_same_dtype(*post_norm_weight, h, op, "post_norm_weight", "h");
    check_shape(*post_norm_weight, {h.size(1)}, op, "post_norm_weight", "h's width");
    check_inputs_apart_from_h(h, {{opt_ptr(post_norm_weight), "post_norm_weight"}}, op);
  }
  TORCH_CHECK(std::isfinite(post_norm_eps) && post_norm_eps >= 0.0, op, ": post_norm_eps must be finite and >= 0, got ",
              post_norm_eps);
  TORCH_CHECK(std::isfinite(out_scale), op, ": out_scale must be finite, got ", out_scale);
}

enum class Activation { kSilu, kGeluTanh };

inline Activation check_activation(c10::string_view activation, const char* op) {
  if (activation == "silu") return Activation::kSilu;
  TORCH_CHECK(activation == "gelu_tanh", op, ": activation must be 'silu' or 'gelu_tanh', got '", std::string(activation),
              "'");
  return Activation::kGeluTanh;
}

struct SkipMlpDims {
  int64_t T, d, I;
};

template <typename OnDevice>
SkipMlpDims check_skip_mlp_args(const at::Tensor& h, const at::Tensor& idx, const at::Tensor& count,
                                const std::optional<at::Tensor>& norm_weight, const at::Tensor& gate_weight,
                                const at::Tensor& up_weight, const at::Tensor& down_weight, const char* op,
                                OnDevice&& on_device) {
  check_devices(on_device, {{opt_ptr(norm_weight), "norm_weight"}, {&gate_weight, "gate_weight"}, {&up_weight, "up_weight"},
                            {&down_weight, "down_weight"}, {&idx, "idx"}, {&count, "count"}});
  check_inplace_target(h, op);
  const int64_t T = h.size(0), d = h.size(1);
  if (norm_weight.has_value()) {
    check_same_dtype(*norm_weight, h, op, "norm_weight", "h");
    check_shape(*norm_weight, {d}, op, "norm_weight", "h's width");
  }
  TORCH_CHECK(gate_weight.dim() == 2, op, ": gate_weight must be [intermediate, ", d, "], got ", gate_weight.sizes());
  const int64_t I = gate_weight.size(0);
  check_weight(gate_weight, I, d, h, op, "gate_weight", "h");
  check_weight(up_weight, I, d, h, op, "up_weight", "h");
  check_weight(down_weight, d, I, h, op, "down_weight", "h");
  check_idx_args(idx, count, T, op);
  check_inputs_apart_from_h(h, {{opt_ptr(norm_weight), "norm_weight"}, {&gate_weight, "gate_weight"}, {&up_weight, "up_weight"},
                                {&down_weight, "down_weight"}, {&idx, "idx"}, {&count, "count"}},
                            op);
  return {T, d, I};
}

}  // namespace skipgpt
