"""Per-op and per-module timings of the native CPU kernels, side by side in one process.

For each shape, token count T and skip rate it prints, per op / module:
  native ms, dense ms (the HF/torch module on every row), reference ms (unfused pure PyTorch),
  speedup vs dense, speedup vs reference, ideal speedup (dense FLOPs / executed FLOPs) and
  efficiency = speedup vs dense / ideal.
T <= 16 is a decode step (T sequences, one new token each, over a 512-token cache); larger T is
one prefill sequence. Example:
  python benchmarks/bench_kernels.py --shapes smollm2 --T 512 2048 --skip 0 0.4
With --device cuda it runs the CUDA benchmark instead (benchmarks/bench_kernels_cuda.py: a
Llama-3.1-8B layer in bf16, CUDA-event medians, TFLOP/s and GB/s).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

import skipgpt_ext
from skipgpt_ext import reference as ref

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
}
DECODE_PAST = 512


def timeit(fn, reps: int, setup=None) -> float:
    """Median wall time in ms (setup, e.g. cloning h for an in-place op, is not timed)."""
    times = []
    for _ in range(reps + 1):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["smollm2"], choices=list(SHAPES))
    ap.add_argument("--T", nargs="+", type=int, default=None,
                    help="default: 1 16 128 512 2048 (cpu), 1 8 64 512 4096 16384 (cuda)")
    ap.add_argument("--skip", nargs="+", type=float, default=None,
                    help="default: 0 0.25 0.4 0.6 (cpu), 0 0.25 0.4 (cuda)")
    ap.add_argument("--reps", type=int, default=None, help="default: 5 (cpu), 20 (cuda)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--mainloops", nargs="+", default=None, choices=["mma", "wgmma", "wgmma-ws", "wgmma-tma"],
                    help="cuda: instead of the full table, time the tiled GEMM ops under each of these "
                         "SKIPGPT_CUDA_GEMM mainloops side by side, and the prefill attention core under "
                         "SKIPGPT_CUDA_ATTN=mma, =wgmma and =wgmma-overlap beside SDPA (default T: 512 4096 16384)")
    ap.add_argument("--attn-kinds", nargs="*", default=None, choices=["mma", "wgmma", "wgmma-overlap"],
                    help="with --mainloops: the SKIPGPT_CUDA_ATTN kinds of the attention rows (default: mma, plus "
                         "wgmma and wgmma-overlap when --mainloops has wgmma; the overlapped one in a last pass)")
    args = ap.parse_args()
    if args.attn_kinds is not None and not args.mainloops:
        ap.error("--attn-kinds goes with --mainloops")
    if args.mainloops and args.device != "cuda":
        ap.error("--mainloops compares CUDA kernels: add --device cuda")
    if args.device == "cuda":
        from bench_kernels_cuda import compare_mainloops, main_cuda  # beside this script

        if args.mainloops:
            compare_mainloops(args.T or [512, 4096, 16384], args.skip or [0.0, 0.4], args.reps or 20, args.mainloops,
                              args.attn_kinds)
            return
        main_cuda(args.T or [1, 8, 64, 512, 4096, 16384], args.skip or [0.0, 0.25, 0.4], args.reps or 20)
        return
    args.T = args.T or [1, 16, 128, 512, 2048]
    args.skip = args.skip or [0.0, 0.25, 0.4, 0.6]
    args.reps = args.reps or 5
    if args.threads:
        torch.set_num_threads(args.threads)
    skipgpt_ext.require_kernels("cpu")
    ops = skipgpt_ext.ops
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}")
    print("shape     T     skip  module/op              native_ms  dense_ms    ref_ms  x_dense  x_ref  ideal  eff")
    for shape in args.shapes:
        cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=1, vocab_size=256, max_position_embeddings=4096)
        cfg._attn_implementation = "sdpa"
        d, Hq, Hkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        hd = d // Hq
        with torch.no_grad():
            attn = LlamaAttention(cfg, 0).to(dtype).eval()
            mlp = LlamaMLP(cfg).to(dtype).eval()
            norm1, norm2 = LlamaRMSNorm(d).to(dtype), LlamaRMSNorm(d).to(dtype)
            for n_ in (norm1, norm2):
                n_.weight.add_(torch.randn(d, dtype=dtype) * 0.1)
            rope = LlamaRotaryEmbedding(cfg)
            for T in args.T:
                decode = T <= 16
                B, S, past = (T, 1, DECODE_PAST) if decode else (1, T, 0)
                h = torch.randn(T, d, dtype=dtype)
                pos = torch.arange(past, past + S).unsqueeze(0).expand(B, S)
                cos, sin = rope(h.view(B, S, d), pos)
                cos_r, sin_r = cos.reshape(T, hd), sin.reshape(T, hd)
                k_past = torch.randn(B, Hkv, past, hd, dtype=dtype)
                v_past = torch.randn(B, Hkv, past, hd, dtype=dtype)
                rw = torch.randn(2, d)
                for skip in args.skip:
                    _bench_point(shape, T, B, S, past, skip, h, rw, norm1, norm2, attn, mlp, cos, sin, cos_r, sin_r,
                                 k_past, v_past, ops, args.reps, dtype)


def _bench_point(shape, T, B, S, past, skip, h, rw, norm1, norm2, attn, mlp, cos, sin, cos_r, sin_r,
                 k_past, v_past, ops, reps, dtype):
    d, hd = h.shape[1], cos_r.shape[1]
    Hq, Hkv = attn.config.num_attention_heads, attn.config.num_key_value_heads
    eps = norm1.variance_epsilon
    # Router biases at the skip-rate quantile of this input's margins: exact skip fractions.
    margins = h.float() @ rw.T
    # skip >= 1 skips every row (the empty-module cost).
    rb = torch.stack([torch.quantile(-margins[:, c], skip) if 0 < skip < 1 else torch.tensor(1e9 if skip <= 0 else -1e9)
                      for c in range(2)])
    rb = rb - 1e-4 * (0 < skip < 1)
    x_norm, a_idx, a_cnt, m_idx, m_cnt = ops.route_norm(h, norm1.weight, eps, rw, rb, 0.0, None)
    n_a, n_m = int(a_cnt), int(m_cnt)
    rows = []

    def row(name, t_nat, t_dense, t_ref, ideal):
        rows.append((name, t_nat, t_dense, t_ref, ideal))

    # route_norm: HF norm + two router linears vs one fused pass.
    row("route_norm",
        timeit(lambda _: ops.route_norm(h, norm1.weight, eps, rw, rb, 0.0, None), reps),
        timeit(lambda _: (norm1(h), F.linear(h.float(), rw), F.linear(h.float(), rw)), reps),
        timeit(lambda _: ref.route_norm(h, norm1.weight, eps, rw, rb, 0.0, None), reps), 1.0)

    # Attention core and projections.
    k_new = attn.k_proj(x_norm).view(B, S, Hkv, hd).transpose(1, 2)
    v_new = attn.v_proj(x_norm).view(B, S, Hkv, hd).transpose(1, 2)
    k = torch.cat([k_past, k_new], 2) if k_past.shape[2] else k_new
    v = torch.cat([v_past, v_new], 2) if v_past.shape[2] else v_new
    q_pos = torch.arange(past, past + S).repeat(B)
    q_c = ops.q_proj_rope(x_norm, a_idx, a_cnt, attn.q_proj.weight, None, None, 0.0, cos_r, sin_r)
    q_dense = attn.q_proj(x_norm).view(B, S, Hq, hd).transpose(1, 2)
    row("q_proj_rope",
        timeit(lambda _: ops.q_proj_rope(x_norm, a_idx, a_cnt, attn.q_proj.weight, None, None, 0.0, cos_r, sin_r), reps),
        timeit(lambda _: (lambda q: q * cos.unsqueeze(1) + ref.rotate_half(q) * sin.unsqueeze(1))(
            attn.q_proj(x_norm).view(B, S, Hq, hd).transpose(1, 2)), reps),
        timeit(lambda _: ref.q_proj_rope(x_norm, a_idx, a_cnt, attn.q_proj.weight, None, None, 0.0, cos_r, sin_r), reps),
        T / n_a if n_a else float("inf"))
    visible = torch.full((T,), float(past + 1)) if past else torch.arange(1, T + 1, dtype=torch.float64)
    core_dense = float(visible.sum())
    core_exec = float(visible[a_idx[:n_a]].sum())
    row("sparse_query_attention",
        timeit(lambda _: ops.sparse_query_attention(q_c, a_idx, a_cnt, k, v, q_pos, None, 0, S, hd**-0.5, 0), reps),
        timeit(lambda _: F.scaled_dot_product_attention(q_dense, k, v, is_causal=not past, enable_gqa=Hq != Hkv), reps),
        timeit(lambda _: ref.sparse_query_attention(q_c, a_idx, a_cnt, k, v, q_pos, None, 0, S, hd**-0.5, 0), reps),
        core_dense / core_exec if core_exec else float("inf"))
    o_in = torch.randn(T, Hq * hd, dtype=dtype)
    row("linear_scatter_add_",
        timeit(lambda hh: ops.linear_scatter_add_(hh, o_in, a_idx, a_cnt, attn.o_proj.weight, None), reps, h.clone),
        timeit(lambda hh: hh.add_(attn.o_proj(o_in)), reps, h.clone),
        timeit(lambda hh: ref.linear_scatter_add_(hh, o_in, a_idx, a_cnt, attn.o_proj.weight, None), reps, h.clone),
        T / n_a if n_a else float("inf"))

    # Whole attention module: norm, routing, K/V for every row, Q, core, O + residual.
    def attn_native(hh):
        xn, ai, ac, _, _ = ops.route_norm(hh, norm1.weight, eps, rw, rb, 0.0, None)
        kk = attn.k_proj(xn).view(B, S, Hkv, hd).transpose(1, 2)
        kk = kk * cos.unsqueeze(1) + ref.rotate_half(kk) * sin.unsqueeze(1)
        vv = attn.v_proj(xn).view(B, S, Hkv, hd).transpose(1, 2)
        if past:
            kk, vv = torch.cat([k_past, kk], 2), torch.cat([v_past, vv], 2)
        q = ops.q_proj_rope(xn, ai, ac, attn.q_proj.weight, None, None, 0.0, cos_r, sin_r)
        o = ops.sparse_query_attention(q, ai, ac, kk, vv, q_pos, None, 0, S, hd**-0.5, 0)
        ops.linear_scatter_add_(hh, o, ai, ac, attn.o_proj.weight, None)

    def attn_reference(hh):
        xn, ai, ac, _, _ = ref.route_norm(hh, norm1.weight, eps, rw, rb, 0.0, None)
        kk = attn.k_proj(xn).view(B, S, Hkv, hd).transpose(1, 2)
        kk = kk * cos.unsqueeze(1) + ref.rotate_half(kk) * sin.unsqueeze(1)
        vv = attn.v_proj(xn).view(B, S, Hkv, hd).transpose(1, 2)
        if past:
            kk, vv = torch.cat([k_past, kk], 2), torch.cat([v_past, vv], 2)
        q = ref.q_proj_rope(xn, ai, ac, attn.q_proj.weight, None, None, 0.0, cos_r, sin_r)
        o = ref.sparse_query_attention(q, ai, ac, kk, vv, q_pos, None, 0, S, hd**-0.5, 0)
        ref.linear_scatter_add_(hh, o, ai, ac, attn.o_proj.weight, None)

    class _Cache:  # a minimal stand-in for the HF cache: prepend the fixed past
        def update(self, kk, vv, layer_idx, *a, **kw):
            return torch.cat([k_past, kk], 2), torch.cat([v_past, vv], 2)

    def attn_dense(hh):
        out, _ = attn(norm1(hh.view(B, S, d)), position_embeddings=(cos, sin), attention_mask=None,
                      cache=_Cache() if past else None)
        hh.add_(out.view(T, d))

    proj_dense = 2 * T * d * (Hq * hd * 2 + Hkv * hd * 2)
    proj_exec = 2 * T * d * Hkv * hd * 2 + 2 * n_a * d * Hq * hd * 2
    core_f = 4 * hd * Hq
    ideal_attn = (proj_dense + core_f * core_dense) / (proj_exec + core_f * core_exec)
    row("ATTENTION module", timeit(attn_native, reps, h.clone), timeit(attn_dense, reps, h.clone),
        timeit(attn_reference, reps, h.clone), ideal_attn)

    # Whole MLP module: norm + gate/up + down + residual.
    row("MLP module (skip_mlp_)",
        timeit(lambda hh: ops.skip_mlp_(hh, m_idx, m_cnt, norm2.weight, eps, mlp.gate_proj.weight, mlp.up_proj.weight,
                                        mlp.down_proj.weight), reps, h.clone),
        timeit(lambda hh: hh.add_(mlp(norm2(hh))), reps, h.clone),
        timeit(lambda hh: ref.skip_mlp_(hh, m_idx, m_cnt, norm2.weight, eps, mlp.gate_proj.weight, mlp.up_proj.weight,
                                        mlp.down_proj.weight), reps, h.clone),
        T / n_m if n_m else float("inf"))
    for name, tn, td, tr, ideal in rows:
        xd, xr = td / tn, tr / tn
        # An empty module (count 0) has an infinite ideal: its efficiency is not defined.
        eff = f"{xd / ideal:5.2f}" if ideal != float("inf") else "    -"
        print(f"{shape:8s} {T:5d}  {skip:4.2f}  {name:22s} {tn:9.3f} {td:9.3f} {tr:9.3f} {xd:7.2f} {xr:6.2f} "
              f"{ideal:6.2f} {eff}", flush=True)


if __name__ == "__main__":
    main()
