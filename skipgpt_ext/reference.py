"""Pure-PyTorch reference of every ``skipgpt`` op: the executable spec and the fallback.

Each function has the exact signature and semantics of the op of the same name declared in
``csrc/registration.cpp``. The reference may synchronise with the host (it reads ``count``)
and may build per-sequence masks; the native kernels do neither. Values written beyond
``count`` in compacted outputs are unspecified by the contract; here they are zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import ops

__all__ = ["rms_norm", "rotate_half", *ops.__all__]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as the Hugging Face Llama family computes it (fp32 statistics)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-order compaction: executing rows first, ascending, then the rest."""
    mask = mask.reshape(-1).to(torch.bool)
    # A stable sort keeps the executing rows in ascending order.
    idx = torch.argsort((~mask).to(torch.uint8), stable=True)
    return idx, mask.sum()


def route_norm(
    h: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    threshold: float,
    row_valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    margin = F.linear(h.to(torch.float32), router_weight, router_bias)  # [T, 2]
    execute = margin > threshold
    if row_valid is not None:
        execute &= row_valid.reshape(-1, 1)
    attn_idx, attn_count = compact(execute[:, 0])
    mlp_idx, mlp_count = compact(execute[:, 1])
    return rms_norm(h, norm_weight, eps), attn_idx, attn_count, mlp_idx, mlp_count


# Positions (kv_offset + key index, q_pos, the window) stay in [0, 2^62]: no int64 overflow in
# the kernels' position arithmetic (csrc/op_args.h).
MAX_POSITION = 1 << 62


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    first = t.data_ptr()
    return first, first + (last + 1) * t.element_size() - 1


def _check_apart_from_h(op: str, h: torch.Tensor, **inputs: torch.Tensor | None) -> None:
    """The in-place ops' contract (csrc/op_args.h): no read-only input may share memory with
    ``h``, which the kernels write while they read the inputs. Conservative byte ranges, as there."""
    if h.numel() == 0:
        return
    h0, h1 = _byte_span(h)
    storage = h.untyped_storage().data_ptr()
    for name, t in inputs.items():
        if t is None or t.numel() == 0 or t.untyped_storage().data_ptr() != storage:
            continue
        t0, t1 = _byte_span(t)
        if not (t1 < h0 or h1 < t0):
            raise RuntimeError(f"skipgpt::{op}: {name} must not share memory with h, which is updated in place; clone() it first")


def _executing_rows(idx: torch.Tensor, count: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``count`` as an int (a host sync) and the executing row numbers ``idx[:count]``."""
    n = int(count)
    return n, idx[:n]


def gather_linear(
    x: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    head_norm_weight: torch.Tensor | None,
    head_norm_eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    head_dim: int = 0,
    whole_norm: bool = False,
) -> torch.Tensor:
    """Without cos/sin (both None): the plain compacted projection (no norm allowed).

    Heads are ``head_dim`` wide (0: ``cos.shape[-1]``); RoPE rotates the first
    ``cos.shape[-1]`` features of each head. The norm is per head as Hugging Face's Llama-style
    RMSNorm, or with ``whole_norm`` over the whole row as OLMo 2's (weight applied in fp32,
    rounded once)."""
    if (cos is None) != (sin is None):
        raise ValueError("gather_linear: cos and sin must be given together or both omitted")
    if cos is None and head_norm_weight is not None:
        raise ValueError("gather_linear: head_norm_weight needs cos and sin")
    T = x.shape[0]
    out = x.new_zeros(T, weight.shape[0])
    n, rows = _executing_rows(idx, count)
    if n == 0:
        return out
    if cos is None:
        out[:n] = F.linear(x.index_select(0, rows), weight, bias)
        return out
    rd = cos.shape[-1]
    hd = head_dim or rd
    q = F.linear(x.index_select(0, rows), weight, bias)
    if head_norm_weight is not None:
        if whole_norm:
            q = _epilogue(q, head_norm_weight, head_norm_eps, 1.0)
        else:
            q = rms_norm(q.view(n, -1, hd), head_norm_weight, head_norm_eps).reshape(n, -1)
    q = q.view(n, -1, hd)
    c = cos.index_select(0, rows).unsqueeze(1)
    s = sin.index_select(0, rows).unsqueeze(1)
    r = q[..., :rd]
    r = r * c + rotate_half(r) * s
    out[:n] = (torch.cat([r, q[..., rd:]], -1) if rd < hd else r).reshape(n, -1)
    return out


q_proj_rope = gather_linear  # the old name (ops.OLD_NAMES)


def sparse_query_attention(
    q: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    key_valid: torch.Tensor | None,
    kv_offset: int,
    seq_len: int,
    scale: float,
    window: int,
    softcap: float = 0.0,
) -> torch.Tensor:
    B, Hkv, Lk, hd = k.shape
    op = "skipgpt::sparse_query_attention"
    if not (math.isfinite(softcap) and softcap >= 0):
        raise RuntimeError(f"{op}: softcap must be finite and >= 0 (0 = none), got {softcap}")
    if not 0 <= kv_offset <= MAX_POSITION - Lk:
        raise RuntimeError(f"{op}: kv_offset (the cache position of key 0) must be in [0, 2^62 - Lk] = "
                           f"[0, {MAX_POSITION - Lk}], got {kv_offset}")
    if not 0 <= window <= MAX_POSITION:
        raise RuntimeError(f"{op}: window must be in [0, 2^62] (0 = none), got {window}")
    if q_pos.numel() and not (int(q_pos.min()) >= 0 and int(q_pos.max()) < MAX_POSITION):
        raise RuntimeError(f"{op}: q_pos must hold positions in [0, 2^62)")
    out = torch.zeros_like(q)
    n, rows = _executing_rows(idx, count)
    if n == 0:
        return out
    Hq = q.shape[1] // hd
    seq = torch.div(rows, seq_len, rounding_mode="floor")
    key_pos = kv_offset + torch.arange(Lk, device=q.device)
    for b in torch.unique(seq).tolist():
        sel = (seq == b).nonzero().squeeze(1)
        qb = q[sel].view(-1, Hkv, Hq // Hkv, hd).to(torch.float32)  # [m, Hkv, G, hd]
        pos = q_pos.index_select(0, rows[sel]).unsqueeze(1)  # [m, 1]
        visible = key_pos.unsqueeze(0) <= pos
        if window > 0:
            visible &= key_pos.unsqueeze(0) > pos - window
        if key_valid is not None:
            visible &= key_valid[b].unsqueeze(0)
        kb, vb = k[b].to(torch.float32), v[b].to(torch.float32)  # [Hkv, Lk, hd]
        scores = torch.einsum("mhgd,hld->mhgl", qb, kb) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        # A row with no visible key gives 0 (its softmax is 0/0). Any other NaN propagates, as in
        # the kernels and dense attention: a NaN or inf in the query, in a visible key or in a
        # visible value makes the output non-finite. (A non-finite value of a key the query cannot
        # see reaches it here through 0 * inf, and in the kernels where that key shares a tile
        # with visible ones: the contract leaves that case unspecified.)
        ob = torch.einsum("mhgl,hld->mhgd", p, vb).masked_fill(~visible.any(-1)[:, None, None, None], 0.0)
        out[sel] = ob.reshape(len(sel), -1).to(q.dtype)
    return out


def _check_epilogue(op: str, h: torch.Tensor, post_norm_weight, post_norm_eps: float, out_scale: float) -> None:
    if post_norm_weight is not None and tuple(post_norm_weight.shape) != (h.shape[1],):
        raise RuntimeError(f"skipgpt::{op}: post_norm_weight must be [{h.shape[1]}] (h's width), got {list(post_norm_weight.shape)}")
    if not (math.isfinite(post_norm_eps) and post_norm_eps >= 0):
        raise RuntimeError(f"skipgpt::{op}: post_norm_eps must be finite and >= 0, got {post_norm_eps}")
    if not math.isfinite(out_scale):
        raise RuntimeError(f"skipgpt::{op}: out_scale must be finite, got {out_scale}")


def _epilogue(y: torch.Tensor, post_norm_weight: torch.Tensor | None, post_norm_eps: float, out_scale: float) -> torch.Tensor:
    """Rows as the residual receives them: RMSNorm in fp32 times the weight, rounded once (as
    Gemma's and OLMo 2's norms compute it), then times ``out_scale``."""
    if post_norm_weight is not None:
        yf = y.to(torch.float32)
        yf = yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + post_norm_eps)
        y = (yf * post_norm_weight.to(torch.float32)).to(y.dtype)
    return y * out_scale if out_scale != 1.0 else y


def linear_scatter_add_(
    h: torch.Tensor,
    a: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    post_norm_weight: torch.Tensor | None = None,
    post_norm_eps: float = 0.0,
    out_scale: float = 1.0,
) -> None:
    _check_apart_from_h("linear_scatter_add_", h, a=a, weight=weight, bias=bias, idx=idx, count=count,
                        post_norm_weight=post_norm_weight)
    _check_epilogue("linear_scatter_add_", h, post_norm_weight, post_norm_eps, out_scale)
    n, rows = _executing_rows(idx, count)
    if n == 0:
        return
    h.index_add_(0, rows, _epilogue(F.linear(a[:n], weight, bias), post_norm_weight, post_norm_eps, out_scale))


ACTIVATIONS = ("silu", "gelu_tanh")


def skip_mlp_(
    h: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    norm_weight: torch.Tensor | None,
    eps: float,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    activation: str = "silu",
    post_norm_weight: torch.Tensor | None = None,
    post_norm_eps: float = 0.0,
    out_scale: float = 1.0,
) -> None:
    _check_apart_from_h(
        "skip_mlp_", h, norm_weight=norm_weight, gate_weight=gate_weight, up_weight=up_weight,
        down_weight=down_weight, idx=idx, count=count, post_norm_weight=post_norm_weight,
    )
    if activation not in ACTIVATIONS:
        raise RuntimeError(f"skipgpt::skip_mlp_: activation must be 'silu' or 'gelu_tanh', got {activation!r}")
    _check_epilogue("skip_mlp_", h, post_norm_weight, post_norm_eps, out_scale)
    n, rows = _executing_rows(idx, count)
    if n == 0:
        return
    x = h.index_select(0, rows)
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    g = F.linear(x, gate_weight)
    g = F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")
    y = F.linear(g * F.linear(x, up_weight), down_weight)
    h.index_add_(0, rows, _epilogue(y, post_norm_weight, post_norm_eps, out_scale))
