"""Realised sparsity of a forward pass, by module count or by parameters (METHOD.md section 3).

Works on tensors, so router tuning differentiates through it and statistics reuse it.
"""

from __future__ import annotations

import torch


def realised_sparsity(
    exec_attn: torch.Tensor,
    exec_mlp: torch.Tensor,
    n_tokens: torch.Tensor | float,
    attn_params: torch.Tensor,
    mlp_params: torch.Tensor,
    metric: str,
) -> torch.Tensor:
    """Fraction of skipped work over all valid tokens, layers and both module types.

    Args:
        exec_attn, exec_mlp: ``[L]`` number of valid tokens that executed each module, or
            ``[L, B]``: the same per sequence, for one sparsity per sequence.
        n_tokens: number of valid (non-padding) tokens (``[B]`` with per-sequence counts).
        attn_params, mlp_params: ``[L]`` parameter counts, used by ``metric="params"``.
        metric: ``"modules"`` (the authors' code: every module counts 1) or ``"params"``
            (the paper's "% of parameters": each executed module counts its size).
    """
    n = torch.as_tensor(n_tokens, dtype=exec_attn.dtype, device=exec_attn.device).clamp_min(1)
    rate_attn, rate_mlp = exec_attn / n, exec_mlp / n
    if metric == "modules":
        return 1 - (rate_attn.mean(0) + rate_mlp.mean(0)) / 2
    if metric == "params":
        per_layer = (-1,) + (1,) * (rate_attn.dim() - 1)  # [L] -> [L, 1] for per-sequence counts
        pa = attn_params.to(rate_attn).reshape(per_layer)
        pm = mlp_params.to(rate_mlp).reshape(per_layer)
        return 1 - (rate_attn * pa + rate_mlp * pm).sum(0) / (pa + pm).sum()
    raise ValueError(f"sparsity metric must be 'modules' or 'params', got {metric!r}")
