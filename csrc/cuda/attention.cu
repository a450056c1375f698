// Query-sparse attention: compacted query rows against the full K/V of their own sequence.
//
// Grid: (compacted row, KV head, KV split). A block holds the G query heads that share its KV
// head (GQA packing: each K/V row is loaded once for all G), scaled into shared memory in
// fp32. Its 4 warps walk the block's keys, one key per warp at a time: the lanes split
// head_dim, dot products are warp reductions, and each warp keeps an online softmax (running
// max, sum and output in fp32 registers, indexed by compile-time constants only). The warps
// merge through shared memory. With one split the block writes the normalised output; with
// several (decode: few rows, long KV), each split writes (max, sum, unnormalised output) and
// a second kernel merges them (split-KV, flash-decoding style). Keys a query may not see
// (later positions, outside the sliding window, padding) are never read. A block whose row is
// at or past count reads nothing: in decode, a skipped sequence skips its whole KV read.
//
// This is the CUDA-core kernel, for decode and short sequences; prefill of longer sequences in
// bf16/fp16 with head_dim 64/128 goes to the tensor-core kernel in attention_mma.cu.
#include <algorithm>
#include <cfloat>

#include "common.cuh"

namespace skipgpt::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxG = 8;    // query heads per KV head
constexpr int kMaxDpl = 8;  // head_dim / 32, so head_dim <= 256

struct RowRange {
  int64_t row, b, ja, jb;  // keys [ja, jb) of sequence b for this block's split
};

__device__ __forceinline__ RowRange row_range(const AttentionParams& p, int64_t i) {
  RowRange r;
  r.row = p.idx[i];
  r.b = r.row / p.seq_len;
  const int64_t pos = p.q_pos[r.row];
  const int64_t hi = min(p.Lk, pos - p.kv_offset + 1);
  const int64_t lo = p.window > 0 ? max(int64_t{0}, pos - p.window + 1 - p.kv_offset) : 0;
  const int64_t len = max(int64_t{0}, hi - lo);
  const int64_t chunk = (len + p.splits - 1) / p.splits;
  r.ja = lo + chunk * blockIdx.z;
  r.jb = min(hi, r.ja + chunk);
  return r;
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) attention_kernel(AttentionParams p) {
  extern __shared__ float sm[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t i = blockIdx.x, g = blockIdx.y;
  const int G = static_cast<int>(p.Hq / p.Hkv), hd = static_cast<int>(p.hd);
  T* out = static_cast<T*>(p.out);
  const int64_t ostride = p.Hq * p.hd;
  if (i >= load_count(p.count, p.T)) {
    if (p.splits == 1)  // rows past count are zeroed (the combine kernel does it otherwise)
      for (int e = threadIdx.x; e < G * hd; e += blockDim.x) out[i * ostride + g * G * hd + e] = from_float<T>(0.f);
    return;
  }
  const RowRange rr = row_range(p, i);
  float* qs = sm;                    // [G, hd] scaled queries
  float* wml = qs + G * hd;          // [kWarps, G, 2] per-warp (max, sum)
  float* wo = wml + kWarps * G * 2;  // [kWarps, G, hd] per-warp outputs
  const T* q = static_cast<const T*>(p.q) + i * p.q_stride + g * G * hd;
  for (int e = threadIdx.x; e < G * hd; e += blockDim.x) qs[e] = to_float<T>(q[e]) * p.scale;
  __syncthreads();

  const T* kb = static_cast<const T*>(p.k) + rr.b * p.k_strides[0] + g * p.k_strides[1];
  const T* vb = static_cast<const T*>(p.v) + rr.b * p.v_strides[0] + g * p.v_strides[1];
  const bool* kvalid = p.key_valid != nullptr ? p.key_valid + rr.b * p.Lk : nullptr;
  float m[kMaxG], l[kMaxG], o[kMaxG][kMaxDpl];
#pragma unroll
  for (int gg = 0; gg < kMaxG; ++gg) {
    m[gg] = -FLT_MAX;
    l[gg] = 0.f;
#pragma unroll
    for (int t = 0; t < kMaxDpl; ++t) o[gg][t] = 0.f;
  }
  for (int64_t j = rr.ja + warp; j < rr.jb; j += kWarps) {
    if (kvalid != nullptr && !kvalid[j]) continue;  // padding key: never seen
    const T* kr = kb + j * p.k_strides[2];
    const T* vr = vb + j * p.v_strides[2];
    float kv[kMaxDpl], vv[kMaxDpl];
#pragma unroll
    for (int t = 0; t < kMaxDpl; ++t) {
      const int d = lane + 32 * t;
      kv[t] = d < hd ? to_float<T>(kr[d]) : 0.f;
      vv[t] = d < hd ? to_float<T>(vr[d]) : 0.f;
    }
#pragma unroll
    for (int gg = 0; gg < kMaxG; ++gg) {
      if (gg >= G) break;
      float s = 0.f;
#pragma unroll
      for (int t = 0; t < kMaxDpl; ++t) {
        const int d = lane + 32 * t;
        if (d < hd) s += qs[gg * hd + d] * kv[t];
      }
      s = warp_sum(s);
      if (p.softcap > 0.f) s = p.softcap * tanhf(s / p.softcap);
      const float mn = fmaxf(m[gg], s);
      const float corr = __expf(m[gg] - mn), pj = __expf(s - mn);
      l[gg] = l[gg] * corr + pj;
      m[gg] = mn;
#pragma unroll
      for (int t = 0; t < kMaxDpl; ++t) o[gg][t] = o[gg][t] * corr + pj * vv[t];
    }
  }
  // Merge the warps.
#pragma unroll
  for (int gg = 0; gg < kMaxG; ++gg) {
    if (gg >= G) break;
    if (lane == 0) {
      wml[(warp * G + gg) * 2] = m[gg];
      wml[(warp * G + gg) * 2 + 1] = l[gg];
    }
#pragma unroll
    for (int t = 0; t < kMaxDpl; ++t) {
      const int d = lane + 32 * t;
      if (d < hd) wo[(warp * G + gg) * hd + d] = o[gg][t];
    }
  }
  __syncthreads();
  const int Hq = static_cast<int>(p.Hq);
  for (int e = threadIdx.x; e < G * hd; e += blockDim.x) {
    const int gg = e / hd, d = e % hd;
    float M = -FLT_MAX;
    for (int w = 0; w < kWarps; ++w)
      if (wml[(w * G + gg) * 2 + 1] > 0.f) M = fmaxf(M, wml[(w * G + gg) * 2]);
    float L = 0.f, O = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float lw = wml[(w * G + gg) * 2 + 1];
      if (lw > 0.f) {
        const float c = __expf(wml[(w * G + gg) * 2] - M);
        L += lw * c;
        O += wo[(w * G + gg) * hd + d] * c;
      }
    }
    const int64_t h = g * G + gg;
    if (p.splits == 1) {
      out[i * ostride + h * hd + d] = from_float<T>(L > 0.f ? O / L : 0.f);  // no visible key: 0
    } else {
      const int64_t slot = (i * Hq + h) * p.splits + blockIdx.z;
      p.partial_o[slot * hd + d] = O;
      if (d == 0) {
        p.partial_ml[slot * 2] = M;
        p.partial_ml[slot * 2 + 1] = L;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(128) combine_kernel(AttentionParams p) {
  const int64_t i = blockIdx.x, h = blockIdx.y;
  const int hd = static_cast<int>(p.hd);
  T* out = static_cast<T*>(p.out) + i * p.Hq * p.hd + h * hd;
  const bool live = i < load_count(p.count, p.T);
  const int64_t base = (i * p.Hq + h) * p.splits;
  float M = -FLT_MAX;
  if (live)
    for (int s = 0; s < p.splits; ++s)
      if (p.partial_ml[(base + s) * 2 + 1] > 0.f) M = fmaxf(M, p.partial_ml[(base + s) * 2]);
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float L = 0.f, O = 0.f;
    if (live)
      for (int s = 0; s < p.splits; ++s) {
        const float ls = p.partial_ml[(base + s) * 2 + 1];
        if (ls > 0.f) {
          const float c = __expf(p.partial_ml[(base + s) * 2] - M);
          L += ls * c;
          O += p.partial_o[(base + s) * hd + d] * c;
        }
      }
    out[d] = from_float<T>(L > 0.f ? O / L : 0.f);
  }
}

}  // namespace

int attention_splits(int64_t T, int64_t Hkv, int64_t Lk, int num_sms) {
  const int64_t blocks = T * Hkv, want = 2 * static_cast<int64_t>(num_sms);
  if (blocks == 0 || blocks >= want || Lk <= 256) return 1;
  const int64_t by_len = (Lk + 255) / 256, by_grid = (want + blocks - 1) / blocks;
  return static_cast<int>(std::min<int64_t>(std::min(by_len, by_grid), 32));
}

cudaError_t launch_attention(const AttentionParams& p, DType dtype, cudaStream_t stream) {
  if (p.T == 0) return cudaSuccess;
  const int64_t G = p.Hq / p.Hkv;
  if (p.splits == 1 && p.T >= 64 && p.seq_len >= 16 && attention_mma_supported(p, dtype))
    return launch_attention_mma(p, dtype, stream);  // prefill: tensor cores
  if (G > kMaxG || p.hd > 32 * kMaxDpl || p.splits < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&]<typename T>() {
    const size_t smem = sizeof(float) * (G * p.hd + kWarps * G * 2 + kWarps * G * p.hd);
    const dim3 grid(static_cast<unsigned>(p.T), static_cast<unsigned>(p.Hkv), static_cast<unsigned>(p.splits));
    attention_kernel<T><<<grid, kWarps * 32, smem, stream>>>(p);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || p.splits == 1) return e;
    combine_kernel<T><<<dim3(static_cast<unsigned>(p.T), static_cast<unsigned>(p.Hq)), 128, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace skipgpt::cuda
