"""Hostile inputs at the op level (issue 14, points 7-9), for the native CPU kernels and the
pure-PyTorch reference alike: every read-only input of an in-place op is checked against the
written tensor, NaN propagates through attention as in dense attention, and positions that
would overflow int64 are refused. Oracles: float64 math written out here, and h's bytes before
a refused call."""

from __future__ import annotations

import math

import pytest
import torch

import skipgpt_ext
from skipgpt_ext import reference as ref

IMPLS = [pytest.param(ref, id="reference")]
if skipgpt_ext.has_kernels("cpu"):
    from skipgpt_ext import ops

    IMPLS.append(pytest.param(ops, id="native"))


def _rows(T: int, every: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(T, dtype=torch.bool)
    mask[::every] = True
    return ref.compact(mask)


def _refused(fn, *args, name: str) -> None:
    h = args[0]
    before = h.clone()
    with pytest.raises(RuntimeError, match=f"{name} must not share memory with h"):
        fn(*args)
    assert torch.equal(h, before)  # nothing written


# -- 7. every read-only input of an in-place op is checked against h -----------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_scatter_add_refuses_any_input_inside_h(impl):
    torch.manual_seed(0)
    T = d = 16  # square, so a weight (or a of the right shape) can be h itself
    h, a, w, b = torch.randn(T, d), torch.randn(T, d), torch.randn(d, d) / 4, torch.randn(d)
    idx, cnt = _rows(T)
    _refused(impl.linear_scatter_add_, h, a, idx, cnt, w, h[0], name="bias")  # the issue: off by 5.6
    _refused(impl.linear_scatter_add_, h, a, idx, cnt, h, b, name="weight")  # the issue: off by 637
    _refused(impl.linear_scatter_add_, h, a, idx, cnt, h.t(), b, name="weight")
    _refused(impl.linear_scatter_add_, h, h, idx, cnt, w, b, name="a")
    buf = torch.randn(2 * T, d)
    _refused(impl.linear_scatter_add_, buf[:T], a, idx, cnt, buf[8 : 8 + d], b, name="weight")  # rows overlap
    # idx and count in h's memory (int64 views of the same storage).
    store = torch.zeros(T * d + 2 * T + 2)
    hh = store[: T * d].view(T, d)
    hh.copy_(h)
    ints = store.view(torch.int64)  # [T * d / 2 + T + 1]
    ints[T * d // 2 : T * d // 2 + T] = idx
    ints[-1] = cnt
    _refused(impl.linear_scatter_add_, hh, a, ints[4 : 4 + T], cnt, w, b, name="idx")
    _refused(impl.linear_scatter_add_, hh, a, idx, ints[3], w, b, name="count")

    # Inputs that only share h's storage, apart from h's bytes, are accepted and exact.
    want = h.double().clone()
    n = int(cnt)
    want.index_add_(0, idx[:n], a[:n].double() @ w.double().t() + b.double())
    out = torch.cat([h, w, a, b[None]])  # h, then the weight, a and the bias, in one buffer
    impl.linear_scatter_add_(out[:T], out[2 * T :3 * T], idx, cnt, out[T : 2 * T], out[3 * T])
    assert (out[:T].double() - want).abs().max() < 1e-4
    assert torch.equal(out[T:], torch.cat([w, a, b[None]]))  # the inputs were not written


@pytest.mark.parametrize("impl", IMPLS)
def test_skip_mlp_refuses_any_input_inside_h(impl):
    torch.manual_seed(1)
    T, d, inter = 16, 16, 24
    h = torch.randn(T, d)
    nw = torch.randn(d)
    wg, wu, wd = torch.randn(inter, d) / 4, torch.randn(inter, d) / 4, torch.randn(d, inter) / 4
    idx, cnt = _rows(T)
    eps = 1e-6
    _refused(impl.skip_mlp_, h, idx, cnt, h[3], eps, wg, wu, wd, name="norm_weight")
    big = torch.randn(T + inter, d)  # h's rows, then gate_weight's rows starting inside h
    _refused(impl.skip_mlp_, big[:T], idx, cnt, nw, eps, big[T - 4 : T - 4 + inter], wu, wd, name="gate_weight")
    _refused(impl.skip_mlp_, big[:T], idx, cnt, nw, eps, wg, big[2 : 2 + inter], wd, name="up_weight")
    wide = torch.randn(T, inter + d)  # h as the last d columns of down_weight's rows
    _refused(impl.skip_mlp_, wide[:, inter:], idx, cnt, nw, eps, wg, wu, wide[:, :inter], name="down_weight")

    # The float64 oracle, and an accepted call with every weight beside h in one buffer.
    hd = h.double()
    n = int(cnt)
    x = hd[idx[:n]]
    x = nw.double() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    act = torch.nn.functional.silu(x @ wg.double().t()) * (x @ wu.double().t())
    want = hd.clone().index_add_(0, idx[:n], act @ wd.double().t())
    buf = torch.cat([h, wg, wu, nw[None]])
    impl.skip_mlp_(buf[:T], idx, cnt, buf[-1], eps, buf[T : T + inter], buf[T + inter : T + 2 * inter], wd)
    assert (buf[:T].double() - want).abs().max() < 1e-4
    assert torch.equal(buf[T:], torch.cat([wg, wu, nw[None]]))


# -- 8. NaN propagates through attention in the reference as in the kernels ----------------------
def _attention_f64(q, k, v, q_pos, key_valid, kv_offset, seq_len, scale, window):
    """Every row, one query at a time, in float64: softmax over the keys the query may see.
    Keys it may not see are never touched (a NaN there cannot reach it); no key gives 0."""
    T = q.shape[0]
    B, Hkv, Lk, hd = k.shape
    G = q.shape[1] // hd // Hkv
    out = torch.zeros(T, q.shape[1], dtype=torch.float64)
    for r in range(T):
        b, p = r // seq_len, int(q_pos[r])
        keys = [j for j in range(Lk) if kv_offset + j <= p and (window == 0 or kv_offset + j > p - window)
                and (key_valid is None or bool(key_valid[b, j]))]
        if not keys:
            continue
        for hq in range(Hkv * G):
            qv = q[r, hq * hd : (hq + 1) * hd].double()
            kk, vv = k[b, hq // G, keys].double(), v[b, hq // G, keys].double()
            out[r, hq * hd : (hq + 1) * hd] = torch.softmax(kk @ qv * scale, 0) @ vv
    return out


def _same_with_nan(got: torch.Tensor, want: torch.Tensor, unspecified: torch.Tensor | None = None) -> None:
    """NaN exactly where the oracle has NaN, equal elsewhere (``unspecified`` elements skipped)."""
    check = torch.ones_like(want, dtype=torch.bool) if unspecified is None else ~unspecified
    assert torch.equal(torch.isnan(got)[check], torch.isnan(want)[check])
    ok = check & ~torch.isnan(want)
    assert (got.double()[ok] - want[ok]).abs().max() < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", ["k", "v", "q"])
def test_attention_propagates_nan_from_visible_inputs(impl, where):
    torch.manual_seed(2)
    B, S, Hkv, G, hd = 2, 6, 2, 2, 8
    T = B * S
    q = torch.randn(T, Hkv * G * hd)
    k, v = torch.randn(B, Hkv, S, hd), torch.randn(B, Hkv, S, hd)
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[1, :2] = False  # sequence 1 is left-padded by two keys
    unspecified = None
    if where == "k":
        k[0, 1, 3, 5] = math.nan  # seen by sequence 0's queries at positions >= 3 (KV head 1)
        k[1, 0, 1, 2] = math.nan  # a padding key: seen by nobody, reaches nobody
    elif where == "v":
        v[0, 0, 2, 1] = math.nan  # seen by sequence 0's queries at positions >= 2 (KV head 0)
        # A value a query cannot see may reach it through 0 * NaN (as in dense attention): the
        # contract leaves those outputs unspecified (sequence 0, KV head 0's query heads, dim 1).
        unspecified = torch.zeros(T, Hkv * G * hd, dtype=torch.bool)
        for hq in range(G):
            unspecified[:2, hq * hd + 1] = True
    else:
        q[S + 4, 3] = math.nan  # one query row (and head)
    q_pos = torch.arange(S).repeat(B)
    idx, cnt = ref.compact(torch.ones(T, dtype=torch.bool))
    want = _attention_f64(q, k, v, q_pos, key_valid, 0, S, 0.35, 0)
    assert torch.isnan(want).any() and not torch.isnan(want).all()  # the oracle has both kinds
    got = impl.sparse_query_attention(q, idx, cnt, k, v, q_pos, key_valid, 0, S, 0.35, 0)
    _same_with_nan(got, want, unspecified)
    # A query that sees no key at all gives 0 (not NaN), whatever the keys hold.
    key_valid[0, :] = False
    got = impl.sparse_query_attention(q, idx, cnt, k, v, q_pos, key_valid, 0, S, 0.35, 0)
    assert torch.equal(got[:S], torch.zeros_like(got[:S]))


@pytest.mark.skipif(not skipgpt_ext.has_kernels("cpu"), reason="native CPU kernels not built")
def test_reference_and_native_agree_on_nan_with_a_window_and_compaction():
    torch.manual_seed(3)
    B, S, Hkv, G, hd, window, off = 1, 9, 1, 2, 8, 3, 4
    T, Lk = B * S, S + off
    q = torch.randn(T, Hkv * G * hd)
    k, v = torch.randn(B, Hkv, Lk, hd), torch.randn(B, Hkv, Lk, hd)
    k[0, 0, 6, 0] = math.nan  # cache position 10: inside the window of positions 10-12 only
    q_pos = torch.arange(off, off + S)
    idx, cnt = _rows(T, every=1)
    mask = torch.rand(T) < 0.7
    idx, cnt = ref.compact(mask)
    a = ref.sparse_query_attention(q, idx, cnt, k, v, q_pos, None, 0, S, 0.5, window)
    b = ops.sparse_query_attention(q, idx, cnt, k, v, q_pos, None, 0, S, 0.5, window)
    n = int(cnt)
    _same_with_nan(a[:n], b[:n].double())
    assert torch.isnan(a[:n]).any() and not torch.isnan(a[:n]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_propagates_nan_in_decode_over_several_key_tiles(impl):
    """One query per sequence against a 300-key cache (two of the CPU kernel's 256-key tiles)."""
    torch.manual_seed(5)
    B, Lk, Hkv, G, hd = 3, 300, 1, 4, 16
    q = torch.randn(B, Hkv * G * hd)
    k, v = torch.randn(B, Hkv, Lk, hd), torch.randn(B, Hkv, Lk, hd)
    k[0, 0, 270, 7] = math.nan  # in the second tile of sequence 0
    q[1, 2 * hd + 5] = math.nan  # query head 2 of sequence 1
    key_valid = torch.ones(B, Lk, dtype=torch.bool)
    key_valid[2, 280] = False
    k[2, 0, 280, 0] = math.nan  # a padding key of sequence 2: reaches nobody
    q_pos = torch.full((B,), Lk - 1)
    idx, cnt = ref.compact(torch.ones(B, dtype=torch.bool))
    want = _attention_f64(q, k, v, q_pos, key_valid, 0, 1, hd**-0.5, 0)
    got = impl.sparse_query_attention(q, idx, cnt, k, v, q_pos, key_valid, 0, 1, hd**-0.5, 0)
    _same_with_nan(got, want)
    assert torch.isnan(got[0]).all() and torch.isnan(got[1]).sum() == hd and not torch.isnan(got[2]).any()


# -- 9. positions that would overflow int64 are refused ------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_refuses_positions_out_of_range(impl):
    torch.manual_seed(4)
    Lk, hd = 4, 8
    q = torch.randn(1, hd)
    k, v = torch.randn(1, 1, Lk, hd), torch.randn(1, 1, Lk, hd)
    idx, cnt = ref.compact(torch.ones(1, dtype=torch.bool))
    top = (1 << 62) - Lk  # the largest kv_offset accepted
    for kv_offset in (2**63 - 2, -1, top + 1):
        with pytest.raises(RuntimeError, match="kv_offset"):
            impl.sparse_query_attention(q, idx, cnt, k, v, torch.tensor([top + 3]), None, kv_offset, 1, 1.0, 0)
    with pytest.raises(RuntimeError, match="window must be in"):
        impl.sparse_query_attention(q, idx, cnt, k, v, torch.tensor([3]), None, 0, 1, 1.0, 2**62 + 1)
    for pos in (-1, 2**63 - 1):
        with pytest.raises(RuntimeError, match="q_pos must hold positions"):
            impl.sparse_query_attention(q, idx, cnt, k, v, torch.tensor([pos]), None, 0, 1, 1.0, 0)
    for cap in (-1.0, float("inf"), float("nan")):  # the soft-cap
        with pytest.raises(RuntimeError, match="softcap must be finite and >= 0"):
            impl.sparse_query_attention(q, idx, cnt, k, v, torch.tensor([3]), None, 0, 1, 1.0, 0, cap)
    # At the top of the range the math is still right: the query at the last key's position sees
    # keys 1-3 with a 3-token window.
    got = impl.sparse_query_attention(q, idx, cnt, k, v, torch.tensor([top + 3]), None, top, 1, 1.0, 3)
    want = torch.softmax(k[0, 0, 1:].double() @ q[0].double(), 0) @ v[0, 0, 1:].double()
    assert (got[0].double() - want).abs().max() < 1e-5


# -- 10. the family features' arguments are checked, by name, before anything is written ----------
@pytest.mark.parametrize("impl", IMPLS)
def test_epilogue_and_activation_arguments_are_checked(impl):
    torch.manual_seed(5)
    T, d, inter = 4, 8, 6
    h = torch.randn(T, d)
    idx, cnt = ref.compact(torch.ones(T, dtype=torch.bool))
    a, w = torch.randn(T, 5), torch.randn(d, 5)
    wg, wu, wd = torch.randn(inter, d), torch.randn(inter, d), torch.randn(d, inter)
    nw = torch.rand(d)
    before = h.clone()
    bad = [
        (lambda: impl.linear_scatter_add_(h, a, idx, cnt, w, None, torch.ones(d + 1)), "post_norm_weight"),
        (lambda: impl.linear_scatter_add_(h, a, idx, cnt, w, None, None, 0.0, float("nan")), "out_scale must be finite"),
        (lambda: impl.linear_scatter_add_(h, a, idx, cnt, w, None, torch.ones(d), -1.0), "post_norm_eps must be finite and >= 0"),
        (lambda: impl.skip_mlp_(h, idx, cnt, nw, 1e-6, wg, wu, wd, "relu"), "activation must be 'silu' or 'gelu_tanh'"),
        (lambda: impl.skip_mlp_(h, idx, cnt, nw, 1e-6, wg, wu, wd, "silu", None, 0.0, float("inf")), "out_scale must be finite"),
        (lambda: impl.skip_mlp_(h, idx, cnt, nw, 1e-6, wg, wu, wd, "silu", h[0]), "post_norm_weight"),
    ]
    for call, match in bad:
        with pytest.raises(RuntimeError, match=match):
            call()
        assert torch.equal(h, before)  # a refused call writes nothing
