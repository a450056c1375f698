// The device-independent range checks of sparse_query_attention's position arguments, shared by
// the CPU and CUDA wrappers. Key j sits at cache position kv_offset + j and the kernels compute
// pos - kv_offset and pos - window + 1 - kv_offset in int64: with every position, kv_offset + Lk
// and the window inside [0, 2^62] none of these can overflow (far past any real context).
#pragma once
#include <c10/util/Exception.h>

#include <cstdint>

namespace skipgpt {

constexpr int64_t kMaxPosition = int64_t{1} << 62;

inline void check_position_args(int64_t kv_offset, int64_t Lk, int64_t window, const char* op) {
  TORCH_CHECK(kv_offset >= 0 && kv_offset <= kMaxPosition - Lk, op,
              ": kv_offset (the cache position of key 0) must be in [0, 2^62 - Lk] = [0, ", kMaxPosition - Lk,
              "], got ", kv_offset);
  TORCH_CHECK(window >= 0 && window <= kMaxPosition, op, ": window must be in [0, 2^62] (0 = none), got ", window);
}

}  // namespace skipgpt
