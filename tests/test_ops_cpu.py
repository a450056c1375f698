"""The native CPU kernels against their oracles: the pure-PyTorch reference run in float64
(and in the kernel's dtype), plus opcheck and argument checking. Fast: bounded hypothesis runs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skipgpt_ext
from skipgpt_ext import reference as ref

pytestmark = pytest.mark.skipif(not skipgpt_ext.has_kernels("cpu"), reason="native CPU kernels not built")
if skipgpt_ext.has_kernels("cpu"):
    from skipgpt_ext import ops

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.bfloat16]
# Tolerance of a kernel output against the float64 reference, relative to the output's scale.
REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert err <= REL_TOL[dtype] * scale, (err, scale)


def _f64(*ts):
    return [t.double() if t is not None and t.is_floating_point() else t for t in ts]


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a row-strided layout (every other column of a wider buffer)."""
    wide = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
    wide[:, ::2] = t
    out = wide[:, ::2]
    assert not out.is_contiguous()
    return out


def _rows(T: int, draw, p=None) -> tuple[torch.Tensor, torch.Tensor]:
    """An in-order compaction of a random row mask (all, none or a random subset)."""
    kind = draw(st.sampled_from(["all", "none", "some"])) if p is None else p
    if kind == "all":
        mask = torch.ones(T, dtype=torch.bool)
    elif kind == "none":
        mask = torch.zeros(T, dtype=torch.bool)
    else:
        mask = torch.rand(T) < draw(st.floats(0.1, 0.9))
    return ref.compact(mask)


# -- route_norm / compact ----------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_route_norm_matches_float64(data):
    T = data.draw(st.sampled_from([0, 1, 2, 7, 33]))
    d = data.draw(st.sampled_from([5, 12, 64, 67]))
    dtype = data.draw(st.sampled_from(DTYPES))
    thr = data.draw(st.sampled_from([-1e9, 0.0, 0.4, 1e9]))  # execute all / mixed / skip all
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    h = (torch.randn(T, d) * 3).to(dtype)
    if data.draw(st.booleans()) and T > 0:
        h = _noncontig(h)
    nw = torch.randn(d).to(dtype)
    rw, rb = torch.randn(2, d), torch.randn(2)
    valid = torch.rand(T) < 0.8 if data.draw(st.booleans()) else None
    x, ai, ac, mi, mc = ops.route_norm(h, nw, 1e-5, rw, rb, thr, valid)
    want = ref.rms_norm(h.double(), nw.double(), 1e-5)
    _close(x, want, dtype)
    margin = h.double() @ rw.double().T + rb.double()
    execute = margin > thr
    if valid is not None:
        execute &= valid.unsqueeze(1)
    clear = (margin - thr).abs() > 1e-3  # rows on the boundary may round either way
    for col, (idx, cnt) in enumerate(((ai, ac), (mi, mc))):
        got = torch.zeros(T, dtype=torch.bool)
        got[idx[: int(cnt)]] = True
        assert torch.equal(got[clear[:, col]], execute[clear[:, col], col])
        # In-order compaction of its own decisions: executing rows ascending, then the rest.
        want_idx, want_cnt = ref.compact(got)
        assert int(cnt) == int(want_cnt) and torch.equal(idx, want_idx)


def test_compact_matches_reference():
    for mask in (torch.rand(50) < 0.3, torch.ones(4, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)):
        idx, cnt = ops.compact(mask)
        want_idx, want_cnt = ref.compact(mask)
        assert torch.equal(idx, want_idx) and int(cnt) == int(want_cnt)


# -- gather_linear --------------------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_gather_linear_matches_float64(data):
    T = data.draw(st.sampled_from([0, 1, 5, 40]))
    d = data.draw(st.sampled_from([6, 16, 37]))
    hd = data.draw(st.sampled_from([2, 8, 10]))
    H = data.draw(st.integers(1, 4))
    dtype = data.draw(st.sampled_from(DTYPES))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(T, d).to(dtype)
    if data.draw(st.booleans()) and T > 0:
        x = _noncontig(x)
    w = (torch.randn(H * hd, d) / d**0.5).to(dtype)
    b = torch.randn(H * hd).to(dtype) if data.draw(st.booleans()) else None
    rd = data.draw(st.sampled_from(range(2, hd + 1, 2)))  # the rotated features: < hd is partial RoPE
    whole = data.draw(st.booleans())  # OLMo 2's norm over the whole row, or one per head
    hn = torch.randn(H * hd if whole else hd).to(dtype) if data.draw(st.booleans()) else None
    whole = whole and hn is not None
    ang = torch.rand(T, rd) * 6
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    head_dim = hd if rd < hd or data.draw(st.booleans()) else 0  # 0: cos's width
    if not data.draw(st.booleans()):  # the plain projection (the layer's V): no RoPE, no head norm
        cos = sin = hn = None
        head_dim, whole = 0, False
    idx, cnt = _rows(T, data.draw)
    got = ops.gather_linear(x, idx, cnt, w, b, hn, 1e-6, cos, sin, head_dim, whole)
    want = ref.gather_linear(*_f64(x, idx, cnt, w, b, hn), 1e-6, *_f64(cos, sin), head_dim, whole)
    n = int(cnt)
    _close(got[:n], want[:n], dtype)
    assert not got[n:].any()  # rows past count are zero


# -- sparse_query_attention -----------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_sparse_query_attention_matches_float64(data):
    B = data.draw(st.integers(1, 3))
    # 70 crosses a query block (64) and a 64-key panel; with past 80, 300 crosses the key tile (256)
    S = data.draw(st.sampled_from([1, 2, 9, 70, 300]))
    past = data.draw(st.sampled_from([0, 3, 80]))  # prefill, or chunks/decode after a cache
    Hkv = data.draw(st.integers(1, 3))
    G = data.draw(st.sampled_from([1, 2, 3]))  # GQA ratio
    hd = data.draw(st.sampled_from([4, 12, 64, 80]))  # 80: not a multiple of the 16-lane vector
    window = data.draw(st.sampled_from([0, 1, 5, 64]))
    softcap = data.draw(st.sampled_from([0.0, 0.0, 0.7]))  # Gemma 2's logit soft-cap, or none
    dtype = data.draw(st.sampled_from(DTYPES))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    Lk, T = past + S, B * S
    # A dynamic sliding cache may return only the last keys: drop a prefix sometimes.
    drop = data.draw(st.sampled_from([0, min(2, Lk - S)])) if Lk > S else 0
    k = torch.randn(B, Hkv, Lk - drop, hd).to(dtype)
    v = torch.randn(B, Hkv, Lk - drop, hd).to(dtype)
    if data.draw(st.booleans()):  # as a fresh projection gives it: [B, S, H, hd] transposed
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    q = torch.randn(T, G * Hkv * hd).to(dtype)
    q_pos = torch.arange(past, past + S).repeat(B)
    key_valid = None
    row_valid = torch.ones(B, S, dtype=torch.bool)
    if data.draw(st.booleans()):  # left padding: each sequence starts at a random offset
        key_valid = torch.ones(B, Lk - drop, dtype=torch.bool)
        for b in range(B):
            pad = int(torch.randint(0, Lk, ()))
            key_valid[b, : max(pad - drop, 0)] = False
            row_valid[b, : max(pad - past, 0)] = False
    idx, cnt = ref.compact(row_valid.reshape(-1) & (torch.rand(T) < data.draw(st.sampled_from([0.0, 0.5, 1.0]))))
    scale = hd**-0.5
    got = ops.sparse_query_attention(q, idx, cnt, k, v, q_pos, key_valid, drop, S, scale, window, softcap)
    want = ref.sparse_query_attention(*_f64(q, idx, cnt, k, v, q_pos, key_valid), drop, S, scale, window, softcap)
    n = int(cnt)
    assert got.shape == q.shape
    _close(got[:n], want[:n], dtype)


_ISA_CHECK = """
import torch
import skipgpt_ext
from skipgpt_ext import ops, reference as ref
print(skipgpt_ext.cpu_isa())
torch.manual_seed(0)
worst = []
for dtype, hd, G, window, cap in [(torch.float32, 64, 3, 0, 0.0), (torch.float32, 80, 2, 100, 0.0), (torch.float32, 64, 2, 0, 0.7), (torch.bfloat16, 128, 4, 0, 0.0)]:
    B, S, past, Hkv = 2, 300, 40, 2
    Lk, T = past + S, B * S
    k, v = torch.randn(B, Hkv, Lk, hd).to(dtype), torch.randn(B, Hkv, Lk, hd).to(dtype)
    q = torch.randn(T, G * Hkv * hd).to(dtype)
    key_valid = torch.ones(B, Lk, dtype=torch.bool)
    key_valid[1, :57] = False
    idx, cnt = ref.compact(torch.rand(T) < 0.6)
    q_pos = torch.arange(past, past + S).repeat(B)
    got = ops.sparse_query_attention(q, idx, cnt, k, v, q_pos, key_valid, 0, S, hd**-0.5, window, cap)
    f64 = [t.double() if t.is_floating_point() else t for t in (q, k, v)]
    want = ref.sparse_query_attention(f64[0], idx, cnt, f64[1], f64[2], q_pos, key_valid, 0, S, hd**-0.5, window, cap)
    n = int(cnt)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    worst.append((got[:n].double() - want[:n]).abs().max().item() / tol)
def rel(got, want, tol):
    if want.numel() == 0:
        return 0.0
    return (got.double() - want).abs().max().item() / (tol * max(want.abs().max().item(), 1.0))


# The compacted linear ops at decode-sized row counts (the skinny kernel: 1-16 rows, K with a
# vector tail) and above them (ATen's GEMM), in every dtype.
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for T, d, inter in [(1, 37, 50), (6, 64, 70), (17, 40, 33), (20, 24, 16)]:
        h = torch.randn(T, d).to(dtype)
        idx, cnt = ref.compact(torch.rand(T) < 0.8)
        idx, cnt = (idx, cnt) if int(cnt) else ref.compact(torch.ones(T, dtype=torch.bool))
        nw, gw, uw = torch.rand(d).to(dtype) + 0.5, torch.randn(inter, d).to(dtype) / 4, torch.randn(inter, d).to(dtype) / 4
        dw = torch.randn(d, inter).to(dtype) / 4
        got = h.clone()
        ops.skip_mlp_(got, idx, cnt, nw, 1e-6, gw, uw, dw)
        want = h.double()
        ref.skip_mlp_(want, idx, cnt, nw.double(), 1e-6, gw.double(), uw.double(), dw.double())
        worst.append(rel(got, want, tol))
        a, w, bias = torch.randn(T, inter).to(dtype), torch.randn(d, inter).to(dtype) / 4, torch.randn(d).to(dtype)
        got = h.clone()
        ops.linear_scatter_add_(got, a, idx, cnt, w, bias)
        want = h.double()
        ref.linear_scatter_add_(want, a.double(), idx, cnt, w.double(), bias.double())
        worst.append(rel(got, want, tol))
        hd = 8
        qw, qb = torch.randn(2 * hd, d).to(dtype) / 4, torch.randn(2 * hd).to(dtype)
        ang = torch.arange(T)[:, None] * torch.rand(hd // 2)
        cos, sin = torch.cat([ang.cos()] * 2, 1).to(dtype), torch.cat([ang.sin()] * 2, 1).to(dtype)
        got = ops.gather_linear(h, idx, cnt, qw, qb, None, 0.0, cos, sin)
        want = ref.gather_linear(h.double(), idx, cnt, qw.double(), qb.double(), None, 0.0, cos.double(), sin.double())
        n = int(cnt)
        worst.append(rel(got[:n], want[:n], tol))
# route_norm: the normalised rows, and the decisions of rows clear of the threshold.
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for d in (67, 576):
        h, nw = (torch.randn(33, d) * 3).to(dtype), torch.randn(d).to(dtype)
        rw, rb = torch.randn(2, d), torch.randn(2)
        x, ai, ac, mi, mc = ops.route_norm(h, nw, 1e-5, rw, rb, 0.5, None)
        err = rel(x, ref.rms_norm(h.double(), nw.double(), 1e-5), tol)
        margin = h.double() @ rw.double().T + rb.double()
        clear = (margin - 0.5).abs() > 1e-3
        for col, (idx, cnt) in enumerate(((ai, ac), (mi, mc))):
            got = torch.zeros(33, dtype=torch.bool)
            got[idx[: int(cnt)]] = True
            if not torch.equal(got[clear[:, col]], (margin > 0.5)[clear[:, col], col]):
                err = float("inf")
        worst.append(err)
print(*worst)
"""


def _cpu_flags() -> set[str]:
    import platform

    if platform.machine() != "x86_64":
        return set()
    with open("/proc/cpuinfo") as f:
        return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}


@pytest.mark.parametrize("isa", ["generic", "avx2", "native"])
def test_each_vector_isa_matches_float64(isa):
    """The attention tile kernels, the skinny (few-row) linear kernel and route_norm's row passes
    are chosen once per process by CPU feature (AVX-512, AVX2, or ATen's GEMM); SKIPGPT_CPU_ISA caps the choice, so
    each path runs in its own process, which must report the path it was asked for."""
    import os
    import subprocess
    import sys

    flags = _cpu_flags()
    has_avx2 = {"avx2", "fma", "f16c"} <= flags
    has_avx512 = has_avx2 and {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
    best = "avx512" if has_avx512 else "avx2" if has_avx2 else "generic"
    want = {"generic": "generic", "avx2": "avx2", "native": best}[isa]
    if isa == "avx2" and not has_avx2:
        pytest.skip("this CPU has no AVX2 + FMA + F16C")
    env = dict(os.environ, SKIPGPT_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    chosen, *fields = res.stdout.split()
    assert chosen == want
    worst = [float(x) for x in fields]  # per case, in units of the dtype's tolerance
    assert len(worst) == 4 + 3 * 4 * 3 + 3 * 2 and max(worst) <= 1.0, worst


@pytest.mark.parametrize("T", [1, 4, 300])  # the skinny kernel and the ATen GEMM path
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_count_leaves_h_bit_exact(T, dtype):
    """count == 0 with NaN weights: h stays bit-exact (a row computed from them and added would
    show NaN). Whether an unused weight is read is not visible here; by design it is not."""
    d, inter = 16, 24
    h = torch.randn(T, d).to(dtype)
    nan = torch.full((inter, d), float("nan"), dtype=dtype)
    idx, cnt = ref.compact(torch.zeros(T, dtype=torch.bool))
    got = h.clone()
    ops.skip_mlp_(got, idx, cnt, torch.ones(d, dtype=dtype), 1e-6, nan, nan, nan.t().contiguous())
    ops.linear_scatter_add_(got, torch.randn(T, inter).to(dtype), idx, cnt, nan.t().contiguous(), None)
    assert torch.equal(got, h)
    # Control: one executing row does pick up the NaN.
    idx1, cnt1 = ref.compact(torch.arange(T) == 0)
    ops.linear_scatter_add_(got, torch.randn(T, inter).to(dtype), idx1, cnt1, nan.t().contiguous(), None)
    assert got[0].isnan().all() and torch.equal(got[1:], h[1:])


def test_attention_query_without_visible_key_gives_zero():
    q = torch.randn(2, 8)
    k = v = torch.randn(1, 1, 2, 8)
    key_valid = torch.tensor([[False, True]])  # the first query sees only a padding key
    got = ops.sparse_query_attention(q, torch.arange(2), torch.tensor(2), k, v, torch.arange(2), key_valid, 0, 2, 1.0, 0)
    assert torch.equal(got[0], torch.zeros(8))
    assert torch.allclose(got[1], v[0, 0, 1], atol=1e-6)


# -- linear_scatter_add_ / skip_mlp_ ----------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_linear_scatter_add_matches_float64(data):
    T = data.draw(st.sampled_from([0, 1, 6, 50]))
    d = data.draw(st.sampled_from([3, 16, 45]))
    k_in = data.draw(st.sampled_from([4, 24, 33]))
    dtype = data.draw(st.sampled_from(DTYPES))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    h = torch.randn(T, d).to(dtype)
    a = torch.randn(T, k_in).to(dtype)
    w = (torch.randn(d, k_in) / k_in**0.5).to(dtype)
    b = torch.randn(d).to(dtype) if data.draw(st.booleans()) else None
    if data.draw(st.booleans()):
        w = w.t().contiguous().t()  # a transposed (column-major) weight
    idx, cnt = _rows(T, data.draw)
    # The epilogue: a post-norm (Gemma 2/3, OLMo 2) and/or an output multiplier (Granite).
    pw = (torch.rand(d) + 0.5).to(dtype) if data.draw(st.booleans()) else None
    scale = data.draw(st.sampled_from([1.0, 1.0, 0.3]))
    got = h.clone()
    ops.linear_scatter_add_(got, a, idx, cnt, w, b, pw, 1e-6, scale)
    want = h.double()
    ref.linear_scatter_add_(want, *_f64(a, idx, cnt, w, b, pw), 1e-6, scale)
    _close(got, want, dtype)
    skipped = torch.ones(T, dtype=torch.bool)
    skipped[idx[: int(cnt)]] = False
    assert torch.equal(got[skipped], h[skipped])  # skipped rows are untouched, bit for bit


@SETTINGS
@given(data=st.data())
def test_skip_mlp_matches_float64(data):
    T = data.draw(st.sampled_from([0, 1, 7, 64]))
    d = data.draw(st.sampled_from([4, 20, 35]))
    inter = data.draw(st.sampled_from([8, 30]))
    dtype = data.draw(st.sampled_from(DTYPES))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    h = torch.randn(T, d).to(dtype)
    nw = torch.randn(d).to(dtype)
    wg = (torch.randn(inter, d) / d**0.5).to(dtype)
    wu = (torch.randn(inter, d) / d**0.5).to(dtype)
    wd = (torch.randn(d, inter) / inter**0.5).to(dtype)
    idx, cnt = _rows(T, data.draw)
    # The family features: no input norm (OLMo 2), GeLU-tanh (Gemma), the epilogue.
    if data.draw(st.booleans()):
        nw = None
    act = data.draw(st.sampled_from(["silu", "gelu_tanh"]))
    pw = (torch.rand(d) + 0.5).to(dtype) if data.draw(st.booleans()) else None
    scale = data.draw(st.sampled_from([1.0, 1.0, 0.3]))
    got = h.clone()
    ops.skip_mlp_(got, idx, cnt, nw, 1e-6, wg, wu, wd, act, pw, 1e-5, scale)
    want = h.double()
    ref.skip_mlp_(want, *_f64(idx, cnt, nw), 1e-6, *_f64(wg, wu, wd), act, *_f64(pw), 1e-5, scale)
    _close(got, want, dtype)
    skipped = torch.ones(T, dtype=torch.bool)
    skipped[idx[: int(cnt)]] = False
    assert torch.equal(got[skipped], h[skipped])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["all", "some"])
def test_linear_ops_with_output_features_split_over_threads(dtype, kind):
    """Compacted GEMMs with more rows than the skinny kernel takes run as one ATen call per
    thread on a column block of the output (N >= 128 splits in two or more): every block, the
    in-place accumulation into h (all rows execute) and the bias must land where they belong."""
    torch.manual_seed(3)
    T, d, inter, hd = 40, 320, 384, 64
    tol = REL_TOL[dtype]
    h = torch.randn(T, d).to(dtype)
    idx, cnt = ref.compact(torch.ones(T, dtype=torch.bool) if kind == "all" else torch.rand(T) < 0.7)
    assert int(cnt) > 16  # past the skinny kernel
    nw, gw, uw = torch.rand(d).to(dtype) + 0.5, (torch.randn(inter, d) / 8).to(dtype), (torch.randn(inter, d) / 8).to(dtype)
    dw = (torch.randn(d, inter) / 8).to(dtype)
    for w in (nw, gw, uw, dw):
        w.requires_grad_()  # as model parameters: the per-thread calls must stay below autograd
    got = h.clone()
    with torch.no_grad():
        ops.skip_mlp_(got, idx, cnt, nw, 1e-6, gw, uw, dw)
    want = h.double()
    ref.skip_mlp_(want, idx, cnt, *_f64(nw.detach()), 1e-6, *_f64(gw.detach(), uw.detach(), dw.detach()))
    _close(got, want, dtype)
    a, w, bias = torch.randn(T, inter).to(dtype), (torch.randn(d, inter) / 8).to(dtype), torch.randn(d).to(dtype)
    got = h.clone()
    ops.linear_scatter_add_(got, a, idx, cnt, w, bias)
    want = h.double()
    ref.linear_scatter_add_(want, *_f64(a), idx, cnt, *_f64(w, bias))
    _close(got, want, dtype)
    qw, qb = (torch.randn(5 * hd, d) / 8).to(dtype), torch.randn(5 * hd).to(dtype)
    ang = torch.arange(T)[:, None] * torch.rand(hd // 2)
    cos, sin = torch.cat([ang.cos()] * 2, 1).to(dtype), torch.cat([ang.sin()] * 2, 1).to(dtype)
    got = ops.gather_linear(h, idx, cnt, qw, qb, None, 0.0, cos, sin)
    want = ref.gather_linear(*_f64(h), idx, cnt, *_f64(qw, qb), None, 0.0, *_f64(cos, sin))
    n = int(cnt)
    _close(got[:n], want[:n], dtype)


def test_float16_ops_match_float64():
    torch.manual_seed(0)
    T, d, inter = 9, 16, 24
    h = torch.randn(T, d).half()
    idx, cnt = ref.compact(torch.rand(T) < 0.5)
    nw, wg, wu, wd = torch.randn(d).half(), torch.randn(inter, d).half() / 4, torch.randn(inter, d).half() / 4, torch.randn(d, inter).half() / 5
    got = h.clone()
    ops.skip_mlp_(got, idx, cnt, nw, 1e-6, wg, wu, wd)
    want = h.double()
    ref.skip_mlp_(want, *_f64(idx, cnt, nw), 1e-6, *_f64(wg, wu, wd))
    _close(got, want, torch.float16)
    q, k, v = torch.randn(T, 8).half(), torch.randn(1, 1, T, 8).half(), torch.randn(1, 1, T, 8).half()
    got = ops.sparse_query_attention(q, idx, cnt, k, v, torch.arange(T), None, 0, T, 0.3, 0)
    want = ref.sparse_query_attention(*_f64(q, idx, cnt, k, v), torch.arange(T), None, 0, T, 0.3, 0)
    _close(got[: int(cnt)], want[: int(cnt)], torch.float16)


# -- opcheck --------------------------------------------------------------------------------------
def _samples(dtype):
    torch.manual_seed(0)
    B, S, d, hd, Hkv, G, inter = 2, 5, 16, 4, 2, 2, 24
    T = B * S
    h = torch.randn(T, d, dtype=dtype)
    nw = torch.randn(d, dtype=dtype)
    idx, cnt = ref.compact(torch.rand(T) < 0.6)
    valid = torch.rand(T) < 0.9
    cos, sin = torch.randn(T, hd, dtype=dtype), torch.randn(T, hd, dtype=dtype)
    q = torch.randn(T, Hkv * G * hd, dtype=dtype)
    k, v = torch.randn(B, Hkv, S + 2, hd, dtype=dtype), torch.randn(B, Hkv, S + 2, hd, dtype=dtype)
    key_valid = torch.rand(B, S + 2) < 0.8
    return {
        "route_norm": (h, nw, 1e-6, torch.randn(2, d), torch.randn(2), 0.1, valid),
        "compact": (torch.rand(T) < 0.5,),
        "gather_linear": (h, idx, cnt, torch.randn(Hkv * G * hd, d, dtype=dtype), torch.randn(Hkv * G * hd, dtype=dtype),
                        torch.randn(hd, dtype=dtype), 1e-6, cos, sin),
        "sparse_query_attention": (q, idx, cnt, k, v, torch.arange(2, S + 2).repeat(B), key_valid, 0, S, 0.5, 3),
        "linear_scatter_add_": (h.clone(), q, idx, cnt, torch.randn(d, Hkv * G * hd, dtype=dtype), None),
        "skip_mlp_": (h.clone(), idx, cnt, nw, 1e-6, torch.randn(inter, d, dtype=dtype),
                      torch.randn(inter, d, dtype=dtype), torch.randn(d, inter, dtype=dtype)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", skipgpt_ext.OP_NAMES)
def test_opcheck(name, dtype):
    torch.library.opcheck(getattr(torch.ops.skipgpt, name).default, _samples(dtype)[name])


def test_python_wrappers_follow_the_schemas():
    """The op set is declared once, in C++: the namespace holds exactly OP_NAMES, and ops.py and
    reference.py take each op's arguments under the schema's names, in its order."""
    import inspect

    declared = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("skipgpt::")}
    assert declared == set(skipgpt_ext.OP_NAMES) | set(ops.OLD_NAMES)
    for name in [*skipgpt_ext.OP_NAMES, *ops.OLD_NAMES]:
        schema = [a.name for a in getattr(torch.ops.skipgpt, name).default._schema.arguments]
        for module in (ops, ref):
            assert list(inspect.signature(getattr(module, name)).parameters) == schema, (module.__name__, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("old", sorted(skipgpt_ext.ops.OLD_NAMES))
def test_old_op_names_still_load_and_compute_the_same(old, dtype):
    """An op renamed for what it computes keeps its old schema, with the same kernel behind it."""
    new = ops.OLD_NAMES[old]
    args = _samples(dtype)[new]
    torch.library.opcheck(getattr(torch.ops.skipgpt, old).default, args)
    got = getattr(torch.ops.skipgpt, old).default(*args)
    want = getattr(torch.ops.skipgpt, new).default(*args)
    assert torch.equal(got, want) and int(args[2]) > 0 and got[: int(args[2])].abs().sum() > 0


def test_cuda_gemv_rows_come_from_the_extension():
    """CUDA_GEMV_MAX_ROWS is the extension's kGemvMaxRows (exported in CPU-only builds too), not a copy."""
    import re
    from pathlib import Path

    header = (Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "gemv_rows.h").read_text()
    want = int(re.search(r"kGemvMaxRows = (\d+);", header).group(1))
    assert skipgpt_ext._C.CUDA_GEMV_MAX_ROWS == want and skipgpt_ext.CUDA_GEMV_MAX_ROWS == want


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_plain_projection(dtype):
    """gather_linear without cos/sin (the layer's V) is a schema case of its own."""
    x, idx, cnt, w, b, _, heps, _, _ = _samples(dtype)["gather_linear"]
    torch.library.opcheck(torch.ops.skipgpt.gather_linear.default, (x, idx, cnt, w, b, None, heps, None, None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_whole_row_norm_and_partial_rope(dtype):
    """gather_linear with OLMo 2's whole-row q/k norm, and with partial RoPE."""
    x, idx, cnt, w, b, hn, heps, cos, sin = _samples(dtype)["gather_linear"]
    hd = cos.shape[1]
    whole = torch.randn(w.shape[0], dtype=dtype)
    torch.library.opcheck(torch.ops.skipgpt.gather_linear.default, (x, idx, cnt, w, b, whole, heps, cos, sin, 0, True))
    half = (cos[:, : hd // 2].contiguous(), sin[:, : hd // 2].contiguous())
    torch.library.opcheck(torch.ops.skipgpt.gather_linear.default, (x, idx, cnt, w, b, hn, heps, *half, hd, False))


# -- bad inputs name the argument ---------------------------------------------------------------------
def _raises(fn, *args, match):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_bad_inputs_name_the_argument():
    s = _samples(torch.float32)
    h, nw, eps, rw, rb, thr, valid = s["route_norm"]
    _raises(ops.route_norm, h.double(), nw, eps, rw, rb, thr, valid, match="h must be float32")
    # As on CUDA: the norm weight has h's dtype (a float32 one with a bfloat16 h is refused).
    _raises(ops.route_norm, h.bfloat16(), nw, eps, rw, rb, thr, valid, match=r"norm_weight must have the dtype of h \(bfloat16\)")
    _raises(ops.route_norm, h, nw.bfloat16(), eps, rw, rb, thr, valid, match=r"norm_weight must have the dtype of h \(float32\)")
    _raises(ops.route_norm, h, nw[:-1], eps, rw, rb, thr, valid, match=r"norm_weight must be \[16\] \(h's width\)")
    _raises(ops.route_norm, h, nw, eps, rw.double(), rb, thr, valid, match="router_weight must be float32")
    _raises(ops.route_norm, h, nw, eps, rw[:1], rb, thr, valid, match=r"router_weight must be \[2, 16\]")
    _raises(ops.route_norm, h, nw, eps, rw, rb, thr, valid[:-1], match="row_valid must have 10")
    _raises(ops.route_norm, h, nw, eps, rw, rb, thr, valid.float(), match="row_valid must be bool")

    x, idx, cnt, w, b, hn, heps, cos, sin = s["gather_linear"]
    _raises(ops.gather_linear, x, idx, cnt, w.bfloat16(), b, hn, heps, cos, sin, match="weight must have the dtype of x")
    _raises(ops.gather_linear, x, idx, cnt, w, b[:-1], hn, heps, cos, sin, match=r"bias must be \[16\]")
    _raises(ops.gather_linear, x, idx, cnt, w, b, hn, heps, cos[:-1], sin, match="cos must be")
    _raises(ops.gather_linear, x, idx, cnt, w, b, None, heps, cos, None, match="cos and sin must be given together")
    _raises(ops.gather_linear, x, idx, cnt, w, b, hn, heps, None, None, match="head_norm_weight needs cos and sin")
    hd = cos.shape[1]
    _raises(ops.gather_linear, x, idx, cnt, w, b, hn, heps, cos, sin, hd // 2, False, match=r"must be even, > 0 and <= head_dim")
    _raises(ops.gather_linear, x, idx, cnt, w, b, None, heps, cos, sin, hd + 2, False, match="multiple of head_dim")
    _raises(ops.gather_linear, x, idx, cnt, w, b, hn, heps, cos, sin, -1, False, match="head_dim must be >= 0")
    _raises(ops.gather_linear, x, idx, cnt, w, b, None, heps, None, None, hd, False, match="head_dim and whole_norm need cos")
    _raises(ops.gather_linear, x, idx, cnt, w, b, None, heps, cos, sin, 0, True, match="whole_norm needs head_norm_weight")
    _raises(ops.gather_linear, x, idx, cnt, w, b, hn, heps, cos, sin, 0, True, match=r"head_norm_weight must be \[16\] \(N")
    _raises(ops.gather_linear, x, idx.int(), cnt, w, b, hn, heps, cos, sin, match="idx must be int64")
    _raises(ops.gather_linear, x, idx, torch.tensor(11), w, b, hn, heps, cos, sin, match=r"count must be in \[0, 10\]")
    bad_idx = idx.clone()
    bad_idx[0] = 10
    _raises(ops.gather_linear, x, bad_idx, cnt, w, b, hn, heps, cos, sin, match="idx.*out of range")
    dup = idx.clone()
    dup[1] = dup[0]
    _raises(ops.gather_linear, x, dup, cnt, w, b, hn, heps, cos, sin, match="not ascending")

    q, idx, cnt, k, v, pos, kv, off, S, scale, win = s["sparse_query_attention"]
    _raises(ops.sparse_query_attention, q, idx, cnt, k.bfloat16(), v, pos, kv, off, S, scale, win, match="k must have the dtype of q")
    _raises(ops.sparse_query_attention, q, idx, cnt, k, v[:, :, 1:], pos, kv, off, S, scale, win, match="v must have k's shape")
    _raises(ops.sparse_query_attention, q, idx, cnt, k, v, pos, kv, off, 4, scale, win, match="seq_len")
    _raises(ops.sparse_query_attention, q, idx, cnt, k, v, pos.int(), kv, off, S, scale, win, match="q_pos must be int64")
    _raises(ops.sparse_query_attention, q, idx, cnt, k, v, pos, kv[:, 1:], off, S, scale, win, match=r"key_valid must be \[2, 7\]")
    _raises(ops.sparse_query_attention, q[:, :-1], idx, cnt, k, v, pos, kv, off, S, scale, win, match="q's width")

    h, a, idx, cnt, w, b = s["linear_scatter_add_"]
    _raises(ops.linear_scatter_add_, h, a, idx, cnt, w[:, :-1], b, match=r"weight must be \[16, 16\]")
    _raises(ops.linear_scatter_add_, h.t(), a, idx, cnt, w, b, match="h is updated in place")
    _raises(ops.linear_scatter_add_, h, a.bfloat16(), idx, cnt, w, b, match="a must have the dtype of h")
    # The kernels add rows into h without atomics: h must not alias itself, nor a alias h.
    h_before = h.clone()
    _raises(ops.linear_scatter_add_, h[:1].expand_as(h), a, idx, cnt, w, b, match="h .*must not have elements that share memory")
    _raises(ops.linear_scatter_add_, h, h, idx, cnt, w, b, match="a must not share memory with h")
    buf = torch.cat([h, a], 1)  # h and a as column blocks of one buffer: interleaved rows
    _raises(ops.linear_scatter_add_, buf[:, :16], buf[:, :16], idx, cnt, w, b, match="a must not share memory")
    _raises(ops.linear_scatter_add_, buf[:, :16], buf[:, 16:], idx, cnt, w, b, match="a must not share memory")
    _raises(ops.linear_scatter_add_, buf[:, 8:24], buf[:, :16], idx, cnt, w, b, match="a must not share memory")
    _raises(ops.linear_scatter_add_, h.as_strided(h.shape, (1, 1)), a, idx, cnt, w, b, match="must not have elements that share")
    assert torch.equal(h, h_before)
    # Rows apart in one buffer (h the top half, a the bottom half) do not overlap: accepted.
    tall = torch.cat([h, a])
    want = h.clone()
    ops.linear_scatter_add_(want, a, idx, cnt, w, b)
    ops.linear_scatter_add_(tall[:10], tall[10:], idx, cnt, w, b)
    assert torch.equal(tall[:10], want)

    h, idx, cnt, nw, eps, wg, wu, wd = s["skip_mlp_"]
    _raises(ops.skip_mlp_, h, idx, cnt, nw, eps, wg, wu[:-1], wd, match=r"up_weight must be \[24, 16\]")
    _raises(ops.skip_mlp_, h, idx, cnt, nw, eps, wg, wu, wd.t(), match=r"down_weight must be \[16, 24\]")
    _raises(ops.skip_mlp_, h, idx, cnt, nw.bfloat16(), eps, wg, wu, wd, match="norm_weight must have the dtype of h")
    _raises(ops.skip_mlp_, h.bfloat16(), idx, cnt, nw, eps, wg, wu, wd, match="norm_weight must have the dtype of h")
    _raises(ops.skip_mlp_, h[:1].expand_as(h), idx, cnt, nw, eps, wg, wu, wd, match="h .*must not have elements that share memory")
