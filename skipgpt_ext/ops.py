"""The native op set, ``torch.ops.skipgpt``: the only module that calls it.

Each schema is declared once in C++ (``csrc/registration.cpp``); the CPU kernels
(``csrc/cpu/``) and the CUDA kernels (``csrc/cuda/``) implement the same schemas, and
:mod:`skipgpt_ext.reference` is the pure-PyTorch executable spec with the same signatures
(the oracle of the tests and the fallback without the extension).

Conventions shared by every op:

- Tokens are flattened to ``T = B * S`` rows. A module's executing rows are an index buffer
  ``idx`` (int64 ``[T]``) plus ``count`` (int64, 0-dim, on the device of the data):
  ``idx[:count]`` are the executing rows, ascending and unique (what :func:`route_norm` and
  :func:`compact` produce); ``idx[count:]`` is unspecified. The CPU kernels check the
  ascending order; the CUDA kernels cannot without a host sync and take it as given.
- Compacted tensors have ``T`` rows: row ``i < count`` belongs to token row ``idx[i]``. Rows
  past ``count`` are unspecified by the contract (the CPU and CUDA kernels write zeros).
  No output shape depends on data, and on CUDA no op synchronises with the host, so a decode
  step can be captured in a CUDA graph.
- dtypes: the CPU kernels take float32, bfloat16 and float16; the CUDA kernels take bfloat16
  and float16 (:func:`route_norm`, :func:`compact` and :func:`sparse_query_attention` also
  float32). Weights have the activations' dtype; router margins are float32.
- The in-place ops (names ending in ``_``) add rows into ``h`` without atomics, so an ``h``
  whose elements share memory (an ``expand()``-ed view) is refused, and so is an input whose
  memory meets ``h``'s.
- Every bad argument raises a ``RuntimeError`` that names it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "route_norm",
    "compact",
    "gather_linear",
    "sparse_query_attention",
    "linear_scatter_add_",
    "skip_mlp_",
]


def route_norm(
    h: Tensor,
    norm_weight: Tensor,
    eps: float,
    router_weight: Tensor,
    router_bias: Tensor,
    threshold: float,
    row_valid: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Both routing decisions of a layer and its attention RMSNorm, in one pass over ``h``.

    Args:
        h: ``[T, d]``, the layer input (the residual stream before the attention norm).
        norm_weight: ``[d]``, the attention RMSNorm weight, in ``h``'s dtype.
        eps: the RMSNorm epsilon.
        router_weight: ``[2, d]`` float32 margin weights, ``w_execute - w_skip``: row 0 for
            attention, row 1 for the MLP.
        router_bias: ``[2]`` float32 margin biases, likewise.
        threshold: a row executes a module iff its margin ``router_weight @ h + router_bias``
            is greater than ``threshold`` (a logit: ``log(p / (1 - p))`` for ``p_exec > p``).
        row_valid: ``[T]`` bool or None; rows where it is False (padding) never execute.

    Returns:
        ``(x_norm, attn_idx, attn_count, mlp_idx, mlp_count)``: ``x_norm [T, d]`` the RMSNorm
        of every row (contiguous; K and V need every row), and for each module the int64
        ``idx [T]`` and 0-dim ``count`` of its executing rows, in order.
    """
    return torch.ops.skipgpt.route_norm.default(
        h, norm_weight, eps, router_weight, router_bias, threshold, row_valid
    )


def compact(mask: Tensor) -> tuple[Tensor, Tensor]:
    """In-order compaction of a boolean row mask (for routers that are not one linear map).

    Args:
        mask: ``[T]`` bool, True where the row executes.

    Returns:
        ``(idx, count)``: int64 ``idx [T]`` whose first ``count`` entries are the True rows,
        ascending, and the 0-dim int64 ``count``.
    """
    return torch.ops.skipgpt.compact.default(mask)


def gather_linear(
    x: Tensor,
    idx: Tensor,
    count: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    head_norm_weight: Tensor | None,
    head_norm_eps: float,
    cos: Tensor | None,
    sin: Tensor | None,
    head_dim: int = 0,
    whole_norm: bool = False,
) -> Tensor:
    """Compacted projection of the executing rows, optionally with an RMSNorm and RoPE at their
    true positions.

    ``out[i] = rope(head_norm(x[idx[i]] @ weight.T + bias), cos[idx[i]], sin[idx[i]])`` for
    ``i < count``, per head of ``head_dim`` features (RoPE rotates the two halves of the first
    ``cos.shape[1]`` features of a head, as Hugging Face's ``rotate_half``; the rest pass
    through: partial RoPE); without ``cos`` and ``sin``, ``x[idx[i]] @ weight.T + bias``. The layer uses it for Q on the executing rows, and over every row for K
    (with RoPE) and V (without). Formerly ``q_proj_rope``, a name that still works.

    Args:
        x: ``[T, d]``, the normalised rows.
        idx, count: the executing rows (see the module docstring).
        weight: ``[N, d]`` with ``N = heads * head_dim``; bias: ``[N]`` or None.
        head_norm_weight: ``[head_dim]`` or None: a per-head RMSNorm before RoPE (Qwen3's and
            Gemma 3's q_norm / k_norm), with epsilon ``head_norm_eps``; with ``whole_norm``,
            ``[N]``: one RMSNorm over the whole projected row (OLMo 2's). Needs ``cos`` and
            ``sin``.
        cos, sin: ``[T, rotary_dim]`` (even ``rotary_dim``, at most ``head_dim``), the rotary
            tables of every row; both None for the plain projection (no norm then).
        head_dim: the width of a head, dividing ``N``; 0 means ``rotary_dim`` (full RoPE).
        whole_norm: normalise the whole row (above) rather than each head. As OLMo 2, the
            weight multiplies the fp32 normalised row, rounded once.

    Returns:
        ``[T, N]``, compacted: row ``i < count`` belongs to token row ``idx[i]``.
    """
    return torch.ops.skipgpt.gather_linear.default(
        x, idx, count, weight, bias, head_norm_weight, head_norm_eps, cos, sin, head_dim, whole_norm
    )


def sparse_query_attention(
    q: Tensor,
    idx: Tensor,
    count: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    key_valid: Tensor | None,
    kv_offset: int,
    seq_len: int,
    scale: float,
    window: int,
    softcap: float = 0.0,
) -> Tensor:
    """Compacted queries against the full causal K/V of their own sequence (GQA).

    Token row ``r`` belongs to sequence ``r // seq_len``. Key ``j`` of sequence ``b`` has
    cache position ``kv_offset + j`` and is visible to a query at position ``p`` iff
    ``key_valid[b, j]``, ``kv_offset + j <= p`` and, when ``window > 0``,
    ``kv_offset + j > p - window``. Query heads map to KV heads in groups of
    ``Hq // Hkv``. A query with no visible key gives zeros. No ``T x T`` mask is built.

    Args:
        q: ``[T, Hq * head_dim]``, compacted: row ``i < count`` is the query of token row
            ``idx[i]``.
        idx, count: the executing rows (see the module docstring).
        k, v: ``[B, Hkv, Lk, head_dim]``, every key of the cache (``B * seq_len == T``).
        q_pos: ``[T]`` int64, the position of every token row (indexed by ``idx``).
        key_valid: ``[B, Lk]`` bool or None; False marks padding keys.
        kv_offset: the cache position of key 0.
        seq_len: tokens per sequence in this forward.
        scale: the softmax scale (usually ``head_dim ** -0.5``).
        window: the sliding window in tokens, or 0 for none.
        softcap: attention logit soft-capping (Gemma 2/3): each visible score
            ``s = scale * q.k`` becomes ``softcap * tanh(s / softcap)`` before the softmax;
            0 for none.

    Returns:
        ``[T, Hq * head_dim]`` (contiguous), compacted like ``q``.
    """
    return torch.ops.skipgpt.sparse_query_attention.default(
        q, idx, count, k, v, q_pos, key_valid, kv_offset, seq_len, scale, window, softcap
    )


# Old names of ops, kept loadable: each is also declared in C++ with the same schema and kernels.
OLD_NAMES = {"q_proj_rope": "gather_linear"}
q_proj_rope = gather_linear


def linear_scatter_add_(
    h: Tensor,
    a: Tensor,
    idx: Tensor,
    count: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    post_norm_weight: Tensor | None = None,
    post_norm_eps: float = 0.0,
    out_scale: float = 1.0,
) -> None:
    """The O projection scatter-added into the residual, in place:
    ``h[idx[i]] += out_scale * post_norm(a[i] @ weight.T + bias)`` for ``i < count``.

    Args:
        h: ``[T, d]``, updated in place (unit stride in its last dimension; no two elements
            may share memory).
        a: ``[T, K]``, compacted (row ``i`` belongs to token row ``idx[i]``); must not share
            memory with ``h``.
        idx, count: the executing rows (see the module docstring).
        weight: ``[d, K]``; bias: ``[d]`` or None.
        post_norm_weight: ``[d]`` or None: an RMSNorm of each projected row before the add
            (Gemma 2/3, OLMo 2), in fp32, scaled by this weight and rounded once.
        post_norm_eps: its epsilon.
        out_scale: a multiplier on the added rows (Granite's residual multiplier).
    """
    torch.ops.skipgpt.linear_scatter_add_.default(
        h, a, idx, count, weight, bias, post_norm_weight, post_norm_eps, out_scale
    )


# The devices whose kernels of linear_scatter_add_ and skip_mlp_ implement more than the Llama
# family's math: the epilogue (post_norm_weight, out_scale), an absent pre-norm and GeLU-tanh.
# On a device not listed, the layer runs those steps in PyTorch on the compacted rows.
EPILOGUE_DEVICES = ("cpu", "cuda")


def skip_mlp_(
    h: Tensor,
    idx: Tensor,
    count: Tensor,
    norm_weight: Tensor | None,
    eps: float,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    activation: str = "silu",
    post_norm_weight: Tensor | None = None,
    post_norm_eps: float = 0.0,
    out_scale: float = 1.0,
) -> None:
    """The whole MLP of the executing rows, in place:
    ``h[r] += out_scale * post_norm(down(act(gate(n)) * up(n)))`` with ``n = RMSNorm(h[r])``,
    for ``r`` in ``idx[:count]``. Skipped rows are not read; with ``count == 0`` no weight is
    read.

    Args:
        h: ``[T, d]``, updated in place (unit stride in its last dimension; no two elements
            may share memory).
        idx, count: the executing rows (see the module docstring).
        norm_weight: ``[d]``, the MLP's input RMSNorm weight, or None for no input norm
            (OLMo 2); eps: its epsilon.
        gate_weight, up_weight: ``[I, d]``; down_weight: ``[d, I]`` (no biases). Row slices
            of a fused gate/up weight (Phi-3) are fine.
        activation: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU with the tanh GeLU, Gemma).
        post_norm_weight, post_norm_eps, out_scale: as in :func:`linear_scatter_add_`.
    """
    torch.ops.skipgpt.skip_mlp_.default(
        h, idx, count, norm_weight, eps, gate_weight, up_weight, down_weight, activation,
        post_norm_weight, post_norm_eps, out_scale,
    )
