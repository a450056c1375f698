"""Thin wrappers over ``torch.ops.skipgpt``: the only module that touches the native ops.

Signatures and semantics are those of :mod:`skipgpt_ext.reference` (the executable spec).
"""

from __future__ import annotations

import torch

__all__ = [
    "route_norm",
    "compact",
    "q_proj_rope",
    "sparse_query_attention",
    "linear_scatter_add_",
    "skip_mlp_",
]


def route_norm(h, norm_weight, eps, router_weight, router_bias, threshold, row_valid):
    return torch.ops.skipgpt.route_norm.default(
        h, norm_weight, eps, router_weight, router_bias, threshold, row_valid
    )


def compact(mask):
    return torch.ops.skipgpt.compact.default(mask)


def q_proj_rope(x, idx, count, weight, bias, head_norm_weight, head_norm_eps, cos, sin):
    return torch.ops.skipgpt.q_proj_rope.default(
        x, idx, count, weight, bias, head_norm_weight, head_norm_eps, cos, sin
    )


def sparse_query_attention(q, idx, count, k, v, q_pos, key_valid, kv_offset, seq_len, scale, window):
    return torch.ops.skipgpt.sparse_query_attention.default(
        q, idx, count, k, v, q_pos, key_valid, kv_offset, seq_len, scale, window
    )


def linear_scatter_add_(h, a, idx, count, weight, bias):
    torch.ops.skipgpt.linear_scatter_add_.default(h, a, idx, count, weight, bias)


def skip_mlp_(h, idx, count, norm_weight, eps, gate_weight, up_weight, down_weight):
    torch.ops.skipgpt.skip_mlp_.default(
        h, idx, count, norm_weight, eps, gate_weight, up_weight, down_weight
    )
