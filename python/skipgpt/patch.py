"""Attach SkipGPT to a Hugging Face model and take it off again, in the style of peft.

``apply`` gives every decoder layer two routers and swaps the layer's class for a subclass
whose forward skips per token (:mod:`skipgpt.layer`). No weight of the model is touched, so
``remove`` restores the original model exactly. ``load_skipgpt`` is peft's ``from_pretrained``:
a model (or its path) with a saved SkipGPT artefact (routers, and a LoRA adapter if it has one)
put on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .adapters import adapter_for, unwrap
from .checkpoint import assign_routers, model_fit, read_checkpoint, read_config
from .config import SkipConfig
from .layer import SkipDecoderLayerMixin
from .router import Router
from .skip_state import FORWARD_KWARG, SkipState, is_patched, state

_SKIP_CLASSES: dict[type, type] = {}


def _skip_class(layer_cls: type) -> type:
    if layer_cls not in _SKIP_CLASSES:
        _SKIP_CLASSES[layer_cls] = type(f"Skip{layer_cls.__name__}", (SkipDecoderLayerMixin, layer_cls), {})
    return _SKIP_CLASSES[layer_cls]


def apply(model: nn.Module, config: SkipConfig | None = None, from_dir: str | Path | None = None) -> nn.Module:
    """Attach two routers to every decoder layer; returns the same (patched) model.

    Args:
        model: a supported ``*ForCausalLM`` (optionally inside a peft wrapper).
        config: the :class:`SkipConfig`; defaults to ``SkipConfig()``, or to the config saved
            in ``from_dir``.
        from_dir: a directory written by :func:`skipgpt.save_routers` (or an authors' router
            checkpoint file) to load the routers from.
    """
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
            device = next(layer.self_attn.parameters()).device
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
    state(model).set_config(mode=mode)


def set_threshold(model: nn.Module, threshold: float) -> None:
    """Execute iff ``p_exec > threshold`` (0 executes everything, 1 skips everything)."""
    state(model).set_config(threshold=threshold)


def stats(model: nn.Module, cumulative: bool = False) -> dict[str, Any]:
    """Realised skip rates of the last complete forward (or of all forwards since the last reset).

    Padding tokens never count. Returns per-layer attention/MLP skip rates, their means, the
    module-count sparsity and the parameter-weighted sparsity.
    """
    st = state(model)
    if cumulative:
        return st.summary_of_counts(st.cum_exec.cpu(), float(st.cum_tokens))
    last = st.last_complete
    if last is None:
        raise RuntimeError("no complete forward pass has run since SkipGPT was applied")
    return st.summary(*last)


def reset_stats(model: nn.Module) -> None:
    state(model).reset_cumulative()


def load_skipgpt(model_or_path=None, artefact: str | os.PathLike | None = None, merge: bool = True, dtype=torch.float32):
    """Load a model with SkipGPT routers (and a LoRA adapter, if the artefact has one).

    ``model_or_path`` is a model, or what :func:`skipgpt.models.load_model` loads (a folder, a
    hub id, or None for the default SmolLM2-135M, in ``dtype``); ``artefact`` is a
    ``train-routers`` or ``finetune-lora`` output folder (None: the bare model). Returns
    ``(model, tokenizer)``, the tokenizer None when a model was passed, the model in eval mode.
    With ``merge=True`` the LoRA weights are merged, so the skipping modes (which read plain
    ``nn.Linear`` weights) work at inference.
    """
    from . import models

    if isinstance(model_or_path, nn.Module):
        model, tok = model_or_path, None
    else:
        model, tok = models.load_model(model_or_path, dtype=dtype)
    if artefact is None:
        return model, tok
    artefact = Path(artefact)
    apply(model, read_config(artefact), from_dir=artefact)
    if (artefact / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(artefact))
        if merge:
            model = model.merge_and_unload()
    model.eval()
    return model, tok
