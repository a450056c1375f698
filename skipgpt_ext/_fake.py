"""Fake (meta) kernels so every op traces under ``torch.compile`` and ``opcheck``.

Outputs never have data-dependent shapes: compacted buffers have T rows plus a count.
"""

from __future__ import annotations

import torch
from torch.library import register_fake


@register_fake("skipgpt::route_norm")
def _route_norm(h, norm_weight, eps, router_weight, router_bias, threshold, row_valid):
    T = h.shape[0]
    idx = h.new_empty(T, dtype=torch.int64)
    count = h.new_empty((), dtype=torch.int64)
    x_norm = h.new_empty(h.shape)  # contiguous whatever h's strides: what the kernels return
    return x_norm, idx, count, torch.empty_like(idx), torch.empty_like(count)


@register_fake("skipgpt::compact")
def _compact(mask):
    return mask.new_empty(mask.numel(), dtype=torch.int64), mask.new_empty((), dtype=torch.int64)


@register_fake("skipgpt::gather_linear")
def _gather_linear(x, idx, count, weight, bias, head_norm_weight, head_norm_eps, cos, sin, head_dim=0, whole_norm=False):
    return x.new_empty(x.shape[0], weight.shape[0])


register_fake("skipgpt::q_proj_rope")(_gather_linear)  # the old name of gather_linear


@register_fake("skipgpt::sparse_query_attention")
def _sparse_query_attention(q, idx, count, k, v, q_pos, key_valid, kv_offset, seq_len, scale, window, softcap=0.0):
    return q.new_empty(q.shape)  # contiguous, like the kernels' output


@register_fake("skipgpt::linear_scatter_add_")
def _linear_scatter_add_(h, a, idx, count, weight, bias, post_norm_weight=None, post_norm_eps=0.0, out_scale=1.0):
    return None


@register_fake("skipgpt::skip_mlp_")
def _skip_mlp_(h, idx, count, norm_weight, eps, gate_weight, up_weight, down_weight, activation="silu",
               post_norm_weight=None, post_norm_eps=0.0, out_scale=1.0):
    return None
