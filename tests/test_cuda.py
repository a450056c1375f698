"""The CUDA kernels against their oracles (float64 reference on the CPU, the masked dense
model), opcheck, argument checks, and CUDA-graph capture of a decode step.

Marked ``cuda``; skipped without a CUDA device and a CUDA build of skipgpt_ext. No hypothesis
here (the GPU machine may lack it): seeded loops over the same kinds of cases as the CPU
property tests. Tolerances: the relative error ``|got - want| / |want|`` (Frobenius) against
float64 stays under 1e-2 for bf16 and 3e-3 for fp16, and the largest element error under
3e-2 (bf16) / 5e-3 (fp16) of the output's scale.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

import skipgpt
import skipgpt_ext
from skipgpt import SkipConfig
from skipgpt_ext import reference as ref
from tiny_models import FAMILY_NAMES, NEW_FAMILY_NAMES, WINDOWED_NAMES, left_padded_batch, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cuda_kernel_env import gemm_unavailable  # noqa: E402  (the kernel-choice probe, shared with the benchmarks)

HAVE_CUDA = torch.cuda.is_available() and skipgpt_ext.has_kernels("cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device and the CUDA build")]
if HAVE_CUDA:
    from skipgpt_ext import ops

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
REL_NORM = {torch.bfloat16: 1e-2, torch.float16: 3e-3}
REL_MAX = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape
    if want.numel() == 0:
        return
    assert torch.isfinite(got).all()
    scale = max(want.abs().max().item(), 1.0)
    assert (got - want).abs().max().item() <= REL_MAX[dtype] * scale
    norm = want.norm().item()
    if norm > 0:
        assert (got - want).norm().item() / norm <= REL_NORM[dtype]


def _cpu64(*ts):
    return [t.detach().cpu().double() if t is not None and t.is_floating_point() else
            (t.detach().cpu() if t is not None else None) for t in ts]


def _rows(T: int, kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "all":
        mask = torch.ones(T, dtype=torch.bool)
    elif kind == "none":
        mask = torch.zeros(T, dtype=torch.bool)
    else:
        mask = torch.rand(T, generator=gen) < 0.6
    idx, cnt = ref.compact(mask)
    return idx.to(DEV), cnt.to(DEV)


def _randn(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEV)


# -- route_norm / compact ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d", [(0, 64), (1, 64), (33, 67), (1000, 576), (4100, 256)])
@pytest.mark.parametrize("thr", [-1e9, 0.0, 1e9])
def test_route_norm_matches_float64(dtype, T, d, thr):
    gen = torch.Generator().manual_seed(T * 7 + d)
    h = _randn(T, d, dtype=dtype, gen=gen, scale=3.0)
    if T > 1:  # a row-strided view (the left half of a wider buffer)
        wide = torch.zeros(T, 2 * d, dtype=dtype, device=DEV)
        wide[:, :d] = h
        h = wide[:, :d]
    nw = _randn(d, dtype=dtype, gen=gen)
    rw, rb = _randn(2, d, dtype=torch.float32, gen=gen), _randn(2, dtype=torch.float32, gen=gen)
    valid = (torch.rand(T, generator=gen) < 0.8).to(DEV)
    x, ai, ac, mi, mc = ops.route_norm(h, nw, 1e-5, rw, rb, thr, valid)
    h64, nw64, rw64, rb64 = _cpu64(h, nw, rw, rb)
    _close(x, ref.rms_norm(h64, nw64, 1e-5), dtype)
    margin = h64 @ rw64.T + rb64
    execute = (margin > thr) & valid.cpu().unsqueeze(1)
    clear = (margin - thr).abs() > 1e-3
    for col, (idx, cnt) in enumerate(((ai, ac), (mi, mc))):
        idx, n = idx.cpu(), int(cnt)
        assert torch.equal(torch.sort(idx).values, torch.arange(T))  # a permutation of the rows
        got = torch.zeros(T, dtype=torch.bool)
        got[idx[:n]] = True
        assert torch.equal(got[clear[:, col]], execute[clear[:, col], col])
        assert torch.equal(idx[:n], torch.nonzero(got).flatten())  # executing rows in order


@pytest.mark.parametrize("T", [0, 1, 31, 32, 33, 5000, 70001])
def test_compact_matches_reference(T):
    mask = torch.rand(T, generator=torch.Generator().manual_seed(T)) < 0.3
    idx, cnt = ops.compact(mask.to(DEV))
    want_idx, want_cnt = ref.compact(mask)
    n = int(want_cnt)
    assert int(cnt) == n
    assert torch.equal(idx.cpu()[:n], want_idx[:n])
    assert torch.equal(torch.sort(idx.cpu()).values, torch.arange(T))


# -- gather_linear ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d,hd,H", [(1, 64, 16, 4), (5, 576, 64, 9), (8, 512, 128, 4), (300, 256, 128, 3), (200, 128, 96, 2), (129, 64, 32, 8)])
@pytest.mark.parametrize("kind", ["all", "none", "some"])
@pytest.mark.parametrize("extras", [False, True, "plain"])  # bias + per-head norm (Qwen2 / Qwen3); no RoPE (V)
def test_gather_linear_matches_float64(dtype, T, d, hd, H, kind, extras, seed=0):
    gen = torch.Generator().manual_seed(T + d + hd + 1000 * seed)
    x = _randn(T, d, dtype=dtype, gen=gen)
    w = _randn(H * hd, d, dtype=dtype, gen=gen, scale=d**-0.5)
    b = _randn(H * hd, dtype=dtype, gen=gen) if extras else None
    hn = _randn(hd, dtype=dtype, gen=gen) if extras else None
    ang = torch.rand(T, hd, generator=gen) * 6
    cos, sin = ang.cos().to(dtype).to(DEV), ang.sin().to(dtype).to(DEV)
    if extras == "plain":
        cos = sin = hn = None
    idx, cnt = _rows(T, kind, gen)
    got = ops.gather_linear(x, idx, cnt, w, b, hn, 1e-6, cos, sin)
    want = ref.gather_linear(*_cpu64(x, idx, cnt, w, b, hn), 1e-6, *_cpu64(cos, sin))
    n = int(cnt)
    _close(got[:n], want[:n], dtype)
    assert (got[n:] == 0).all()  # rows past count are zeroed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d,hd,H", [(1, 64, 16, 4), (5, 576, 64, 9), (300, 256, 128, 3), (129, 64, 32, 8)])
@pytest.mark.parametrize("kind", ["all", "some"])
@pytest.mark.parametrize("variant", ["whole", "partial", "whole+partial"])  # OLMo 2's q/k norm; Phi-3's RoPE
def test_gather_linear_whole_row_norm_and_partial_rope_match_float64(dtype, T, d, hd, H, kind, variant):
    gen = torch.Generator().manual_seed(T + d + hd)
    x = _randn(T, d, dtype=dtype, gen=gen)
    w = _randn(H * hd, d, dtype=dtype, gen=gen, scale=d**-0.5)
    whole = "whole" in variant
    hn = _randn(H * hd if whole else hd, dtype=dtype, gen=gen)
    rd = hd // 2 if "partial" in variant else hd
    ang = torch.rand(T, rd, generator=gen) * 6
    cos, sin = ang.cos().to(dtype).to(DEV), ang.sin().to(dtype).to(DEV)
    idx, cnt = _rows(T, kind, gen)
    got = ops.gather_linear(x, idx, cnt, w, None, hn, 1e-6, cos, sin, hd, whole)
    want = ref.gather_linear(*_cpu64(x, idx, cnt, w), None, *_cpu64(hn), 1e-6, *_cpu64(cos, sin), hd, whole)
    n = int(cnt)
    _close(got[:n], want[:n], dtype)
    assert (got[n:] == 0).all()


# -- sparse_query_attention ----------------------------------------------------------------------
ATTN_CASES = [
    # B, S, past, Hkv, G, hd, window, padded
    (1, 1, 0, 1, 1, 64, 0, False),
    (2, 37, 0, 2, 4, 64, 0, True),  # GQA, left padding
    (3, 50, 10, 2, 2, 128, 7, True),  # sliding window, cached keys
    (1, 1, 1500, 8, 4, 128, 0, False),  # decode: split-KV path
    (4, 1, 700, 2, 8, 80, 0, True),  # decode, head_dim not a power of two
    (1, 600, 0, 4, 1, 128, 0, False),  # longer prefill
    (2, 40, 0, 2, 2, 80, 0, True),  # prefill with head_dim 80: the CUDA-core kernel, not the mma one
]
# Prefill with >= 64 rows, head_dim 64/128, bf16/fp16 runs the tensor-core kernel
# (attention_mma.cu): the 2nd, 3rd and 6th cases; the others run the CUDA-core kernel.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTN_CASES)
@pytest.mark.parametrize("kind", ["all", "some"])
def test_sparse_query_attention_matches_float64(dtype, case, kind, seed=0, drop=0):
    """``drop``: the first keys are not in k/v (a sliding cache returns the last ones), so the
    keys start at cache position kv_offset = drop."""
    B, S, past, Hkv, G, hd, window, padded = case
    gen = torch.Generator().manual_seed(B * 1000 + S + past + 100000 * seed)
    T, Lk = B * S, past + S - drop
    q = _randn(T, Hkv * G * hd, dtype=dtype, gen=gen)
    k, v = _randn(B, Hkv, Lk, hd, dtype=dtype, gen=gen), _randn(B, Hkv, Lk, hd, dtype=dtype, gen=gen)
    q_pos = torch.arange(past, past + S).repeat(B).to(DEV)
    key_valid = None
    if padded:
        key_valid = torch.ones(B, Lk, dtype=torch.bool)
        for b in range(B):
            key_valid[b, : (b * 3) % max(Lk // 2, 1)] = False
        key_valid = key_valid.to(DEV)
    idx, cnt = _rows(T, kind, gen)
    scale = hd**-0.5
    got = ops.sparse_query_attention(q, idx, cnt, k, v, q_pos, key_valid, drop, S, scale, window)
    want = ref.sparse_query_attention(*_cpu64(q, idx, cnt, k, v, q_pos, key_valid), drop, S, scale, window)
    n = int(cnt)
    _close(got[:n], want[:n], dtype)
    assert (got[n:] == 0).all()


# Gemma 2's logit soft-cap: the CUDA-core kernel applies it (prefill cases that would otherwise run
# the tensor-core kernel fall back to it), decode and split-KV included.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [ATTN_CASES[1], ATTN_CASES[2], ATTN_CASES[3], ATTN_CASES[4]])
def test_sparse_query_attention_softcap_matches_float64(dtype, case):
    B, S, past, Hkv, G, hd, window, padded = case
    gen = torch.Generator().manual_seed(11 + S)
    T, Lk = B * S, past + S
    q = _randn(T, Hkv * G * hd, dtype=dtype, gen=gen, scale=3.0)  # scores of order 1 and more: the cap matters
    k, v = _randn(B, Hkv, Lk, hd, dtype=dtype, gen=gen), _randn(B, Hkv, Lk, hd, dtype=dtype, gen=gen)
    q_pos = torch.arange(past, past + S).repeat(B).to(DEV)
    idx, cnt = _rows(T, "some", gen)
    got = ops.sparse_query_attention(q, idx, cnt, k, v, q_pos, None, 0, S, hd**-0.5, window, 0.8)
    want = ref.sparse_query_attention(*_cpu64(q, idx, cnt, k, v, q_pos, None), 0, S, hd**-0.5, window, 0.8)
    uncapped = ref.sparse_query_attention(*_cpu64(q, idx, cnt, k, v, q_pos, None), 0, S, hd**-0.5, window)
    n = int(cnt)
    assert (want[:n] - uncapped[:n]).abs().max() > 0.1
    _close(got[:n], want[:n], dtype)


# A sliding cache's keys from position drop on (kv_offset > 0), and a count of 0: decode on one
# pass (65 keys) and split-KV (401 keys with a 400-token window; 601 keys), prefill on the
# tensor-core kernel, and prefill on the CUDA-core kernel (head_dim 80).
@pytest.mark.parametrize("case,drop", [((2, 1, 1500, 2, 4, 128, 64, False), 1436), ((2, 1, 1500, 2, 4, 128, 400, True), 1100),
                                       ((2, 1, 900, 2, 2, 64, 0, True), 300),
                                       ((2, 90, 40, 2, 2, 128, 50, True), 40), ((1, 70, 30, 2, 2, 64, 0, False), 12),
                                       ((2, 40, 20, 2, 2, 80, 24, True), 16)])
@pytest.mark.parametrize("kind", ["some", "none"])
def test_sparse_query_attention_with_kv_offset_or_no_rows(case, drop, kind):
    test_sparse_query_attention_matches_float64(torch.bfloat16, case, kind, drop=drop)


# The tensor-core prefill kernel on each matrix instruction set: mma.sync, or wgmma (plain, or
# with the next tile's S under this tile's softmax) on a compute-capability 9.0 device with an
# sm_90a build (SKIPGPT_CUDA_ATTN, read per launch). The
# cases reach it (>= 64 rows, sequences of >= 16, head_dim 64 / 128) across query blocks that
# span several sequences, left padding, sliding windows and cached keys, and blocks of one
# sequence whose inner key tiles every row sees (the kernel skips the per-key mask there).
ATTN_PREFILL_CASES = [ATTN_CASES[1], ATTN_CASES[2], ATTN_CASES[5],
                      (1, 300, 0, 2, 3, 64, 0, False), (3, 70, 30, 2, 2, 128, 20, True), (2, 200, 0, 1, 8, 64, 0, True),
                      (1, 700, 40, 2, 2, 64, 320, False)]  # wide window: unmasked tiles past a non-zero lo (all kernels)


# The overlapped wgmma kernel's tests carry the id "wgmma_overlap": gpu_check.sh runs them in a
# process of their own.
@pytest.mark.parametrize("attn", ["mma", "wgmma", pytest.param("wgmma-overlap", id="wgmma_overlap")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTN_PREFILL_CASES)
@pytest.mark.parametrize("kind", ["all", "some"])
def test_attention_prefill_kernels(monkeypatch, attn, dtype, case, kind):
    monkeypatch.setenv("SKIPGPT_CUDA_ATTN", attn)
    if attn != "mma" and (why := _wgmma_unavailable_reason()) is not None:
        pytest.skip(why)
    _poison_cuda_cache()
    test_sparse_query_attention_matches_float64(dtype, case, kind, seed=MAINLOOP_SEED[attn])


@pytest.mark.parametrize("attn", ["mma", "wgmma", pytest.param("wgmma-overlap", id="wgmma_overlap")])
@pytest.mark.parametrize("hd", [64, 128])
def test_attention_unmasked_tiles_equal_masked_ones(monkeypatch, attn, hd):
    """Key tiles every row sees skip the per-key mask; an all-true padding mask sends every tile
    through the mask instead. The two must agree bit for bit (and with float64)."""
    monkeypatch.setenv("SKIPGPT_CUDA_ATTN", attn)
    if attn != "mma" and (why := _wgmma_unavailable_reason()) is not None:
        pytest.skip(why)
    _poison_cuda_cache()
    gen = torch.Generator().manual_seed(hd + MAINLOOP_SEED[attn])
    S, Hkv, G = 700, 2, 2
    q = _randn(S, Hkv * G * hd, dtype=torch.bfloat16, gen=gen)
    k, v = _randn(1, Hkv, S, hd, dtype=torch.bfloat16, gen=gen), _randn(1, Hkv, S, hd, dtype=torch.bfloat16, gen=gen)
    q_pos = torch.arange(S, device=DEV)
    idx, cnt = _rows(S, "all", gen)
    scale = hd**-0.5
    fast = ops.sparse_query_attention(q, idx, cnt, k, v, q_pos, None, 0, S, scale, 0)
    every_key = torch.ones(1, S, dtype=torch.bool, device=DEV)
    masked = ops.sparse_query_attention(q, idx, cnt, k, v, q_pos, every_key, 0, S, scale, 0)
    assert torch.equal(fast, masked)
    _close(fast, ref.sparse_query_attention(*_cpu64(q, idx, cnt, k, v, q_pos, None), 0, S, scale, 0), torch.bfloat16)


def test_attention_kind_env_is_checked(monkeypatch):
    q = torch.randn(64, 128, device=DEV, dtype=torch.bfloat16)
    k = v = torch.randn(1, 1, 64, 128, device=DEV, dtype=torch.bfloat16)
    idx, cnt = ref.compact(torch.ones(64, dtype=torch.bool, device=DEV))
    pos = torch.arange(64, device=DEV)
    monkeypatch.setenv("SKIPGPT_CUDA_ATTN", "fa3")
    with pytest.raises(RuntimeError, match="SKIPGPT_CUDA_ATTN must be unset, auto, mma, wgmma or wgmma-overlap"):
        ops.sparse_query_attention(q, idx, cnt, k, v, pos, None, 0, 64, 128**-0.5, 0)


# -- linear_scatter_add_ / skip_mlp_ ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
# T <= 8 runs the GEMV kernel (gemv.cu), larger T the tiled GEMM: 8 and 9 straddle the switch.
@pytest.mark.parametrize("T,din,dout", [(1, 64, 64), (8, 4096, 1024), (9, 256, 512), (77, 576, 576), (300, 1536, 256), (1000, 128, 4096)])
@pytest.mark.parametrize("kind", ["all", "none", "some"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_scatter_add_matches_float64(dtype, T, din, dout, kind, with_bias, seed=0):
    gen = torch.Generator().manual_seed(T + din + dout + 1000 * seed)
    h = _randn(T, dout, dtype=dtype, gen=gen)
    a = _randn(T, din, dtype=dtype, gen=gen)
    w = _randn(dout, din, dtype=dtype, gen=gen, scale=din**-0.5)
    b = _randn(dout, dtype=dtype, gen=gen) if with_bias else None
    idx, cnt = _rows(T, kind, gen)
    n = int(cnt)
    a[n:] = float("nan")  # rows past count must never be read
    got = h.clone()
    ops.linear_scatter_add_(got, a, idx, cnt, w, b)
    want = h.cpu().double()
    ref.linear_scatter_add_(want, *_cpu64(a, idx, cnt, w, b))
    _close(got, want, dtype)
    skipped = torch.ones(T, dtype=torch.bool)
    skipped[idx[:n].cpu()] = False
    assert torch.equal(got[skipped.to(DEV)], h[skipped.to(DEV)])  # untouched, bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d,inter", [(1, 64, 96), (4, 1024, 2816), (50, 576, 1536), (513, 256, 704), (2048, 128, 512)])
@pytest.mark.parametrize("kind", ["all", "none", "some"])
def test_skip_mlp_matches_float64(dtype, T, d, inter, kind, seed=0):
    gen = torch.Generator().manual_seed(T + d + inter + 1000 * seed)
    h = _randn(T, d, dtype=dtype, gen=gen)
    nw = _randn(d, dtype=dtype, gen=gen)
    wg, wu = _randn(inter, d, dtype=dtype, gen=gen, scale=d**-0.5), _randn(inter, d, dtype=dtype, gen=gen, scale=d**-0.5)
    wd = _randn(d, inter, dtype=dtype, gen=gen, scale=inter**-0.5)
    idx, cnt = _rows(T, kind, gen)
    got = h.clone()
    ops.skip_mlp_(got, idx, cnt, nw, 1e-6, wg, wu, wd)
    want = h.cpu().double()
    ref.skip_mlp_(want, *_cpu64(idx, cnt, nw), 1e-6, *_cpu64(wg, wu, wd))
    _close(got, want, dtype)
    n = int(cnt)
    skipped = torch.ones(T, dtype=torch.bool)
    skipped[idx[:n].cpu()] = False
    assert torch.equal(got[skipped.to(DEV)], h[skipped.to(DEV)])


# The epilogue features (Gemma's and OLMo 2's post-norms, Granite's multiplier), Gemma's GeLU-tanh
# and OLMo 2's MLP without an input norm: the GEMV (T <= 8) and the tiled GEMM both feed them.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,din,dout", [(1, 64, 64), (9, 256, 576), (300, 1536, 256)])
@pytest.mark.parametrize("kind", ["all", "none", "some"])
@pytest.mark.parametrize("post_norm,out_scale", [(True, 1.0), (False, 0.6), (True, 0.2)])
def test_linear_scatter_add_epilogue_matches_float64(dtype, T, din, dout, kind, post_norm, out_scale):
    gen = torch.Generator().manual_seed(T + din + dout)
    h = _randn(T, dout, dtype=dtype, gen=gen)
    a = _randn(T, din, dtype=dtype, gen=gen)
    w = _randn(dout, din, dtype=dtype, gen=gen, scale=din**-0.5)
    b = _randn(dout, dtype=dtype, gen=gen)
    pw = _randn(dout, dtype=dtype, gen=gen) if post_norm else None
    idx, cnt = _rows(T, kind, gen)
    n = int(cnt)
    a[n:] = float("nan")  # rows past count must never be read
    got = h.clone()
    ops.linear_scatter_add_(got, a, idx, cnt, w, b, pw, 1e-6, out_scale)
    want = h.cpu().double()
    ref.linear_scatter_add_(want, *_cpu64(a, idx, cnt, w, b), *_cpu64(pw), 1e-6, out_scale)
    _close(got, want, dtype)
    skipped = torch.ones(T, dtype=torch.bool)
    skipped[idx[:n].cpu()] = False
    assert torch.equal(got[skipped.to(DEV)], h[skipped.to(DEV)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d,inter", [(1, 64, 96), (50, 576, 1536), (513, 256, 704)])
@pytest.mark.parametrize("kind", ["all", "some"])
@pytest.mark.parametrize("activation,pre_norm,post_norm,out_scale",
                         [("gelu_tanh", True, True, 1.0), ("silu", False, True, 1.0), ("silu", True, False, 0.6),
                          ("gelu_tanh", False, False, 1.0)])
def test_skip_mlp_features_match_float64(dtype, T, d, inter, kind, activation, pre_norm, post_norm, out_scale):
    gen = torch.Generator().manual_seed(T + d + inter)
    h = _randn(T, d, dtype=dtype, gen=gen)
    nw = _randn(d, dtype=dtype, gen=gen) if pre_norm else None
    wg, wu = _randn(inter, d, dtype=dtype, gen=gen, scale=d**-0.5), _randn(inter, d, dtype=dtype, gen=gen, scale=d**-0.5)
    wd = _randn(d, inter, dtype=dtype, gen=gen, scale=inter**-0.5)
    pw = _randn(d, dtype=dtype, gen=gen) if post_norm else None
    idx, cnt = _rows(T, kind, gen)
    got = h.clone()
    ops.skip_mlp_(got, idx, cnt, nw, 1e-6, wg, wu, wd, activation, pw, 1e-6, out_scale)
    want = h.cpu().double()
    ref.skip_mlp_(want, *_cpu64(idx, cnt, nw), 1e-6, *_cpu64(wg, wu, wd), activation, *_cpu64(pw), 1e-6, out_scale)
    _close(got, want, dtype)
    n = int(cnt)
    skipped = torch.ones(T, dtype=torch.bool)
    skipped[idx[:n].cpu()] = False
    assert torch.equal(got[skipped.to(DEV)], h[skipped.to(DEV)])


# -- every tiled GEMM mainloop ----------------------------------------------------------------------
# launch_gemm runs mma.sync (gemm.cu) unless SKIPGPT_CUDA_GEMM (read per launch) asks for the
# plain, the warp-specialised or the warp-specialised TMA wgmma mainloop (gemm_sm90.cu;
# compute capability 9.0, sm_90a build).
# The cases cross every tile edge of each: M past 128 with a partial last tile and whole tiles past
# count (kind "some"), K not a multiple of 64 and deeper than the 3-4 pipeline stages, N not a
# multiple of 128 / 256, RoPE in the epilogue (head_dim 64 / 128, with the Qwen3 head norm) and
# in its own pass (head_dim 96). wgmma takes 128-wide tiles while 256-wide ones would number
# fewer than the SMs: the cases with T 4200 and N 2048 (264 wide tiles) run the 256-wide ones.
@functools.cache
def _wgmma_unavailable_reason() -> str | None:
    """Why the wgmma kernels cannot run here (the ops' own error under SKIPGPT_CUDA_GEMM=wgmma), or
    None. One row takes the GEMV: the check runs, no wgmma kernel is launched."""
    if torch.cuda.get_device_capability() != (9, 0):
        return "the wgmma kernels run on compute capability 9.0 only"
    return gemm_unavailable("wgmma")


def _poison_cuda_cache() -> None:
    """Leave NaN in the memory the caching allocator hands out next (0x7FFF is NaN as bf16,
    fp16 and, paired, fp32), so an output element or intermediate a kernel never writes reads
    as NaN, not as a stale right answer left by an earlier test on the same inputs."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # no smaller stale block is left to be handed out before the poison
    big = torch.full((64 << 20,), 0x7FFF, dtype=torch.int16, device=DEV)  # large-block pool
    small = [torch.full((1 << 18,), 0x7FFF, dtype=torch.int16, device=DEV) for _ in range(64)]  # < 1 MB pool
    del big, small


MAINLOOP_SEED = {"mma": 0, "wgmma": 1, "wgmma-ws": 2, "wgmma-tma": 3, "wgmma-overlap": 4}  # other inputs per kernel, on top of the poison


# The warp-specialised kernels' tests carry the ids "wgmma_ws" and "wgmma_tma": gpu_check.sh runs
# each in a process of its own (a pipeline hang there traps after 10 s and poisons the CUDA
# context).
@pytest.fixture(params=["mma", "wgmma", pytest.param("wgmma-ws", id="wgmma_ws"), pytest.param("wgmma-tma", id="wgmma_tma")])
def gemm_mainloop(request, monkeypatch):
    monkeypatch.setenv("SKIPGPT_CUDA_GEMM", request.param)
    if request.param != "mma" and (why := _wgmma_unavailable_reason()) is not None:
        pytest.skip(why)
    _poison_cuda_cache()
    return request.param


def test_gemm_mainloop_env_is_checked(monkeypatch):
    x = torch.randn(16, 64, device=DEV, dtype=torch.bfloat16)
    idx, cnt = ref.compact(torch.ones(16, dtype=torch.bool, device=DEV))
    w = torch.randn(64, 64, device=DEV, dtype=torch.bfloat16)
    monkeypatch.setenv("SKIPGPT_CUDA_GEMM", "wgmma2")
    with pytest.raises(RuntimeError, match="SKIPGPT_CUDA_GEMM must be unset, auto, mma, wgmma, wgmma-ws or wgmma-tma"):
        ops.linear_scatter_add_(x.clone(), x, idx, cnt, w, None)
    monkeypatch.setenv("SKIPGPT_CUDA_GEMM", "auto")
    h = x.clone()
    ops.linear_scatter_add_(h, x, idx, cnt, w, None)
    _close(h, x.double().cpu() + (x.double() @ w.double().T).cpu(), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d,hd,H,extras", [(300, 200, 64, 6, True), (600, 1000, 128, 3, False), (257, 520, 96, 3, True),
                                             (129, 4096, 128, 2, True), (140, 256, 64, 9, "plain"),
                                             (4200, 256, 128, 16, True), (4200, 136, 64, 32, "plain")])
@pytest.mark.parametrize("kind", ["all", "some"])
def test_gemm_mainloops_gather_linear(gemm_mainloop, dtype, T, d, hd, H, extras, kind):
    test_gather_linear_matches_float64(dtype, T, d, hd, H, kind, extras, seed=MAINLOOP_SEED[gemm_mainloop])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,din,dout", [(300, 200, 520), (600, 1000, 264), (130, 4096, 4096), (4200, 328, 2048)])
@pytest.mark.parametrize("kind", ["all", "some"])
def test_gemm_mainloops_linear_scatter_add(gemm_mainloop, dtype, T, din, dout, kind):
    test_linear_scatter_add_matches_float64(dtype, T, din, dout, kind, with_bias=True, seed=MAINLOOP_SEED[gemm_mainloop])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d,inter", [(300, 200, 392), (513, 520, 1000), (256, 4096, 1408), (4200, 2048, 264)])
@pytest.mark.parametrize("kind", ["all", "some"])
def test_gemm_mainloops_skip_mlp(gemm_mainloop, dtype, T, d, inter, kind):
    test_skip_mlp_matches_float64(dtype, T, d, inter, kind, seed=MAINLOOP_SEED[gemm_mainloop])


@pytest.mark.parametrize("offset,align", [(8, 16), (64, 128)])  # elements into a larger buffer, bytes
def test_gemm_mainloops_weight_views(gemm_mainloop, offset, align):
    """Weights that are views into a larger buffer, 16-byte but not 128-byte aligned, and 128-byte
    aligned: wgmma-tma's TMA loads need 128-byte aligned weights and take cp.async otherwise."""
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(offset + 1000 * MAINLOOP_SEED[gemm_mainloop])
    T, d, inter = 300, 200, 392

    def view(rows, cols):
        buf = _randn(offset + rows * cols, dtype=dtype, gen=gen, scale=cols**-0.5)
        w = buf[offset:].view(rows, cols)
        assert w.data_ptr() % 128 == align % 128 and w.data_ptr() % 16 == 0
        return w

    h, nw = _randn(T, d, dtype=dtype, gen=gen), _randn(d, dtype=dtype, gen=gen)
    wg, wu, wd, wo = view(inter, d), view(inter, d), view(d, inter), view(d, inter)
    a, bias = _randn(T, inter, dtype=dtype, gen=gen), _randn(d, dtype=dtype, gen=gen)
    idx, cnt = _rows(T, "some", gen)
    got = h.clone()
    ops.skip_mlp_(got, idx, cnt, nw, 1e-6, wg, wu, wd)
    want = h.cpu().double()
    ref.skip_mlp_(want, *_cpu64(idx, cnt, nw), 1e-6, *_cpu64(wg, wu, wd))
    _close(got, want, dtype)
    got = h.clone()
    ops.linear_scatter_add_(got, a, idx, cnt, wo, bias)
    want = h.cpu().double()
    ref.linear_scatter_add_(want, *_cpu64(a, idx, cnt, wo, bias))
    _close(got, want, dtype)


@pytest.mark.parametrize("T", [8, 300])  # the GEMV, and the tiled GEMM's early exit
def test_empty_count_leaves_h_bit_exact(gemm_mainloop, T):
    # count == 0 must leave h bit-exact, with NaN weights (so a row computed from them and added
    # would show). That no weight byte is read is the design (a block exits on the device-side
    # count before its first load); this test cannot see reads that are not written back.
    gen = torch.Generator().manual_seed(0)
    d, inter = 64, 128
    h = _randn(T, d, dtype=torch.bfloat16, gen=gen)
    nan = torch.full((inter, d), float("nan"), dtype=torch.bfloat16, device=DEV)
    idx, cnt = _rows(T, "none", gen)
    got = h.clone()
    ops.skip_mlp_(got, idx, cnt, torch.ones(d, dtype=torch.bfloat16, device=DEV), 1e-6, nan, nan, nan.t().contiguous())
    ops.linear_scatter_add_(got, torch.randn(T, inter, device=DEV).bfloat16(), idx, cnt, nan.t().contiguous(), None)
    assert torch.equal(got, h)
    # Control: one executing row does pick up the NaN.
    idx1, cnt1 = ref.compact(torch.arange(T) == 0)
    ops.linear_scatter_add_(got, torch.randn(T, inter, device=DEV).bfloat16(), idx1.to(DEV), cnt1.to(DEV),
                            nan.t().contiguous(), None)
    assert got[0].isnan().all() and torch.equal(got[1:], h[1:])


# -- opcheck and bad inputs --------------------------------------------------------------------------
def _samples(dtype):
    gen = torch.Generator().manual_seed(0)
    B, S, d, hd, Hkv, G, inter = 2, 5, 64, 16, 2, 2, 96
    T = B * S
    h = _randn(T, d, dtype=dtype, gen=gen)
    nw = _randn(d, dtype=dtype, gen=gen)
    idx, cnt = _rows(T, "some", gen)
    cos, sin = _randn(T, hd, dtype=dtype, gen=gen), _randn(T, hd, dtype=dtype, gen=gen)
    q = _randn(T, Hkv * G * hd, dtype=dtype, gen=gen)
    k, v = _randn(B, Hkv, S + 2, hd, dtype=dtype, gen=gen), _randn(B, Hkv, S + 2, hd, dtype=dtype, gen=gen)
    key_valid = (torch.rand(B, S + 2, generator=gen) < 0.8).to(DEV)
    f32 = dict(dtype=torch.float32, gen=gen)
    return {
        "route_norm": (h, nw, 1e-6, _randn(2, d, **f32), _randn(2, **f32), 0.1, (torch.rand(T) < 0.9).to(DEV)),
        "compact": ((torch.rand(T) < 0.5).to(DEV),),
        "gather_linear": (h, idx, cnt, _randn(Hkv * G * hd, d, dtype=dtype, gen=gen), _randn(Hkv * G * hd, dtype=dtype, gen=gen),
                        _randn(hd, dtype=dtype, gen=gen), 1e-6, cos, sin),
        "sparse_query_attention": (q, idx, cnt, k, v, torch.arange(2, S + 2).repeat(B).to(DEV), key_valid, 0, S, 0.5, 3),
        "linear_scatter_add_": (h.clone(), q, idx, cnt, _randn(d, Hkv * G * hd, dtype=dtype, gen=gen), None),
        "skip_mlp_": (h.clone(), idx, cnt, nw, 1e-6, _randn(inter, d, dtype=dtype, gen=gen),
                      _randn(inter, d, dtype=dtype, gen=gen), _randn(d, inter, dtype=dtype, gen=gen)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", skipgpt_ext.OP_NAMES)
def test_opcheck(name, dtype):
    torch.library.opcheck(getattr(torch.ops.skipgpt, name).default, _samples(dtype)[name])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("old", sorted(skipgpt_ext.ops.OLD_NAMES))
def test_old_op_names_still_load_and_compute_the_same(old, dtype):
    new = skipgpt_ext.ops.OLD_NAMES[old]
    args = _samples(dtype)[new]
    torch.library.opcheck(getattr(torch.ops.skipgpt, old).default, args)
    assert torch.equal(getattr(torch.ops.skipgpt, old).default(*args), getattr(torch.ops.skipgpt, new).default(*args))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_plain_projection(dtype):
    x, idx, cnt, w, b, _, heps, _, _ = _samples(dtype)["gather_linear"]
    torch.library.opcheck(torch.ops.skipgpt.gather_linear.default, (x, idx, cnt, w, b, None, heps, None, None))


def test_bad_inputs_name_the_argument():
    s = _samples(torch.bfloat16)
    h, nw, eps, rw, rb, thr, valid = s["route_norm"]
    with pytest.raises(RuntimeError, match="norm_weight must be a CUDA tensor"):
        ops.route_norm(h, nw.cpu(), eps, rw, rb, thr, valid)
    with pytest.raises(RuntimeError, match="router_weight must be float32"):
        ops.route_norm(h, nw, eps, rw.bfloat16(), rb, thr, valid)
    with pytest.raises(RuntimeError, match=r"norm_weight must have the dtype of h \(bfloat16\)"):  # as on the CPU
        ops.route_norm(h, nw.float(), eps, rw, rb, thr, valid)
    x, idx, cnt, w, b, hn, heps, cos, sin = s["gather_linear"]
    with pytest.raises(RuntimeError, match="x must be bfloat16 or float16 on CUDA"):
        ops.gather_linear(x.float(), idx, cnt, w.float(), b, hn, heps, cos, sin)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        ops.gather_linear(x[:, :60], idx, cnt, w[:, :60], b, hn, heps, cos, sin)
    with pytest.raises(RuntimeError, match="idx must be int64"):
        ops.gather_linear(x, idx.int(), cnt, w, b, hn, heps, cos, sin)
    with pytest.raises(RuntimeError, match="cos and sin must be given together"):
        ops.gather_linear(x, idx, cnt, w, b, None, heps, cos, None)
    with pytest.raises(RuntimeError, match="head_norm_weight needs cos and sin"):
        ops.gather_linear(x, idx, cnt, w, b, hn, heps, None, None)
    h2, a, idx, cnt, w, b = s["linear_scatter_add_"]
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.linear_scatter_add_(h2, a, idx, cnt, w[:, :-8], b)
    # The epilogues add rows into h without atomics: h must not alias itself, nor a alias h.
    h_before = h2.clone()
    with pytest.raises(RuntimeError, match="h .*must not have elements that share memory"):
        ops.linear_scatter_add_(h2[:1].expand_as(h2), a, idx, cnt, w, b)
    with pytest.raises(RuntimeError, match="a must not share memory with h"):
        ops.linear_scatter_add_(h2, h2[:, : a.shape[1]], idx, cnt, w, b)
    with pytest.raises(RuntimeError, match="a must not share memory with h"):  # a narrower view of h
        ops.linear_scatter_add_(h2, h2[:, :32], idx, cnt, w[:, :32].contiguous(), b)
    with pytest.raises(RuntimeError, match="h .*must not have elements that share memory"):
        ops.linear_scatter_add_(h2.as_strided(h2.shape, (8, 1)), a, idx, cnt, w, b)
    assert torch.equal(h2, h_before)
    h3, idx, cnt, nw, eps, wg, wu, wd = s["skip_mlp_"]
    with pytest.raises(RuntimeError, match="h .*must not have elements that share memory"):
        ops.skip_mlp_(h3[:1].expand_as(h3), idx, cnt, nw, eps, wg, wu, wd)


# -- end to end ------------------------------------------------------------------------------------
def _logits_close(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> None:
    a, b = a.float()[keep], b.float()[keep]
    assert (a - b).norm() / a.norm() <= 3e-2


@pytest.mark.parametrize("family", FAMILY_NAMES + WINDOWED_NAMES + NEW_FAMILY_NAMES)
def test_native_equals_masked_bfloat16(family):
    """bf16 on CUDA: native == masked within bf16 rounding. Stated tolerance: logits relative
    error (Frobenius, real tokens) <= 3e-2, realised sparsity within 0.03 (a decision near the
    threshold may flip under a different rounding order)."""
    model = tiny_model(family, dtype=torch.bfloat16).to(DEV)
    skipgpt.apply(model, SkipConfig(mode="masked"))
    ids, mask = left_padded_batch()
    ids, mask = ids.to(DEV), mask.to(DEV)
    new = torch.randint(3, 128, (3, 1), generator=torch.Generator().manual_seed(7)).to(DEV)
    mask2 = torch.cat([mask, torch.ones_like(new)], 1)
    res = {}
    for mode in ("masked", "native"):
        skipgpt.set_mode(model, mode)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            s = skipgpt.stats(model)
            step = model(input_ids=new, attention_mask=mask2, past_key_values=out.past_key_values, use_cache=True)
        res[mode] = (out.logits, step.logits, s)
    (pm, sm, stm), (pn, sn, stn) = res["masked"], res["native"]
    assert 0.1 < stn["attn_skip"] < 0.9 and 0.1 < stn["mlp_skip"] < 0.9
    _logits_close(pm, pn, mask.bool())
    _logits_close(sm, sn, torch.ones(sm.shape[:2], dtype=torch.bool, device=DEV))
    assert abs(stm["param_sparsity"] - stn["param_sparsity"]) <= 0.03


def test_auto_mode_is_native_for_bf16_and_reference_for_fp32_on_cuda():
    model = tiny_model("llama").to(DEV)
    skipgpt.apply(model, SkipConfig(mode="auto"))
    st = skipgpt.state(model)
    assert st.resolve_mode(False, torch.device(DEV), torch.bfloat16) == "native"
    assert st.resolve_mode(False, torch.device(DEV), torch.float32) == "reference"


# -- CUDA graphs ---------------------------------------------------------------------------------------
def _decode_step(h, k, v, q_pos, w):
    """One layer's skipping ops at batch-1 decode, all on device-side counts."""
    x, ai, ac, mi, mc = ops.route_norm(h, w["n1"], 1e-6, w["rw"], w["rb"], 0.0, None)
    q = ops.gather_linear(x, ai, ac, w["q"], None, None, 0.0, w["cos"], w["sin"])
    o = ops.sparse_query_attention(q, ai, ac, k, v, q_pos, None, 0, 1, 0.125, 0)
    ops.linear_scatter_add_(h, o, ai, ac, w["o"], None)
    ops.skip_mlp_(h, mi, mc, w["n2"], 1e-6, w["g"], w["u"], w["d"])
    return ac, mc


def test_decode_step_captures_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(3)
    d, hd, Hq, Hkv, inter, L = 256, 64, 4, 2, 512, 300
    bf = dict(dtype=torch.bfloat16, gen=gen)
    w = {"n1": _randn(d, **bf), "n2": _randn(d, **bf), "rw": _randn(2, d, dtype=torch.float32, gen=gen),
         "rb": torch.zeros(2, device=DEV), "q": _randn(Hq * hd, d, **bf, scale=d**-0.5),
         "o": _randn(d, Hq * hd, **bf, scale=(Hq * hd) ** -0.5), "g": _randn(inter, d, **bf, scale=d**-0.5),
         "u": _randn(inter, d, **bf, scale=d**-0.5), "d": _randn(d, inter, **bf, scale=inter**-0.5),
         "cos": _randn(1, hd, **bf), "sin": _randn(1, hd, **bf)}
    k, v = _randn(1, Hkv, L, hd, **bf), _randn(1, Hkv, L, hd, **bf)
    q_pos = torch.tensor([L - 1], device=DEV)
    h_static = _randn(1, d, **bf)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (allocations, attribute opt-ins) before capture
        _decode_step(h_static.clone(), k, v, q_pos, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        counts = _decode_step(h_static, k, v, q_pos, w)
    seen = set()
    for trial in range(6):
        h_new = _randn(1, d, **bf, scale=3.0)
        want = h_new.clone()
        want_counts = _decode_step(want, k, v, q_pos, w)
        h_static.copy_(h_new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(h_static, want)
        assert [int(c) for c in counts] == [int(c) for c in want_counts]
        seen.add(tuple(int(c) for c in counts))
    assert len(seen) > 1  # the replays really took different skip decisions


def test_patched_layer_forward_captures_in_a_cuda_graph():
    model = tiny_model("llama", dtype=torch.bfloat16).to(DEV)
    skipgpt.apply(model, SkipConfig(mode="native"))
    layer = model.model.layers[1]
    B, S, d = 1, 1, model.config.hidden_size
    h_static = torch.randn(B, S, d, device=DEV, dtype=torch.bfloat16)
    pos = torch.zeros(1, 1, dtype=torch.long, device=DEV)
    cos, sin = model.model.rotary_emb(h_static, pos)
    skipgpt.state(model)._begin(None, B, S, device=torch.device(DEV))
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(h_static.clone(), position_embeddings=(cos, sin))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_static = layer(h_static, position_embeddings=(cos, sin))
        gen = torch.Generator().manual_seed(5)
        seen = set()
        for _ in range(8):
            h_new = _randn(B, S, d, dtype=torch.bfloat16, gen=gen, scale=3.0)
            want = layer(h_new.clone(), position_embeddings=(cos, sin))
            h_static.copy_(h_new)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out_static, want)
            # The masked oracle on the same input: same result within bf16 rounding, and its gates
            # say which decisions this replay took.
            skipgpt.set_mode(model, "masked")
            masked = layer(h_new.clone(), attention_mask=None, position_embeddings=(cos, sin))
            skipgpt.set_mode(model, "native")
            _close(out_static.float(), masked.float(), torch.bfloat16)
            seen.add(tuple(int(g.item()) for g in skipgpt.state(model).gates[1]))
        assert len(seen) > 1  # the replays really took different skip decisions
