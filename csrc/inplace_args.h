// The device-independent checks of the in-place ops (linear_scatter_add_, skip_mlp_), shared by
// the CPU and CUDA wrappers: their kernels add rows into h without atomics, so no two elements
// of h may share memory (an expand()ed h would lose updates), and linear_scatter_add_'s input
// a must not share memory with h (other rows of a would be read after h's rows were written).
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace skipgpt {

inline void check_no_internal_overlap(const at::Tensor& h, const char* op) {
  TORCH_CHECK(at::has_internal_overlap(h) != at::MemOverlap::Yes, op,
              ": h is updated in place and must not have elements that share memory (e.g. an expand()ed tensor), "
              "got strides ", h.strides(), "; clone() it first");
}

inline void check_no_overlap_with_h(const at::Tensor& h, const at::Tensor& t, const char* op, const char* name) {
  const auto status = at::get_overlap_status(h, t);
  TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ", name,
              " must not share memory with h, which is updated in place; clone() it first");
}

}  // namespace skipgpt
