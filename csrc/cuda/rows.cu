// Row-wise kernels around the GEMMs: the MLP's gather + RMSNorm of its executing rows (a plain
// gather without a norm), RoPE (with the optional per-head RMSNorm) on compacted Q rows when
// head_dim does not tile the GEMM's N block, GeLU-tanh(gate) * up, and the post-norm /
// output-multiplier epilogue scatter-added into the residual. One warp per row (or per row and
// head); rows past count exit at once.
#include <algorithm>

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
  if (nw == nullptr) {  // no input norm (OLMo 2's MLP): the gather alone
    for (int64_t j = int64_t{lane} * P::V; j < p.d; j += 32 * P::V) {
      P x;
      x.load(row + j);
      x.store(out + j);
    }
    return;
  }
  float ss = 0.f;
  for (int64_t j = int64_t{lane} * P::V; j < p.d; j += 32 * P::V) {
    P x;
    x.load(row + j);
#pragma unroll
    for (int e = 0; e < P::V; ++e) ss += to_float<T>(x.e[e]) * to_float<T>(x.e[e]);
  }
  write_rms_norm_row<T, kVec>(row, nw, out, p.d, rsqrtf(warp_sum(ss) / static_cast<float>(p.d) + p.eps), lane);
}

// row_inv[i] = 1 / RMS(out[i, :N]) for the rows i < count: the whole-row norm's statistic
// (OLMo 2), a pass of its own so that no warp rewrites a row another is still reading.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) row_rms_kernel(GemmParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t i = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  if (i >= load_count(p.count, p.M)) return;
  const T* v = static_cast<const T*>(p.out) + i * p.ldo;
  float ss = 0.f;
  for (int64_t j = lane; j < p.N; j += 32) ss += to_float<T>(v[j]) * to_float<T>(v[j]);
  ss = warp_sum(ss);
  if (lane == 0) p.row_inv[i] = rsqrtf(ss / static_cast<float>(p.N) + p.head_norm_eps);
}

// In place on out [M, N] (rows < count): per head, the optional RMSNorm (of the head, or of the
// whole row with row_inv), then RoPE on the head's first rot_dim features with the cos/sin row
// of token a_idx[i]; the rest of the head keeps its normalised value (partial RoPE).
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) rope_rows_kernel(GemmParams p) {
  const int lane = threadIdx.x % 32, hd = p.head_dim, rd = p.rot_dim > 0 ? p.rot_dim : hd, half = rd / 2;
  const int64_t heads = p.N / hd;
  const int64_t item = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  const int64_t i = item / heads, h = item % heads;
  if (i >= load_count(p.count, p.M)) return;
  T* v = static_cast<T*>(p.out) + i * p.ldo + h * hd;
  const bool whole = p.row_inv != nullptr;
  const T* hw = static_cast<const T*>(p.head_norm_weight);
  if (hw != nullptr && whole) hw += h * hd;  // the whole-row weight [N]: this head's slice
  const int64_t row = p.a_idx != nullptr ? p.a_idx[i] : i;
  const T* c = static_cast<const T*>(p.cos) + row * rd;
  const T* s = static_cast<const T*>(p.sin) + row * rd;
  float inv = 1.f;
  if (hw != nullptr) {
    if (whole) {
      inv = p.row_inv[i];
    } else {
      float ss = 0.f;
      for (int j = lane; j < hd; j += 32) ss += to_float<T>(v[j]) * to_float<T>(v[j]);
      inv = rsqrtf(warp_sum(ss) / static_cast<float>(hd) + p.head_norm_eps);  // also a warp barrier
    }
  }
  // OLMo 2's norm rounds once (the weight times the fp32 normalised value); the per-head
  // norms as Llama's RMSNorm, twice (the normalised value, then the product).
  const auto normed = [&](float t, int j) {
    return whole ? round_to<T>(to_float<T>(hw[j]) * (t * inv)) : round_to<T>(to_float<T>(hw[j]) * round_to<T>(t * inv));
  };
  for (int j = lane; j < half; j += 32) {
    float t1 = to_float<T>(v[j]), t2 = to_float<T>(v[j + half]);
    if (hw != nullptr) {
      t1 = normed(t1, j);
      t2 = normed(t2, j + half);
    }
    rope_pair<T>(t1, t2, to_float<T>(c[j]), to_float<T>(s[j]), to_float<T>(c[j + half]), to_float<T>(s[j + half]), v[j],
                 v[j + half]);
  }
  if (hw != nullptr) {
    for (int j = rd + lane; j < hd; j += 32) v[j] = from_float<T>(normed(to_float<T>(v[j]), j));
  }
}

// act[i, n] = gelu_tanh(g[i, n]) * u[i, n] for i < count, from the rounded gate and up rows,
// computed in fp32 and rounded once. One thread per element of the first count rows.
template <typename T>
__global__ void __launch_bounds__(256) gelu_mul_kernel(GeluMulParams p) {
  const int64_t n = load_count(p.count, p.T) * p.I;
  const T* g = static_cast<const T*>(p.gate);
  const T* u = static_cast<const T*>(p.up);
  T* out = static_cast<T*>(p.out);
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < n; e += int64_t{gridDim.x} * blockDim.x) {
    const float x = to_float<T>(g[e]);
    const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);  // sqrt(2/pi) (x + 0.044715 x^3)
    out[e] = from_float<T>(0.5f * x * (1.f + tanhf(inner)) * to_float<T>(u[e]));
  }
}

// h[idx[i]] += out_scale * post_norm(y[i]) for i < count, as the reference rounds it: the
// RMSNorm in fp32 times the weight, rounded once; times out_scale, rounded; added, rounded.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) norm_scatter_add_kernel(NormScatterAddParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t i = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  if (i >= load_count(p.count, p.T)) return;
  const T* y = static_cast<const T*>(p.y) + i * p.d;
  const T* nw = static_cast<const T*>(p.norm_weight);
  T* h = static_cast<T*>(p.h) + p.idx[i] * p.h_stride;
  float inv = 1.f;
  if (nw != nullptr) {
    float ss = 0.f;
    for (int64_t j = lane; j < p.d; j += 32) ss += to_float<T>(y[j]) * to_float<T>(y[j]);
    inv = rsqrtf(warp_sum(ss) / static_cast<float>(p.d) + p.eps);
  }
  for (int64_t j = lane; j < p.d; j += 32) {
    float z = to_float<T>(y[j]);
    if (nw != nullptr) z = round_to<T>(z * inv * to_float<T>(nw[j]));
    if (p.out_scale != 1.f) z = round_to<T>(z * p.out_scale);
    h[j] = from_float<T>(to_float<T>(h[j]) + z);
  }
}

}  // namespace

cudaError_t launch_gelu_mul(const GeluMulParams& p, DType dtype, cudaStream_t stream) {
  if (p.T == 0 || p.I == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(p.T * p.I, 256), 65535));
    gelu_mul_kernel<T><<<blocks, 256, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_norm_scatter_add(const NormScatterAddParams& p, DType dtype, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    norm_scatter_add_kernel<T><<<static_cast<unsigned>(ceil_div(p.T, kWarps)), kWarps * 32, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

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
    if (p.row_inv != nullptr) {
      row_rms_kernel<T><<<static_cast<unsigned>(ceil_div(p.M, kWarps)), kWarps * 32, 0, stream>>>(p);
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
    const auto blocks = static_cast<unsigned>(ceil_div(p.M * (p.N / p.head_dim), kWarps));
    rope_rows_kernel<T><<<blocks, kWarps * 32, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace skipgpt::cuda
