"""Attach SkipGPT to a Hugging Face model and take it off again, in the style of peft.

``apply`` gives every decoder layer two routers and swaps the layer's class for a subclass
whose forward skips per token (:mod:`skipgpt.layer`). No weight of the model is touched, so
``remove`` restores the original model exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .adapters import adapter_for, unwrap
from .config import SkipConfig
from .layer import FORWARD_KWARG, SkipDecoderLayerMixin, SkipState
from .router import Router
from .sparsity import realised_sparsity

_SKIP_CLASSES: dict[type, type] = {}


def _skip_class(layer_cls: type) -> type:
    if layer_cls not in _SKIP_CLASSES:
        _SKIP_CLASSES[layer_cls] = type(f"Skip{layer_cls.__name__}", (SkipDecoderLayerMixin, layer_cls), {})
    return _SKIP_CLASSES[layer_cls]


def is_patched(model: nn.Module) -> bool:
    return hasattr(unwrap(model), "skipgpt_state")


def state(model: nn.Module) -> SkipState:
    base = unwrap(model)
    if not hasattr(base, "skipgpt_state"):
        raise ValueError("this model has no SkipGPT routers; call skipgpt.apply(model, SkipConfig()) first")
    return base.skipgpt_state


def apply(model: nn.Module, config: SkipConfig | None = None, from_dir: str | Path | None = None) -> nn.Module:
    """Attach two routers to every decoder layer; returns the same (patched) model.

    Args:
        model: a supported ``*ForCausalLM`` (optionally inside a peft wrapper).
        config: the :class:`SkipConfig`; defaults to ``SkipConfig()``, or to the config saved
            in ``from_dir``.
        from_dir: a directory written by :func:`skipgpt.save_routers` (or an authors' router
            checkpoint file) to load the routers from.
    """
    from .checkpoint import assign_routers, model_fit, read_checkpoint, read_config

    base = unwrap(model)
    adapter = adapter_for(base)
    if is_patched(base):
        raise ValueError("SkipGPT is already applied to this model; call skipgpt.remove(model) first")
    explicit_config = config is not None
    if config is None:
        config = read_config(from_dir) if from_dir is not None and Path(from_dir).is_dir() else SkipConfig()
    config.validate()
    layers = adapter.layers(base)
    hidden = base.config.hidden_size
    # Everything that can be refused is checked before the model changes: a refused apply leaves
    # it exactly as it was (and draws no random router weights).
    loaded = None
    if from_dir is not None:
        loaded = read_checkpoint(from_dir, model_fit(adapter, len(layers), hidden), config.router_type)

    st = SkipState(config, adapter, layers)
    try:
        for layer in layers:
            device = layer.input_layernorm.weight.device
            layer.router_attention = Router(hidden, config.router_type, config.init_execute_bias, device=device)
            layer.router_mlp = Router(hidden, config.router_type, config.init_execute_bias, device=device)
            layer.__class__ = _skip_class(type(layer))
            # A plain attribute, not a submodule: the state holds no weights and must not be saved.
            object.__setattr__(layer, "skip_state", st)

        decoder = adapter.decoder(base)
        # The hooks find the state on the module they are called with (not in a closure), so a
        # deep copy of the model runs with its own state.
        object.__setattr__(decoder, "_skipgpt_state", st)
        hooks = (
            decoder.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True),
            decoder.register_forward_hook(_decoder_post_hook, with_kwargs=True, always_call=True),
        )
        object.__setattr__(base, "skipgpt_state", st)
        object.__setattr__(base, "_skipgpt_hooks", hooks)
        if loaded is not None:  # an explicit config keeps its own threshold
            assign_routers(model, loaded, restore_threshold=not explicit_config)
    except BaseException:
        _undo(base, adapter)
        raise
    return model


def remove(model: nn.Module) -> nn.Module:
    """Take the routers off and restore the original layer classes; returns the model."""
    base = unwrap(model)
    st = state(base)
    _undo(base, st.adapter)
    return model


def _undo(base: nn.Module, adapter) -> None:
    """Take off whatever :func:`apply` put on (also a partial application)."""
    for layer in adapter.layers(base):
        if isinstance(layer, SkipDecoderLayerMixin):
            layer.__class__ = next(c for c in type(layer).__mro__[1:] if c is not SkipDecoderLayerMixin)
        for name in ("router_attention", "router_mlp"):
            if name in layer._modules:
                delattr(layer, name)
        layer.__dict__.pop("skip_state", None)
    for hook in base.__dict__.pop("_skipgpt_hooks", ()):
        hook.remove()
    adapter.decoder(base).__dict__.pop("_skipgpt_state", None)
    base.__dict__.pop("skipgpt_state", None)


def _decoder_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    """Start one forward: its :class:`ForwardState` goes to this forward's layers as a keyword
    argument (so concurrent forwards and copies of the model never share one)."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    inputs = embeds if embeds is not None else ids
    record_hidden = bool(kwargs.get("output_hidden_states") or module.config.output_hidden_states)
    fwd = module._skipgpt_state._begin(
        mask, inputs.shape[0], inputs.shape[1], clone_first=embeds is not None, clone_all=record_hidden,
        device=inputs.device,
    )
    return args, {**kwargs, FORWARD_KWARG: fwd}


def _decoder_post_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output):
    # Also called when the forward raised (always_call; output None then): nothing accumulates.
    fwd = kwargs.get(FORWARD_KWARG)
    if fwd is not None:
        module._skipgpt_state._end(fwd, completed=output is not None)
    return None


def routers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(qualified_name, router)`` pairs, in layer order, attention before MLP."""
    base = unwrap(model)
    for name, module in base.named_modules():
        if isinstance(module, Router):
            yield name, module


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, r in routers(model) for p in r.parameters()]


def set_mode(model: nn.Module, mode: str) -> None:
    """``masked`` | ``reference`` | ``native`` | ``auto`` (native if built, else reference)."""
    _set_config(model, mode=mode)


@contextlib.contextmanager
def overrides(model: nn.Module, **fields: Any):
    """Set :class:`SkipConfig` fields for the duration of a ``with`` block, then restore them
    (also on error). E.g. ``with overrides(model, threshold=0.0, gate="deterministic"):`` runs
    the dense model."""
    cfg = state(model).config
    old = {k: getattr(cfg, k) for k in fields}
    try:
        for k, v in fields.items():
            setattr(cfg, k, v)
        cfg.validate()
        yield cfg
    finally:
        for k, v in old.items():
            setattr(cfg, k, v)


def set_threshold(model: nn.Module, threshold: float) -> None:
    """Execute iff ``p_exec > threshold`` (0 executes everything, 1 skips everything)."""
    _set_config(model, threshold=threshold)


def _set_config(model: nn.Module, **fields: Any) -> None:
    """Set config fields if the result validates; a refused value changes nothing."""
    st = state(model)
    new = dataclasses.replace(st.config, **fields)  # validated (and numbers normalised) here
    for name in fields:
        setattr(st.config, name, getattr(new, name))


def stats(model: nn.Module, cumulative: bool = False) -> dict[str, Any]:
    """Realised skip rates of the last complete forward (or of all forwards since the last reset).

    Padding tokens never count. Returns per-layer attention/MLP skip rates, their means, the
    module-count sparsity and the parameter-weighted sparsity.
    """
    st = state(model)
    if cumulative:
        return _summary(st, st.cum_exec.cpu(), float(st.cum_tokens))
    last = st.last_complete
    if last is None:
        raise RuntimeError("no complete forward pass has run since SkipGPT was applied")
    return _forward_summary(st, *last)


def _forward_summary(st: SkipState, exec_counts, n_valid) -> dict[str, Any]:
    counts = torch.tensor([[float(a), float(m)] for a, m in exec_counts], dtype=torch.float64)
    return _summary(st, counts, float(n_valid))


def _summary(st: SkipState, counts: torch.Tensor, n: float) -> dict[str, Any]:
    ea, em = counts[:, 0], counts[:, 1]
    denom = max(n, 1.0)
    return {
        "tokens": int(n),
        "layers": [
            {"attn_skip": 1 - float(a) / denom, "mlp_skip": 1 - float(m) / denom} for a, m in zip(ea, em)
        ],
        "attn_skip": 1 - float(ea.mean()) / denom,
        "mlp_skip": 1 - float(em.mean()) / denom,
        "module_sparsity": float(realised_sparsity(ea, em, n, st.attn_params, st.mlp_params, "modules")),
        "param_sparsity": float(realised_sparsity(ea, em, n, st.attn_params, st.mlp_params, "params")),
    }


def reset_stats(model: nn.Module) -> None:
    state(model).reset_cumulative()


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
    old_mode = st.config.mode
    saved = [p.detach().clone() for p in router_parameters(model)]
    st.config.mode = "masked"
    try:
        for layer in layers:
            h = _layer_input(model, layer, input_ids, attention_mask)
            h = h.reshape(-1, h.shape[-1])
            if st.valid is not None:
                h = h[st.valid.reshape(-1)]
            for router in (layer.router_attention, layer.router_mlp):
                logits = router(h)
                shift = thr - _midpoint_quantile(logits[:, 0] - logits[:, 1], skip_rate)
                last = router.weight_predictor if router.router_type == "linear" else router.weight_predictor[2]
                last.bias[0] += float(shift) / 2
                last.bias[1] -= float(shift) / 2
    except BaseException:  # a failed calibration leaves the routers as they were
        for p, old in zip(router_parameters(model), saved):
            p.copy_(old)
        raise
    finally:
        st.config.mode = old_mode


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
    old = (st.config.mode, st.config.threshold, st.config.policy)
    try:
        st.config.mode, st.config.threshold, st.config.policy = "masked", 0.0, "router"
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        st.config.mode, st.config.threshold, st.config.policy = old
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
    model: nn.Module, input_ids: torch.Tensor, target: float, metric: str = "params", attention_mask=None, iters: int = 20
) -> float:
    """Set the global inference threshold so the realised sparsity on these tokens is ``target``.

    Router tuning meets its target on Gumbel samples; the deterministic rule p_exec > 0.5 can
    land elsewhere (routers still unsure execute every time). Sparsity grows monotonically
    with the threshold, so a bisection on it finds the rate. Returns the threshold (also set).
    A refused or failed call leaves the threshold as it was.
    """
    st = state(model)
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0.0 <= target <= 1.0:
        raise ValueError(f"calibrate_threshold: target must be a sparsity in [0, 1], got {target!r}")
    if metric not in ("params", "modules"):
        raise ValueError(f"calibrate_threshold: metric must be 'params' or 'modules', got {metric!r}")
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise ValueError(f"calibrate_threshold: iters must be a positive integer, got {iters!r}")
    key = "param_sparsity" if metric == "params" else "module_sparsity"
    old = st.config.threshold
    try:
        lo, hi = 0.0, 1.0
        for _ in range(iters):
            mid = (lo + hi) / 2
            set_threshold(model, mid)
            model(input_ids=input_ids, attention_mask=attention_mask)
            fwd = st.forward_state()  # this call's forward, whatever other threads run
            s = _forward_summary(st, fwd.exec_counts, fwd.n_valid)[key]
            lo, hi = (mid, hi) if s < target else (lo, mid)
        set_threshold(model, (lo + hi) / 2)
    except BaseException:
        set_threshold(model, old)
        raise
    return st.config.threshold
