// The whole native surface of skipgpt_ext: every op schema, declared once.
// CPU kernels register under the CPU dispatch key in csrc/cpu/, CUDA kernels under CUDA in
// csrc/cuda/. Python fake (meta) kernels live in skipgpt_ext/_fake.py.
//
// Conventions shared by every op (see skipgpt_ext/reference.py for the executable spec):
// - Tokens are flattened to T = B*S rows. A module's executing rows are described by
//   `idx` (int64 [T], the first `count` entries are the executing row numbers in ascending
//   order, the rest unspecified) and `count` (int64, 0-dim). No output shape depends on data.
// - Compacted tensors have T rows; rows [0, count) are meaningful.
// - Mutating ops declare their mutated argument with (a!).
#include <Python.h>
#include <torch/library.h>

#include "cpu/vec_isa.h"
#include "cuda/gemv_rows.h"

namespace {
// The vector ISA the CPU kernels chose for this process (CPU features, capped by
// SKIPGPT_CPU_ISA): "avx512", "avx2" or "generic". Not an op: it reads no tensor.
PyObject* cpu_isa(PyObject*, PyObject*) {
  using skipgpt::cpu::Isa;
  const Isa isa = skipgpt::cpu::cpu_isa();
  return PyUnicode_FromString(isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "generic");
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The vector ISA of the CPU kernels: avx512, avx2 or generic."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// Importing skipgpt_ext._C loads this library, whose static initialisers register the schemas
// and kernels with the dispatcher. No pybind11 bindings are needed; the module holds only
// introspection: cpu_isa() and the constant CUDA_GEMV_MAX_ROWS (kGemvMaxRows, exported so
// that Python never keeps a copy of it; present in CPU-only builds too).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr &&
      PyModule_AddIntConstant(module, "CUDA_GEMV_MAX_ROWS", static_cast<long>(skipgpt::cuda::kGemvMaxRows)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(skipgpt, m) {
  // Both routing decisions and the attention RMSNorm in one pass over h [T, d].
  // router_weight [2, d] fp32: row 0 = attention (w_exec - w_skip), row 1 = MLP.
  // router_bias [2] fp32 likewise. A row executes iff margin > threshold and row_valid.
  m.def(
      "route_norm(Tensor h, Tensor norm_weight, float eps, Tensor router_weight, "
      "Tensor router_bias, float threshold, Tensor? row_valid) -> "
      "(Tensor x_norm, Tensor attn_idx, Tensor attn_count, Tensor mlp_idx, Tensor mlp_count)");
  // In-order compaction of a boolean row mask (routers that are not a single linear map).
  m.def("compact(Tensor mask) -> (Tensor idx, Tensor count)");
  // The compacted projection of rows idx[:count] of x, with an optional RMSNorm and RoPE
  // epilogue: out[i] = rope(norm(x[idx[i]] @ W^T + b), cos[idx[i]], sin[idx[i]]) for i < count.
  // Heads are head_dim wide (0: cos.size(1)); RoPE rotates the first cos.size(1) features of
  // each head (partial RoPE when that is less than head_dim). The norm is per head
  // (head_norm_weight [head_dim]; Qwen3, Gemma 3) or, with whole_norm, over the whole projected
  // row (head_norm_weight [N]; OLMo 2). Without cos/sin (both absent) it is the plain compacted
  // projection (no norm then). The layer's Q (executing rows), and K and V (every row).
  m.def(
      "gather_linear(Tensor x, Tensor idx, Tensor count, Tensor weight, Tensor? bias, "
      "Tensor? head_norm_weight, float head_norm_eps, Tensor? cos, Tensor? sin, int head_dim=0, "
      "bool whole_norm=False) -> Tensor");
  // gather_linear's old name, kept so that code and exported graphs that call it still load;
  // both devices register the same kernel under it.
  m.def(
      "q_proj_rope(Tensor x, Tensor idx, Tensor count, Tensor weight, Tensor? bias, "
      "Tensor? head_norm_weight, float head_norm_eps, Tensor? cos, Tensor? sin, int head_dim=0, "
      "bool whole_norm=False) -> Tensor");
  // Compacted queries q [T, Hq*hd] against the full K/V [B, Hkv, Lk, hd] of their own
  // sequence (row r belongs to sequence r // seq_len). Key j has cache position kv_offset + j
  // and is visible to a query at position p iff key_valid[b, j], kv_offset + j <= p and,
  // when window > 0, kv_offset + j > p - window. softcap > 0 caps each visible score
  // s = scale * q.k as softcap * tanh(s / softcap) before the softmax (Gemma 2/3; 0 = none).
  m.def(
      "sparse_query_attention(Tensor q, Tensor idx, Tensor count, Tensor k, Tensor v, "
      "Tensor q_pos, Tensor? key_valid, int kv_offset, int seq_len, float scale, int window, "
      "float softcap=0.0) -> Tensor");
  // h[idx[i]] += a[i] @ W^T (+ bias) for i < count, in place.
  // With post_norm_weight, each added row is first RMS-normalised in fp32 and scaled by it
  // (Gemma 2/3, OLMo 2: post-norms), then multiplied by out_scale (Granite's multiplier).
  m.def(
      "linear_scatter_add_(Tensor(a!) h, Tensor a, Tensor idx, Tensor count, Tensor weight, "
      "Tensor? bias, Tensor? post_norm_weight=None, float post_norm_eps=0.0, float out_scale=1.0) -> ()");
  // h[r] += out_scale * post_norm(down(act(gate(n)) * up(n))), n = RMSNorm(h[r]) (or h[r] without
  // norm_weight), for the rows r = idx[:count]; act is "silu" or "gelu_tanh"; the epilogue as
  // in linear_scatter_add_.
  m.def(
      "skip_mlp_(Tensor(a!) h, Tensor idx, Tensor count, Tensor? norm_weight, float eps, "
      "Tensor gate_weight, Tensor up_weight, Tensor down_weight, str activation=\"silu\", "
      "Tensor? post_norm_weight=None, float post_norm_eps=0.0, float out_scale=1.0) -> ()");
}
