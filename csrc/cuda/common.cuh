// Device helpers shared by the .cu files: element conversions and warp reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace skipgpt::cuda {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Round through T and back: the value an fp32 result has once stored in T.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float<T>(from_float<T>(x));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One 16-byte vector of a row (kVec) or a single element: how the row-wise kernels walk rows,
// a warp's lanes taking consecutive vectors.
template <typename T, bool kVec>
struct RowPack {
  static constexpr int V = kVec ? 16 / sizeof(T) : 1;
  union {
    uint4 u;
    T e[V];
  };
  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kVec) {
      u = *reinterpret_cast<const uint4*>(p);
    } else {
      e[0] = *p;
    }
  }
  __device__ __forceinline__ void store(T* p) const {
    if constexpr (kVec) {
      *reinterpret_cast<uint4*>(p) = u;
    } else {
      *p = e[0];
    }
  }
};

// RoPE of the pair (t1, t2) = (x[j], x[j + half]) with the cos/sin of columns j and j + half,
// rounded as HF computes it in T: round(x * cos) + round(rotate_half(x) * sin), rounded.
template <typename T>
__device__ __forceinline__ void rope_pair(float t1, float t2, float c1, float s1, float c2, float s2, T& o1, T& o2) {
  o1 = from_float<T>(round_to<T>(t1 * c1) - round_to<T>(t2 * s1));
  o2 = from_float<T>(round_to<T>(t2 * c2) + round_to<T>(t1 * s2));
}

// The writing pass of an RMSNorm, as HF computes it: out = w * round_T(x * inv), per warp.
template <typename T, bool kVec>
__device__ __forceinline__ void write_rms_norm_row(const T* row, const T* nw, T* out, int64_t d, float inv, int lane) {
  using P = RowPack<T, kVec>;
  for (int64_t j = int64_t{lane} * P::V; j < d; j += 32 * P::V) {
    P x, w, y;
    x.load(row + j);  // an L1/L2 hit: the row was just read for its statistics
    w.load(nw + j);
#pragma unroll
    for (int e = 0; e < P::V; ++e) y.e[e] = from_float<T>(to_float<T>(w.e[e]) * round_to<T>(to_float<T>(x.e[e]) * inv));
    y.store(out + j);
  }
}

// The count a kernel works on: the device value when given (clamped to [0, capacity], so a
// bad count cannot index past the row buffers), else the capacity.
__device__ __forceinline__ int64_t load_count(const int64_t* count, int64_t capacity) {
  if (count == nullptr) return capacity;
  const int64_t c = *count;
  return c < 0 ? 0 : (c > capacity ? capacity : c);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Over 48 KB of dynamic shared memory needs an opt-in per kernel and device. It is not a
// stream operation (fine while a graph is being captured); done once per kernel and device.
template <auto kKernel>
cudaError_t opt_in_smem(size_t bytes) {
  static bool done[64] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess || (dev >= 0 && dev < 64 && done[dev])) return e;
  e = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e == cudaSuccess && dev >= 0 && dev < 64) done[dev] = true;
  return e;
}

// Calls f.template operator()<T>() with T the element type of dtype.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32:
      return f.template operator()<float>();
    case DType::kBF16:
      return f.template operator()<__nv_bfloat16>();
    case DType::kF16:
      return f.template operator()<__half>();
  }
  return cudaErrorInvalidValue;
}

}  // namespace skipgpt::cuda
