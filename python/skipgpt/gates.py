"""Gate policies of the masked path: SkipGPT's routers and the dynamic baselines.

- ``router`` (SkipGPT): per token, hard straight-through Gumbel in training, else
  ``p_exec > threshold``.
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
import torch.nn.functional as F

POLICIES = ("router", "topk", "random")


def router_gate(logits: torch.Tensor, gumbel: bool, tau: float, threshold_logit: float) -> torch.Tensor:
    if gumbel:
        # Hard straight-through: the forward is the exact one-hot, the backward the softmax's.
        return F.gumbel_softmax(logits, tau=tau, hard=True)[..., 0]
    return ((logits[..., 0] - logits[..., 1]) > threshold_logit).to(logits.dtype)


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
        return hard + soft - soft.detach()
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
