"""benchmarks/layout_probe.py, the GPU failure diagnosis, checked on the CPU kernels.

The probe's inputs must make every output an exact code of the operand element it came from; a
correct kernel must pass every probe; a kernel that reads the wrong elements must fail and be
described (value deltas, wrong columns). The corrupted ops below wrap the real CPU kernels with a
known layout error (negative controls for the diagnosis, not stand-ins for a kernel)."""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import skipgpt_ext
from skipgpt_ext import reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import layout_probe as lp  # noqa: E402

pytestmark = pytest.mark.skipif(not skipgpt_ext.has_kernels("cpu"), reason="native CPU kernels not built")

SMALL_GEMM = {"narrow": (64, 256, 96)}
SMALL_ATTN = {"prefill hd64": (2, 128, 128, 2, 2, 64), "decode hd128": (4, 1, 288, 2, 2, 128)}


def test_gemm_inputs_code_the_operand_indices():
    """Independent of any kernel: each probe's exact product names the index it is meant to."""
    T, N, K = 40, 300, 24
    r, n = torch.arange(T)[:, None], torch.arange(N)[None, :]
    want = {
        "W codes n": lp.code(n).expand(T, N),
        "W codes k": lp.code(r % K).expand(T, N),
        "x codes row": lp.code(r).expand(T, N),
        "x codes k": lp.code(n % K).expand(T, N),
    }
    names = []
    for name, x, w in lp.gemm_inputs(T, N, K):
        names.append(name)
        torch.testing.assert_close(x.double() @ w.double().T, want[name].double(), rtol=0, atol=0)
        assert x.to(torch.bfloat16).float().equal(x) and w.to(torch.bfloat16).float().equal(w)  # exact in bf16
    assert names == list(want)


def test_attention_inputs_pick_one_key_per_query():
    """Each query (t, h) attends to its target: key q_pos for even heads, q_pos - 1 for odd."""
    B, S, Lk, Hkv, G, hd = 2, 128, 128, 2, 2, 64
    q, k, q_pos, kv_offset, v = lp.attention_inputs(B, S, Lk, Hkv, G, hd)
    T, Hq = B * S, Hkv * G
    idx, count = torch.arange(T), torch.tensor(T)
    out = ref.sparse_query_attention(q.double(), idx, count, k.double(), v["V codes key"].double(), q_pos, None,
                                     kv_offset, S, 1.0, 0).view(T, Hq, hd)
    for h in range(Hq):
        target = (q_pos - (h % 2)).clamp(min=0)
        torch.testing.assert_close(out[:, h, :], lp.code(target)[:, None].expand(T, hd).double(), rtol=0, atol=1e-9)
    col = ref.sparse_query_attention(q.double(), idx, count, k.double(), v["V codes column"].double(), q_pos, None,
                                     kv_offset, S, 1.0, 0).view(T, Hq, hd)
    torch.testing.assert_close(col, lp.code(torch.arange(hd)).expand(T, Hq, hd).double(), rtol=0, atol=1e-9)


def test_mlp_inputs_code_the_operand_indices():
    """float64 math: silu(gate) * up, projected down, adds exactly the intended code to each row."""
    T, d = 24, 16
    i_t, n = torch.arange(T)[:, None], torch.arange(d)[None, :]
    want = {
        "gate codes n": (32 + n % 224).expand(T, d),
        "up codes n": lp.code(n).expand(T, d),
        "gate codes k": (32 + (i_t % d) % 224).expand(T, d),
        "up codes k": lp.code(i_t % d).expand(T, d),
    }
    names = []
    for name, h, norm_w, gate, up, down in lp.mlp_inputs(T, d, d):
        names.append(name)
        idx, count = torch.arange(T), torch.tensor(T)
        h64 = h.double()
        out = h64.clone()
        ref.skip_mlp_(out, idx, count, norm_w.double(), 1e-30, gate.double(), up.double(), down.double())
        torch.testing.assert_close(out - h64, want[name].double(), rtol=0, atol=1e-9)
        for t in (h, norm_w, gate, up, down):
            assert t.to(torch.bfloat16).float().equal(t)
    assert names == list(want)


def test_cpu_kernels_pass_every_probe():
    results = lp.gemm_probes("cpu") + lp.mlp_probes("cpu") + lp.attention_probes("cpu")
    assert len(results) == 2 * 4 * 3 + 4 + 4 * 3
    assert [r.name for r in results if r.wrong] == []
    assert all(r.total > 0 and r.report == "" for r in results)


def _ops_with(**overrides):
    """The op set with some ops replaced; an op replaced under its current name is replaced under
    its old name too (ops.OLD_NAMES: the probes may call either)."""
    names = [*skipgpt_ext.ops.__all__, *skipgpt_ext.ops.OLD_NAMES]
    ns = types.SimpleNamespace(**{name: getattr(skipgpt_ext.ops, name) for name in names})
    for name, fn in overrides.items():
        setattr(ns, name, fn)
        for old, new in skipgpt_ext.ops.OLD_NAMES.items():
            if new == name:
                setattr(ns, old, fn)
    return ns


def _swap_halves(t: torch.Tensor, group: int) -> torch.Tensor:
    """Swap the two halves of every `group` consecutive columns (a stride error of group/2)."""
    rows, cols = t.shape
    return t.view(rows, cols // group, 2, group // 2).flip(2).reshape(rows, cols)


def test_gemm_probe_describes_a_column_swap():
    def gather_linear_swapped(x, idx, count, weight, *rest):
        return _swap_halves(skipgpt_ext.ops.gather_linear(x, idx, count, weight, *rest), 16)

    results = lp.gemm_probes("cpu", ops=_ops_with(gather_linear=gather_linear_swapped), shapes=SMALL_GEMM)
    plain = [r for r in results if "gather_linear," in r.name or "q_proj_rope," in r.name]  # no RoPE (either name)
    by = {r.name.split(", ")[-1]: r for r in plain}
    for pattern in ("W codes n", "x codes k"):
        r = by[pattern]
        assert r.wrong == r.total  # every output column moved by 8
        assert "+8 x" in r.report and "-8 x" in r.report
        assert "columns mod 128: 0-127" in r.report
    assert by["W codes k"].wrong == 0 and by["x codes row"].wrong == 0  # blind to a column swap
    assert all(r.wrong == 0 for r in results if "linear_scatter_add_" in r.name)


def test_rope_rows_are_identity_and_rotation():
    """float64: the RoPE probe's cos/sin leave even rows as they are and rotate odd ones."""
    T, hd = 6, 8
    cos, sin = lp.rope_rows(T, hd)
    q = lp.code(torch.arange(hd)).double().expand(T, hd)
    out = q * cos.double() + ref.rotate_half(q) * sin.double()
    torch.testing.assert_close(out[0::2], q[0::2], rtol=0, atol=0)
    half = torch.cat([-q[1, hd // 2:], q[1, : hd // 2]])
    torch.testing.assert_close(out[1::2], half.expand(T // 2, hd), rtol=0, atol=0)


def test_gemm_probe_describes_rope_of_the_wrong_row():
    def gather_linear_rope_row_off(x, idx, count, weight, bias, hnw, eps, cos, sin):
        if cos is not None:  # each row takes the next token row's cos/sin
            cos, sin = cos.roll(-1, 0), sin.roll(-1, 0)
        return skipgpt_ext.ops.gather_linear(x, idx, count, weight, bias, hnw, eps, cos, sin)

    results = lp.gemm_probes("cpu", ops=_ops_with(gather_linear=gather_linear_rope_row_off), shapes=SMALL_GEMM)
    rope = [r for r in results if "+ RoPE" in r.name]
    assert len(rope) == 4 and all(r.wrong > 0 for r in rope)
    assert all("another code (wrong element read)" in r.report for r in rope)
    assert all(r.wrong == 0 for r in results if "+ RoPE" not in r.name)


def test_gemm_probe_describes_rows_not_written():
    def scatter_drops_tail(h, a, idx, count, weight, bias):
        n = int(count)
        skipgpt_ext.ops.linear_scatter_add_(h, a, idx, torch.tensor(n - n % 16), weight, bias)

    results = lp.gemm_probes("cpu", ops=_ops_with(linear_scatter_add_=scatter_drops_tail), shapes=SMALL_GEMM)
    bad = [r for r in results if r.wrong]
    assert bad and all("linear_scatter_add_" in r.name for r in bad)
    for r in bad:
        assert "0 another code" in r.report and f"{r.wrong} zero" in r.report


def test_mlp_probe_describes_up_rows_read_out_of_order():
    def mlp_up_swapped(h, idx, count, norm_weight, eps, gate_weight, up_weight, down_weight):
        n, d = up_weight.shape
        up_bad = up_weight.view(n // 16, 2, 8, d).flip(1).reshape(n, d)  # up rows read 8 apart
        skipgpt_ext.ops.skip_mlp_(h, idx, count, norm_weight, eps, gate_weight, up_bad, down_weight)

    results = {r.name.split(", ")[-1]: r for r in lp.mlp_probes("cpu", ops=_ops_with(skip_mlp_=mlp_up_swapped))}
    up_n = results["up codes n"]
    assert up_n.wrong > 0 and "+8 x" in up_n.report and "-8 x" in up_n.report
    assert "columns mod 128: 0-127" in up_n.report
    assert [results[p].wrong for p in ("gate codes n", "gate codes k", "up codes k")] == [0, 0, 0]


def test_attention_probe_describes_a_key_stride_error():
    def attention_keys_swapped(q, idx, count, k, v, *rest):
        B, H, L, D = v.shape
        v_bad = v.view(B, H, L // 16, 2, 8, D).flip(3).reshape(B, H, L, D)  # keys read 8 apart
        return skipgpt_ext.ops.sparse_query_attention(q, idx, count, k, v_bad, *rest)

    results = lp.attention_probes("cpu", ops=_ops_with(sparse_query_attention=attention_keys_swapped),
                                  cases=SMALL_ATTN)
    by = {r.name: r for r in results}
    for case in SMALL_ATTN:
        key = next(r for name, r in by.items() if name.startswith(f"attention {case}") and name.endswith("V codes key"))
        assert key.wrong == key.total
        assert re.search(r"most common got - want \(codes\): [+-]8 x\d+", key.report)  # every key read 8 off
        others = [r for name, r in by.items() if name.startswith(f"attention {case}") and not name.endswith("key")]
        assert [r.wrong for r in others] == [0, 0]  # the column and head codes do not depend on the key


def test_cli_on_cpu_exits_zero(capsys):
    assert lp.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "wrong" not in out and out.count(": ok") == 40
    assert out.count("probes exact") == 3 and "attention: 12 of 12 probes exact" in out


def test_run_variant_reports_a_failing_family_and_restores_the_env(monkeypatch, capsys):
    """gpu_check.sh's path: a family whose kernel raises (unavailable variant, CUDA fault) is
    reported and counted, the others still run, and the kernel-choosing variable is restored."""
    monkeypatch.setenv("SKIPGPT_CUDA_GEMM", "mma")
    seen = []

    def faulting():
        seen.append(os.environ["SKIPGPT_CUDA_GEMM"])
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    def fine():
        seen.append(os.environ["SKIPGPT_CUDA_GEMM"])
        return lp.gemm_probes("cpu", shapes=SMALL_GEMM)[:2]

    wrong, errors = lp.run_variant("SKIPGPT_CUDA_GEMM", "wgmma-ws", [("gemm", faulting), ("mlp", fine)])
    assert (wrong, errors) == (0, 1)
    assert seen == ["wgmma-ws", "wgmma-ws"] and os.environ["SKIPGPT_CUDA_GEMM"] == "mma"
    out = capsys.readouterr().out
    assert "gemm: error: CUDA error: an illegal memory access was encountered" in out and "more" not in out
    assert "mlp: 2 of 2 probes exact" in out


def test_cli_rejects_kernel_choices_on_cpu():
    with pytest.raises(SystemExit):
        lp.main(["--device", "cpu", "--gemm"])
