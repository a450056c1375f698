"""Calibration: fit the routers' bias, input scale or the inference threshold to a few tokens.

None of these train anything. Each runs forwards of the patched model on calibration tokens
and sets one thing; a refused or failed call leaves the model as it was.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .adapters import unwrap
from .patch import router_parameters, set_threshold
from .skip_state import overrides, state


class _Captured(Exception):
    pass


def _layer_input(model: nn.Module, layer: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """Run the model up to ``layer`` and return that layer's input hidden states."""
    box: list[torch.Tensor] = []

    def grab(mod, args, kwargs):
        box.append(kwargs.get("hidden_states", args[0] if args else None))
        raise _Captured

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    except _Captured:
        pass
    finally:
        handle.remove()
    return box[0]


def _midpoint_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """A cut with a fraction ~q of ``values`` at or below it, placed halfway between two distinct
    values, so that no value sits on the cut (ties, e.g. repeated tokens, would flip on rounding)."""
    v = torch.sort(values.double())[0]
    k = min(max(int(round(q * len(v))), 1), len(v) - 1)
    lower = v[k - 1]
    above = v[v > lower]
    upper = above[0] if len(above) else lower + 1.0
    return (lower + upper) / 2


@torch.no_grad()
def calibrate_bias(model: nn.Module, input_ids: torch.Tensor, skip_rate: float, attention_mask=None) -> None:
    """Shift every router's bias so that it skips ``skip_rate`` of the calibration tokens.

    A cheap way to reach a given sparsity from untrained (or trained) routers without tuning.
    Layers are calibrated in order, each on the hidden states produced by the already
    calibrated layers before it, so the realised rate on this data matches ``skip_rate``.
    """
    st = state(model)
    thr = st.config.threshold_logit
    if isinstance(skip_rate, bool) or not isinstance(skip_rate, numbers.Real) or not 0.0 < skip_rate < 1.0:
        raise ValueError(f"calibrate_bias: skip_rate must be in (0, 1), got {skip_rate!r}")
    if not math.isfinite(thr):
        raise ValueError(f"calibrate_bias needs a threshold strictly between 0 and 1, got {st.config.threshold}")
    layers = st.adapter.layers(unwrap(model))
    saved = [p.detach().clone() for p in router_parameters(model)]
    try:
        with overrides(model, mode="masked"):
            for layer in layers:
                h = _layer_input(model, layer, input_ids, attention_mask)
                h = h.reshape(-1, h.shape[-1])
                if st.valid is not None:
                    h = h[st.valid.reshape(-1)]
                for router in (layer.router_attention, layer.router_mlp):
                    logits = router(h)
                    shift = thr - _midpoint_quantile(logits[:, 0] - logits[:, 1], skip_rate)
                    last = router.output_layer
                    last.bias[0] += float(shift) / 2
                    last.bias[1] -= float(shift) / 2
    except BaseException:  # a failed calibration leaves the routers as they were
        for p, old in zip(router_parameters(model), saved):
            p.copy_(old)
        raise


@torch.no_grad()
def calibrate_input_scale(model: nn.Module, input_ids: torch.Tensor, attention_mask=None) -> list[float]:
    """Set each layer's routers' ``input_scale`` to 1 / RMS of that layer's input h_l.

    Measured with every module executing (the dense residual stream), median over valid tokens.
    Call it before router tuning; see :class:`skipgpt.Router` for why. Returns the scales.
    """
    st = state(model)
    layers = st.adapter.layers(unwrap(model))
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: captured.__setitem__(i, kwargs.get("hidden_states", args[0] if args else None)),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    try:
        with overrides(model, mode="masked", threshold=0.0, policy="router"):
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    scales = []
    for i, layer in enumerate(layers):
        h = captured[i].reshape(-1, captured[i].shape[-1]).float()
        if st.valid is not None:
            h = h[st.valid.reshape(-1)]
        rms = h.pow(2).mean(-1).sqrt().median().clamp_min(1e-6)
        scales.append(float(1.0 / rms))
        for router in (layer.router_attention, layer.router_mlp):
            router.input_scale.fill_(scales[-1])
    return scales


@torch.no_grad()
def calibrate_threshold(
    model: nn.Module, input_ids, target: float, metric: str = "params", attention_mask=None, iters: int = 20,
    tol: float = 1e-3,
) -> float:
    """Set the global inference threshold so the realised sparsity on these tokens is ``target``.

    Router tuning meets its target on Gumbel samples; the deterministic rule p_exec > 0.5 can
    land elsewhere (routers still unsure execute every time). Sparsity grows monotonically
    with the threshold, so a bisection on it finds the rate: at most ``iters`` halvings, each a
    forward over every token set, stopping at the first threshold whose rate is within ``tol``
    of the target (default 0.1 point). Returns the threshold (also set). A refused or failed
    call leaves the threshold as it was.

    ``input_ids`` may also be a list of token tensors, one per kind of text (for example the
    sources of a training mixture), with ``attention_mask`` None or a list of the same length.
    Token-aware routers skip more of some texts than others, so one threshold cannot put
    every source on the target. With a list, the threshold puts the midpoint of the highest
    and the lowest source's rate on the target: the largest deviation of any source from the
    target is then as small as one threshold can make it, whatever each source's share.
    """
    st = state(model)
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0.0 <= target <= 1.0:
        raise ValueError(f"calibrate_threshold: target must be a sparsity in [0, 1], got {target!r}")
    if metric not in ("params", "modules"):
        raise ValueError(f"calibrate_threshold: metric must be 'params' or 'modules', got {metric!r}")
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise ValueError(f"calibrate_threshold: iters must be a positive integer, got {iters!r}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0.0 <= tol < 1.0:
        raise ValueError(f"calibrate_threshold: tol must be a sparsity difference in [0, 1), got {tol!r}")
    if isinstance(input_ids, torch.Tensor):
        sets, masks = [input_ids], [attention_mask]
    else:
        sets = list(input_ids)
        if not sets or not all(isinstance(t, torch.Tensor) for t in sets):
            raise TypeError("calibrate_threshold: input_ids must be a token tensor or a non-empty list of them, "
                            f"got {type(input_ids).__name__}")
        masks = [None] * len(sets) if attention_mask is None else list(attention_mask)
        if len(masks) != len(sets):
            raise ValueError(f"calibrate_threshold: {len(masks)} attention masks for {len(sets)} token sets")
    key = "param_sparsity" if metric == "params" else "module_sparsity"

    def rate(ids, mask) -> float:
        model(input_ids=ids, attention_mask=mask)
        fwd = st.forward_state()  # this call's forward, whatever other threads run
        return st.summary(fwd.exec_counts, fwd.n_valid)[key]

    lo, hi = 0.0, 1.0
    with overrides(model, threshold=st.config.threshold):  # the trial thresholds do not outlive the search
        for _ in range(iters):
            mid = (lo + hi) / 2
            set_threshold(model, mid)
            rates = [rate(ids, mask) for ids, mask in zip(sets, masks)]
            s = (max(rates) + min(rates)) / 2  # each rate, and so this, grows with the threshold
            if abs(s - target) <= tol:
                lo = hi = mid
                break
            lo, hi = (mid, hi) if s < target else (lo, mid)
    set_threshold(model, (lo + hi) / 2)
    return st.config.threshold
