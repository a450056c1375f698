// Query-sparse attention on tensor cores, for prefill (many compacted rows): flash-style.
//
// Grid: (64-row block of compacted queries, query head). Four warps own 16 rows each. The
// block's Q rows (gathered from the compacted q) stay in registers as mma A fragments; K/V
// tiles of 64 keys stream through a two-stage cp.async buffer. S = Q K^T and O += P V run as
// mma.sync m16n8k16 (fp32 accumulate; K through ldmatrix, V through ldmatrix.trans), with the
// online softmax on the S fragments in registers (exp2, scale folded in) and P re-packed as
// the A operand of the second product without touching shared memory.
//
// Compacted rows are scattered positions, possibly of several sequences: each row keeps its
// own visible key range [lo, hi) (causal by true position, sliding window) and the block
// visits each sequence its rows touch, over the union of their ranges; keys outside a row's
// range, padding keys and rows of other sequences are masked. A block whose first row is past
// count writes zeros and reads nothing. Head dims 64 and 128; other shapes, fp32 and decode
// (few rows) take the CUDA-core kernel in attention.cu.
//
// On Hopper (WG = true, sm_90a; SKIPGPT_CUDA_ATTN=wgmma, opt-in until verified on a GPU) the
// same kernel issues warpgroup MMAs instead, with 128 query rows per block: two warpgroups of
// 64 rows share each K/V tile. A warpgroup's m64 accumulators have the mma.sync C layout per
// warp, so the masking and online softmax are shared. Q, K and V tiles are then stored 128-byte
// swizzled in 64-column blocks ([HD / 64][rows][64], sm90_layout.h); S = Q K^T reads Q and K by
// K-major descriptors (m64n64k16), and O += P V takes P from registers (the mma.sync A
// fragment) and V by an MN-major descriptor (m64nHDk16, imm-trans-b).
#include <cfloat>

#include "common.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

namespace skipgpt::cuda {
namespace {

constexpr int kBK = 64;  // keys per K/V tile
// Query rows per block, a warp per 16: 64 (4 warps) on mma.sync; 128 (two warpgroups sharing
// each K/V tile, which halves the K/V traffic per row) on wgmma.
template <bool WG>
constexpr int kBQ = WG ? 128 : 64;
template <bool WG>
constexpr int kThreads = kBQ<WG> * 2;

// K/V stages: 2, or 3 when S of the next tile overlaps this tile's softmax (wgmma-overlap).
template <bool OVERLAP>
constexpr int kStages = OVERLAP ? 3 : 2;

template <int HD, bool WG, bool OVERLAP>
constexpr size_t mma_smem_bytes() {
  // Q + the stages of K and V, 2-byte elements: padded rows (mma.sync), or swizzled rows plus
  // 1024 bytes to align the tiles (wgmma).
  constexpr size_t rows = kBQ<WG> + 2 * kStages<OVERLAP> * kBK;
  return WG ? rows * HD * 2 + 1024 : rows * (HD + 8) * 2;
}

// Element offset of (row r, column c; c a multiple of 8) in a tile of `rows` rows: padded rows
// for mma.sync; for wgmma the swizzled 64-column blocks the descriptors read (sm90_layout.h).
template <int HD, bool WG>
__device__ __forceinline__ int tile_off(int rows, int r, int c) {
  if constexpr (WG) {
    return sm90::tile_sw128(rows, r, c);
  } else {
    return r * (HD + 8) + c;
  }
}

template <typename T, int HD, bool WG, bool OVERLAP>
__device__ __forceinline__ void attention_mma_body(const AttentionParams& p) {
  constexpr int BQ = kBQ<WG>, THREADS = kThreads<WG>, STAGES = kStages<OVERLAP>;
  static_assert(BQ % 64 == 0 && kBK == 64, "whole warpgroups of 64 rows; 64-key tiles");
  static_assert(WG || !OVERLAP, "the overlap is of asynchronous (wgmma) MMAs");
  constexpr int QTILE = WG ? BQ * HD : BQ * (HD + 8);     // elements of the Q tile
  constexpr int KTILE = WG ? kBK * HD : kBK * (HD + 8);  // ... of one K or V tile
  constexpr int LDS = HD + 8;  // mma.sync: padded row, 16-byte aligned, ldmatrix conflict-free
  constexpr int CH = HD / 8;   // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = smem_raw;
  if constexpr (WG)  // descriptors assume tiles aligned to the 1024-byte swizzle pattern
    smem = sm90::align_1024(smem_raw);
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + QTILE;           // [STAGES][KTILE]
  T* Vs = Ks + STAGES * KTILE;  // [STAGES][KTILE]
  __shared__ int64_t row_seq[BQ], row_lo[BQ], row_hi[BQ];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t i0 = int64_t{blockIdx.x} * BQ;
  const int64_t h = blockIdx.y, G = p.Hq / p.Hkv, g = h / G;
  const int64_t cnt = load_count(p.count, p.T);
  T* out = static_cast<T*>(p.out);
  const int64_t ostride = p.Hq * HD;
  if (i0 >= cnt) {
    const int64_t rows = min(int64_t{BQ}, p.T - i0);
    for (int64_t e = tid; e < rows * CH; e += THREADS)
      *reinterpret_cast<uint4*>(out + (i0 + e / CH) * ostride + h * HD + (e % CH) * 8) = make_uint4(0, 0, 0, 0);
    return;
  }
  const int64_t nrows = min(int64_t{BQ}, cnt - i0);
  for (int r = tid; r < BQ; r += THREADS) {
    if (r < nrows) {
      const int64_t row = p.idx[i0 + r], pos = p.q_pos[row];
      const int64_t lo = p.window > 0 ? max(int64_t{0}, pos - p.window + 1 - p.kv_offset) : 0;
      row_seq[r] = row / p.seq_len;
      row_lo[r] = lo;
      row_hi[r] = max(lo, min(p.Lk, pos - p.kv_offset + 1));
    } else {
      row_seq[r] = -1;
      row_lo[r] = row_hi[r] = 0;
    }
  }
  const T* q = static_cast<const T*>(p.q);
  for (int e = tid; e < BQ * CH; e += THREADS) {
    const int r = e / CH, c = (e % CH) * 8;
    const bool ok = r < nrows;
    cp_async_16(Qs + tile_off<HD, WG>(BQ, r, c), ok ? q + (i0 + r) * p.q_stride + h * HD + c : q, ok ? 16 : 0);
  }
  cp_async_commit();
  cp_async_wait<0>();
  if constexpr (WG) sm90::fence_proxy_async();  // the copies, visible to the tensor cores' proxy
  __syncthreads();

  uint32_t qf[WG ? 1 : HD / 16][4];  // mma.sync: Q as A fragments in registers
  if constexpr (!WG) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
      ldmatrix_x4(qf[kk], Qs + (warp * 16 + lane % 16) * LDS + kk * 16 + (lane / 16) * 8);
  }

  // This thread's two rows (mma C layout): r0 = warp*16 + lane/4 and r0 + 8.
  const int r0 = warp * 16 + lane / 4;
  float o[HD / 8][4] = {};
  float m[2] = {-FLT_MAX, -FLT_MAX}, l[2] = {0.f, 0.f};
  const float sl2 = p.scale * 1.44269504088896341f;  // softmax in base 2
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);

  for (int64_t b = row_seq[0]; b <= row_seq[nrows - 1]; ++b) {
    int64_t lo_b = p.Lk, hi_b = 0;
    // Keys [lo_all, hi_all) are visible to every row of the block, if all BQ rows are of this
    // sequence (a partial last block never is): tiles inside skip the per-key masking.
    int64_t lo_all = 0, hi_all = p.Lk;
    bool whole = p.key_valid == nullptr;
    for (int r = 0; r < BQ; ++r) {
      if (row_seq[r] != b) {
        whole = false;
        continue;
      }
      lo_all = max(lo_all, row_lo[r]);
      hi_all = min(hi_all, row_hi[r]);
      if (row_hi[r] > row_lo[r]) {
        lo_b = min(lo_b, row_lo[r]);
        hi_b = max(hi_b, row_hi[r]);
      }
    }
    if (hi_b <= lo_b) continue;  // no row of this sequence sees a key (uniform across the block)
    int64_t rlo[2], rhi[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = r0 + rr * 8;
      const bool mine = row_seq[r] == b;
      rlo[rr] = mine ? row_lo[r] : 0;
      rhi[rr] = mine ? row_hi[r] : 0;
    }
    const T* kb = kbase + b * p.k_strides[0] + g * p.k_strides[1];
    const T* vb = vbase + b * p.v_strides[0] + g * p.v_strides[1];
    const bool* kvalid = p.key_valid != nullptr ? p.key_valid + b * p.Lk : nullptr;
    const int64_t ntiles = (hi_b - lo_b + kBK - 1) / kBK;

    auto load_tile = [&](int stage, int64_t t) {
      const int64_t j0 = lo_b + t * kBK;
      T* ks = Ks + stage * KTILE;
      T* vs = Vs + stage * KTILE;
      for (int e = tid; e < kBK * CH; e += THREADS) {
        const int r = e / CH, c = (e % CH) * 8;
        const bool ok = j0 + r < hi_b;
        const int off = tile_off<HD, WG>(kBK, r, c);
        cp_async_16(ks + off, ok ? kb + (j0 + r) * p.k_strides[2] + c : kb, ok ? 16 : 0);
        cp_async_16(vs + off, ok ? vb + (j0 + r) * p.v_strides[2] + c : vb, ok ? 16 : 0);
      }
    };
    // wgmma: S = Q K^T for this warpgroup's 64 rows against a 64-key tile, issued as one
    // committed group (HD / 16 steps of m64n64k16, both operands K-major); not waited for.
    auto issue_s = [&](float (&s)[kBK / 8][4], const T* ks) {
      auto& sf = reinterpret_cast<float(&)[kBK / 2]>(s);
      sm90::fence_regs(sf);
      sm90::fence();
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk)
        sm90::Mma<kBK, T>::run(sf, sm90::desc_sw128(Qs + sm90::kmajor_start(BQ, (warp / 4) * 64, kk)),
                               sm90::desc_sw128(ks + sm90::kmajor_start(kBK, 0, kk)));
      sm90::commit();
      sm90::fence_regs(sf);
    };
    // wgmma: O += P V, P from registers, V MN-major (64-column blocks 8 KB apart); not waited for.
    auto issue_pv = [&](uint32_t (&pa)[kBK / 16][4], const T* vs) {
      auto& of = reinterpret_cast<float(&)[HD / 2]>(o);
      sm90::fence_regs(of);
      sm90::fence_regs(pa);
      sm90::fence();  // the accumulators were just rescaled, and P written, by ordinary instructions
#pragma unroll
      for (int kc = 0; kc < kBK / 16; ++kc)
        sm90::MmaRegA<HD, T>::run(of, pa[kc], sm90::desc_sw128_mn(vs + sm90::mnmajor_start(kc), sm90::mn_lbo(kBK), sm90::kSbo));
      sm90::commit();
      sm90::fence_regs(of);
      sm90::fence_regs(pa);
    };
    // Online softmax of tile t's S (this thread's two rows): mask (skipped where every key is
    // visible to every row), running max and sum, O rescaled, P packed as mma A fragments.
    auto softmax = [&](float (&s)[kBK / 8][4], int64_t t, uint32_t (&pa)[kBK / 16][4]) {
      const int64_t j0 = lo_b + t * kBK;
      float mx[2] = {-FLT_MAX, -FLT_MAX};
      if (whole && j0 >= lo_all && j0 + kBK <= hi_all) {  // every key visible to every row
#pragma unroll
        for (int nt = 0; nt < kBK / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[nt][e] = __fmul_rn(s[nt][e], sl2);  // _rn: never fused, so both paths round alike
            mx[e / 2] = fmaxf(mx[e / 2], s[nt][e]);
          }
      } else {
#pragma unroll
        for (int nt = 0; nt < kBK / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int rr = e / 2;
            const int64_t key = j0 + nt * 8 + (lane % 4) * 2 + (e % 2);
            const bool ok = key >= rlo[rr] && key < rhi[rr] && (kvalid == nullptr || kvalid[key]);
            s[nt][e] = ok ? __fmul_rn(s[nt][e], sl2) : -INFINITY;
            mx[rr] = fmaxf(mx[rr], s[nt][e]);
          }
      }
      float alpha[2];
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {  // the four lanes of a quad share a row
        mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 1));
        mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 2));
        const float mn = fmaxf(m[rr], mx[rr]);
        alpha[rr] = exp2f(m[rr] - mn);  // 0 on the first visible tile (m = -FLT_MAX), 1 if unchanged
        m[rr] = mn;
      }
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int nt = 0; nt < kBK / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int rr = e / 2;
          s[nt][e] = exp2f(s[nt][e] - m[rr]);  // masked: exp2(-inf) = 0
          sum[rr] += s[nt][e];
        }
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        sum[rr] += __shfl_xor_sync(0xffffffffu, sum[rr], 1);
        sum[rr] += __shfl_xor_sync(0xffffffffu, sum[rr], 2);
        l[rr] = l[rr] * alpha[rr] + sum[rr];
      }
#pragma unroll
      for (int dt = 0; dt < HD / 8; ++dt) {
        o[dt][0] *= alpha[0];
        o[dt][1] *= alpha[0];
        o[dt][2] *= alpha[1];
        o[dt][3] *= alpha[1];
      }
      // P as A fragments, 16 keys each (the S accumulator layout pairs up into them).
#pragma unroll
      for (int kc = 0; kc < kBK / 16; ++kc) {
        pa[kc][0] = pack2<T>(s[2 * kc][0], s[2 * kc][1]);
        pa[kc][1] = pack2<T>(s[2 * kc][2], s[2 * kc][3]);
        pa[kc][2] = pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
        pa[kc][3] = pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
      }
    };

    if constexpr (OVERLAP) {
      // Three K/V stages; S of tile t + 1 runs on the tensor cores under tile t's softmax.
      // Stage (t + 2) % 3 is refilled at iteration t: it held tile t - 1, whose last reader
      // (P V of t - 1) finished before the barrier closing iteration t - 1.
      load_tile(0, 0);
      cp_async_commit();
      if (ntiles > 1) load_tile(1, 1);
      cp_async_commit();
      cp_async_wait<1>();  // tile 0 landed
      sm90::fence_proxy_async();
      __syncthreads();
      float s[kBK / 8][4] = {};
      issue_s(s, Ks);
      sm90::wait<0>();
      sm90::fence_regs(reinterpret_cast<float(&)[kBK / 2]>(s));
      int st = 0;  // the stage of tile t: t % 3
      for (int64_t t = 0; t < ntiles; ++t) {
        const int st1 = st == 2 ? 0 : st + 1, st2 = st1 == 2 ? 0 : st1 + 1;  // of t + 1, t + 2
        if (t + 2 < ntiles) load_tile(st2, t + 2);
        cp_async_commit();
        float sn[kBK / 8][4] = {};
        if (t + 1 < ntiles) {  // uniform across the block
          cp_async_wait<1>();  // tile t + 1 landed (tile t + 2 may still be in flight)
          sm90::fence_proxy_async();
          __syncthreads();
          issue_s(sn, Ks + st1 * KTILE);
        }
        uint32_t pa[kBK / 16][4];
        softmax(s, t, pa);
        issue_pv(pa, Vs + st * KTILE);
        sm90::wait<0>();  // S of t + 1 and O += P V of t
        sm90::fence_regs(reinterpret_cast<float(&)[HD / 2]>(o));
        sm90::fence_regs(pa);
        sm90::fence_regs(reinterpret_cast<float(&)[kBK / 2]>(sn));
#pragma unroll
        for (int nt = 0; nt < kBK / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nt][e] = sn[nt][e];
        __syncthreads();  // every warp is done with stage t % 3 before it is refilled
        st = st1;
      }
    } else {
      load_tile(0, 0);
      cp_async_commit();
      for (int64_t t = 0; t < ntiles; ++t) {
        if (t + 1 < ntiles) load_tile(static_cast<int>((t + 1) % 2), t + 1);
        cp_async_commit();
        cp_async_wait<1>();  // tile t landed (tile t + 1 may still be in flight)
        if constexpr (WG) sm90::fence_proxy_async();
        __syncthreads();
        const int stage = static_cast<int>(t % 2);
        const T* ks = Ks + stage * KTILE;
        const T* vs = Vs + stage * KTILE;

        float s[kBK / 8][4] = {};
        if constexpr (WG) {
          issue_s(s, ks);
          sm90::wait<0>();
          sm90::fence_regs(reinterpret_cast<float(&)[kBK / 2]>(s));
        } else {
#pragma unroll
          for (int kk = 0; kk < HD / 16; ++kk)
#pragma unroll
            for (int np = 0; np < kBK / 16; ++np) {
              uint32_t r[4];
              ldmatrix_x4(r, ks + (np * 16 + lane % 8 + (lane / 16) * 8) * LDS + kk * 16 + ((lane / 8) % 2) * 8);
              mma_16816<T>(s[2 * np], qf[kk], r[0], r[1]);
              mma_16816<T>(s[2 * np + 1], qf[kk], r[2], r[3]);
            }
        }
        uint32_t pa[kBK / 16][4];
        softmax(s, t, pa);
        if constexpr (WG) {
          issue_pv(pa, vs);
          sm90::wait<0>();
          sm90::fence_regs(reinterpret_cast<float(&)[HD / 2]>(o));
          sm90::fence_regs(pa);
        } else {
#pragma unroll
          for (int kc = 0; kc < kBK / 16; ++kc)
#pragma unroll
            for (int dp = 0; dp < HD / 16; ++dp) {
              uint32_t r[4];
              ldmatrix_x4_trans(r, vs + (kc * 16 + lane % 8 + ((lane / 8) % 2) * 8) * LDS + dp * 16 + (lane / 16) * 8);
              mma_16816<T>(o[2 * dp], pa[kc], r[0], r[1]);
              mma_16816<T>(o[2 * dp + 1], pa[kc], r[2], r[3]);
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = r0 + rr * 8;
    if (r >= nrows) continue;
    const float inv = l[rr] > 0.f ? 1.f / l[rr] : 0.f;  // no visible key: 0
    T* dst = out + (i0 + r) * ostride + h * HD + (lane % 4) * 2;
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt)
      *reinterpret_cast<uint32_t*>(dst + dt * 8) = pack2<T>(o[dt][2 * rr] * inv, o[dt][2 * rr + 1] * inv);
  }
  // Rows of this block past count (a partial last block) are zeroed.
  for (int64_t e = tid; e < (BQ - nrows) * CH; e += THREADS) {
    const int64_t i = i0 + nrows + e / CH;
    if (i < p.T) *reinterpret_cast<uint4*>(out + i * ostride + h * HD + (e % CH) * 8) = make_uint4(0, 0, 0, 0);
  }
}

template <typename T, int HD, bool WG, bool OVERLAP>
__global__ void __launch_bounds__(kThreads<WG>) attention_mma_kernel(AttentionParams p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (WG) {
    __trap();  // only sm_90a code holds the wgmma body (not even instantiated here)
  } else {
    attention_mma_body<T, HD, false, false>(p);
  }
#else
  attention_mma_body<T, HD, WG, OVERLAP>(p);
#endif
}

template <typename T, int HD, bool WG, bool OVERLAP>
cudaError_t launch_hd(const AttentionParams& p, cudaStream_t stream) {
  constexpr size_t smem = mma_smem_bytes<HD, WG, OVERLAP>();
  const cudaError_t e = opt_in_smem<attention_mma_kernel<T, HD, WG, OVERLAP>>(smem);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.T, kBQ<WG>)), static_cast<unsigned>(p.Hq));
  attention_mma_kernel<T, HD, WG, OVERLAP><<<grid, kThreads<WG>, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool WG, bool OVERLAP>
cudaError_t launch_kind(const AttentionParams& p, cudaStream_t stream) {
  return p.hd == 64 ? launch_hd<T, 64, WG, OVERLAP>(p, stream) : launch_hd<T, 128, WG, OVERLAP>(p, stream);
}

template <typename T>
cudaError_t launch_dtype(const AttentionParams& p, AttentionMma kind, cudaStream_t stream) {
  switch (kind) {
    case AttentionMma::kMma:
      return launch_kind<T, false, false>(p, stream);
    case AttentionMma::kWgmma:
      return launch_kind<T, true, false>(p, stream);
    case AttentionMma::kWgmmaOverlap:
      return launch_kind<T, true, true>(p, stream);
    default:
      return cudaErrorNotSupported;
  }
}

}  // namespace

bool attention_mma_supported(const AttentionParams& p, DType dtype) {
  const bool aligned = p.q_stride % 8 == 0 && p.k_strides[2] % 8 == 0 && p.v_strides[2] % 8 == 0 &&
                       p.k_strides[0] % 8 == 0 && p.k_strides[1] % 8 == 0 && p.v_strides[0] % 8 == 0 &&
                       p.v_strides[1] % 8 == 0 && reinterpret_cast<uintptr_t>(p.q) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p.k) % 16 == 0 && reinterpret_cast<uintptr_t>(p.v) % 16 == 0;
  // Soft-capping runs in the CUDA-core kernel only (this one folds the scale into exp2).
  return dtype != DType::kF32 && (p.hd == 64 || p.hd == 128) && aligned && p.softcap == 0.f;
}

cudaError_t launch_attention_mma(const AttentionParams& p, DType dtype, cudaStream_t stream) {
  const AttentionMma kind = attention_mma_kind();
  return dtype == DType::kBF16 ? launch_dtype<__nv_bfloat16>(p, kind, stream) : launch_dtype<__half>(p, kind, stream);
}

}  // namespace skipgpt::cuda
