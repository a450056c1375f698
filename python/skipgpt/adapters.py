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
    # Mistral, Phi-3: one window for every layer, straight from the config.
    return int(getattr(attn.config, "sliding_window", None) or 0)


def _layer_window(attn: nn.Module) -> int:
    # Qwen2/3, Gemma 2/3, SmolLM3: the window applies only to the layers typed "sliding_attention".
    return int(getattr(attn, "sliding_window", None) or 0)


def _attn_softcap(attn: nn.Module) -> float:
    # Gemma 2: scores become cap * tanh(scores / cap) before the softmax.
    return float(getattr(attn, "attn_logit_softcapping", None) or 0.0)


def _layer_rope(attn: nn.Module) -> bool:
    # SmolLM3: layers listed as 0 in config.no_rope_layers use no position embedding (NoPE).
    return bool(getattr(attn, "use_rope", True))


def _residual_multiplier(layer: nn.Module) -> float:
    # Granite: each module's output is scaled before the residual add.
    return float(getattr(layer, "residual_multiplier", 1.0))


def _no_softcap(attn: nn.Module) -> float:
    return 0.0


def _always(attn: nn.Module) -> bool:
    return True


def _one(layer: nn.Module) -> float:
    return 1.0


# Where a decoder layer keeps each norm: before attention, after attention (on its output,
# before the residual add), before the MLP and after the MLP. None: the family has no such norm.
PRE_NORMS = ("input_layernorm", None, "post_attention_layernorm", None)  # Llama and most others
SANDWICH_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
POST_NORMS = (None, "post_attention_layernorm", None, "post_feedforward_layernorm")  # OLMo 2


@dataclasses.dataclass(frozen=True)
class FamilyAdapter:
    """What one family's decoder layer does differently from Llama's.

    Every field is a general feature of the skipping layer (and, where the fused kernels cover
    it, of the ops), never a per-model code path:

    - ``norms``: the four norm slots (see ``PRE_NORMS``); a module's gate multiplies its
      post-normed output.
    - ``norm_offset``: the norms scale by ``offset + weight`` (Gemma: 1).
    - ``qk_norm``: ``"head"`` normalises each head of q and k (Qwen3, Gemma 3), ``"proj"`` the
      whole q and k projections (OLMo 2).
    - ``fused_qkv`` / ``fused_gate_up``: the attribute of a fused projection (Phi-3); the op
      reads row slices of its weight, never a copy.
    - ``window``, ``softcap``, ``rope`` and ``residual_scale``: per-layer facts read from the
      model's own modules (sliding window, attention logit soft-cap, whether the layer uses
      RoPE, the multiplier on each module's output before the residual add).
    """

    name: str
    causal_lm_class: str
    window: Callable[[nn.Module], int] = _no_window
    qk_norm: str = ""
    norms: tuple[str | None, str | None, str | None, str | None] = PRE_NORMS
    norm_offset: float = 0.0
    softcap: Callable[[nn.Module], float] = _no_softcap
    rope: Callable[[nn.Module], bool] = _always
    residual_scale: Callable[[nn.Module], float] = _one
    fused_qkv: str | None = None
    fused_gate_up: str | None = None

    def q_norm(self, attn: nn.Module) -> nn.Module | None:
        return attn.q_norm if self.qk_norm else None

    def k_norm(self, attn: nn.Module) -> nn.Module | None:
        return attn.k_norm if self.qk_norm else None

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that owns ``layers`` (e.g. ``LlamaModel``)."""
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def norm(self, layer: nn.Module, slot: int) -> nn.Module | None:
        """The norm in ``slot`` (0: before attention, 1: after it, 2: before the MLP, 3: after it)."""
        name = self.norms[slot]
        return getattr(layer, name) if name is not None else None

    def norm_weight(self, norm: nn.Module):
        """The weight the norm really scales by (Gemma's ``1 + weight``)."""
        return norm.weight + self.norm_offset if self.norm_offset else norm.weight

    def projection(self, attn: nn.Module, which: str) -> tuple[nn.Module, slice | None]:
        """The linear module holding projection ``which`` (``"q"``, ``"k"``, ``"v"`` or ``"o"``),
        and the slice of its output rows that belong to it (None: all of them)."""
        if self.fused_qkv is None or which == "o":
            return getattr(attn, f"{which}_proj"), None
        nq = attn.config.num_attention_heads * attn.head_dim
        nkv = attn.config.num_key_value_heads * attn.head_dim
        start = {"q": 0, "k": nq, "v": nq + nkv}[which]
        return getattr(attn, self.fused_qkv), slice(start, start + (nq if which == "q" else nkv))

    def mlp_projections(self, mlp: nn.Module) -> tuple[nn.Module, slice | None, nn.Module, slice | None, nn.Module] | None:
        """``(gate, gate_rows, up, up_rows, down)`` of a gated MLP, or None when the MLP is
        something else (a mixture of experts): then it runs as a whole module on its rows."""
        if self.fused_gate_up is not None:
            fused = getattr(mlp, self.fused_gate_up, None)
            if fused is None:
                return None
            half = fused.weight.shape[0] // 2  # gate first, then up (Phi-3's chunk(2))
            return fused, slice(0, half), fused, slice(half, 2 * half), mlp.down_proj
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return None
        return mlp.gate_proj, None, mlp.up_proj, None, mlp.down_proj

    def mlp_activation(self, mlp: nn.Module) -> nn.Module | None:
        return getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)


FAMILIES: dict[str, FamilyAdapter] = {
    a.causal_lm_class: a
    for a in (
        FamilyAdapter("llama", "LlamaForCausalLM"),
        FamilyAdapter("mistral", "MistralForCausalLM", window=_config_window),
        FamilyAdapter("qwen2", "Qwen2ForCausalLM", window=_layer_window),
        FamilyAdapter("qwen3", "Qwen3ForCausalLM", window=_layer_window, qk_norm="head"),
        FamilyAdapter("gemma2", "Gemma2ForCausalLM", window=_layer_window, norms=SANDWICH_NORMS, norm_offset=1.0,
                      softcap=_attn_softcap),
        # Gemma 3 has q/k norms instead of soft-capping (its HF attention ignores the config's cap).
        FamilyAdapter("gemma3", "Gemma3ForCausalLM", window=_layer_window, norms=SANDWICH_NORMS, norm_offset=1.0,
                      qk_norm="head"),
        FamilyAdapter("phi3", "Phi3ForCausalLM", window=_config_window, fused_qkv="qkv_proj", fused_gate_up="gate_up_proj"),
        FamilyAdapter("olmo2", "Olmo2ForCausalLM", norms=POST_NORMS, qk_norm="proj"),
        FamilyAdapter("smollm3", "SmolLM3ForCausalLM", window=_layer_window, rope=_layer_rope),
        FamilyAdapter("granite", "GraniteForCausalLM", residual_scale=_residual_multiplier),
        FamilyAdapter("qwen3_moe", "Qwen3MoeForCausalLM", window=_layer_window, qk_norm="head"),
    )
}


def active_params(module: nn.Module) -> int:
    """Parameters one token uses in ``module``: all of them, except in a mixture of experts,
    where a token uses the router, its ``top_k`` experts and any shared expert."""
    experts = getattr(module, "experts", None)
    router = getattr(module, "gate", None)
    num, top_k = getattr(experts, "num_experts", None), getattr(router, "top_k", None)
    if experts is None or not num or not top_k:
        return sum(p.numel() for p in module.parameters())
    expert_params = sum(p.numel() for p in experts.parameters())
    rest = sum(p.numel() for p in module.parameters()) - expert_params
    return rest + expert_params * top_k // num


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
