// Compacted linear layers for a handful of rows (decode). With M <= kGemvMaxRows the tiled
// GEMM would give each of its few blocks a 128-row weight panel to stream through a 3-stage
// pipeline: too few bytes in flight to approach HBM bandwidth. Here one warp owns one output
// feature: it streams that weight row once with 16-byte read-only loads (all lanes in one
// contiguous 512-byte span per step) and dots it with every executing row, so every SM has
// many independent loads in flight. The epilogues are the GEMM's (gemm_tile.cuh), with the same
// rounding: kStore (+ bias, rows past count zeroed), kScatterAdd (in place into h's rows),
// kSiluMul (gate and up rows of the same feature in one warp); kRope stores, then rotates in
// a second pass (launch_rope_rows). The count is read on the device: a count of 0 returns
// before any weight load, so a skipped module reads no weight byte.
#include "gemm_tile.cuh"

namespace skipgpt::cuda {
namespace {

constexpr int kWarps = 8;  // output features per block

template <typename T, Epilogue EPI>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(GemmParams p) {
  constexpr int R = static_cast<int>(kGemvMaxRows);
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte load
  constexpr bool kDual = EPI == Epilogue::kSiluMul;
  constexpr bool kZeroTail = EPI == Epilogue::kStore || EPI == Epilogue::kRope;
  union Pack {
    uint4 u;
    T e[V];
  };
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  if (n >= p.N) return;
  const int64_t cnt = load_count(p.count, p.M);
  T* out = static_cast<T*>(p.out);
  if constexpr (kZeroTail) {
    for (int64_t i = cnt + lane; i < p.M; i += 32) out[i * p.ldo + n] = from_float<T>(0.f);
  }
  if (cnt <= 0) return;  // an empty module: no weight byte read
  const int rows = static_cast<int>(cnt < R ? cnt : R);  // cnt <= M <= R (load_count clamps)
  const T* A = static_cast<const T*>(p.A);
  const T* a_row[R];
#pragma unroll
  for (int r = 0; r < R; ++r) a_row[r] = A + (r < rows ? (p.a_idx != nullptr ? p.a_idx[r] : r) * p.lda : 0);
  const T* w = static_cast<const T*>(p.W) + n * p.K;
  const T* w1 = kDual ? static_cast<const T*>(p.W1) + n * p.K : nullptr;
  float acc[R], acc1[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = acc1[r] = 0.f;

#pragma unroll 4
  for (int64_t k = int64_t{lane} * V; k < p.K; k += 32 * V) {  // K is a multiple of V
    Pack wv, wv1;
    // Streamed once: evict-first, so the reused A rows keep their place in L1.
    wv.u = __ldcs(reinterpret_cast<const uint4*>(w + k));
    if constexpr (kDual) wv1.u = __ldcs(reinterpret_cast<const uint4*>(w1 + k));
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rows) {
        Pack av;
        av.u = *reinterpret_cast<const uint4*>(a_row[r] + k);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float a = to_float<T>(av.e[e]);
          acc[r] = fmaf(a, to_float<T>(wv.e[e]), acc[r]);
          if constexpr (kDual) acc1[r] = fmaf(a, to_float<T>(wv1.e[e]), acc1[r]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < rows) {  // rows is the same for the whole warp
      acc[r] = warp_sum(acc[r]);  // every lane holds the sums
      if constexpr (kDual) acc1[r] = warp_sum(acc1[r]);
    }
  }

  const T* bias = static_cast<const T*>(p.bias);
  const float b = (bias != nullptr && !kDual) ? to_float<T>(bias[n]) : 0.f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= rows || lane != r) continue;  // lane r writes row r
    if constexpr (EPI == Epilogue::kScatterAdd) {
      T* dst = out + p.out_idx[r] * p.ldo + n;  // as HF: the projection rounds to T, then the add
      *dst = from_float<T>(to_float<T>(*dst) + round_to<T>(acc[r] + b));
    } else if constexpr (kDual) {
      out[r * p.ldo + n] = from_float<T>(silu_mul<T>(acc[r], acc1[r]));
    } else {
      out[r * p.ldo + n] = from_float<T>(acc[r] + b);
    }
  }
}

template <typename T, Epilogue EPI>
cudaError_t launch_one(const GemmParams& p, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(ceil_div(p.N, kWarps));
  gemv_kernel<T, EPI><<<blocks, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemv(const GemmParams& p, Epilogue epi, DType dtype, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.M > kGemvMaxRows || p.K % 8 != 0) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&]<typename T>() -> cudaError_t {
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // bf16/fp16 only, as the GEMM
    } else {
      switch (epi) {
        case Epilogue::kStore:
          return launch_one<T, Epilogue::kStore>(p, stream);
        case Epilogue::kRope: {
          const cudaError_t e = launch_one<T, Epilogue::kStore>(p, stream);
          return e != cudaSuccess ? e : launch_rope_rows(p, dtype, stream);
        }
        case Epilogue::kScatterAdd:
          return launch_one<T, Epilogue::kScatterAdd>(p, stream);
        case Epilogue::kSiluMul:
          return launch_one<T, Epilogue::kSiluMul>(p, stream);
      }
      return cudaErrorInvalidValue;
    }
  });
}

}  // namespace skipgpt::cuda
