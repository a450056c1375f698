// Compacted-row GEMMs on tensor cores (mma.sync m16n8k16, bf16/fp16 in, fp32 accumulate),
// with the fusions the skipping layer needs in the epilogue:
//   kStore       q = A[idx] W^T + b                      (rows past count zeroed)
//   kRope        kStore, then per-head RMSNorm (Qwen3) and RoPE at each row's true position
//   kScatterAdd  h[out_idx[i]] += A[i] W^T + b            (O and down projections, in place)
//   kSiluMul     act = silu(A W_gate^T) * (A W_up^T)      (gate and up share the A tiles)
//
// Tiles: BM x BN x BK with a STAGES-deep cp.async pipeline; 8 warps, each owning a
// (BM/WM) x (BN/WN) piece of C. The row count lives on the device: a block whose first row is
// at or past count returns before its first load (no weight byte read), rows past count inside
// a tile are zero-filled by cp.async's src-size operand. A rows may be gathered (a_idx) as
// they are loaded: the gather is a per-row address, so the 16-byte async copies stay intact.
// The accumulators are staged through shared memory for the epilogue, which then works on
// whole 16-byte column chunks (and on whole heads for RoPE).
//
// sm_80 and sm_90a share this mainloop; a wgmma/TMA mainloop for sm_90a is future work.
// Row capacities of at most kGemvMaxRows (decode) go to gemv.cu instead.
#include "common.cuh"
#include "mma.cuh"

namespace skipgpt::cuda {
namespace {

template <int BM_, int BN_, int WM_, int WN_, bool DUAL_>
struct Cfg {
  static constexpr int BM = BM_, BN = BN_, BK = 32, STAGES = 3, WM = WM_, WN = WN_;
  static constexpr bool DUAL = DUAL_;
  static constexpr int THREADS = WM * WN * 32;
  static constexpr int WTM = BM / WM, WTN = BN / WN;  // warp tile
  static constexpr int MI = WTM / 16, NI = WTN / 8;
  static constexpr int LDS = BK + 8;                  // padded smem row (80 B: ldmatrix conflict-free)
  static constexpr int BROWS = DUAL ? 2 * BN : BN;    // gate rows then up rows
  static constexpr int LDC = BN + 4;                  // staged fp32 C row
  static constexpr size_t kPipeBytes = size_t{STAGES} * (BM + BROWS) * LDS * 2;
  static constexpr size_t kStageBytes = size_t{BM} * LDC * 4;
  static constexpr size_t kSmemBytes = kPipeBytes > kStageBytes ? kPipeBytes : kStageBytes;
  static_assert(NI % 2 == 0 && MI >= 1 && WTM % 16 == 0, "warp tile");
};

template <typename T, Epilogue EPI, typename C>
__global__ void __launch_bounds__(C::THREADS) gemm_kernel(GemmParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int64_t a_row[C::BM];    // gathered A row of each tile row (-1: past count)
  __shared__ int64_t out_row[C::BM];  // destination row in out
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // M tiles on x (up to 2^31 - 1 of them), N tiles on y.
  const int64_t m0 = int64_t{blockIdx.x} * C::BM, n0 = int64_t{blockIdx.y} * C::BN;
  const int64_t cnt = load_count(p.count, p.M);
  T* out = static_cast<T*>(p.out);
  constexpr bool kZeroTail = EPI == Epilogue::kStore || EPI == Epilogue::kRope;

  if (m0 >= cnt) {  // an empty tile: no load at all; only zero the output rows it owns
    if constexpr (kZeroTail) {
      const int64_t rows = min(int64_t{C::BM}, p.M - m0);
      for (int64_t c = tid; c < rows * (C::BN / 8); c += C::THREADS) {
        const int64_t i = c / (C::BN / 8), col = n0 + (c % (C::BN / 8)) * 8;
        if (col < p.N) *reinterpret_cast<uint4*>(out + (m0 + i) * p.ldo + col) = make_uint4(0, 0, 0, 0);
      }
    }
    return;
  }
  for (int i = tid; i < C::BM; i += C::THREADS) {
    const int64_t gi = m0 + i;
    const bool ok = gi < cnt;
    a_row[i] = ok ? (p.a_idx != nullptr ? p.a_idx[gi] : gi) : -1;
    out_row[i] = ok ? (EPI == Epilogue::kScatterAdd ? p.out_idx[gi] : gi) : -1;
  }
  __syncthreads();

  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + C::STAGES * C::BM * C::LDS;
  const T* A = static_cast<const T*>(p.A);
  const T* W = static_cast<const T*>(p.W);
  const T* W1 = static_cast<const T*>(p.W1);
  const int64_t K = p.K, ktiles = (K + C::BK - 1) / C::BK;
  constexpr int KC = C::BK / 8;  // 16-byte chunks per tile row

  auto load_tile = [&](int stage, int64_t kt) {
    const int64_t k0 = kt * C::BK;
    T* as = As + stage * C::BM * C::LDS;
    T* bs = Bs + stage * C::BROWS * C::LDS;
    for (int c = tid; c < C::BM * KC; c += C::THREADS) {
      const int r = c / KC, kc = (c % KC) * 8;
      const int64_t ar = a_row[r];
      const bool ok = ar >= 0 && k0 + kc < K;
      cp_async_16(as + r * C::LDS + kc, ok ? A + ar * p.lda + k0 + kc : A, ok ? 16 : 0);
    }
    for (int c = tid; c < C::BROWS * KC; c += C::THREADS) {
      const int r = c / KC, kc = (c % KC) * 8;
      const int64_t n = n0 + (r % C::BN);
      const T* base = (C::DUAL && r >= C::BN) ? W1 : W;
      const bool ok = n < p.N && k0 + kc < K;
      cp_async_16(bs + r * C::LDS + kc, ok ? base + n * K + k0 + kc : W, ok ? 16 : 0);
    }
  };

  float acc[C::MI][C::NI][4] = {};
  float acc1[C::DUAL ? C::MI : 1][C::DUAL ? C::NI : 1][4] = {};
  const int wm = warp / C::WN, wn = warp % C::WN;

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < ktiles) load_tile(s, s);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // stage kt landed for every thread; stage kt-1 is free to refill
    const int64_t next = kt + C::STAGES - 1;
    if (next < ktiles) load_tile(static_cast<int>(next % C::STAGES), next);
    cp_async_commit();

    const int stage = static_cast<int>(kt % C::STAGES);
    const T* as = As + stage * C::BM * C::LDS;
    const T* bs = Bs + stage * C::BROWS * C::LDS;
#pragma unroll
    for (int kk = 0; kk < C::BK; kk += 16) {
      uint32_t af[C::MI][4];
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)
        ldmatrix_x4(af[mi], as + (wm * C::WTM + mi * 16 + lane % 16) * C::LDS + kk + (lane / 16) * 8);
#pragma unroll
      for (int half = 0; half < (C::DUAL ? 2 : 1); ++half) {
        uint32_t bf[C::NI][2];
#pragma unroll
        for (int np = 0; np < C::NI / 2; ++np) {
          uint32_t r[4];
          const int n = half * C::BN + wn * C::WTN + np * 16 + lane % 8 + (lane / 16) * 8;
          ldmatrix_x4(r, bs + n * C::LDS + kk + ((lane / 8) % 2) * 8);
          bf[2 * np][0] = r[0];
          bf[2 * np][1] = r[1];
          bf[2 * np + 1][0] = r[2];
          bf[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < C::NI; ++ni) {
            if (half == 0) {
              mma_16816<T>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
            } else if constexpr (C::DUAL) {
              mma_16816<T>(acc1[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
            }
          }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the fp32 staging tile

  float* Cs = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const int r = wm * C::WTM + mi * 16 + lane / 4 + h2 * 8;
        const int c = wn * C::WTN + ni * 8 + (lane % 4) * 2;
        float v0 = acc[mi][ni][2 * h2], v1 = acc[mi][ni][2 * h2 + 1];
        if constexpr (C::DUAL) {  // as HF: silu(round(gate)) rounded, times round(up), rounded
          const float g0 = round_to<T>(v0), g1 = round_to<T>(v1);
          const float s0 = round_to<T>(g0 / (1.f + __expf(-g0))), s1 = round_to<T>(g1 / (1.f + __expf(-g1)));
          v0 = s0 * round_to<T>(acc1[mi][ni][2 * h2]);
          v1 = s1 * round_to<T>(acc1[mi][ni][2 * h2 + 1]);
        }
        *reinterpret_cast<float2*>(Cs + r * C::LDC + c) = make_float2(v0, v1);
      }
  __syncthreads();

  const T* bias = static_cast<const T*>(p.bias);
  union Pack {
    uint4 u;
    T e[8];
  };
  constexpr int CH = C::BN / 8;  // 16-byte output chunks per tile row
  if constexpr (EPI == Epilogue::kRope) {
    // Round to T with the bias (the projection's output), in place, before the per-head pass.
    for (int c = tid; c < C::BM * C::BN; c += C::THREADS) {
      const int i = c / C::BN, col = c % C::BN;
      const float b = (bias != nullptr && n0 + col < p.N) ? to_float<T>(bias[n0 + col]) : 0.f;
      Cs[i * C::LDC + col] = round_to<T>(Cs[i * C::LDC + col] + b);
    }
    __syncthreads();
    const int hd = p.head_dim, half = hd / 2, heads = C::BN / hd;
    const T* cs = static_cast<const T*>(p.cos);
    const T* sn = static_cast<const T*>(p.sin);
    const T* hw = static_cast<const T*>(p.head_norm_weight);
    for (int item = warp; item < C::BM * heads; item += C::THREADS / 32) {
      const int i = item / heads, hl = item % heads;
      const int64_t gi = m0 + i, col0 = n0 + int64_t{hl} * hd;
      if (gi >= p.M || col0 >= p.N) continue;
      T* dst = out + gi * p.ldo + col0;
      if (gi >= cnt) {
        for (int j = lane; j < hd; j += 32) dst[j] = from_float<T>(0.f);
        continue;
      }
      const float* src = Cs + i * C::LDC + hl * hd;
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
    for (int c = tid; c < C::BM * CH; c += C::THREADS) {
      const int i = c / CH, cc = (c % CH) * 8;
      const int64_t gi = m0 + i, col = n0 + cc;
      if (gi >= p.M || col >= p.N) continue;
      if (gi >= cnt) {
        if constexpr (kZeroTail) *reinterpret_cast<uint4*>(out + gi * p.ldo + col) = make_uint4(0, 0, 0, 0);
        continue;
      }
      const float* src = Cs + i * C::LDC + cc;
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

template <typename T, Epilogue EPI, typename C>
cudaError_t launch_cfg(const GemmParams& p, cudaStream_t stream) {
  const cudaError_t e = opt_in_smem<gemm_kernel<T, EPI, C>>(C::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.M, C::BM)), static_cast<unsigned>(ceil_div(p.N, C::BN)));
  gemm_kernel<T, EPI, C><<<grid, C::THREADS, C::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

using CfgMain = Cfg<128, 128, 2, 4, false>;  // 8 warps of 64 x 32
using CfgDual = Cfg<128, 64, 2, 4, true>;    // 8 warps of 64 x (16 gate + 16 up)

}  // namespace

cudaError_t launch_gemm(const GemmParams& p, Epilogue epi, DType dtype, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (epi == Epilogue::kSiluMul && p.bias != nullptr) return cudaErrorInvalidValue;  // no bias there
  if (p.M <= kGemvMaxRows) return launch_gemv(p, epi, dtype, stream);  // decode: bandwidth, not tiles
  return dispatch_dtype(dtype, [&]<typename T>() -> cudaError_t {
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // tensor-core paths only (the op wrappers reject fp32 first)
    } else {
      switch (epi) {
        case Epilogue::kStore:
          return launch_cfg<T, Epilogue::kStore, CfgMain>(p, stream);
        case Epilogue::kRope:
          if (p.head_dim <= 0 || CfgMain::BN % p.head_dim != 0) {  // heads do not tile: two steps
            const cudaError_t e = launch_cfg<T, Epilogue::kStore, CfgMain>(p, stream);
            return e != cudaSuccess ? e : launch_rope_rows(p, dtype, stream);
          }
          return launch_cfg<T, Epilogue::kRope, CfgMain>(p, stream);
        case Epilogue::kScatterAdd:
          return launch_cfg<T, Epilogue::kScatterAdd, CfgMain>(p, stream);
        case Epilogue::kSiluMul:
          return launch_cfg<T, Epilogue::kSiluMul, CfgDual>(p, stream);
      }
      return cudaErrorInvalidValue;
    }
  });
}

}  // namespace skipgpt::cuda
