// The CUDA kernels' launch interface: raw pointers, plain structs, no torch headers.
//
// The .cu files include only this header and the CUDA toolkit, so they compile in ~1 s each
// and the CMake compile check (sm_80 and sm_90a) needs no torch at all. The op wrappers in
// ops_cuda.cpp (host C++ with ATen) check arguments, allocate outputs and call these on the
// current stream. Every launcher returns the launch's cudaError_t; none synchronises.
//
// Shared conventions (the executable spec is skipgpt_ext/reference.py):
// - Tokens are flattened to T rows. A module's executing rows are idx[0:count) (ascending,
//   unique); count lives on the device and every kernel reads it there: a tile whose rows all
//   lie at or past count exits before touching any weight.
// - Element types: kF32 / kBF16 / kF16 (the GEMM kernels take kBF16 / kF16 only).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "gemv_rows.h"

namespace skipgpt::cuda {

enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// -- route_norm / compact (route_norm.cu) ------------------------------------------------------
struct RouteNormParams {
  const void* h = nullptr;  // [T, d], row stride h_stride, unit column stride
  int64_t h_stride = 0;
  const void* norm_weight = nullptr;  // [d], h's dtype
  float eps = 0.f;
  const float* router_weight = nullptr;  // [2, d] margins (attention row 0, MLP row 1)
  const float* router_bias = nullptr;    // [2]
  float threshold = 0.f;
  const bool* row_valid = nullptr;  // [T] or null
  const bool* mask = nullptr;       // compact(): the decisions themselves (h unused)
  void* x_norm = nullptr;           // [T, d] contiguous, h's dtype (null for compact)
  int64_t* attn_idx = nullptr;      // [T]
  int64_t* attn_count = nullptr;    // 0-dim
  int64_t* mlp_idx = nullptr;       // [T] (null for compact)
  int64_t* mlp_count = nullptr;
  uint64_t* workspace = nullptr;  // route_norm_workspace_words(T) zeroed words
  int64_t T = 0, d = 0;
};
int64_t route_norm_workspace_words(int64_t T);
cudaError_t launch_route_norm(const RouteNormParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_compact(const RouteNormParams& p, cudaStream_t stream);

// -- compacted GEMMs (gemm.cu) -----------------------------------------------------------------
// C[i, :] = A[a_row(i), :] @ W^T for i < count (a_row(i) = a_idx ? a_idx[i] : i), then one of
// the epilogues below. A row stride lda, W [N, K] contiguous; K and N multiples of 8, 16-byte
// aligned rows.
enum class Epilogue : int {
  kStore = 0,       // out[i, n] = C + bias;  rows [count, M) of out are zeroed
  kRope = 1,        // kStore, then per head: optional RMSNorm, RoPE at position row a_idx[i]
  kScatterAdd = 2,  // out[out_idx[i], n] += C + bias (in place, rows unique: no atomics)
  kSiluMul = 3,     // out[i, n] = silu(A W^T) * (A W1^T)  (W = gate, W1 = up; no bias)
};
struct GemmParams {
  const void* A = nullptr;
  int64_t lda = 0;
  const int64_t* a_idx = nullptr;
  const void* W = nullptr;
  const void* W1 = nullptr;  // kSiluMul only
  const void* bias = nullptr;
  void* out = nullptr;
  int64_t ldo = 0;
  const int64_t* out_idx = nullptr;  // kScatterAdd
  const int64_t* count = nullptr;    // device count; null = all M rows
  int64_t M = 0, N = 0, K = 0;       // M: the row capacity (T)
  // kRope: cos/sin [T, rot_dim] (h's dtype), optional head-norm weight [head_dim]. RoPE turns
  // the first rot_dim features of each head (rot_dim < head_dim: partial RoPE). With row_inv (a
  // [M] fp32 scratch), the norm is over the whole row instead (OLMo 2), weight [N], rounded
  // once; launch_rope_rows fills row_inv. The tiled epilogue covers only rot_dim == head_dim
  // and per-head norms; launch_gemm sends the rest to the row pass.
  const void* cos = nullptr;
  const void* sin = nullptr;
  const void* head_norm_weight = nullptr;
  float head_norm_eps = 0.f;
  int head_dim = 0;
  int rot_dim = 0;  // 0: head_dim
  float* row_inv = nullptr;
};
// launch_gemm hands row capacities M <= kGemvMaxRows (gemv_rows.h; decode batches) to
// launch_gemv (gemv.cu): one warp per output feature, same epilogues and rounding.
cudaError_t launch_gemm(const GemmParams& p, Epilogue epi, DType dtype, cudaStream_t stream);
// The tiled mainloop launch_gemm uses for larger M, from SKIPGPT_CUDA_GEMM (read at every launch,
// so tests can switch): unset, "auto" or "mma": mma.sync (gemm.cu); "wgmma" / "wgmma-ws" /
// "wgmma-tma": the plain / warp-specialised / warp-specialised with TMA weight tiles wgmma
// kernel (gemm_sm90.cu), kUnavailable unless the device has
// compute capability 9.0 and the build sm_90a code (SKIPGPT_SM90A); any other value kUnknown.
// launch_gemm returns cudaErrorNotSupported for those two when it reaches the tiled path; the op
// wrappers check first, on every call (decode-sized ones included), and fail with a message.
// auto becomes the faster wgmma kernel once a GPU run has verified them.
enum class GemmMainloop : int { kMma = 0, kWgmma = 1, kWgmmaWs = 2, kWgmmaTma = 3, kUnavailable = 4, kUnknown = 5 };
GemmMainloop gemm_mainloop();
// True on a compute-capability 9.0 device when the build holds sm_90a code (gemm.cu).
bool sm90a_device();
cudaError_t launch_gemm_mma(const GemmParams& p, Epilogue epi, DType dtype, cudaStream_t stream);
// loop: kWgmma, kWgmmaWs or kWgmmaTma.
cudaError_t launch_gemm_sm90(const GemmParams& p, Epilogue epi, DType dtype, GemmMainloop loop, cudaStream_t stream);
cudaError_t launch_gemv(const GemmParams& p, Epilogue epi, DType dtype, cudaStream_t stream);
// RoPE (and the head or whole-row norm) in place on the compacted rows, where the tiled
// epilogue does not cover the family's heads (see GemmParams).
cudaError_t launch_rope_rows(const GemmParams& p, DType dtype, cudaStream_t stream);

// x[i] = RMSNorm(h[idx[i]]) for i < count (the MLP's gather rides on its norm); a plain
// gather when norm_weight is null.
struct GatherNormParams {
  const void* h = nullptr;
  int64_t h_stride = 0;
  const int64_t* idx = nullptr;
  const int64_t* count = nullptr;
  const void* norm_weight = nullptr;
  float eps = 0.f;
  void* x = nullptr;  // [T, d] contiguous
  int64_t T = 0, d = 0;
};
cudaError_t launch_gather_norm(const GatherNormParams& p, DType dtype, cudaStream_t stream);

// out[i, :] = gelu_tanh(gate[i, :]) * up[i, :] for i < count; all [T, I] contiguous.
struct GeluMulParams {
  const void* gate = nullptr;
  const void* up = nullptr;
  void* out = nullptr;
  const int64_t* count = nullptr;
  int64_t T = 0, I = 0;
};
cudaError_t launch_gelu_mul(const GeluMulParams& p, DType dtype, cudaStream_t stream);

// h[idx[i], :] += out_scale * RMSNorm_w(y[i, :]) for i < count (no norm when norm_weight is
// null): the post-norm / output-multiplier epilogue of linear_scatter_add_ and skip_mlp_.
struct NormScatterAddParams {
  void* h = nullptr;
  int64_t h_stride = 0;
  const void* y = nullptr;  // [T, d] contiguous
  const int64_t* idx = nullptr;
  const int64_t* count = nullptr;
  const void* norm_weight = nullptr;  // [d] or null
  float eps = 0.f;
  float out_scale = 1.f;
  int64_t T = 0, d = 0;
};
cudaError_t launch_norm_scatter_add(const NormScatterAddParams& p, DType dtype, cudaStream_t stream);

// -- query-sparse attention (attention.cu) -----------------------------------------------------
struct AttentionParams {
  const void* q = nullptr;  // [T, Hq*hd] compacted, row stride q_stride
  int64_t q_stride = 0;
  const int64_t* idx = nullptr;
  const int64_t* count = nullptr;
  const void* k = nullptr;  // [B, Hkv, Lk, hd], unit stride on hd
  const void* v = nullptr;
  int64_t k_strides[3] = {0, 0, 0};  // batch, head, key
  int64_t v_strides[3] = {0, 0, 0};
  const int64_t* q_pos = nullptr;     // [T]
  const bool* key_valid = nullptr;    // [B, Lk] contiguous or null
  void* out = nullptr;                // [T, Hq*hd] contiguous
  float* partial_o = nullptr;         // split-KV scratch: [T, Hq, splits, hd]
  float* partial_ml = nullptr;        // [T, Hq, splits, 2]
  int64_t T = 0, B = 0, Hq = 0, Hkv = 0, Lk = 0, hd = 0;
  int64_t kv_offset = 0, seq_len = 1, window = 0;
  float scale = 1.f;
  float softcap = 0.f;  // > 0: scores become softcap * tanh(scores / softcap) (Gemma 2/3)
  int splits = 1;
};
// How many KV splits launch_attention will use (the caller sizes the scratch from it).
int attention_splits(int64_t T, int64_t Hkv, int64_t Lk, int num_sms);
cudaError_t launch_attention(const AttentionParams& p, DType dtype, cudaStream_t stream);
// The tensor-core prefill kernel (attention_mma.cu), chosen by launch_attention for many rows
// of long sequences when dtype is bf16/fp16, head_dim is 64 or 128 and rows are 16-byte aligned.
bool attention_mma_supported(const AttentionParams& p, DType dtype);
cudaError_t launch_attention_mma(const AttentionParams& p, DType dtype, cudaStream_t stream);
// The prefill kernel's matrix instructions, from SKIPGPT_CUDA_ATTN (read at every launch):
// unset, "auto" or "mma": mma.sync; "wgmma" (sm_90a: S = Q K^T from shared memory, P V with P in
// registers); "wgmma-overlap" (the same with three K/V stages, S of the next key tile issued
// before this tile's softmax), kUnavailable where they cannot run; anything else kUnknown. launch_attention returns
// cudaErrorNotSupported for those two when it reaches the prefill kernel; the op wrapper checks
// first, on every call (decode included), and fails with a message. auto becomes wgmma once a
// GPU run has verified it.
enum class AttentionMma : int { kMma = 0, kWgmma = 1, kWgmmaOverlap = 2, kUnavailable = 3, kUnknown = 4 };
AttentionMma attention_mma_kind();

}  // namespace skipgpt::cuda
