// Shared helpers of the CPU kernels: the CPU's own argument checks (the device, the values of
// idx; the rest is in ../op_args.h) and row gathering.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "../op_args.h"

namespace skipgpt::cpu {

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

// The device check the shared argument checks (op_args.h) run on every other tensor argument.
inline auto on_cpu(const char* op) {
  return [op](const at::Tensor& t, const char* name) { check_cpu(t, op, name); };
}

// The executing rows, read on the host: count, checked to be in [0, rows], and idx[:count],
// checked to be unique rows in [0, rows), ascending (so the in-place scatter needs no atomics
// and the compacted order is the token order). Their dtypes and shapes are checked already.
inline int64_t read_count_and_check_idx(const at::Tensor& idx, const at::Tensor& count, int64_t rows,
                                        const char* op) {
  const int64_t n = count.item<int64_t>();
  TORCH_CHECK(n >= 0 && n <= rows, op, ": count must be in [0, ", rows, "], got ", n);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t st = idx.stride(0);
  int64_t prev = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = ip[i * st];
    TORCH_CHECK(r > prev && r < rows, op, ": idx[:count] must be ascending unique rows in [0, ", rows,
                "), got idx[", i, "] = ", r, (r <= prev ? " (not ascending)" : " (out of range)"));
    prev = r;
  }
  return n;
}

// Gather rows idx[:n] of x [T, d] (any row stride, unit column stride) into a contiguous [n, d].
inline at::Tensor gather_rows(const at::Tensor& x, const int64_t* idx, int64_t n) {
  const int64_t d = x.size(1);
  auto out = at::empty({n, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t es = x.element_size(), rs = x.stride(0) * es;
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::memcpy(dst + i * d * es, src + idx[i] * rs, d * es);
  });
  return out;
}

}  // namespace skipgpt::cpu
