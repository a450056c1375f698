"""The importance prior of router tuning: what each module costs when it is skipped.

A few modules of a pretrained model are critical: on SmolLM2-135M, skipping the layer-0 MLP
for every token costs about 8 nats, while most modules cost under 0.3. Router tuning that lets
the sparsity penalty push such a module towards skipping fails, and one that starts there
rarely recovers. So, before tuning:

1. :func:`module_costs` measures, once, each module's ablation cost: the increase of the mean
   next-token loss when that one module is skipped for every token (everything else dense).
2. :func:`apply_prior` pins the modules that cost more than ``pin_cost`` nats (their routers
   always execute and are not trained), and can raise the other routers' initial execute
   margin with their cost, so costlier modules start further from skipping.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .adapters import adapter_for, unwrap
from .skip_state import state

# Margin of a pinned router: zero weights and a bias margin far beyond any threshold logit
# (threshold 1 - 1e-12 is logit 27.6) or noise the training gate adds (P(logistic > 60) ~ 1e-26).
PIN_MARGIN = 60.0
MODULES = ("attention", "mlp")


@torch.no_grad()
def module_costs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
    """Each module's ablation cost in nats on ``input_ids`` ``[B, S]``.

    Works on a plain or a patched model (a patched one must execute every token, e.g. a fresh
    ``init_execute_bias`` router is not enough: pass the unpatched model, or threshold 0). A
    module is skipped by zeroing its output for every token, which is exactly what a skip
    does to the residual stream. Returns ``{"base_loss", "costs": [[attn, mlp] per layer],
    "tokens"}``.
    """
    base = unwrap(model)
    layers = adapter_for(base).layers(base)
    was_training = model.training
    model.eval()

    def loss() -> float:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=_labels(input_ids, attention_mask))
        return float(out.loss)

    try:
        base_loss = loss()
        costs = []
        for layer in layers:
            row = []
            for module in (layer.self_attn, layer.mlp):
                handle = module.register_forward_hook(_zero_output)
                try:
                    row.append(loss() - base_loss)
                finally:
                    handle.remove()
            costs.append(row)
    finally:
        model.train(was_training)
    n = int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
    return {"base_loss": base_loss, "costs": costs, "tokens": n}


def _labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return input_ids
    return input_ids.masked_fill(attention_mask == 0, -100)


def _zero_output(module, args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def prior_margins(costs: Sequence[Sequence[float]], base: float, scale: float, cap: float = 4.0) -> torch.Tensor:
    """Initial execute margins ``[L, 2]``: ``base + scale * log10(cost / median cost)``, clamped
    to ``[base, base + cap]``. Monotone in the cost; never below ``base``, so cheap modules do
    not start out skipping (which measured worse than a flat start)."""
    c = torch.tensor(costs, dtype=torch.float64).clamp_min(1e-4)
    med = c.flatten().median()
    return (base + scale * torch.log10(c / med)).clamp(base, base + cap)


@torch.no_grad()
def apply_prior(
    model: nn.Module,
    costs: Sequence[Sequence[float]],
    pin_cost: float = math.inf,
    bias_scale: float = 0.0,
) -> list[tuple[int, str]]:
    """Pin the routers of modules that cost at least ``pin_cost`` nats, and (``bias_scale > 0``)
    set the other routers' execute margins from :func:`prior_margins` around their current
    margin. Returns the pinned ``(layer, "attention" | "mlp")`` pairs, in order."""
    st = state(model)
    layers = st.adapter.layers(unwrap(model))
    if len(costs) != len(layers) or any(len(r) != 2 for r in costs):
        raise ValueError(f"costs must be [{len(layers)}, 2] (layers x attention/MLP), got {len(costs)} rows")
    pinned = []
    raise_by = prior_margins(costs, 0.0, bias_scale) if bias_scale > 0 else None  # margin increases
    for i, layer in enumerate(layers):
        for j, kind in enumerate(MODULES):
            router = getattr(layer, f"router_{kind}")
            last = router.output_layer
            if costs[i][j] >= pin_cost:
                last.weight.zero_()
                last.bias.copy_(torch.tensor([PIN_MARGIN / 2, -PIN_MARGIN / 2]))
                pinned.append((i, kind))
            elif raise_by is not None:
                last.bias += torch.tensor([float(raise_by[i, j]) / 2, -float(raise_by[i, j]) / 2])
    return pinned


def pinned_routers(model: nn.Module, pinned: Sequence[tuple[int, str]]) -> list[nn.Module]:
    layers = state(model).adapter.layers(unwrap(model))
    return [getattr(layers[i], f"router_{kind}") for i, kind in pinned]
