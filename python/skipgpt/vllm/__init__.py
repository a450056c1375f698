"""SkipGPT in vLLM: the plugin that registers the SkipGPT model classes, and helpers.

Installed with ``pip install skipgpt[vllm]``, the ``vllm.general_plugins`` entry point
``skipgpt = skipgpt.vllm:register`` runs in every vLLM process. It registers

- ``SkipGPTLlamaForCausalLM``, ``SkipGPTMistralForCausalLM``, ``SkipGPTQwen2ForCausalLM``
  and ``SkipGPTQwen3ForCausalLM`` with vLLM's ``ModelRegistry`` (imported lazily, in the
  worker that builds the model);
- the ``skipgpt_*`` model types with transformers' ``AutoConfig``, so vLLM reads an export's
  config without ``trust_remote_code``.

Then ``LLM(model=<export>, enforce_eager=True)`` (or ``skipgpt serve <export>``) serves it. See
docs/serving.md.
"""

from __future__ import annotations

import os
from typing import Any

from .models import VLLM_BASES

ARCHITECTURES = {"SkipGPT" + arch: f"skipgpt.vllm.models:SkipGPT{arch}" for arch in VLLM_BASES}
_registered = False


def register() -> None:
    """Register the SkipGPT classes with vLLM and the config types with transformers.
    Idempotent: vLLM calls it in every process, possibly more than once."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from ..export import _base_model_types, register_auto_classes

    types = sorted({t for arch, t in _base_model_types().items() if arch in VLLM_BASES})
    register_auto_classes(types, models=False)
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    _registered = True


def stats(llm, reset: bool = False) -> dict[str, Any]:
    """Realised sparsity of the SkipGPT model inside a ``vllm.LLM``, since the engine started or
    the last ``reset=True``: ``tokens``, ``param_sparsity``, ``module_sparsity``, ``attn_skip``,
    ``mlp_skip`` and per-layer executed counts.

    It runs a function in the engine's worker (``LLM.apply_model``): with vLLM's engine in a
    separate process (the default), that needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``; with
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` it does not. The server logs the same figures instead
    (``SKIPGPT_LOG_INTERVAL``).
    """
    return llm.apply_model(_Summary(reset))[0]


class _Summary:
    def __init__(self, reset: bool) -> None:
        self.reset = reset

    def __call__(self, model) -> dict[str, Any]:
        st = getattr(model, "skipgpt_stats", None)
        if st is None:
            raise ValueError(f"{type(model).__name__} is not a SkipGPT model")
        out = st.summary()
        if self.reset:
            st.reset()
        return out


def log_interval() -> float:
    """Seconds between the engine's SkipGPT log lines (``SKIPGPT_LOG_INTERVAL``, default 10; 0: none)."""
    try:
        return max(0.0, float(os.environ.get("SKIPGPT_LOG_INTERVAL", "10")))
    except ValueError:
        return 10.0
