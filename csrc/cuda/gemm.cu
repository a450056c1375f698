// Compacted-row GEMMs on tensor cores (mma.sync m16n8k16, bf16/fp16 in, fp32 accumulate),
// with the fusions the skipping layer needs in the epilogue:
//   kStore       q = A[idx] W^T + b                      (rows past count zeroed)
//   kRope        kStore, then per-head RMSNorm (Qwen3) and RoPE at each row's true position
//                (a whole-row norm or partial RoPE: a row pass after kStore, rows.cu)
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
// This mainloop runs on sm_80+; on an sm_90a build and a compute-capability 9.0 device
// SKIPGPT_CUDA_GEMM=wgmma / wgmma-ws / wgmma-tma selects the wgmma mainloops of gemm_sm90.cu
// instead (the same epilogues, gemm_tile.cuh). Row capacities of at most kGemvMaxRows (decode) go to gemv.cu.
#include <cstdlib>
#include <string_view>

#include "gemm_tile.cuh"
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
  static constexpr int LDC = BN + 8;                  // staged fp32 C row (float2 stores: no bank conflict)
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
  if (!tile_rows<T, EPI, C::BM, C::BN, C::THREADS>(p, m0, n0, cnt, a_row, out_row)) return;

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
        if constexpr (C::DUAL) {
          v0 = silu_mul<T>(v0, acc1[mi][ni][2 * h2]);
          v1 = silu_mul<T>(v1, acc1[mi][ni][2 * h2 + 1]);
        }
        *reinterpret_cast<float2*>(Cs + r * C::LDC + c) = make_float2(v0, v1);
      }
  __syncthreads();

  tile_epilogue<T, EPI, C::BM, C::BN, C::THREADS, C::LDC>(p, Cs, a_row, out_row, m0, n0, cnt, tid);
}

template <typename T, Epilogue EPI, typename C>
cudaError_t launch_cfg(const GemmParams& p, cudaStream_t stream) {
  const cudaError_t e = opt_in_smem<gemm_kernel<T, EPI, C>>(C::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.M, C::BM)), static_cast<unsigned>(ceil_div(p.N, C::BN)));
  gemm_kernel<T, EPI, C><<<grid, C::THREADS, C::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

using CfgMain = Cfg<128, 128, 2, 4, false>;  // 8 warps of 64 x 32 (BN a multiple of 128: kRope)
using CfgDual = Cfg<128, 64, 2, 4, true>;    // 8 warps of 64 x (16 gate + 16 up)

}  // namespace

cudaError_t launch_gemm_mma(const GemmParams& p, Epilogue epi, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&]<typename T>() -> cudaError_t {
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // tensor-core paths only (the op wrappers reject fp32 first)
    } else {
      switch (epi) {
        case Epilogue::kStore:
          return launch_cfg<T, Epilogue::kStore, CfgMain>(p, stream);
        case Epilogue::kRope:
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

bool sm90a_device() {
#if defined(SKIPGPT_SM90A)
  int dev = 0, major = 0, minor = 0;
  return cudaGetDevice(&dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess && major == 9 &&
         minor == 0;
#else
  return false;
#endif
}

GemmMainloop gemm_mainloop() {
  const char* env = std::getenv("SKIPGPT_CUDA_GEMM");
  const std::string_view want = env != nullptr ? env : "";
  // The wgmma kernels have not run on a GPU yet: opt-in until a device run verifies them
  // (benchmarks/gpu_check.sh tests and times all mainloops), then the faster one becomes auto.
  if (want.empty() || want == "auto" || want == "mma") return GemmMainloop::kMma;
  if (want == "wgmma") return sm90a_device() ? GemmMainloop::kWgmma : GemmMainloop::kUnavailable;
  if (want == "wgmma-ws") return sm90a_device() ? GemmMainloop::kWgmmaWs : GemmMainloop::kUnavailable;
  if (want == "wgmma-tma") return sm90a_device() ? GemmMainloop::kWgmmaTma : GemmMainloop::kUnavailable;
  return GemmMainloop::kUnknown;
}

AttentionMma attention_mma_kind() {
  const char* env = std::getenv("SKIPGPT_CUDA_ATTN");
  const std::string_view want = env != nullptr ? env : "";
  if (want.empty() || want == "auto" || want == "mma") return AttentionMma::kMma;  // wgmma: opt-in, as above
  if (want == "wgmma") return sm90a_device() ? AttentionMma::kWgmma : AttentionMma::kUnavailable;
  if (want == "wgmma-overlap") return sm90a_device() ? AttentionMma::kWgmmaOverlap : AttentionMma::kUnavailable;
  return AttentionMma::kUnknown;
}

cudaError_t launch_gemm(const GemmParams& p, Epilogue epi, DType dtype, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (epi == Epilogue::kSiluMul && p.bias != nullptr) return cudaErrorInvalidValue;  // no bias there
  if (p.M <= kGemvMaxRows) return launch_gemv(p, epi, dtype, stream);  // decode: bandwidth, not tiles
  const GemmMainloop loop = gemm_mainloop();
  if (loop == GemmMainloop::kUnavailable || loop == GemmMainloop::kUnknown) return cudaErrorNotSupported;
  auto tiled = [&](Epilogue e) {
    return loop == GemmMainloop::kMma ? launch_gemm_mma(p, e, dtype, stream)
                                      : launch_gemm_sm90(p, e, dtype, loop, stream);
  };
  // Both mainloops' BN are multiples of 128: RoPE rides in the epilogue when heads tile that
  // (full RoPE and per-head norms only).
  const bool rope_in_tile = p.head_dim > 0 && 128 % p.head_dim == 0 && (p.rot_dim == 0 || p.rot_dim == p.head_dim) &&
                            p.row_inv == nullptr;
  if (epi == Epilogue::kRope && !rope_in_tile) {
    const cudaError_t e = tiled(Epilogue::kStore);
    return e != cudaSuccess ? e : launch_rope_rows(p, dtype, stream);
  }
  return tiled(epi);
}

}  // namespace skipgpt::cuda
