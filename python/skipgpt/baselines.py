"""Baselines at matched sparsity, expressed through the same routers and the same evaluation.

- ShortGPT: remove whole layers with the lowest Block Influence, BI = 1 - mean cos(h_in, h_out).
- LLM-Drop (static module drop): remove the attention/MLP sublayers whose output is most
  similar to their input (lowest 1 - cos(x, x + f(x))), until the parameter budget is met.
- MoD-D: a per-layer top-k token capacity (``policy="topk"``), routers tuned the same way
  (:func:`skipgpt.train.train_routers` with ``policy="topk"``).
- Random: each module executes with probability 1 - rate (``policy="random"``).

A static drop is a router with zero weights and a constant margin (+/-``BIG``), so it runs in
every mode (masked, reference, native) and its sparsity is measured like SkipGPT's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .adapters import active_params, adapter_for, unwrap
from .config import SkipConfig
from .patch import apply
from .skip_state import is_patched, state

BIG = 30.0  # margin of a constant router: p_exec = sigmoid(+/-30), far from any threshold


@torch.no_grad()
def sublayer_similarity(model, input_ids: torch.Tensor, attention_mask=None) -> dict[str, torch.Tensor]:
    """Mean cosine similarity, over valid calibration tokens, of each sublayer's input and output
    (residual included) and of each whole layer's input and output (float64)."""
    if is_patched(model):
        raise ValueError("measure similarities on the dense model, before skipgpt.apply")
    base = unwrap(model)
    layers = base.model.layers
    acts: dict[str, list] = {"attn_in": [], "attn_out": [], "mlp_out": []}
    hooks = []
    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, kw: acts["attn_in"].append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o: acts["attn_out"].append(o[0])))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, o: acts["mlp_out"].append(o)))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    valid = attention_mask.bool() if attention_mask is not None else torch.ones(input_ids.shape, dtype=torch.bool)
    cos = lambda a, b: F.cosine_similarity(a[valid].double(), b[valid].double(), dim=-1).mean()  # noqa: E731
    attn_sim, mlp_sim, layer_sim = [], [], []
    for x, a, m in zip(acts["attn_in"], acts["attn_out"], acts["mlp_out"]):
        mid = x + a
        attn_sim.append(cos(x, mid))
        mlp_sim.append(cos(mid, mid + m))
        layer_sim.append(cos(x, mid + m))
    return {"attn": torch.stack(attn_sim), "mlp": torch.stack(mlp_sim), "layer": torch.stack(layer_sim)}


def _param_counts(model) -> tuple[list[int], list[int]]:
    base = unwrap(model)
    layers = adapter_for(base).layers(base)
    pa = [active_params(l.self_attn) for l in layers]
    pm = [active_params(l.mlp) for l in layers]
    return pa, pm


def _closest_prefix(order: list[tuple[int, str]], sizes: dict[tuple[int, str], int], total: int, target: float) -> int:
    """How many modules of ``order`` to drop so the dropped parameter share is closest to target."""
    best, best_err, acc = 0, abs(target), 0
    for i, key in enumerate(order, 1):
        acc += sizes[key]
        err = abs(acc / total - target)
        if err < best_err:
            best, best_err = i, err
    return best


def shortgpt_plan(sim: dict[str, torch.Tensor], model, sparsity: float) -> dict[str, list[int]]:
    """Layers to remove: lowest Block Influence first, as many as bring the parameter share
    closest to ``sparsity``."""
    bi = 1 - sim["layer"]
    pa, pm = _param_counts(model)
    order = [(int(i), "layer") for i in torch.argsort(bi)]
    sizes = {(i, "layer"): pa[i] + pm[i] for i in range(len(pa))}
    n = _closest_prefix(order, sizes, sum(sizes.values()), sparsity)
    drop = sorted(i for i, _ in order[:n])
    return {"attn": drop, "mlp": drop}


def module_drop_plan(sim: dict[str, torch.Tensor], model, sparsity: float) -> dict[str, list[int]]:
    """Sublayers to remove (LLM-Drop): lowest importance 1 - cos(x, x + f(x)) first."""
    pa, pm = _param_counts(model)
    imp = [((1 - float(sim["attn"][i])), i, "attn") for i in range(len(pa))]
    imp += [((1 - float(sim["mlp"][i])), i, "mlp") for i in range(len(pm))]
    order = [(i, k) for _, i, k in sorted(imp)]
    sizes = {(i, "attn"): pa[i] for i in range(len(pa))} | {(i, "mlp"): pm[i] for i in range(len(pm))}
    n = _closest_prefix(order, sizes, sum(sizes.values()), sparsity)
    return {"attn": sorted(i for i, k in order[:n] if k == "attn"), "mlp": sorted(i for i, k in order[:n] if k == "mlp")}


@torch.no_grad()
def apply_static_plan(model, plan: dict[str, list[int]], config: SkipConfig | None = None):
    """Patch ``model`` with constant routers: the modules in ``plan`` always skip, the rest
    always execute."""
    config = config or SkipConfig()
    if not is_patched(model):
        apply(model, config)
    layers = state(model).adapter.layers(unwrap(model))
    for kind, router_name in (("attn", "router_attention"), ("mlp", "router_mlp")):
        dropped = set(plan[kind])
        for i, layer in enumerate(layers):
            router = getattr(layer, router_name)
            if router.router_type != "linear":
                raise ValueError("static plans need linear routers")
            router.weight_predictor.weight.zero_()
            m = -BIG if i in dropped else BIG
            router.weight_predictor.bias.copy_(torch.tensor([m / 2, -m / 2]))
    return model


def baseline(model, name: str, sparsity: float, calib_ids: torch.Tensor | None = None, calib_mask=None, seed: int = 0) -> dict[str, Any]:
    """Patch ``model`` as baseline ``name`` at ``sparsity``: ``shortgpt``, ``module_drop``,
    ``random`` or ``mod_d`` (top-k with untrained routers: tune them with train_routers)."""
    if name in ("shortgpt", "module_drop"):
        if calib_ids is None:
            raise ValueError(f"{name} needs calibration tokens")
        sim = sublayer_similarity(model, calib_ids, calib_mask)
        plan = (shortgpt_plan if name == "shortgpt" else module_drop_plan)(sim, model, sparsity)
        apply_static_plan(model, plan)
        return {"plan": plan, "similarity": {k: v.tolist() for k, v in sim.items()}}
    if name == "random":
        apply(model, SkipConfig(policy="random", capacity=1 - sparsity, seed=seed, mode="masked"))
        return {}
    if name == "mod_d":
        apply(model, SkipConfig(policy="topk", capacity=1 - sparsity, mode="masked"))
        return {}
    raise ValueError(f"unknown baseline {name!r}; choose from shortgpt, module_drop, random, mod_d")
