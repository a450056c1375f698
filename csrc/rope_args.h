// The device-independent argument checks of q_proj_rope, shared by the CPU and CUDA wrappers
// (each adds its own device and dtype checks): cos and sin come together or not at all,
// head_norm_weight only with them, cos and sin are [T, head_dim] with an even head_dim that
// tiles the weight's N output features, and head_norm_weight is [head_dim].
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace skipgpt {

// head_dim, or 0 for a plain projection (no cos/sin).
inline int64_t check_rope_args(const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                               const std::optional<at::Tensor>& head_norm_weight, int64_t T, int64_t N,
                               const char* op) {
  TORCH_CHECK(cos.has_value() == sin.has_value(), op, ": cos and sin must be given together (RoPE) or both "
              "omitted (a plain projection)");
  TORCH_CHECK(cos.has_value() || !head_norm_weight.has_value(), op,
              ": head_norm_weight needs cos and sin (it normalises RoPE heads)");
  if (!cos.has_value()) return 0;
  for (const auto& [t, name] : {std::pair{&*cos, "cos"}, std::pair{&*sin, "sin"}})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T, op, ": ", name, " must be [", T, ", head_dim], got ", t->sizes());
  const int64_t hd = cos->size(1);
  TORCH_CHECK(sin->size(1) == hd, op, ": sin must be [", T, ", ", hd, "] like cos, got ", sin->sizes());
  TORCH_CHECK(hd > 0 && hd % 2 == 0 && N % hd == 0, op, ": weight's ", N,
              " output features must be a multiple of head_dim = cos.size(1) = ", hd, " (even)");
  if (head_norm_weight.has_value())
    TORCH_CHECK(head_norm_weight->dim() == 1 && head_norm_weight->size(0) == hd, op, ": head_norm_weight must be [",
                hd, "], got ", head_norm_weight->sizes());
  return hd;
}

}  // namespace skipgpt
