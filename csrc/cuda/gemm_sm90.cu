// Compacted-row GEMMs on Hopper's warpgroup MMA (wgmma, sm_90a): the contract, epilogues and
// rounding of gemm.cu (kernels.h; gemm_tile.cuh), on the tensor-core path Hopper runs at full
// rate (mma.sync, gemm.cu, peaks well below it there). launch_gemm runs these kernels under
// SKIPGPT_CUDA_GEMM=wgmma / wgmma-ws / wgmma-tma on a compute-capability 9.0 device when the
// build holds sm_90a code (SKIPGPT_SM90A); opt-in until a GPU run has verified them.
//
// Block tile 128 x BN x 64 for two warpgroups, 64 rows each. A 4-stage cp.async pipeline fills
// 128-byte-swizzled shared tiles, the layout the wgmma descriptors read; A rows are gathered
// per row (a_idx) as they load, which TMA cannot do on sm_90, and rows past count load as
// zeros (wgmma-tma brings the weight tiles by TMA instead). One wgmma group stays in flight
// while the next stage is requested.
//   kStore, kRope, kScatterAdd: BN 256, one m64n256k16 per warpgroup and 16 of K
//                               (128 fp32 accumulators per thread); BN 128 when 256-wide
//                               tiles would number fewer than the SMs (small M or N);
//   kSiluMul:                   BN 128 features, gate and up tiles, two m64n128k16 (64 + 64).
#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes through the runtime)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000

#include <type_traits>

#include "gemm_tile.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

namespace skipgpt::cuda {
namespace {

template <int BN_, bool DUAL_>
struct Sm90Cfg {
  static constexpr int BM = 128, BN = BN_, BK = 64, STAGES = 4;
  static constexpr int CONSUMERS = 256;             // two MMA warpgroups of 64 rows each
  static constexpr bool DUAL = DUAL_;
  static constexpr int BROWS = DUAL ? 2 * BN : BN;  // gate rows then up rows
  static constexpr int REGS = BN / 2;               // accumulators of one 64 x BN tile per thread
  static_assert(REGS * 128 == 64 * BN, "m64nBN: BN / 2 fp32 accumulators per thread");
  static constexpr int LDC = BN + 8;                // staged fp32 C row (float2 stores: no bank conflict)
  static constexpr size_t kABytes = size_t{BM} * BK * 2, kBBytes = size_t{BROWS} * BK * 2;
  static constexpr size_t kStageBytes = kABytes + kBBytes;
  static constexpr size_t kPipeBytes = STAGES * kStageBytes, kCBytes = size_t{BM} * LDC * 4;
  static constexpr size_t kSmemBytes = (kPipeBytes > kCBytes ? kPipeBytes : kCBytes) + 1024;  // + alignment
  static_assert(BK * 2 == 128, "one 128-byte swizzle row per tile row");
  static_assert(kABytes % 1024 == 0 && kStageBytes % 1024 == 0, "tiles stay 1024-byte aligned");
  static_assert(size_t{BN} * BK * 2 % 1024 == 0, "the up half (and its TMA box) starts 1024-byte aligned");
  static_assert(BN == 128 || BN == 256, "wgmma N (and a multiple of 128: see launch_gemm's kRope)");
};

// Loader thread t of LOADERS issues its share of k-tile kt's copies into one stage, in the
// swizzled layout the descriptors read (sm90_layout.h: tile_sw128); rows past count and columns
// past N or K load as zeros. load_a: the gathered A rows; load_b: the weight rows (gate then up).
template <typename T, typename C, int LOADERS, int UNROLL>
__device__ __forceinline__ void load_a(const GemmParams& p, unsigned char* stage, const int64_t* a_row, int64_t kt,
                                       int t) {
  static_assert(C::BM * 8 % LOADERS == 0, "whole copy rounds");
  const T* A = static_cast<const T*>(p.A);
  const int64_t K = p.K, k0 = kt * C::BK;
  T* as = reinterpret_cast<T*>(stage);
#pragma unroll(UNROLL)
  for (int i = 0; i < C::BM * 8 / LOADERS; ++i) {
    const int c = t + i * LOADERS, r = c / 8, ch = c % 8;
    const int64_t ar = a_row[r], k = k0 + ch * 8;
    const bool ok = ar >= 0 && k < K;
    cp_async_16(as + sm90::tile_sw128(C::BM, r, ch * 8), ok ? A + ar * p.lda + k : A, ok ? 16 : 0);
  }
}

template <typename T, typename C, int LOADERS, int UNROLL>
__device__ __forceinline__ void load_b(const GemmParams& p, unsigned char* stage, int64_t n0, int64_t kt, int t) {
  static_assert(C::BROWS * 8 % LOADERS == 0, "whole copy rounds");
  const T* W = static_cast<const T*>(p.W);
  const T* W1 = static_cast<const T*>(p.W1);
  const int64_t K = p.K, k0 = kt * C::BK;
  T* bs = reinterpret_cast<T*>(stage + C::kABytes);
#pragma unroll(UNROLL)
  for (int i = 0; i < C::BROWS * 8 / LOADERS; ++i) {
    const int c = t + i * LOADERS, r = c / 8, ch = c % 8;
    const int64_t n = n0 + (r % C::BN), k = k0 + ch * 8;
    const T* base = (C::DUAL && r >= C::BN) ? W1 : W;
    const bool ok = n < p.N && k < K;
    cp_async_16(bs + sm90::tile_sw128(C::BROWS, r, ch * 8), ok ? base + n * K + k : W, ok ? 16 : 0);
  }
}

template <typename T, typename C, int LOADERS, int UNROLL>
__device__ __forceinline__ void load_stage(const GemmParams& p, unsigned char* stage, const int64_t* a_row, int64_t n0,
                                           int64_t kt, int t) {
  load_a<T, C, LOADERS, UNROLL>(p, stage, a_row, kt, t);
  load_b<T, C, LOADERS, UNROLL>(p, stage, n0, kt, t);
}

// Consumer warpgroup cwg (0 / 1, rows 64 cwg ..) issues one stage's MMAs as one committed group.
template <typename T, typename C>
__device__ __forceinline__ void mma_stage(const unsigned char* stage, int cwg, float (&acc)[C::REGS],
                                          float (&acc1)[C::DUAL ? C::REGS : 1]) {
  const T* as = reinterpret_cast<const T*>(stage);
  const T* bs = reinterpret_cast<const T*>(stage + C::kABytes);
  sm90::fence_regs(acc);
  sm90::fence_regs(acc1);
  sm90::fence();
#pragma unroll
  for (int kk = 0; kk < C::BK / 16; ++kk) {
    const uint64_t da = sm90::desc_sw128(as + sm90::kmajor_start(C::BM, cwg * 64, kk));
    sm90::Mma<C::BN, T>::run(acc, da, sm90::desc_sw128(bs + sm90::kmajor_start(C::BROWS, 0, kk)));
    if constexpr (C::DUAL)
      sm90::Mma<C::BN, T>::run(acc1, da, sm90::desc_sw128(bs + sm90::kmajor_start(C::BROWS, C::BN, kk)));
  }
  sm90::commit();
}

// Writes consumer warpgroup cwg's accumulators into the fp32 staging tile (SiLU-mul combined).
template <typename T, typename C>
__device__ __forceinline__ void stage_acc(float* Cs, int cwg, int ctid, const float (&acc)[C::REGS],
                                          const float (&acc1)[C::DUAL ? C::REGS : 1]) {
  const int lane = ctid % 32, r0 = cwg * 64 + ((ctid / 32) % 4) * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < C::BN / 8; ++j)
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int r = r0 + 8 * h2, c = 8 * j + 2 * (lane % 4);
      float v0 = acc[4 * j + 2 * h2], v1 = acc[4 * j + 2 * h2 + 1];
      if constexpr (C::DUAL) {
        v0 = silu_mul<T>(v0, acc1[4 * j + 2 * h2]);
        v1 = silu_mul<T>(v1, acc1[4 * j + 2 * h2 + 1]);
      }
      *reinterpret_cast<float2*>(Cs + r * C::LDC + c) = make_float2(v0, v1);
    }
}

// Variant 1 ("wgmma"): all 256 threads load and compute. A stage is refilled once both
// warpgroups' MMAs on it are done; one MMA group stays in flight while the next loads.
template <typename T, Epilogue EPI, typename C>
__global__ void __launch_bounds__(C::CONSUMERS, 1) gemm_sm90_kernel(GemmParams p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // only sm_90a code holds this kernel; launch_gemm never picks it elsewhere
#else
  constexpr int THREADS = C::CONSUMERS;
  extern __shared__ unsigned char smem_raw[];
  __shared__ int64_t a_row[C::BM];
  __shared__ int64_t out_row[C::BM];
  const int tid = threadIdx.x, cwg = tid / 128;
  const int64_t m0 = int64_t{blockIdx.x} * C::BM, n0 = int64_t{blockIdx.y} * C::BN;
  const int64_t cnt = load_count(p.count, p.M);
  if (!tile_rows<T, EPI, C::BM, C::BN, THREADS>(p, m0, n0, cnt, a_row, out_row)) return;
  unsigned char* smem = sm90::align_1024(smem_raw);
  const int64_t ktiles = (p.K + C::BK - 1) / C::BK;

  float acc[C::REGS] = {};
  float acc1[C::DUAL ? C::REGS : 1] = {};

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < ktiles) load_stage<T, C, THREADS, 8>(p, smem + s * C::kStageBytes, a_row, n0, s, tid);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    sm90::fence_proxy_async();  // this thread's copies, visible to the tensor cores' proxy
    __syncthreads();            // ... and every thread's: stage kt is complete
    mma_stage<T, C>(smem + (kt % C::STAGES) * C::kStageBytes, cwg, acc, acc1);
    sm90::wait<1>();  // this warpgroup's MMAs of stage kt-1 are done ...
    sm90::fence_regs(acc);
    sm90::fence_regs(acc1);
    __syncthreads();  // ... and the other's: stage kt-1 may be refilled
    const int64_t next = kt + C::STAGES - 1;
    if (next < ktiles) load_stage<T, C, THREADS, 8>(p, smem + (next % C::STAGES) * C::kStageBytes, a_row, n0, next, tid);
    cp_async_commit();
  }
  sm90::wait<0>();
  sm90::fence_regs(acc);
  sm90::fence_regs(acc1);
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the fp32 staging tile

  float* Cs = reinterpret_cast<float*>(smem);
  stage_acc<T, C>(Cs, cwg, tid, acc, acc1);
  __syncthreads();
  tile_epilogue<T, EPI, C::BM, C::BN, THREADS, C::LDC>(p, Cs, a_row, out_row, m0, n0, cnt, tid);
#endif
}

// Variant 2 ("wgmma-ws", warp-specialised): a producer warpgroup only copies, two consumer
// warpgroups only multiply, handing stages over through mbarriers (full: the producer's 128
// threads' copies landed; empty: both consumers' MMAs on it are done), so no block barrier
// sits in the main loop. setmaxnreg moves registers from the producer (40) to the consumers
// (232). The consumers alone stage and write the tile (named barrier 1).
// Variant 3 ("wgmma-tma", TMA = true): the same, but the weight tiles (B: half to two thirds of a stage's
// bytes) come by TMA, one cp.async.bulk.tensor per stage (two for gate/up) from one producer
// thread, landing in the same swizzled layout (the tensor map's 128-byte swizzle is
// tile_sw128's) and counted on the stage's full barrier as transaction bytes; the gathered A
// rows stay on the producers' cp.async. tma.b0 maps W (gate), tma.b1 W1 (up).
constexpr int kWsProducers = 128;
[[maybe_unused]] constexpr int kWsProducerRegs = 40, kWsConsumerRegs = 232;  // 128 x 40 + 256 x 232 = 384 x 168

// The weights' TMA tensor maps (kernel parameters: __grid_constant__; CUtensorMap carries the
// alignment the encoder needs); boxes of 64 K columns x BN rows, zero fill past N and K.
// Unused (zero) without TMA.
struct TmaB {
  CUtensorMap b0, b1;
};

template <typename T, Epilogue EPI, typename C, bool TMA>
__global__ void __launch_bounds__(kWsProducers + C::CONSUMERS, 1)
    gemm_sm90_ws_kernel(GemmParams p, const __grid_constant__ TmaB tma) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();
#else
  constexpr int THREADS = kWsProducers + C::CONSUMERS;
  // setmaxnreg only moves registers within what the block holds at entry (a multiple of 8 per
  // thread under the 64 K file): the consumers' increase would otherwise wait forever.
  static_assert(kWsProducers * kWsProducerRegs + C::CONSUMERS * kWsConsumerRegs <= THREADS * ((65536 / THREADS) & ~7),
                "setmaxnreg budget");
  extern __shared__ unsigned char smem_raw[];
  __shared__ int64_t a_row[C::BM];
  __shared__ int64_t out_row[C::BM];
  __shared__ __align__(8) uint64_t full[C::STAGES];
  __shared__ __align__(8) uint64_t empty[C::STAGES];
  const int tid = threadIdx.x, wg = tid / 128;
  const int64_t m0 = int64_t{blockIdx.x} * C::BM, n0 = int64_t{blockIdx.y} * C::BN;
  const int64_t cnt = load_count(p.count, p.M);
  if (tid == 0) {
    for (int s = 0; s < C::STAGES; ++s) {
      // One cp.async arrival per producer thread, plus (TMA) thread 0's expect_tx arrival.
      sm90::mbar_init(&full[s], kWsProducers + (TMA ? 1 : 0));
      sm90::mbar_init(&empty[s], 2);  // one arrival per consumer warpgroup
    }
    if constexpr (TMA) sm90::fence_mbar_init();
  }
  // tile_rows' barrier also publishes the initialised mbarriers.
  if (!tile_rows<T, EPI, C::BM, C::BN, THREADS>(p, m0, n0, cnt, a_row, out_row)) return;
  unsigned char* smem = sm90::align_1024(smem_raw);
  const int64_t ktiles = (p.K + C::BK - 1) / C::BK;

  if (wg == 0) {  // producer
    sm90::regs_dealloc<kWsProducerRegs>();
    if constexpr (TMA) {
      if (tid == 0) {
        sm90::prefetch_tmap(&tma.b0);
        if constexpr (C::DUAL) sm90::prefetch_tmap(&tma.b1);
      }
    }
    for (int64_t kt = 0; kt < ktiles; ++kt) {
      const int s = static_cast<int>(kt % C::STAGES);
      const uint32_t round = static_cast<uint32_t>(kt / C::STAGES);
      if (round > 0) sm90::mbar_wait(&empty[s], (round - 1) & 1);  // its previous tile is consumed
      unsigned char* stage = smem + s * C::kStageBytes;
      if constexpr (TMA) {
        if (tid == 0) {  // expect the whole boxes' bytes (zero-filled parts count), then request them
          sm90::mbar_arrive_expect_tx(&full[s], static_cast<uint32_t>(C::kBBytes));
          const int k0 = static_cast<int>(kt * C::BK), nb = static_cast<int>(n0);
          sm90::tma_load_2d(stage + C::kABytes, &tma.b0, k0, nb, &full[s]);
          if constexpr (C::DUAL) sm90::tma_load_2d(stage + C::kABytes + size_t{C::BN} * C::BK * 2, &tma.b1, k0, nb, &full[s]);  // up: BN rows on
        }
        load_a<T, C, kWsProducers, 1>(p, stage, a_row, kt, tid);
      } else {
        load_stage<T, C, kWsProducers, 1>(p, stage, a_row, n0, kt, tid);
      }
      sm90::cp_async_mbar_arrive(&full[s]);
    }
    cp_async_wait_all();  // no copy outlives its thread (the full barriers already track them)
  } else {  // consumers
    sm90::regs_alloc<kWsConsumerRegs>();
    const int cwg = wg - 1, ctid = tid - kWsProducers;
    float acc[C::REGS] = {};
    float acc1[C::DUAL ? C::REGS : 1] = {};
    for (int64_t kt = 0; kt < ktiles; ++kt) {
      const int s = static_cast<int>(kt % C::STAGES);
      sm90::mbar_wait(&full[s], static_cast<uint32_t>(kt / C::STAGES) & 1);
      __syncwarp();  // the .aligned wgmma below wants the warp converged after the polling loop
      sm90::fence_proxy_async();  // the producers' generic-proxy copies, for the tensor cores
      mma_stage<T, C>(smem + s * C::kStageBytes, cwg, acc, acc1);
      sm90::wait<1>();  // this warpgroup's MMAs of tile kt-1 are done: release its stage
      sm90::fence_regs(acc);
      sm90::fence_regs(acc1);
      if (kt > 0 && ctid % 128 == 0) sm90::mbar_arrive(&empty[(kt - 1) % C::STAGES]);
    }
    sm90::wait<0>();
    sm90::fence_regs(acc);
    sm90::fence_regs(acc1);
    // Every tile's full barrier has completed: no copy is in flight. Both consumer warpgroups'
    // MMAs must be done before the buffers become the staging tile.
    sm90::named_sync<1, C::CONSUMERS>();
    float* Cs = reinterpret_cast<float*>(smem);
    stage_acc<T, C>(Cs, cwg, ctid, acc, acc1);
    sm90::named_sync<1, C::CONSUMERS>();
    tile_epilogue<T, EPI, C::BM, C::BN, C::CONSUMERS, C::LDC, 1>(p, Cs, a_row, out_row, m0, n0, cnt, ctid);
  }
#endif
}

// Host side of the TMA variant: cuTensorMapEncodeTiled (its CUDA 12.0 ABI) from the driver,
// through the runtime's entry-point query (no link against libcuda), looked up once.
using EncodeTiledFn = PFN_cuTensorMapEncodeTiled_v12000;

EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
    if (e != cudaSuccess) (void)cudaGetLastError();  // not this launch's error to report later
    return e == cudaSuccess && found == cudaDriverEntryPointSuccess ? reinterpret_cast<EncodeTiledFn>(f) : nullptr;
  }();
  return fn;
}

// TMA with the 128-byte swizzle wants the tensor's base 128-byte aligned (CUDA Programming
// Guide, TMA swizzle) and every dimension non-zero; the op wrappers guarantee 16-byte aligned
// weights only (a weight may be a view into a larger buffer). A GEMM that misses either takes
// wgmma-ws's cp.async weight loads instead.
bool tma_fits(const GemmParams& p, Epilogue epi) {
  const auto aligned = [](const void* w) { return reinterpret_cast<uintptr_t>(w) % 128 == 0; };
  return p.K > 0 && aligned(p.W) && (epi != Epilogue::kSiluMul || aligned(p.W1));
}

// A row-major [rows, K] weight (K contiguous, rows K * 2 bytes apart: 16-byte multiples, as the
// op wrappers require) as boxes of 64 K columns x box_rows rows, 128-byte swizzle, zero fill.
template <typename T>
cudaError_t weight_tmap(CUtensorMap* map, const void* w, int64_t rows, int64_t K, int box_rows) {
  const EncodeTiledFn encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K) * sizeof(T)};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t unit[2] = {1, 1};
  constexpr CUtensorMapDataType type =
      std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult r = encode(map, type, 2, const_cast<void*>(w), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

enum class Sm90Kernel { kPlain, kWarpSpecialised, kTma };

template <typename T, Epilogue EPI, typename C, Sm90Kernel V>
cudaError_t launch_cfg(const GemmParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.M, C::BM)), static_cast<unsigned>(ceil_div(p.N, C::BN)));
  if constexpr (V == Sm90Kernel::kPlain) {
    constexpr auto kernel = gemm_sm90_kernel<T, EPI, C>;
    const cudaError_t e = opt_in_smem<kernel>(C::kSmemBytes);
    if (e != cudaSuccess) return e;
    kernel<<<grid, C::CONSUMERS, C::kSmemBytes, stream>>>(p);
  } else {
    constexpr bool tma_b = V == Sm90Kernel::kTma;
    constexpr auto kernel = gemm_sm90_ws_kernel<T, EPI, C, tma_b>;
    const cudaError_t e = opt_in_smem<kernel>(C::kSmemBytes);
    if (e != cudaSuccess) return e;
    TmaB tma{};
    if constexpr (tma_b) {
      cudaError_t m = weight_tmap<T>(&tma.b0, p.W, p.N, p.K, C::BN);
      if (m == cudaSuccess && C::DUAL) m = weight_tmap<T>(&tma.b1, p.W1, p.N, p.K, C::BN);
      if (m != cudaSuccess) return m;
    }
    kernel<<<grid, kWsProducers + C::CONSUMERS, C::kSmemBytes, stream>>>(p, tma);
  }
  return cudaGetLastError();
}

using CfgWide = Sm90Cfg<256, false>;
using CfgNarrow = Sm90Cfg<128, false>;  // when 256-wide tiles would leave SMs idle
using CfgDual = Sm90Cfg<128, true>;

int sm_count() {
  static int count[64] = {};
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (dev >= 0 && dev < 64 && count[dev] > 0) return count[dev];
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
  if (dev >= 0 && dev < 64) count[dev] = n;
  return n;
}

template <typename T, Sm90Kernel V>
cudaError_t launch_variant(const GemmParams& p, Epilogue epi, cudaStream_t stream) {
  const bool wide = ceil_div(p.M, CfgWide::BM) * ceil_div(p.N, CfgWide::BN) >= sm_count();
  switch (epi) {
    case Epilogue::kStore:
      return wide ? launch_cfg<T, Epilogue::kStore, CfgWide, V>(p, stream)
                  : launch_cfg<T, Epilogue::kStore, CfgNarrow, V>(p, stream);
    case Epilogue::kRope:
      return wide ? launch_cfg<T, Epilogue::kRope, CfgWide, V>(p, stream)
                  : launch_cfg<T, Epilogue::kRope, CfgNarrow, V>(p, stream);
    case Epilogue::kScatterAdd:
      return wide ? launch_cfg<T, Epilogue::kScatterAdd, CfgWide, V>(p, stream)
                  : launch_cfg<T, Epilogue::kScatterAdd, CfgNarrow, V>(p, stream);
    case Epilogue::kSiluMul:
      return launch_cfg<T, Epilogue::kSiluMul, CfgDual, V>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_gemm_sm90(const GemmParams& p, Epilogue epi, DType dtype, GemmMainloop loop, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&]<typename T>() -> cudaError_t {
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;
    } else {
      switch (loop) {
        case GemmMainloop::kWgmma:
          return launch_variant<T, Sm90Kernel::kPlain>(p, epi, stream);
        case GemmMainloop::kWgmmaWs:
          return launch_variant<T, Sm90Kernel::kWarpSpecialised>(p, epi, stream);
        case GemmMainloop::kWgmmaTma:
          return tma_fits(p, epi) ? launch_variant<T, Sm90Kernel::kTma>(p, epi, stream)
                                  : launch_variant<T, Sm90Kernel::kWarpSpecialised>(p, epi, stream);
        default:
          return cudaErrorInvalidValue;
      }
    }
  });
}

}  // namespace skipgpt::cuda
