// The tile pieces every compacted-row GEMM mainloop shares (gemm.cu: mma.sync, sm_80+;
// gemm_sm90.cu: wgmma, sm_90a): the empty-tile exit, the tile's row maps, the SiLU-mul combine
// and the epilogues, which work on the block's fp32 accumulators once staged in shared memory
// (whole 16-byte column chunks, and whole heads for RoPE).
#pragma once
#include "common.cuh"

namespace skipgpt::cuda {

// The rows of the tile at m0. A tile wholly at or past count returns false at once, having only
// zeroed the output rows it owns (kStore, kRope): it reads no weight byte. Otherwise a_row[i] is
// the A row of tile row i (gathered through a_idx; -1 past count) and out_row[i] its output row
// (through out_idx for kScatterAdd), and the block has synchronised.
template <typename T, Epilogue EPI, int BM, int BN, int THREADS>
__device__ __forceinline__ bool tile_rows(const GemmParams& p, int64_t m0, int64_t n0, int64_t cnt, int64_t* a_row,
                                          int64_t* out_row) {
  const int tid = threadIdx.x;
  if (m0 >= cnt) {
    if constexpr (EPI == Epilogue::kStore || EPI == Epilogue::kRope) {
      T* out = static_cast<T*>(p.out);
      const int64_t rows = min(int64_t{BM}, p.M - m0);
      for (int64_t c = tid; c < rows * (BN / 8); c += THREADS) {
        const int64_t i = c / (BN / 8), col = n0 + (c % (BN / 8)) * 8;
        if (col < p.N) *reinterpret_cast<uint4*>(out + (m0 + i) * p.ldo + col) = make_uint4(0, 0, 0, 0);
      }
    }
    return false;
  }
  for (int i = tid; i < BM; i += THREADS) {
    const int64_t gi = m0 + i;
    const bool ok = gi < cnt;
    a_row[i] = ok ? (p.a_idx != nullptr ? p.a_idx[gi] : gi) : -1;
    out_row[i] = ok ? (EPI == Epilogue::kScatterAdd ? p.out_idx[gi] : gi) : -1;
  }
  __syncthreads();
  return true;
}

// As HF computes act(gate(x)) * up(x) in T: silu of the rounded gate, rounded, times the
// rounded up projection (the product is rounded by the store).
template <typename T>
__device__ __forceinline__ float silu_mul(float gate, float up) {
  const float g = round_to<T>(gate);
  return round_to<T>(g / (1.f + __expf(-g))) * round_to<T>(up);
}

// The epilogue over the staged fp32 tile Cs [BM][LDC] (kSiluMul already combined into it), run
// by THREADS threads numbered tid (whole warps); BARRIER is the barrier id they share (0: the
// whole block's __syncthreads).
template <typename T, Epilogue EPI, int BM, int BN, int THREADS, int LDC, int BARRIER = 0>
__device__ void tile_epilogue(const GemmParams& p, float* Cs, const int64_t* a_row, const int64_t* out_row, int64_t m0,
                              int64_t n0, int64_t cnt, int tid) {
  const int lane = tid % 32, warp = tid / 32;
  constexpr bool kZeroTail = EPI == Epilogue::kStore || EPI == Epilogue::kRope;
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  union Pack {
    uint4 u;
    T e[8];
  };
  constexpr int CH = BN / 8;  // 16-byte output chunks per tile row
  if constexpr (EPI == Epilogue::kRope) {
    // Round to T with the bias (the projection's output), in place, before the per-head pass.
    for (int c = tid; c < BM * BN; c += THREADS) {
      const int i = c / BN, col = c % BN;
      const float b = (bias != nullptr && n0 + col < p.N) ? to_float<T>(bias[n0 + col]) : 0.f;
      Cs[i * LDC + col] = round_to<T>(Cs[i * LDC + col] + b);
    }
    if constexpr (BARRIER == 0) {
      __syncthreads();
    } else {
      asm volatile("bar.sync %0, %1;\n" ::"n"(BARRIER), "n"(THREADS) : "memory");
    }
    const int hd = p.head_dim, half = hd / 2, heads = BN / hd;
    const T* cs = static_cast<const T*>(p.cos);
    const T* sn = static_cast<const T*>(p.sin);
    const T* hw = static_cast<const T*>(p.head_norm_weight);
    for (int item = warp; item < BM * heads; item += THREADS / 32) {
      const int i = item / heads, hl = item % heads;
      const int64_t gi = m0 + i, col0 = n0 + int64_t{hl} * hd;
      if (gi >= p.M || col0 >= p.N) continue;
      T* dst = out + gi * p.ldo + col0;
      if (gi >= cnt) {
        for (int j = lane; j < hd; j += 32) dst[j] = from_float<T>(0.f);
        continue;
      }
      const float* src = Cs + i * LDC + hl * hd;
      float inv = 1.f;
      if (hw != nullptr) {
        float ss = 0.f;
        for (int j = lane; j < hd; j += 32) ss += src[j] * src[j];
        inv = rsqrtf(warp_sum(ss) / static_cast<float>(hd) + p.head_norm_eps);
      }
      const int64_t row = a_row[i];  // RoPE at the token's true position
      for (int j = lane; j < half; j += 32) {
        float t1 = src[j], t2 = src[j + half];
        if (hw != nullptr) {
          t1 = round_to<T>(to_float<T>(hw[j]) * round_to<T>(t1 * inv));
          t2 = round_to<T>(to_float<T>(hw[j + half]) * round_to<T>(t2 * inv));
        }
        const T* c = cs + row * hd;
        const T* s = sn + row * hd;
        rope_pair<T>(t1, t2, to_float<T>(c[j]), to_float<T>(s[j]), to_float<T>(c[j + half]), to_float<T>(s[j + half]),
                     dst[j], dst[j + half]);
      }
    }
  } else {
    for (int c = tid; c < BM * CH; c += THREADS) {
      const int i = c / CH, cc = (c % CH) * 8;
      const int64_t gi = m0 + i, col = n0 + cc;
      if (gi >= p.M || col >= p.N) continue;
      if (gi >= cnt) {
        if constexpr (kZeroTail) *reinterpret_cast<uint4*>(out + gi * p.ldo + col) = make_uint4(0, 0, 0, 0);
        continue;
      }
      const float* src = Cs + i * LDC + cc;
      Pack y;
      if constexpr (EPI == Epilogue::kScatterAdd) {
        T* dst = out + out_row[i] * p.ldo + col;
        Pack hv;
        hv.u = *reinterpret_cast<const uint4*>(dst);
#pragma unroll
        for (int e = 0; e < 8; ++e) {  // as HF: the projection rounds to T, then the residual add
          const float b = bias != nullptr ? to_float<T>(bias[col + e]) : 0.f;
          y.e[e] = from_float<T>(to_float<T>(hv.e[e]) + round_to<T>(src[e] + b));
        }
        *reinterpret_cast<uint4*>(dst) = y.u;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float b = bias != nullptr ? to_float<T>(bias[col + e]) : 0.f;
          y.e[e] = from_float<T>(src[e] + b);
        }
        *reinterpret_cast<uint4*>(out + gi * p.ldo + col) = y.u;
      }
    }
  }
}

}  // namespace skipgpt::cuda
