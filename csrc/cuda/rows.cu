// Row-wise kernels around the GEMMs: the MLP's gather + RMSNorm of its executing rows, and
// RoPE (with the optional per-head RMSNorm) on compacted Q rows when head_dim does not tile
// the GEMM's N block. One warp per row (or per row and head); rows past count exit at once.
#include "common.cuh"

namespace skipgpt::cuda {
namespace {

constexpr int kWarps = 8;

template <typename T, bool kVec>
__global__ void __launch_bounds__(kWarps * 32) gather_norm_kernel(GatherNormParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t i = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  if (i >= load_count(p.count, p.T)) return;
  const T* row = static_cast<const T*>(p.h) + p.idx[i] * p.h_stride;
  const T* nw = static_cast<const T*>(p.norm_weight);
  T* out = static_cast<T*>(p.x) + i * p.d;
  using P = RowPack<T, kVec>;
  float ss = 0.f;
  for (int64_t j = int64_t{lane} * P::V; j < p.d; j += 32 * P::V) {
    P x;
    x.load(row + j);
#pragma unroll
    for (int e = 0; e < P::V; ++e) ss += to_float<T>(x.e[e]) * to_float<T>(x.e[e]);
  }
  write_rms_norm_row<T, kVec>(row, nw, out, p.d, rsqrtf(warp_sum(ss) / static_cast<float>(p.d) + p.eps), lane);
}

// In place on out [M, N] (rows < count): per head, optional RMSNorm, then RoPE with the
// cos/sin row of token a_idx[i].
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) rope_rows_kernel(GemmParams p) {
  const int lane = threadIdx.x % 32, hd = p.head_dim, half = hd / 2;
  const int64_t heads = p.N / hd;
  const int64_t item = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  const int64_t i = item / heads, h = item % heads;
  if (i >= load_count(p.count, p.M)) return;
  T* v = static_cast<T*>(p.out) + i * p.ldo + h * hd;
  const T* hw = static_cast<const T*>(p.head_norm_weight);
  const int64_t row = p.a_idx != nullptr ? p.a_idx[i] : i;
  const T* c = static_cast<const T*>(p.cos) + row * hd;
  const T* s = static_cast<const T*>(p.sin) + row * hd;
  float inv = 1.f;
  if (hw != nullptr) {
    float ss = 0.f;
    for (int j = lane; j < hd; j += 32) ss += to_float<T>(v[j]) * to_float<T>(v[j]);
    inv = rsqrtf(warp_sum(ss) / static_cast<float>(hd) + p.head_norm_eps);  // also a warp barrier
  }
  for (int j = lane; j < half; j += 32) {
    float t1 = to_float<T>(v[j]), t2 = to_float<T>(v[j + half]);
    if (hw != nullptr) {
      t1 = round_to<T>(to_float<T>(hw[j]) * round_to<T>(t1 * inv));
      t2 = round_to<T>(to_float<T>(hw[j + half]) * round_to<T>(t2 * inv));
    }
    rope_pair<T>(t1, t2, to_float<T>(c[j]), to_float<T>(s[j]), to_float<T>(c[j + half]), to_float<T>(s[j + half]), v[j],
                 v[j + half]);
  }
}

}  // namespace

cudaError_t launch_gather_norm(const GatherNormParams& p, DType dtype, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    constexpr int V = 16 / sizeof(T);
    const bool vec = p.d % V == 0 && p.h_stride % V == 0 && reinterpret_cast<uintptr_t>(p.h) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(p.norm_weight) % 16 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
    const auto blocks = static_cast<unsigned>(ceil_div(p.T, kWarps));
    if (vec) {
      gather_norm_kernel<T, true><<<blocks, kWarps * 32, 0, stream>>>(p);
    } else {
      gather_norm_kernel<T, false><<<blocks, kWarps * 32, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_rope_rows(const GemmParams& p, DType dtype, cudaStream_t stream) {
  if (p.M == 0 || p.head_dim <= 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    const auto blocks = static_cast<unsigned>(ceil_div(p.M * (p.N / p.head_dim), kWarps));
    rope_rows_kernel<T><<<blocks, kWarps * 32, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace skipgpt::cuda
