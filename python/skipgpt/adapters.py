"""Model-family adapters: only what differs between the supported Hugging Face families.

Everything else (the layer structure, norms, projections, the cache) is shared, so a family is
a few lines here. Add a family by adding an entry to ``FAMILIES``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn


def _no_window(attn: nn.Module) -> int:
    return 0


def _config_window(attn: nn.Module) -> int:
    # Mistral: one window for every layer, straight from the config.
    return int(getattr(attn.config, "sliding_window", None) or 0)


def _layer_window(attn: nn.Module) -> int:
    # Qwen2/Qwen3: the window applies only to the layers typed "sliding_attention".
    return int(getattr(attn, "sliding_window", None) or 0)


@dataclasses.dataclass(frozen=True)
class FamilyAdapter:
    name: str
    causal_lm_class: str
    window: Callable[[nn.Module], int] = _no_window
    qk_norm: bool = False  # Qwen3 normalises each head of q and k before RoPE

    def q_norm(self, attn: nn.Module) -> nn.Module | None:
        return attn.q_norm if self.qk_norm else None

    def k_norm(self, attn: nn.Module) -> nn.Module | None:
        return attn.k_norm if self.qk_norm else None

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that owns ``layers`` (e.g. ``LlamaModel``)."""
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers


FAMILIES: dict[str, FamilyAdapter] = {
    a.causal_lm_class: a
    for a in (
        FamilyAdapter("llama", "LlamaForCausalLM"),
        FamilyAdapter("mistral", "MistralForCausalLM", window=_config_window),
        FamilyAdapter("qwen2", "Qwen2ForCausalLM", window=_layer_window),
        FamilyAdapter("qwen3", "Qwen3ForCausalLM", window=_layer_window, qk_norm=True),
    )
}


class UnsupportedModelError(ValueError):
    pass


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def adapter_for(model: nn.Module) -> FamilyAdapter:
    name = type(unwrap(model)).__name__
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"SkipGPT does not support {name}. Supported model classes: {sorted(FAMILIES)}."
        ) from None


def norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
