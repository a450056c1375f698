// The device-independent checks of the in-place ops (linear_scatter_add_, skip_mlp_), shared by
// the CPU and CUDA wrappers: their kernels add rows into h without atomics, so no two elements
// of h may share memory (an expand()ed h would lose updates), and no input the op reads (a,
// the weights, the bias, the norm weight, idx, count) may share memory with h (it would be read
// after h's rows were written: a bias that is a row of h, or a weight that is h, gives wrong
// sums). The internal check is exact for the layout the ops take (h: 2-D, unit stride in its
// last dimension); the input-vs-h check is a conservative byte-range test (column blocks of one
// buffer that share no element are refused too). Neither reads tensor data, so both are safe
// under CUDA graph capture.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

namespace skipgpt {

// [first, last] byte addresses a tensor's elements can occupy (numel() > 0).
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
  const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size()) - 1};
}

inline void check_no_internal_overlap(const at::Tensor& h, const char* op) {
  // Rows of a unit-stride 2-D h are disjoint iff each starts at or past the previous one's end.
  const bool disjoint = h.dim() == 2 && h.stride(1) == 1
                            ? h.size(0) <= 1 || h.size(1) == 0 || h.stride(0) >= h.size(1)
                            : h.is_non_overlapping_and_dense();
  TORCH_CHECK(disjoint, op, ": h is updated in place and must not have elements that share memory (e.g. an "
              "expand()ed tensor), got shape ", h.sizes(), " and strides ", h.strides(), "; clone() it first");
}

inline void check_no_overlap_with_h(const at::Tensor& h, const at::Tensor& t, const char* op, const char* name) {
  if (h.numel() == 0 || t.numel() == 0 || !h.is_alias_of(t)) return;
  const auto [h0, h1] = byte_span(h);
  const auto [t0, t1] = byte_span(t);
  TORCH_CHECK(t1 < h0 || h1 < t0, op, ": ", name, " must not share memory with h, which is updated in place; "
              "clone() it first");
}

// Every read-only input of an in-place op, by name, against h.
inline void check_inputs_apart_from_h(const at::Tensor& h,
                                      std::initializer_list<std::pair<const at::Tensor*, const char*>> inputs,
                                      const char* op) {
  for (const auto& [t, name] : inputs)
    if (t != nullptr && t->defined()) check_no_overlap_with_h(h, *t, op, name);
}

inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

}  // namespace skipgpt
