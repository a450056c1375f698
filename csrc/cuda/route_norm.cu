// route_norm: both router margins and the attention RMSNorm in one pass over h, and the
// in-order compaction of both modules' executing rows in the same kernel (a single-pass scan
// with decoupled look-back, so there is no separate compaction or alignment launch).
//
// Each block takes the next tile of kTileRows rows (tile numbers come from an atomic counter,
// so every earlier tile has already started: the look-back cannot wait on an unscheduled
// block). One warp per row: fp32 dots and sum of squares over one read of the row, then the
// normalised row is written. Warp 0 then ballots the tile's decisions, publishes the tile's
// aggregate, walks back over earlier tiles until it meets an inclusive prefix, publishes its
// own inclusive prefix and writes the executing rows at exclusive-prefix + rank. Status words
// pack the flag and both modules' counts in 64 bits, so one atomic store publishes all three.
// Skipped rows fill idx from the end (unspecified by the contract, but deterministic). The
// tile with the last number writes the device-side counts.
#include "common.cuh"

namespace skipgpt::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kTileRows = 32;  // one ballot per tile
constexpr uint64_t kCountMask = (uint64_t{1} << 31) - 1;
constexpr uint64_t kAggregate = uint64_t{1} << 62;
constexpr uint64_t kInclusive = uint64_t{2} << 62;

__device__ __forceinline__ uint64_t pack(uint64_t flag, uint64_t a, uint64_t m) { return flag | (m << 31) | a; }

template <typename T, bool kVec>
__device__ __forceinline__ void route_row(const RouteNormParams& p, int64_t r, int lane, bool& ea, bool& em) {
  const T* row = static_cast<const T*>(p.h) + r * p.h_stride;
  const T* nw = static_cast<const T*>(p.norm_weight);
  T* out = static_cast<T*>(p.x_norm) + r * p.d;
  const float* w0 = p.router_weight;
  const float* w1 = p.router_weight + p.d;
  using P = RowPack<T, kVec>;
  float ss = 0.f, m0 = 0.f, m1 = 0.f;
  for (int64_t j = int64_t{lane} * P::V; j < p.d; j += 32 * P::V) {
    P x;
    x.load(row + j);
#pragma unroll
    for (int e = 0; e < P::V; ++e) {
      const float f = to_float<T>(x.e[e]);
      ss += f * f;
      m0 += f * w0[j + e];
      m1 += f * w1[j + e];
    }
  }
  ss = warp_sum(ss);
  m0 = warp_sum(m0);
  m1 = warp_sum(m1);
  const bool ok = p.row_valid == nullptr || p.row_valid[r];
  ea = ok && (m0 + p.router_bias[0]) > p.threshold;
  em = ok && (m1 + p.router_bias[1]) > p.threshold;
  write_rms_norm_row<T, kVec>(row, nw, out, p.d, rsqrtf(ss / static_cast<float>(p.d) + p.eps), lane);
}

template <typename T, bool kRoute, bool kVec>
__global__ void __launch_bounds__(kWarps * 32) route_compact_kernel(RouteNormParams p) {
  __shared__ uint8_t flag_a[kTileRows], flag_m[kTileRows];
  __shared__ int64_t tile_s, excl_a_s, excl_m_s;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned long long* counter = reinterpret_cast<unsigned long long*>(p.workspace);
  unsigned long long* status = counter + 1;
  if (threadIdx.x == 0) tile_s = static_cast<int64_t>(atomicAdd(counter, 1ull));
  __syncthreads();
  const int64_t tile = tile_s, r0 = tile * kTileRows, rows = p.T;

  for (int rr = warp; rr < kTileRows; rr += kWarps) {
    const int64_t r = r0 + rr;
    bool ea = false, em = false;
    if (r < rows) {
      if constexpr (kRoute) {
        route_row<T, kVec>(p, r, lane, ea, em);
      } else {
        ea = p.mask[r];
      }
    }
    if (lane == 0) {
      flag_a[rr] = ea;
      flag_m[rr] = em;
    }
  }
  __syncthreads();
  if (warp != 0) return;

  const bool ea = flag_a[lane], em = flag_m[lane];
  const unsigned ba = __ballot_sync(0xffffffffu, ea), bm = __ballot_sync(0xffffffffu, em);
  if (lane == 0) {
    const uint64_t agg_a = __popc(ba), agg_m = __popc(bm);
    uint64_t excl_a = 0, excl_m = 0;
    if (tile > 0) {
      atomicExch(status + tile, pack(kAggregate, agg_a, agg_m));
      for (int64_t t = tile - 1;; --t) {
        uint64_t s;
        do {
          s = *reinterpret_cast<volatile unsigned long long*>(status + t);
        } while ((s >> 62) == 0);
        excl_a += s & kCountMask;
        excl_m += (s >> 31) & kCountMask;
        if ((s & kInclusive) != 0) break;
      }
    }
    atomicExch(status + tile, pack(kInclusive, excl_a + agg_a, excl_m + agg_m));
    excl_a_s = static_cast<int64_t>(excl_a);
    excl_m_s = static_cast<int64_t>(excl_m);
    if (tile == (rows + kTileRows - 1) / kTileRows - 1) {
      *p.attn_count = static_cast<int64_t>(excl_a + agg_a);
      if (p.mlp_count != nullptr) *p.mlp_count = static_cast<int64_t>(excl_m + agg_m);
    }
  }
  __syncwarp();
  const int64_t r = r0 + lane;
  if (r >= rows) return;
  const unsigned below = (1u << lane) - 1u;
  {
    const int64_t excl = excl_a_s, rank = __popc(ba & below);
    // Skipped rows: (r0 - excl) skipped rows precede this tile, (lane - rank) precede r in it.
    p.attn_idx[ea ? excl + rank : rows - 1 - ((r0 - excl) + (lane - rank))] = r;
  }
  if (p.mlp_idx != nullptr) {
    const int64_t excl = excl_m_s, rank = __popc(bm & below);
    p.mlp_idx[em ? excl + rank : rows - 1 - ((r0 - excl) + (lane - rank))] = r;
  }
}

template <bool kRoute, typename T, bool kVec>
cudaError_t launch(const RouteNormParams& p, cudaStream_t stream) {
  if (p.T == 0) {  // no tile would write the counts
    cudaError_t e = cudaMemsetAsync(p.attn_count, 0, sizeof(int64_t), stream);
    if (e == cudaSuccess && p.mlp_count != nullptr) e = cudaMemsetAsync(p.mlp_count, 0, sizeof(int64_t), stream);
    return e;
  }
  const auto tiles = static_cast<unsigned>(ceil_div(p.T, kTileRows));
  route_compact_kernel<T, kRoute, kVec><<<tiles, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int64_t route_norm_workspace_words(int64_t T) { return 1 + ceil_div(T, kTileRows); }

cudaError_t launch_route_norm(const RouteNormParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&]<typename T>() {
    constexpr int V = 16 / sizeof(T);
    const bool vec = p.d % V == 0 && p.h_stride % V == 0 && reinterpret_cast<uintptr_t>(p.h) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(p.norm_weight) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(p.x_norm) % 16 == 0;
    return vec ? launch<true, T, true>(p, stream) : launch<true, T, false>(p, stream);
  });
}

cudaError_t launch_compact(const RouteNormParams& p, cudaStream_t stream) {
  return launch<false, float, false>(p, stream);
}

}  // namespace skipgpt::cuda
