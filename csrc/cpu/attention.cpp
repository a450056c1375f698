// sparse_query_attention: compacted queries against the full causal KV of their own sequence.
// Work items are (block of up to kQueryBlock compacted queries of one sequence, KV head); each
// holds the G query heads of its KV head, so a K/V tile is loaded once for all of them (GQA).
// Keys are visited in tiles with an online softmax: no T x T score or mask tensor exists.
// On x86 with AVX-512 or AVX2 the tile products run in register-blocked kernels of our own
// (attention_tile.inc, compiled once per instruction set and chosen by CPU feature); elsewhere
// they go through ATen's GEMM, with masking and softmax ours.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "vec_isa.h"
#include "vec_math.h"

namespace skipgpt::cpu {
namespace {

constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyTile = 256;
static_assert(kKeyTile % 64 == 0, "the tile kernels pack whole K panels of 64 (AVX-512) or 16 (AVX2) keys");

// Online-softmax step of one row over one tile (the generic path): returns the rescale factor
// of the old state and overwrites the scores with the tile's probabilities relative to the new
// running max (all 0 when every key of the tile is masked). The reductions keep 8 lanes, so the
// compiler vectorises them (SSE2, NEON) without -ffast-math. Masked keys hold -inf, so a NaN
// score is a visible key's: it makes the row NaN (as in dense attention), never a masked row.
// 1 / the softmax sum of a row; 0 for a row that saw no key, NaN for a NaN sum (so that the
// output is NaN even where the accumulated P V happens to be finite).
inline float no_key_zero_inv(float sum) { return sum > 0 ? 1.0f / sum : (sum == 0 ? 0.0f : sum); }

float softmax_tile_row(float* s, int64_t nk, float& row_max, float& row_sum) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  float lanes[8] = {ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf};
  int64_t j = 0;
  for (; j + 8 <= nk; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] = lanes[l] > s[j + l] ? lanes[l] : s[j + l];
  float mx = ninf;
  for (int l = 0; l < 8; ++l) mx = std::max(mx, lanes[l]);
  for (; j < nk; ++j) mx = std::max(mx, s[j]);
  if (mx == ninf) {  // every key masked, or every visible score NaN (the max skips NaN)
    if (std::any_of(s, s + nk, [](float x) { return std::isnan(x); })) row_sum = std::numeric_limits<float>::quiet_NaN();
    std::fill(s, s + nk, 0.0f);
    return 1.0f;
  }
  const float new_max = std::max(row_max, mx);
  const float alpha = row_max == ninf ? 0.0f : exp_nonpos(row_max - new_max);
  for (j = 0; j < nk; ++j) s[j] = exp_nonpos(s[j] - new_max);
  float sums[8] = {};
  for (j = 0; j + 8 <= nk; j += 8)
    for (int l = 0; l < 8; ++l) sums[l] += s[j + l];
  float sum = 0;
  for (int l = 0; l < 8; ++l) sum += sums[l];
  for (; j < nk; ++j) sum += s[j];
  row_max = new_max;
  row_sum = row_sum * alpha + sum;
  return alpha;
}

// Attention logit soft-capping (Gemma 2/3): s = cap * tanh(s / cap) on the visible scores of a
// row, before the mask and the softmax (a masked key stays -inf).
inline void apply_softcap(float* s, int64_t n, float cap) {
  const float inv = 1.0f / cap;
  for (int64_t j = 0; j < n; ++j) s[j] = cap * std::tanh(s[j] * inv);
}

// What a tile kernel needs to run one work item (attention_tile.inc).
template <typename scalar_t>
struct ItemArgs {
  const scalar_t *q, *k, *v;
  scalar_t* out;
  const int64_t *idx, *q_pos;
  const bool* key_valid;
  int64_t qs, os, ksb, ksh, ksl, vsb, vsh, vsl;
  int64_t hd, G, Lk, kv_offset, seq_len, window, key_tile;
  float scale, softcap;
};

}  // namespace

#if defined(SKIPGPT_X86_VEC)
// AVX-512: 6 x 64 score and 6 x 64 output accumulators (24 of 32 registers).
SKIPGPT_BEGIN_AVX512
namespace avx512_tiles {
struct Vec : avx512_vec::Vec {
  static constexpr int kPanelVecs = 4, kPvVecs = 4;
};
#include "attention_tile.inc"
}  // namespace avx512_tiles
SKIPGPT_END_ISA

// AVX2 (16 registers): 6 x 16 score and 6 x 16 output accumulators.
SKIPGPT_BEGIN_AVX2
namespace avx2_tiles {
struct Vec : avx2_vec::Vec {
  static constexpr int kPanelVecs = 2, kPvVecs = 2;
};
#include "attention_tile.inc"
}  // namespace avx2_tiles
SKIPGPT_END_ISA
#endif  // x86 tiles

namespace {

template <typename scalar_t>
void attend(const at::Tensor& q, const int64_t* idx, int64_t n, const at::Tensor& k, const at::Tensor& v,
            const int64_t* q_pos, const bool* key_valid, int64_t kv_offset, int64_t seq_len, float scale,
            int64_t window, float softcap, at::Tensor& out) {
  const int64_t Hkv = k.size(1), Lk = k.size(2), hd = k.size(3);
  const int64_t Hq = q.size(1) / hd, G = Hq / Hkv;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* outp = out.data_ptr<scalar_t>();
  const int64_t qs = q.stride(0), os = out.stride(0);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksl = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsl = v.stride(2);

  // Query blocks: runs of compacted queries of one sequence (idx is ascending).
  std::vector<int64_t> block_start;
  for (int64_t i = 0; i < n;) {
    block_start.push_back(i);
    const int64_t b = idx[i] / seq_len;
    int64_t e = i + 1;
    while (e < n && e - i < kQueryBlock && idx[e] / seq_len == b) ++e;
    i = e;
  }
  block_start.push_back(n);
  const int64_t nblocks = static_cast<int64_t>(block_start.size()) - 1;

  // Causal work grows with the block's position, so equal counts of work items are unequal
  // work (2 threads got 1:3 of it). Split the items into one contiguous range per thread of
  // about equal cost (queries x visited keys), and give each thread exactly one range.
  const int64_t nitems = nblocks * Hkv;
  std::vector<double> cost_prefix(nitems + 1, 0.0);
  for (int64_t w = 0; w < nitems; ++w) {
    const int64_t blk = w / Hkv, i0 = block_start[blk], i1 = block_start[blk + 1] - 1;
    const int64_t first = idx[i0], last = idx[i1];
    const int64_t hi = std::min(Lk - 1, q_pos[last] - kv_offset);
    const int64_t lo = window > 0 ? std::max<int64_t>(0, q_pos[first] - window + 1 - kv_offset) : 0;
    cost_prefix[w + 1] = cost_prefix[w] + static_cast<double>(i1 - i0 + 1) * static_cast<double>(std::max<int64_t>(hi - lo + 1, 1));
  }
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nitems));
  std::vector<int64_t> part_start(parts + 1, nitems);
  part_start[0] = 0;
  for (int64_t p = 1, w = 0; p < parts; ++p) {
    const double goal = cost_prefix[nitems] * static_cast<double>(p) / static_cast<double>(parts);
    while (w < nitems && cost_prefix[w + 1] <= goal) ++w;
    part_start[p] = std::max(w, part_start[p - 1]);
  }

  const Isa isa = cpu_isa();
  if (isa != Isa::kGeneric) {
#if defined(SKIPGPT_X86_VEC)
    const ItemArgs<scalar_t> args{qp, kp, vp, outp, idx, q_pos, key_valid, qs, os, ksb, ksh, ksl, vsb, vsh, vsl,
                                  hd, G, Lk, kv_offset, seq_len, window, kKeyTile, scale, softcap};
    at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
      avx512_tiles::Scratch sc512;
      avx2_tiles::Scratch sc2;
      for (int64_t w = part_start[pb]; w < part_start[pe]; ++w) {
        const int64_t blk = w / Hkv, i0 = block_start[blk], m = block_start[blk + 1] - i0;
        if (isa == Isa::kAvx512)
          avx512_tiles::run_item<scalar_t>(args, i0, m, w % Hkv, sc512);
        else
          avx2_tiles::run_item<scalar_t>(args, i0, m, w % Hkv, sc2);
      }
    });
#endif
    return;
  }
  // Generic path (no AVX2, or SKIPGPT_CPU_ISA=generic): tile products through ATen's GEMM.
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    const int64_t wb = part_start[pb], we = part_start[pe];
    std::vector<float> Qf(kQueryBlock * G * hd), O(kQueryBlock * G * hd), S(kQueryBlock * G * kKeyTile);
    std::vector<float> row_max(kQueryBlock * G), row_sum(kQueryBlock * G), alpha(kQueryBlock * G);
    std::vector<int64_t> jmin(kQueryBlock), jmax(kQueryBlock);
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    constexpr bool is_f32 = std::is_same_v<scalar_t, float>;
    for (int64_t w = wb; w < we; ++w) {
      const int64_t blk = w / Hkv, g = w % Hkv;
      const int64_t i0 = block_start[blk], m = block_start[blk + 1] - i0, R = m * G;
      const int64_t b = idx[i0] / seq_len;
      int64_t lo = Lk, hi = -1;
      for (int64_t qi = 0; qi < m; ++qi) {
        const int64_t row = idx[i0 + qi], p = q_pos[row];
        jmax[qi] = std::min(Lk - 1, p - kv_offset);
        jmin[qi] = window > 0 ? std::max<int64_t>(0, p - window + 1 - kv_offset) : 0;
        lo = std::min(lo, jmin[qi]);
        hi = std::max(hi, jmax[qi]);
        for (int64_t gg = 0; gg < G; ++gg) {
          const scalar_t* src = qp + (i0 + qi) * qs + (g * G + gg) * hd;  // q is compacted
          float* dst = Qf.data() + (qi * G + gg) * hd;
          for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<float>(src[d]) * scale;
        }
      }
      std::fill(O.begin(), O.begin() + R * hd, 0.0f);
      std::fill(row_max.begin(), row_max.begin() + R, -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.begin() + R, 0.0f);
      const scalar_t* kb = kp + b * ksb + g * ksh;
      const scalar_t* vb = vp + b * vsb + g * vsh;
      const bool* kvalid = key_valid != nullptr ? key_valid + b * Lk : nullptr;
      const auto Qt = at::from_blob(Qf.data(), {R, hd}, f32);
      auto Ot = at::from_blob(O.data(), {R, hd}, f32);
      for (int64_t j0 = std::max<int64_t>(lo, 0); j0 <= hi; j0 += kKeyTile) {
        const int64_t nk = std::min(kKeyTile, hi + 1 - j0);
        at::Tensor Kt = at::from_blob(const_cast<scalar_t*>(kb + j0 * ksl), {nk, hd}, {ksl, 1},
                                      at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
        at::Tensor Vt = at::from_blob(const_cast<scalar_t*>(vb + j0 * vsl), {nk, hd}, {vsl, 1},
                                      at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
        if (!is_f32) {
          Kt = Kt.to(at::kFloat);
          Vt = Vt.to(at::kFloat);
        }
        auto St = at::from_blob(S.data(), {R, nk}, f32);
        at::mm_out(St, Qt, Kt.t());
        bool any = false;
        for (int64_t qi = 0; qi < m; ++qi) {
          const int64_t a = std::max<int64_t>(jmin[qi] - j0, 0), e = std::min<int64_t>(jmax[qi] - j0 + 1, nk);
          for (int64_t gg = 0; gg < G; ++gg) {
            const int64_t r = qi * G + gg;
            float* s = S.data() + r * nk;
            constexpr float ninf = -std::numeric_limits<float>::infinity();
            alpha[r] = 1.0f;
            if (a >= e) {  // this tile lies outside the query's causal window
              std::fill(s, s + nk, 0.0f);
              continue;
            }
            if (softcap > 0.0f) apply_softcap(s + a, e - a, softcap);
            for (int64_t j = 0; j < a; ++j) s[j] = ninf;
            for (int64_t j = e; j < nk; ++j) s[j] = ninf;
            if (kvalid != nullptr)
              for (int64_t j = a; j < e; ++j)
                if (!kvalid[j0 + j]) s[j] = ninf;
            alpha[r] = softmax_tile_row(s, nk, row_max[r], row_sum[r]);
            any = true;
          }
        }
        if (!any) continue;
        for (int64_t r = 0; r < R; ++r)
          if (alpha[r] != 1.0f)
            for (int64_t d = 0; d < hd; ++d) O[r * hd + d] *= alpha[r];
        Ot.addmm_(St, Vt);
      }
      for (int64_t qi = 0; qi < m; ++qi) {
        for (int64_t gg = 0; gg < G; ++gg) {
          const int64_t r = qi * G + gg;
          const float inv = no_key_zero_inv(row_sum[r]);
          scalar_t* dst = outp + (i0 + qi) * os + (g * G + gg) * hd;
          const float* src = O.data() + r * hd;
          // A row that saw no key is exactly 0 (even where masked values were not finite).
          for (int64_t d = 0; d < hd; ++d) dst[d] = inv == 0.0f ? scalar_t(0) : static_cast<scalar_t>(src[d] * inv);
        }
      }
    }
  });
}

at::Tensor sparse_query_attention_cpu(const at::Tensor& q_in, const at::Tensor& idx, const at::Tensor& count,
                                      const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& q_pos,
                                      const std::optional<at::Tensor>& key_valid, int64_t kv_offset,
                                      int64_t seq_len, double scale, int64_t window, double softcap) {
  const char* op = "skipgpt::sparse_query_attention";
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be finite and >= 0 (0 = none), got ", softcap);
  check_cpu(q_in, op, "q");
  check_float_dtype(q_in, op, "q");
  const int64_t T =
      check_attention_args(q_in, idx, count, k_in, v_in, q_pos, key_valid, kv_offset, seq_len, window, op, on_cpu(op)).T;
  const at::Tensor kv_valid = key_valid.has_value() ? key_valid->contiguous() : at::Tensor();
  const int64_t n = read_count_and_check_idx(idx, count, T, op);
  auto out = at::empty({T, q_in.size(1)}, q_in.options().memory_format(at::MemoryFormat::Contiguous));
  // Rows past count are unspecified by the contract; zero them so the output is deterministic.
  if (n < T) out.narrow(0, n, T - n).zero_();
  if (n == 0) return out;
  const at::Tensor q = q_in.stride(1) == 1 ? q_in : q_in.contiguous();
  // K/V from a cache are contiguous; a fresh transposed view is fine too (unit stride on head_dim).
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  const auto idx_c = idx.contiguous();
  const auto pos_c = q_pos.contiguous();
  const int64_t* pp = pos_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(pp[i] >= 0 && pp[i] < kMaxPosition, op, ": q_pos must hold positions in [0, 2^62), got q_pos[", i,
                "] = ", pp[i]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "sparse_query_attention", [&] {
    attend<scalar_t>(q, idx_c.data_ptr<int64_t>(), n, k, v, pos_c.data_ptr<int64_t>(),
                     kv_valid.defined() ? kv_valid.data_ptr<bool>() : nullptr, kv_offset, seq_len,
                     static_cast<float>(scale), window, static_cast<float>(softcap), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(skipgpt, CPU, m) { m.impl("sparse_query_attention", &sparse_query_attention_cpu); }

}  // namespace skipgpt::cpu
