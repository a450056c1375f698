"""Layout probe: which operand element each output element of a tiled kernel came from.

When a GPU test of a tiled kernel fails, its mismatch count says little about why. This probe runs
the same ops on structured inputs whose results are exact small integers in bf16 (one-hot rows
against index-coded matrices), so each output element names the operand row, column or key the
kernel actually used. Each output is compared exactly with the reference op (the same inputs, on
the CPU, :mod:`skipgpt_ext.reference`). For every probe that differs it prints the shape of the
error: zero / non-integer / wrong-code counts, the most common value deltas (got - want), the
wrong rows and columns modulo the tile sizes, and examples. That is enough to tell a descriptor
stride from an accumulator map from a k-advance bug without another device run.

GEMM probes (``q_proj_rope`` without and with RoPE, ``linear_scatter_add_``), out[r, n] = x[idx[r]] . W[n]:
  * ``W codes n``   x one-hot at k = r % K, W[n, k] = code(n)      -> out names the W row used;
  * ``W codes k``   x one-hot at k = r % K, W[n, k] = code(k)      -> the k at which A met B;
  * ``x codes row`` x[i, k] = code(i),     W one-hot at k = n % K  -> the x row gathered;
  * ``x codes k``   x[i, k] = code(k),     W one-hot at k = n % K  -> the k of A that was read.
  Two shapes: one that takes the 128-wide wgmma tiles, one with enough tiles for the 256-wide ones.
  The RoPE epilogue (head_dim 128) gets cos 1 / sin 0 on even token rows and cos 0 / sin 1 on
  odd ones, so its per-row cos/sin and its half rotation show as moved or negated codes.
Fused MLP probes (``skip_mlp_``): one-hot tokens (exact through RMSNorm), gate >= 32 (SiLU is the
identity in bf16 there), one-hot down: h gains silu(gate) * up coded by gate/up row n or by k.
Attention probes (``sparse_query_attention``): query row t of head h is one-hot at its target key's
code column, keys are one-hot with a position ramp, so each query attends (to 1e-14) to exactly one
visible key; V then codes the key, the column, or the (sequence, KV head):
  prefill blocks (2 sequences x 128 tokens, every third token skipped, head_dim 64 and 128, GQA 2;
  and 2 x 384 tokens, for blocks of several key tiles) and a split-KV decode batch (4 sequences,
  288 cached keys).
code(i) = 1 + i % 255: exact in bf16, and 0 stays "nothing read".

Usage on the device, one kernel variant per process (a fault cannot spoil the next):
  python benchmarks/layout_probe.py --device cuda --gemm wgmma --attn wgmma
On the CPU kernels (a self-check of the probe, also run by tests/test_layout_probe.py):
  python benchmarks/layout_probe.py --device cpu
Exit status 1 when any probe differs from the reference, 2 when a variant could not run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from collections.abc import Callable, Iterator

import torch

import skipgpt_ext
from cuda_kernel_env import kernel_env  # beside this script
from skipgpt_ext import reference as ref

DTYPE = torch.bfloat16
BIG = 32.0  # the score of a query's target key over the others (exact in bf16)


def code(i: torch.Tensor) -> torch.Tensor:
    return (1 + i % 255).to(torch.float32)


@dataclasses.dataclass
class Result:
    name: str
    total: int
    wrong: int
    report: str  # empty when nothing is wrong

    def line(self) -> str:
        status = "ok" if self.wrong == 0 else f"{self.wrong} of {self.total} wrong"
        return f"{self.name}: {status}" + (f"\n{self.report}" if self.report else "")


def _ranges(values) -> str:
    """Sorted ints as '0-7,16-23' (at most 12 runs shown)."""
    vals = sorted(set(int(v) for v in values))
    runs, start = [], None
    for i, v in enumerate(vals):
        if start is None:
            start = v
        if i + 1 == len(vals) or vals[i + 1] != v + 1:
            runs.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(runs[:12]) + (f",... ({len(runs)} runs)" if len(runs) > 12 else "")


def compare(name: str, got: torch.Tensor, want: torch.Tensor, row_tile: int, col_tile: int,
            rows: torch.Tensor | None = None) -> Result:
    """Exact comparison of a probe's output with the reference's, with a diagnosis of the error.

    ``rows`` restricts the comparison to the output rows the op defines (executed rows)."""
    got, want = got.detach().to("cpu", torch.float32), want.detach().to("cpu", torch.float32)
    if rows is not None:
        got, want = got[rows], want[rows]
        row_ids = rows
    else:
        row_ids = torch.arange(got.shape[0])
    bad = ~(got == want)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return Result(name, got.numel(), 0, "")
    r, c = bad.nonzero(as_tuple=True)
    g, w = got[r, c], want[r, c]
    nonfinite = ~torch.isfinite(g)
    zero = g == 0
    integral = torch.isfinite(g) & (g == g.round()) & (g.abs() >= 1) & (g.abs() <= 255)  # a code, maybe negated
    other = ~(nonfinite | zero | integral)
    out_rows = row_ids[r]
    lines = [
        f"    kinds: {int(zero.sum())} zero (nothing read or not written), {int(nonfinite.sum())} non-finite, "
        f"{int(integral.sum())} another code (wrong element read), {int(other.sum())} other (mixed / partial sums)",
    ]
    if integral.any():
        delta = (g[integral] - w[integral]).to(torch.int64).tolist()
        common = collections.Counter(delta).most_common(6)
        lines.append("    most common got - want (codes): " + ", ".join(f"{d:+d} x{k}" for d, k in common))
    lines.append(f"    wrong output rows: {len(set(out_rows.tolist()))} of {got.shape[0]}; "
                 f"rows mod {row_tile}: {_ranges(out_rows % row_tile)}")
    lines.append(f"    wrong columns: {len(set(c.tolist()))} of {got.shape[1]}; "
                 f"columns mod {col_tile}: {_ranges(c % col_tile)}")
    ex = ", ".join(f"({int(out_rows[i])},{int(c[i])}) want {w[i]:g} got {g[i]:g}" for i in range(min(6, n_bad)))
    lines.append(f"    first: {ex}")
    return Result(name, got.numel(), n_bad, "\n".join(lines))


# ---- GEMM probes -----------------------------------------------------------------------------

GEMM_SHAPES = {
    # (T rows, N, K): 4 x 4 tiles of 128x128 (wgmma's narrow tiles: fewer 256-wide tiles than SMs),
    # K 448 = 7 wgmma k-tiles (14 mma.sync ones), so the 4-stage pipelines wrap (the warp-
    # specialised kernels' empty-barrier waits and parity flips run); T and N >= K, so the one-hot
    # rows reach every k. Then 16 x 11 = 176 tiles of 128x256 (>= 132 SMs): the 256-wide tiles.
    "narrow": (512, 512, 448),
    "wide": (2048, 2816, 128),
}


def gemm_inputs(T: int, N: int, K: int) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(probe name, x [T, K], W [N, K]) in fp32 (exact small integers and ones)."""
    i_t, i_n, i_k = torch.arange(T), torch.arange(N), torch.arange(K)
    x_onehot = (i_k[None, :] == (i_t[:, None] % K)).float()
    w_onehot = (i_k[None, :] == (i_n[:, None] % K)).float()
    yield "W codes n", x_onehot, code(i_n)[:, None].expand(N, K)
    yield "W codes k", x_onehot, code(i_k)[None, :].expand(N, K)
    yield "x codes row", code(i_t)[:, None].expand(T, K), w_onehot
    yield "x codes k", code(i_k)[None, :].expand(T, K), w_onehot


ROPE_HD = 128


def rope_rows(T: int, hd: int = ROPE_HD) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, hd] per token row: even rows cos 1, sin 0 (RoPE is the identity), odd rows
    cos 0, sin 1 (rotate_half: the head's second half negated into the first, the first into
    the second). A wrong row's cos/sin then shows as a code moved hd/2 or negated."""
    odd = (torch.arange(T) % 2 == 1)[:, None].expand(T, hd)
    return (~odd).float(), odd.float()


def gemm_probes(device: str, ops=None, shapes=GEMM_SHAPES) -> list[Result]:
    """q_proj_rope (plain, and with the RoPE epilogue at head_dim 128) and linear_scatter_add_ on
    every GEMM shape and input pattern."""
    ops = ops or skipgpt_ext.ops
    results = []
    gen = torch.Generator().manual_seed(0)
    for shape_name, (T, N, K) in shapes.items():
        # In-order compaction of a random five sixths of the rows: gathered rows, count < T.
        idx, count = ref.compact(torch.rand(T, generator=gen) < 5 / 6)
        n = int(count)
        col_tile = 128 if shape_name == "narrow" else 256
        cos, sin = (t.to(DTYPE) for t in rope_rows(T))
        for pattern, x, w in gemm_inputs(T, N, K):
            xb, wb = x.to(DTYPE).contiguous(), w.to(DTYPE).contiguous()
            for label, rope in (("q_proj_rope", (None, None)), ("q_proj_rope + RoPE", (cos, sin))):
                want = ref.q_proj_rope(xb, idx, count, wb, None, None, 0.0, *rope)
                got = ops.q_proj_rope(*(t.to(device) for t in (xb, idx, count, wb)), None, None, 0.0,
                                      *(t.to(device) if t is not None else None for t in rope))
                results.append(compare(f"gemm {shape_name} {T}x{N}x{K} {label}, {pattern}", got, want,
                                       128, col_tile, rows=torch.arange(n)))
            # The scatter epilogue: h[idx[r]] += a[r] W^T into a zero residual; a = the gathered rows.
            a = xb.index_select(0, idx).contiguous()  # rows past count: the skipped ones, unread
            h_want = torch.zeros(T, N, dtype=DTYPE)
            ref.linear_scatter_add_(h_want, a, idx, count, wb, None)
            h_got = torch.zeros(T, N, dtype=DTYPE, device=device)
            ops.linear_scatter_add_(h_got, a.to(device), idx.to(device), count.to(device), wb.to(device), None)
            results.append(compare(f"gemm {shape_name} {T}x{N}x{K} linear_scatter_add_, {pattern}", h_got, h_want,
                                   128, col_tile))
    return results


# ---- fused MLP probes (the gate/up GEMM and its SiLU-mul epilogue) ------------------------------

MLP_SHAPE = (512, 256, 256)  # T tokens, hidden d (a power of 4: RMSNorm of a one-hot row is exact), I = d


def mlp_inputs(T: int, d: int, inter: int):
    """(probe name, h [T, d], norm weight, gate, up, down) in fp32, exact in bf16.

    Token i is one-hot at k = i % d, so RMSNorm with weight 1/sqrt(d) gives x = e_k exactly. A gate
    of 32 or more makes SiLU the identity to bf16 precision (silu(32) = 32 (1 - 1e-14)), so the
    fused activation silu(gate) * up is one exact code per element, and the one-hot down
    projection adds act[r, n] to h[idx[r], n] (inter == d)."""
    assert inter == d
    i_t, i_d = torch.arange(T), torch.arange(d)
    h = (i_d[None, :] == (i_t[:, None] % d)).float()
    norm_w = torch.full((d,), d ** -0.5)
    ones, sixty_four = torch.ones(inter, d), torch.full((inter, d), 64.0)
    down = torch.eye(d)
    gate_code = (32 + i_d % 224).float()  # 32..255: SiLU is the identity there
    yield "gate codes n", h, norm_w, gate_code[:, None].expand(inter, d), ones, down
    yield "up codes n", h, norm_w, sixty_four, code(i_d)[:, None].expand(inter, d), down / 64
    yield "gate codes k", h, norm_w, gate_code[None, :].expand(inter, d), ones, down
    yield "up codes k", h, norm_w, sixty_four, code(i_d)[None, :].expand(inter, d), down / 64


def mlp_probes(device: str, ops=None, shape=MLP_SHAPE) -> list[Result]:
    """skip_mlp_ (RMSNorm, gate/up with SiLU-mul, down with scatter-add) on coded weights."""
    ops = ops or skipgpt_ext.ops
    T, d, inter = shape
    gen = torch.Generator().manual_seed(1)
    idx, count = ref.compact(torch.rand(T, generator=gen) < 5 / 6)
    results = []
    for pattern, h, norm_w, gate, up, down in mlp_inputs(T, d, inter):
        hb, nb, gb, ub, db = (t.to(DTYPE).contiguous() for t in (h, norm_w, gate, up, down))
        h_want = hb.clone()
        ref.skip_mlp_(h_want, idx, count, nb, 1e-30, gb, ub, db)
        h_got = hb.to(device, copy=True)
        ops.skip_mlp_(h_got, idx.to(device), count.to(device), nb.to(device), 1e-30, gb.to(device), ub.to(device),
                      db.to(device))
        results.append(compare(f"mlp {T}x{d}x{inter} skip_mlp_, {pattern}", h_got - hb.to(device),
                               h_want - hb, 128, 128))
    return results


# ---- attention probes --------------------------------------------------------------------------

ATTN_CASES = {
    # name: (B, seq_len, Lk, Hkv, G, head_dim). Prefill: T >= 64 and one KV split (Lk <= 256, or
    # T * Hkv >= 2 x SMs) take the tensor-core kernel; 384 keys give blocks of up to 6 key tiles,
    # so the overlapped kernel's three stages rotate and inner tiles skip the per-key mask.
    "prefill hd64": (2, 128, 128, 2, 2, 64),
    "prefill hd128": (2, 128, 128, 2, 2, 128),
    "prefill hd128 long": (2, 384, 384, 2, 2, 128),
    # decode: one token per sequence over 288 keys (split-KV: T * Hkv blocks < 2 x SMs, Lk > 256)
    "decode hd128": (4, 1, 288, 2, 2, 128),
}


def attention_inputs(B: int, S: int, Lk: int, Hkv: int, G: int, hd: int):
    """q [T, Hq*hd], k [B, Hkv, Lk, hd], q_pos [T], kv_offset, and the V patterns.

    Key j is one-hot at column j % hd with weight 1 + j // hd, so among the visible keys of a
    column the latest wins by BIG. Query (t, h) is one-hot (BIG) at the column of its target:
    its own position for even heads, the one before for odd heads (distinguishes a group's heads)."""
    T, Hq = B * S, Hkv * G
    kv_offset = 0
    q_pos = (Lk - S + torch.arange(S)).repeat(B)  # the last S of the Lk keys are the new tokens
    j = torch.arange(Lk)
    k_one = torch.zeros(Lk, hd)
    k_one[j, j % hd] = (1 + j // hd).float()
    k = k_one.expand(B, Hkv, Lk, hd)
    q = torch.zeros(T, Hq, hd)
    for h in range(Hq):
        target = (q_pos - (h % 2)) % hd
        q[torch.arange(T), h, target] = BIG
    jj = torch.arange(Lk)[:, None].expand(Lk, hd)
    cc = torch.arange(hd)[None, :].expand(Lk, hd)
    bh = torch.arange(B * Hkv).view(B, Hkv, 1, 1).expand(B, Hkv, Lk, hd)
    v_patterns = {
        "V codes key": code(jj).expand(B, Hkv, Lk, hd),
        "V codes column": code(cc).expand(B, Hkv, Lk, hd),
        "V codes (seq, kv head)": code(bh),
    }
    return q.view(T, Hq * hd), k, q_pos, kv_offset, v_patterns


def attention_probes(device: str, ops=None, cases=ATTN_CASES) -> list[Result]:
    ops = ops or skipgpt_ext.ops
    results = []
    for name, (B, S, Lk, Hkv, G, hd) in cases.items():
        T = B * S
        q, k, q_pos, kv_offset, v_patterns = attention_inputs(B, S, Lk, Hkv, G, hd)
        # In-order compaction with every third token skipped (decode: every sequence runs).
        run = torch.arange(T) % 3 != 1 if S > 1 else torch.ones(T, dtype=torch.bool)
        idx, count = ref.compact(run)
        n = int(count)
        # q is compacted like the op's output (row r: token idx[r]; rows past count unread).
        qb, kb = q.index_select(0, idx).to(DTYPE).contiguous(), k.to(DTYPE).contiguous()
        for pattern, v in v_patterns.items():
            vb = v.to(DTYPE).contiguous()
            rest = (None, kv_offset, S, 1.0, 0)  # no padding mask, offset, seq_len, scale, no window
            want = ref.sparse_query_attention(qb, idx, count, kb, vb, q_pos, *rest)
            got = ops.sparse_query_attention(*(t.to(device) for t in (qb, idx, count, kb, vb, q_pos)), *rest)
            results.append(compare(f"attention {name} (B {B}, S {S}, Lk {Lk}, Hkv {Hkv}, G {G}), {pattern}",
                                   got, want, 64, hd, rows=torch.arange(n)))  # out is compacted: row r = token idx[r]
    return results


# ---- CLI ----------------------------------------------------------------------------------------

Family = tuple[str, Callable[[], list[Result]]]


def run_families(families: list[Family]) -> tuple[int, int]:
    """Run each probe family, print its results. Returns (wrong probes, families that raised).

    A family that raises (the kernel variant cannot run here, or it faulted) costs only its own
    results; after a sticky CUDA fault the later families report the same error."""
    wrong = errors = 0
    for label, probes in families:
        try:
            results = probes()
        except RuntimeError as e:
            print(f"   {label}: error: {str(e).splitlines()[0]}")
            errors += 1
            continue
        bad = sum(r.wrong > 0 for r in results)
        for r in results:
            print("   " + r.line())
        print(f"   {label}: {len(results) - bad} of {len(results)} probes exact")
        wrong += bad
    return wrong, errors


def run_variant(env: str, value: str, families: list[Family]) -> tuple[int, int]:
    """run_families under os.environ[env] = value (restored afterwards)."""
    print(f"== {env}={value}")
    with kernel_env(env, value):
        return run_families(families)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--gemm", nargs="*", default=None, choices=["mma", "wgmma", "wgmma-ws", "wgmma-tma"],
                    help="GEMM mainloops to probe (SKIPGPT_CUDA_GEMM; none with an empty list); default: mma")
    ap.add_argument("--attn", nargs="*", default=None, choices=["mma", "wgmma", "wgmma-overlap"],
                    help="prefill attention kernels to probe (SKIPGPT_CUDA_ATTN; none with an empty list); default: mma")
    args = ap.parse_args(argv)
    if args.device == "cpu" and (args.gemm is not None or args.attn is not None):
        ap.error("--gemm / --attn choose CUDA kernels: add --device cuda")
    skipgpt_ext.require_kernels(args.device)
    if args.device == "cpu":
        wrong, errors = run_families([("gemm", lambda: gemm_probes("cpu")), ("mlp", lambda: mlp_probes("cpu")),
                                      ("attention", lambda: attention_probes("cpu"))])
        return 2 if errors else (1 if wrong else 0)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing probed")
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    wrong = errors = 0
    for m in args.gemm if args.gemm is not None else ["mma"]:
        w, e = run_variant("SKIPGPT_CUDA_GEMM", m, [("gemm", lambda: gemm_probes("cuda")),
                                                    ("mlp", lambda: mlp_probes("cuda"))])
        wrong, errors = wrong + w, errors + e
    for m in args.attn if args.attn is not None else ["mma"]:
        w, e = run_variant("SKIPGPT_CUDA_ATTN", m, [("attention", lambda: attention_probes("cuda"))])
        wrong, errors = wrong + w, errors + e
    return 2 if errors else (1 if wrong else 0)


if __name__ == "__main__":
    sys.exit(main())
