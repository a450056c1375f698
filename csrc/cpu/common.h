// Shared helpers of the CPU kernels: argument checks that name the argument, count reading,
// row loops and float conversion.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>

namespace skipgpt::cpu {

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", s);
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

// The executing rows: idx[:count] must be unique rows in [0, rows), ascending (so the in-place
// scatter needs no atomics and the compacted order is the token order).
inline int64_t read_count_and_check_idx(const at::Tensor& idx, const at::Tensor& count, int64_t rows,
                                        const char* op) {
  check_cpu(idx, op, "idx");
  check_cpu(count, op, "count");
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(count.scalar_type() == at::kLong, op, ": count must be int64, got ", count.scalar_type());
  TORCH_CHECK(count.numel() == 1, op, ": count must hold one value, got shape ", count.sizes());
  check_dim(idx, 1, op, "idx");
  TORCH_CHECK(idx.size(0) == rows, op, ": idx must have ", rows, " entries (one per row), got ", idx.size(0));
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

template <typename T>
inline float to_f(T x) {
  return static_cast<float>(x);
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
