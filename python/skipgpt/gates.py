"""Gate policies of the masked path: SkipGPT's routers and the dynamic baselines.

- ``router`` (SkipGPT): per token, ``p_exec > threshold``. In training the decision is made on
  the margin plus ``noise`` times a Gumbel difference (a standard logistic sample), with the
  straight-through gradient of ``sigmoid(noisy margin / tau)``: ``noise = 1`` is the paper's
  hard Gumbel-softmax sample, ``noise = 0`` the deterministic straight-through gate, whose
  forward is exactly the inference rule.
- ``topk`` (MoD-D, Mixture-of-Depths retro-fitted): per layer and sequence, the ``capacity``
  fraction of valid tokens with the highest router margin executes. Top-k looks at the whole
  sequence, so it is not causal: evaluate it with teacher-forced perplexity over whole windows;
  in token-by-token generation every step is a sequence of one and always executes.
- ``random``: each token executes with probability ``capacity``, from a fixed hash of
  (seed, layer, module, batch row, position): deterministic, and independent of content.
"""

from __future__ import annotations

import math

import torch

POLICIES = ("router", "topk", "random")


def router_gate(
    logits: torch.Tensor, straight_through: bool, tau: float, threshold_logit: float, noise: float = 1.0
) -> torch.Tensor:
    """The execute gate ``[...]`` of a router's logits ``[..., 2]`` (index 0 = execute).

    Without ``straight_through``: the inference rule, ``margin > threshold_logit`` (no gradient).
    With it: the forward is the hard decision on ``margin + noise * L`` (``L`` the difference of
    two Gumbel samples, i.e. standard logistic), the backward the gradient of
    ``sigmoid((margin + noise * L - threshold_logit) / tau)``. For two logits this is exactly
    the hard Gumbel-softmax at ``noise = 1``; at ``noise = 0`` it is deterministic.
    """
    margin = logits[..., 0] - logits[..., 1]
    if not straight_through:
        return (margin > threshold_logit).to(logits.dtype)
    if noise:
        u = torch.rand_like(margin).clamp_(torch.finfo(margin.dtype).tiny, 1.0)
        margin = margin + noise * (torch.log(u) - torch.log1p(-u))  # logistic = Gumbel - Gumbel
    z = margin - threshold_logit
    soft = torch.sigmoid(z / tau)
    hard = (z > 0).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly the hard value in the forward


def topk_gate(logits: torch.Tensor, valid: torch.Tensor | None, capacity: float, straight_through: bool) -> torch.Tensor:
    margin = logits[..., 0] - logits[..., 1]  # [B, S]
    if valid is None:
        valid = torch.ones_like(margin, dtype=torch.bool)
    k = torch.ceil(valid.sum(-1, keepdim=True).to(margin.dtype) * capacity)  # [B, 1] per sequence
    ranked = margin.masked_fill(~valid, float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(margin.shape[-1], device=margin.device).expand_as(order))
    hard = ((rank < k) & valid).to(margin.dtype)
    if straight_through:
        soft = torch.sigmoid(margin)
        return hard + (soft - soft.detach())  # exactly the hard value in the forward
    return hard


def random_gate(shape: tuple[int, int], positions: torch.Tensor, capacity: float, seed: int, layer: int, module: int) -> torch.Tensor:
    B, S = shape
    rows = torch.arange(B, device=positions.device).view(B, 1)
    pos = positions.expand(B, S)
    # A 32-bit integer hash (multiply-xorshift); int64 arithmetic keeps it exact.
    x = (pos * 2654435761 + rows * 40503 + (seed * 131 + layer * 2 + module) * 2246822519) % (1 << 32)
    for mul in (0x7FEB352D, 0x846CA68B):
        x = x ^ (x >> 16)
        x = (x * mul) % (1 << 32)
    x = x ^ (x >> 16)
    return (x.to(torch.float64) / 2**32 < capacity).to(torch.float32)


def check_capacity(capacity: float) -> None:
    if not (0.0 < capacity <= 1.0) or math.isnan(capacity):
        raise ValueError(f"capacity must be in (0, 1], got {capacity}")
