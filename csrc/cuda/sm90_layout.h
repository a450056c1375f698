// The shared-memory tiles the wgmma kernels write, and the matrix descriptors that read them,
// as constexpr functions (plain C++: no CUDA headers). The static_asserts at the end check, at
// compile time, that every operand element a descriptor addresses under the PTX ISA's canonical
// layouts is the element the kernels' copies stored there: for the GEMM tiles (gemm_sm90.cu)
// and the attention Q, K and V tiles (attention_mma.cu). tests/test_sm90_layout.py compiles this
// header with the host compiler, and once more with a deliberately wrong stride to show the
// check can fail.
#pragma once
#include <cstdint>

namespace skipgpt::cuda::sm90 {

// -- what the kernels store ------------------------------------------------------------------
// Element (r, c) of a tile of `rows` rows of 2-byte elements, kept as 64-column blocks of
// 128-byte rows (blocks rows * 128 bytes apart); the 16-byte chunk (c % 64) / 8 of row r sits at
// chunk ((c % 64) / 8) ^ (r % 8) of its row. Tiles start 1024-byte aligned. Element offset.
constexpr int tile_sw128(int rows, int r, int c) {
  return (c / 64) * (rows * 64) + r * 64 + ((((c % 64) / 8) ^ (r % 8)) * 8) + c % 8;
}

// -- what the descriptors read ---------------------------------------------------------------
constexpr uint32_t kSbo = 1024;  // 8 rows of 128 bytes: the stride byte offset of every tile
// The leading byte offset of an MN-major tile of `rows` K rows: the next 64-column block.
constexpr uint32_t mn_lbo(int rows) { return static_cast<uint32_t>(rows) * 128; }

// The 128-byte swizzle (Swizzle<3,4,3>) the hardware applies to a shared-memory byte address:
// the 16-byte chunk bits [4, 7) XOR the 128-byte row bits [7, 10). Relative to a 1024-byte
// aligned base, as every tile here is (descriptor base offset 0).
constexpr uint32_t swizzle128(uint32_t byte) { return byte ^ (((byte >> 7) & 7u) << 4); }

// Canonical layouts of the PTX ISA for 2-byte elements (T = 8), one m64nNk16 operand: the byte
// offset from the descriptor's start address of operand element (mn, k), k < 16, before the
// swizzle.
//   K-major:  ((8, m), (T, 2k)) : ((8T, SBO), (1, T))
//   MN-major: ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO))
constexpr uint32_t kmajor_sw128(uint32_t sbo, int mn, int k) {
  return static_cast<uint32_t>((mn % 8) * 128 + k * 2) + static_cast<uint32_t>(mn / 8) * sbo;
}
constexpr uint32_t mnmajor_sw128(uint32_t lbo, uint32_t sbo, int mn, int k) {
  return static_cast<uint32_t>((mn % 64) * 2 + (k % 8) * 128) + static_cast<uint32_t>(mn / 64) * lbo +
         static_cast<uint32_t>(k / 8) * sbo;
}

// The descriptor start (element offset in the tile) of k step kk (16 columns) of a K-major
// operand whose rows begin at tile row row0: the step's 64-column block, row0's row, and 32
// bytes per step inside the block (the swizzle then lands each chunk).
constexpr int kmajor_start(int tile_rows, int row0, int kk) {
  return (kk / 4) * (tile_rows * 64) + row0 * 64 + (kk % 4) * 16;
}
// The start of k step kc (16 K rows) of an MN-major operand: 16 rows further per step.
constexpr int mnmajor_start(int kc) { return kc * 16 * 64; }

// -- the checks --------------------------------------------------------------------------------
// A K-major operand of `mn_rows` rows starting at tile row row0, over `cols` columns.
constexpr bool kmajor_tile_reads_right(int tile_rows, int row0, int mn_rows, int cols, uint32_t sbo) {
  for (int kk = 0; kk < cols / 16; ++kk) {
    const uint32_t start = static_cast<uint32_t>(kmajor_start(tile_rows, row0, kk)) * 2;
    for (int mn = 0; mn < mn_rows; ++mn)
      for (int k = 0; k < 16; ++k)
        if (swizzle128(start + kmajor_sw128(sbo, mn, k)) !=
            static_cast<uint32_t>(tile_sw128(tile_rows, row0 + mn, kk * 16 + k)) * 2)
          return false;
  }
  return true;
}

// An MN-major operand (B = a row-major [K rows][N] tile, e.g. V): k steps of 16 rows at
// start = 16 rows further each, N = cols.
constexpr bool mnmajor_tile_reads_right(int tile_rows, int cols, uint32_t lbo, uint32_t sbo) {
  for (int kc = 0; kc < tile_rows / 16; ++kc) {
    const uint32_t start = static_cast<uint32_t>(mnmajor_start(kc)) * 2;
    for (int n = 0; n < cols; ++n)
      for (int k = 0; k < 16; ++k)
        if (swizzle128(start + mnmajor_sw128(lbo, sbo, n, k)) != static_cast<uint32_t>(tile_sw128(tile_rows, kc * 16 + k, n)) * 2)
          return false;
  }
  return true;
}

// What TMA writes (wgmma-tma's weight tiles, CU_TENSOR_MAP_SWIZZLE_128B): a box 64 elements
// wide (one 128-byte row per box row) landing at tile row row0 goes dense row-major from its
// destination, and the hardware swizzles each byte address. It must be the tile the producers'
// cp.async copies write, which the descriptors read (checked above).
constexpr bool tma_box_is_tile(int tile_rows, int row0, int box_rows, uint32_t skew = 0) {
  const uint32_t dst = static_cast<uint32_t>(row0) * 128 + skew;
  for (int r = 0; r < box_rows; ++r)
    for (int c = 0; c < 64; ++c)
      if (swizzle128(dst + static_cast<uint32_t>(r * 128 + c * 2)) !=
          static_cast<uint32_t>(tile_sw128(tile_rows, row0 + r, c)) * 2)
        return false;
  return true;
}

#ifndef SKIPGPT_LAYOUT_BREAK  // tests/test_sm90_layout.py sets it to a wrong stride
#define SKIPGPT_LAYOUT_BREAK 0
#endif

// GEMM (gemm_sm90.cu): 128-row A tiles read as two 64-row warpgroup operands; B tiles of 128 or
// 256 rows (and the up half of the gate/up tile, 128 rows on); 64 columns per stage.
static_assert(kmajor_tile_reads_right(128, 0, 64, 64, kSbo + SKIPGPT_LAYOUT_BREAK), "GEMM A, warpgroup 0");
static_assert(kmajor_tile_reads_right(128, 64, 64, 64, kSbo), "GEMM A, warpgroup 1");
static_assert(kmajor_tile_reads_right(256, 0, 256, 64, kSbo), "GEMM B, 256 rows");
static_assert(kmajor_tile_reads_right(256, 128, 128, 64, kSbo), "GEMM B, up half of gate/up");
// wgmma-tma: the TMA boxes of the weight tiles (256 and 128 rows; gate and up boxes of 128).
static_assert(tma_box_is_tile(256, 0, 256, SKIPGPT_LAYOUT_BREAK), "GEMM B by TMA, 256 rows");
static_assert(tma_box_is_tile(128, 0, 128), "GEMM B by TMA, 128 rows");
static_assert(tma_box_is_tile(256, 0, 128) && tma_box_is_tile(256, 128, 128), "GEMM gate and up boxes by TMA");
// Attention (attention_mma.cu): 128-row Q tiles read by two warpgroups and 64-row K tiles, over
// head_dim 64 / 128; 64-row V tiles read MN-major.
static_assert(kmajor_tile_reads_right(128, 0, 64, 64, kSbo), "attention Q, warpgroup 0, head_dim 64");
static_assert(kmajor_tile_reads_right(128, 64, 64, 128, kSbo), "attention Q, warpgroup 1, head_dim 128");
static_assert(kmajor_tile_reads_right(128, 64, 64, 64, kSbo), "attention Q, warpgroup 1, head_dim 64");
static_assert(kmajor_tile_reads_right(64, 0, 64, 64, kSbo), "attention K, head_dim 64");
static_assert(kmajor_tile_reads_right(64, 0, 64, 128, kSbo), "attention K, head_dim 128");
static_assert(mnmajor_tile_reads_right(64, 64, mn_lbo(64), kSbo), "attention V, head_dim 64");
static_assert(mnmajor_tile_reads_right(64, 128, mn_lbo(64) + SKIPGPT_LAYOUT_BREAK, kSbo), "attention V, head_dim 128");

}  // namespace skipgpt::cuda::sm90
