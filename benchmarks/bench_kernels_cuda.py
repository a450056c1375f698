"""CUDA side of bench_kernels.py (``python benchmarks/bench_kernels.py --device cuda``).

One Llama-3.1-8B layer (d 4096, I 14336, 32/8 heads, head_dim 128) in bf16. For each T and
skip rate, per op and per module, from one process:
  native us, dense us (torch/cuBLAS/SDPA on every row), reference us (unfused torch),
  x_dense, x_ref, ideal (dense FLOPs / executed FLOPs), eff = x_dense / ideal,
  achieved TFLOP/s and GB/s of the native kernel (executed FLOPs; bytes = weights read when the
  module runs + activations in and out).
Timing: CUDA events around each call, warm-up first, median of the repetitions, inputs rotated
among several copies (in-place ops restore h before each timed call, untimed). T <= 64 is a
decode step (T sequences of one new token over a DECODE_PAST-token cache); larger T is one
prefill sequence. At T == 1 the MLP is also timed as CUDA-graph replays (launch gaps removed),
with the module skipped (count 0) and executed.
"""

from __future__ import annotations

import os
import statistics

import torch
import torch.nn.functional as F

import skipgpt_ext
from cuda_kernel_env import gemm_unavailable  # beside this script
from skipgpt_ext import reference as ref

LLAMA8B = dict(d=4096, inter=14336, Hq=32, Hkv=8, hd=128)
DECODE_PAST = 2048
ROTATE = 3


def _events_ms(fn, reps: int, setup=None) -> float:
    """Median of per-call CUDA-event times in ms. fn gets ``setup(i)`` (untimed) or ``i`` (for rotation)."""
    for i in range(3):
        fn(setup(i) if setup else i)
    times = []
    for i in range(reps):
        arg = setup(i) if setup else i
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(arg)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _graph_ms(fn, reps: int = 50) -> float:
    """Median time of one CUDA-graph replay of fn (captured after a warm-up)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return _events_ms(lambda _: g.replay(), reps)


def main_cuda(T_list, skips, reps: int) -> None:
    skipgpt_ext.require_kernels("cuda")
    ops = skipgpt_ext.ops
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    d, inter, Hq, Hkv, hd = (LLAMA8B[k] for k in ("d", "inter", "Hq", "Hkv", "hd"))
    G = Hq // Hkv
    props = torch.cuda.get_device_properties(0)
    print(f"torch {torch.__version__}, {props.name}, {props.multi_processor_count} SMs, bf16, Llama-3.1-8B layer")
    print(f"GEMM mainloop for T > 8: {os.environ.get('SKIPGPT_CUDA_GEMM') or 'mma (auto)'}; prefill attention: "
          f"{os.environ.get('SKIPGPT_CUDA_ATTN') or 'mma (auto)'} (SKIPGPT_CUDA_GEMM / SKIPGPT_CUDA_ATTN)")
    print("T      skip  op/module               native_us  dense_us    ref_us  x_dense  x_ref  ideal   eff  TFLOP/s   GB/s")
    w = lambda *s, scale=1.0: (torch.randn(*s, device=dev) * scale).to(dt)  # noqa: E731
    Wq, Wk, Wv, Wo = w(Hq * hd, d, scale=d**-0.5), w(Hkv * hd, d, scale=d**-0.5), w(Hkv * hd, d, scale=d**-0.5), w(d, Hq * hd, scale=(Hq * hd) ** -0.5)
    Wg, Wu, Wd = w(inter, d, scale=d**-0.5), w(inter, d, scale=d**-0.5), w(d, inter, scale=inter**-0.5)
    n1, n2 = 1 + 0.1 * w(d), 1 + 0.1 * w(d)
    rw = torch.randn(2, d, device=dev)
    eps = 1e-5
    esz = 2
    for T in T_list:
        decode = T <= 64
        B, S, past = (T, 1, DECODE_PAST) if decode else (1, T, 0)
        hs = [w(T, d) for _ in range(ROTATE)]
        ang = torch.rand(T, hd, device=dev) * 6
        cos_r, sin_r = ang.cos().to(dt), ang.sin().to(dt)
        cos4, sin4 = cos_r.view(B, 1, S, hd), sin_r.view(B, 1, S, hd)
        k_past, v_past = w(B, Hkv, past, hd), w(B, Hkv, past, hd)
        q_pos = torch.arange(past, past + S, device=dev).repeat(B)
        point_skips = list(skips) + ([1.0] if T == 1 else [])
        for skip in point_skips:
            h0 = hs[0]
            margins = h0.float() @ rw.T
            if skip <= 0:
                rb = torch.full((2,), 1e9, device=dev)
            elif skip >= 1:
                rb = torch.full((2,), -1e9, device=dev)
            else:
                rb = torch.stack([torch.quantile(-margins[:, c], skip) for c in range(2)]) - 1e-4
            x_norm, a_idx, a_cnt, m_idx, m_cnt = ops.route_norm(h0, n1, eps, rw, rb, 0.0, None)
            n_a, n_m = int(a_cnt), int(m_cnt)
            rows = []

            def row(name, tn, td, tr, ideal, flops, nbytes):
                rows.append((name, tn, td, tr, ideal, flops, nbytes))

            reps_big = reps if T <= 4096 else max(3, reps // 4)
            # route_norm vs the dense norm + two router GEMVs
            row("route_norm",
                _events_ms(lambda i: ops.route_norm(hs[i % ROTATE], n1, eps, rw, rb, 0.0, None), reps),
                _events_ms(lambda i: (F.rms_norm(hs[i % ROTATE], (d,), n1, eps), F.linear(hs[i % ROTATE].float(), rw)), reps),
                _events_ms(lambda i: ref.route_norm(hs[i % ROTATE], n1, eps, rw, rb, 0.0, None), reps),
                1.0, 4 * T * d, 2 * T * d * esz)

            def rope_dense(xx):
                q = F.linear(xx, Wq).view(B, S, Hq, hd).transpose(1, 2)
                return q * cos4 + ref.rotate_half(q) * sin4

            row("q_proj_rope",
                _events_ms(lambda _: ops.q_proj_rope(x_norm, a_idx, a_cnt, Wq, None, None, 0.0, cos_r, sin_r), reps),
                _events_ms(lambda _: rope_dense(x_norm), reps),
                _events_ms(lambda _: ref.q_proj_rope(x_norm, a_idx, a_cnt, Wq, None, None, 0.0, cos_r, sin_r), reps),
                T / n_a if n_a else float("inf"), 2 * n_a * d * Hq * hd, (Wq.numel() if n_a else 0) * esz + 2 * n_a * (d + Hq * hd) * esz)

            k_new, v_new = w(B, Hkv, S, hd), w(B, Hkv, S, hd)
            k = torch.cat([k_past, k_new], 2) if past else k_new
            v = torch.cat([v_past, v_new], 2) if past else v_new
            q_c = ops.q_proj_rope(x_norm, a_idx, a_cnt, Wq, None, None, 0.0, cos_r, sin_r)
            q_dense = w(B, Hq, S, hd)
            visible = torch.full((T,), float(past + 1)) if past else torch.arange(1, T + 1, dtype=torch.float64)
            core_dense, core_exec = float(visible.sum()), float(visible[a_idx[:n_a].cpu()].sum())
            reps_core = reps if T <= 512 else 3
            row("sparse_query_attention",
                _events_ms(lambda _: ops.sparse_query_attention(q_c, a_idx, a_cnt, k, v, q_pos, None, 0, S, hd**-0.5, 0), reps_core),
                _events_ms(lambda _: F.scaled_dot_product_attention(q_dense, k, v, is_causal=not past, enable_gqa=True), reps_core),
                _events_ms(lambda _: ref.sparse_query_attention(q_c, a_idx, a_cnt, k, v, q_pos, None, 0, S, hd**-0.5, 0), min(reps_core, 3))
                if T <= 4096 else float("nan"),
                core_dense / core_exec if core_exec else float("inf"), 4 * hd * Hq * core_exec,
                (2 * k.numel() * esz * (n_a / T) if past else 2 * k.numel() * esz) + 2 * n_a * Hq * hd * esz)

            o_in = w(T, Hq * hd)
            restore = lambda i: hs[i % ROTATE].clone()  # noqa: E731
            row("linear_scatter_add_",
                _events_ms(lambda hh: ops.linear_scatter_add_(hh, o_in, a_idx, a_cnt, Wo, None), reps, restore),
                _events_ms(lambda hh: hh.add_(F.linear(o_in, Wo)), reps, restore),
                _events_ms(lambda hh: ref.linear_scatter_add_(hh, o_in, a_idx, a_cnt, Wo, None), reps, restore),
                T / n_a if n_a else float("inf"), 2 * n_a * d * Hq * hd, (Wo.numel() if n_a else 0) * esz + n_a * (Hq * hd + 2 * d) * esz)

            def mlp_native(hh):
                ops.skip_mlp_(hh, m_idx, m_cnt, n2, eps, Wg, Wu, Wd)

            def mlp_dense(hh):
                xx = F.rms_norm(hh, (d,), n2, eps)
                hh.add_(F.linear(F.silu(F.linear(xx, Wg)) * F.linear(xx, Wu), Wd))

            mlp_flops = 2 * n_m * d * inter * 3
            row("MLP module (skip_mlp_)",
                _events_ms(mlp_native, reps_big, restore), _events_ms(mlp_dense, reps_big, restore),
                _events_ms(lambda hh: ref.skip_mlp_(hh, m_idx, m_cnt, n2, eps, Wg, Wu, Wd), reps_big, restore),
                T / n_m if n_m else float("inf"), mlp_flops, (3 * Wg.numel() if n_m else 0) * esz + 2 * n_m * d * esz)

            every, n_every = torch.arange(T, device=dev), torch.full((), T, dtype=torch.long, device=dev)

            def attn_native(hh):  # K/V as the layer runs them: the fused op for decode batches, else cuBLAS
                xn, ai, ac, _, _ = ops.route_norm(hh, n1, eps, rw, rb, 0.0, None)
                if T <= skipgpt_ext.CUDA_GEMV_MAX_ROWS:
                    kk = ops.q_proj_rope(xn, every, n_every, Wk, None, None, 0.0, cos_r, sin_r)
                    kk = kk.view(B, S, Hkv, hd).transpose(1, 2)
                    vv = ops.q_proj_rope(xn, every, n_every, Wv, None, None, 0.0, None, None)
                else:
                    kk = F.linear(xn, Wk).view(B, S, Hkv, hd).transpose(1, 2)
                    kk = kk * cos4 + ref.rotate_half(kk) * sin4
                    vv = F.linear(xn, Wv)
                vv = vv.view(B, S, Hkv, hd).transpose(1, 2)
                if past:
                    kk, vv = torch.cat([k_past, kk], 2), torch.cat([v_past, vv], 2)
                q = ops.q_proj_rope(xn, ai, ac, Wq, None, None, 0.0, cos_r, sin_r)
                o = ops.sparse_query_attention(q, ai, ac, kk, vv, q_pos, None, 0, S, hd**-0.5, 0)
                ops.linear_scatter_add_(hh, o, ai, ac, Wo, None)

            def attn_dense(hh):
                xn = F.rms_norm(hh, (d,), n1, eps)
                q = rope_dense(xn)
                kk = F.linear(xn, Wk).view(B, S, Hkv, hd).transpose(1, 2)
                kk = kk * cos4 + ref.rotate_half(kk) * sin4
                vv = F.linear(xn, Wv).view(B, S, Hkv, hd).transpose(1, 2)
                if past:
                    kk, vv = torch.cat([k_past, kk], 2), torch.cat([v_past, vv], 2)
                o = F.scaled_dot_product_attention(q, kk, vv, is_causal=not past, enable_gqa=True)
                hh.add_(F.linear(o.transpose(1, 2).reshape(T, Hq * hd), Wo))

            proj_dense = 2 * T * d * (Hq * hd * 2 + Hkv * hd * 2)
            proj_exec = 2 * T * d * Hkv * hd * 2 + 2 * n_a * d * Hq * hd * 2
            core_f = 4 * hd * Hq
            row("ATTENTION module", _events_ms(attn_native, reps_core, restore), _events_ms(attn_dense, reps_core, restore),
                float("nan"), (proj_dense + core_f * core_dense) / (proj_exec + core_f * core_exec),
                proj_exec + core_f * core_exec, (2 * Wk.numel() + (2 * Wq.numel() if n_a else 0)) * esz)

            for name, tn, td, tr, ideal, flops, nbytes in rows:
                xd, xr = td / tn, tr / tn
                eff = f"{xd / ideal:5.2f}" if ideal != float("inf") else "    -"
                tf, gbs = flops / (tn * 1e-3) / 1e12, nbytes / (tn * 1e-3) / 1e9
                print(f"{T:6d} {skip:4.2f}  {name:22s} {tn * 1e3:9.1f} {td * 1e3:9.1f} {tr * 1e3:9.1f} {xd:7.2f} {xr:6.2f} "
                      f"{ideal:6.2f} {eff} {tf:8.1f} {gbs:7.0f}", flush=True)
            if T == 1:
                hh = hs[0].clone()
                g_nat = _graph_ms(lambda: mlp_native(hh))
                g_den = _graph_ms(lambda: mlp_dense(hh))
                state = "skipped (count 0)" if n_m == 0 else "executed"
                print(f"{T:6d} {skip:4.2f}  MLP as CUDA graph, {state}: native {g_nat * 1e3:.1f} us, dense {g_den * 1e3:.1f} us, "
                      f"x_dense {g_den / g_nat:.2f}", flush=True)


def compare_mainloops(T_list, skips, reps: int, loops, attn_kinds=None) -> None:
    """The tiled GEMM ops (T > 8) under each SKIPGPT_CUDA_GEMM mainloop, side by side with cuBLAS,
    and the prefill attention core under each SKIPGPT_CUDA_ATTN kind beside SDPA (attn_kinds;
    default mma, plus wgmma and wgmma-overlap when the wgmma mainloop is asked for).

    One Llama-3.1-8B layer in bf16, prefill rows, routers at the given skip rate. The mainloop
    is switched through the environment (the kernels read it at every launch); each op is timed
    under one mainloop after another in the same process, each with its own warm-up. Dense is
    cuBLAS on every row (the Q row: the projection alone); ideal = T / executing rows. The
    warp-specialised kernels get passes of their own after all the others (the TMA one last),
    and so does the overlapped attention, last of all, so that a fault or a hang there (the
    GEMMs' mbarrier watchdog traps) cannot cost the other rows.
    """
    skipgpt_ext.require_kernels("cuda")
    props = torch.cuda.get_device_properties(0)
    print(f"torch {torch.__version__}, {props.name}, {props.multi_processor_count} SMs, bf16, Llama-3.1-8B layer GEMMs "
          "and prefill attention core (causal, one sequence)")
    saved = {v: os.environ.get(v) for v in ("SKIPGPT_CUDA_GEMM", "SKIPGPT_CUDA_ATTN")}
    try:
        if attn_kinds is None:
            attn_kinds = ["mma"] + (["wgmma", "wgmma-overlap"] if "wgmma" in loops else [])
        loops = [m for m in loops if _mainloop_runs_here(m)]
        if any(k != "mma" for k in attn_kinds) and not _mainloop_runs_here("wgmma"):  # the same sm_90a check
            attn_kinds = [k for k in attn_kinds if k == "mma"]
        specialised = ("wgmma-ws", "wgmma-tma")
        first = [m for m in loops if m not in specialised]
        first_attn = [k for k in attn_kinds if k != "wgmma-overlap"]
        if first or first_attn:
            _mainloop_rows(T_list, skips, reps, first, first_attn)
        for m in specialised:
            if m in loops:
                _mainloop_rows(T_list, skips, reps, [m], [])
        if "wgmma-overlap" in attn_kinds:
            _mainloop_rows(T_list, skips, reps, [], ["wgmma-overlap"])
    finally:
        for var, val in saved.items():
            if val is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = val


def _mainloop_runs_here(m: str) -> bool:
    """Whether SKIPGPT_CUDA_GEMM=m can run on this device and build (the ops' own check)."""
    why = gemm_unavailable(m)
    if why is not None:
        print(f"skipping mainloop {m}: {why}", flush=True)
    return why is None


def _mainloop_rows(T_list, skips, reps: int, loops, attn_kinds) -> None:
    ops = skipgpt_ext.ops
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    d, inter, Hq, Hkv, hd = (LLAMA8B[k] for k in ("d", "inter", "Hq", "Hkv", "hd"))
    head = "".join(f" {m + '_us':>12s}" for m in loops) + "".join(f" {'x_' + m:>11s}" for m in loops)
    if loops:
        print(f"T      skip  op                      ideal  dense_us{head}  (x_m: dense / mainloop m)", flush=True)
    w = lambda *s, scale=1.0: (torch.randn(*s, device=dev) * scale).to(dt)  # noqa: E731
    Wq, Wo = w(Hq * hd, d, scale=d**-0.5), w(d, Hq * hd, scale=(Hq * hd) ** -0.5)
    Wg, Wu, Wd = w(inter, d, scale=d**-0.5), w(inter, d, scale=d**-0.5), w(d, inter, scale=inter**-0.5)
    n2 = 1 + 0.1 * w(d)
    eps = 1e-5
    for T in T_list:
        hs = [w(T, d) for _ in range(ROTATE)]
        o_in = w(T, Hq * hd)
        ang = torch.rand(T, hd, device=dev) * 6
        cos_r, sin_r = ang.cos().to(dt), ang.sin().to(dt)
        restore = lambda i: hs[i % ROTATE].clone()  # noqa: E731
        for skip in skips:
            gen = torch.Generator(device="cpu").manual_seed(T)
            mask = torch.rand(T, generator=gen) >= skip
            idx, cnt = ref.compact(mask.to(dev))
            ideal = T / max(int(mask.sum()), 1)
            cases = [
                ("q_proj_rope", lambda _: ops.q_proj_rope(hs[0], idx, cnt, Wq, None, None, 0.0, cos_r, sin_r),
                 lambda _: F.linear(hs[0], Wq), None),
                ("linear_scatter_add_", lambda hh: ops.linear_scatter_add_(hh, o_in, idx, cnt, Wo, None),
                 lambda hh: hh.add_(F.linear(o_in, Wo)), restore),
                ("MLP module (skip_mlp_)", lambda hh: ops.skip_mlp_(hh, idx, cnt, n2, eps, Wg, Wu, Wd),
                 lambda hh: hh.add_(F.linear(F.silu(F.linear(F.rms_norm(hh, (d,), n2, eps), Wg))
                                             * F.linear(F.rms_norm(hh, (d,), n2, eps), Wu), Wd)), restore),
            ]
            for name, native, dense, setup in cases if loops else []:
                td = _events_ms(dense, reps, setup)
                tn = []
                for m in loops:
                    os.environ["SKIPGPT_CUDA_GEMM"] = m
                    tn.append(_events_ms(native, reps, setup))
                os.environ.pop("SKIPGPT_CUDA_GEMM", None)
                cols = "".join(f" {t * 1e3:12.1f}" for t in tn) + "".join(f" {td / t:11.2f}" for t in tn)
                print(f"{T:6d} {skip:4.2f}  {name:22s} {ideal:5.2f} {td * 1e3:9.1f}{cols}", flush=True)
            kinds = attn_kinds
            if not kinds:
                continue
            # The prefill attention core (T >= 64: the tensor-core kernel) on each matrix
            # instruction set (SKIPGPT_CUDA_ATTN), beside SDPA on every row.
            q_c = w(T, Hq * hd)
            k, v = w(1, Hkv, T, hd), w(1, Hkv, T, hd)
            q_dense = w(1, Hq, T, hd)
            q_pos = torch.arange(T, device=dev)
            visible = torch.arange(1, T + 1, dtype=torch.float64)
            ideal_core = float(visible.sum()) / max(float(visible[mask].sum()), 1.0)
            reps_core = reps if T <= 4096 else 3
            td = _events_ms(lambda _: F.scaled_dot_product_attention(q_dense, k, v, is_causal=True, enable_gqa=True),
                            reps_core)
            ta = {}
            for kind in kinds:
                os.environ["SKIPGPT_CUDA_ATTN"] = kind
                ta[kind] = _events_ms(
                    lambda _: ops.sparse_query_attention(q_c, idx, cnt, k, v, q_pos, None, 0, T, hd**-0.5, 0), reps_core)
            os.environ.pop("SKIPGPT_CUDA_ATTN", None)
            cols = "".join(f"  {kind} {t * 1e3:9.1f} (x_dense {td / t:.2f})" for kind, t in ta.items())
            print(f"{T:6d} {skip:4.2f}  {'attention core':22s} {ideal_core:5.2f} {td * 1e3:9.1f}{cols}", flush=True)
