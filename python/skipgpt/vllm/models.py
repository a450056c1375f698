"""vLLM's own Llama, Mistral, Qwen2 and Qwen3 models, with SkipGPT routers and real skipping.

Each class subclasses the vLLM model of its family and changes only its decoder layers: they
gain ``router_attention`` and ``router_mlp`` (loaded by vLLM's weight loader from the export's
``model.safetensors``) and run :meth:`SkipLayer.forward` on vLLM's flattened token batch:

1. ``h`` = the layer input (vLLM carries it as ``hidden_states + residual``);
2. route: each token's two decisions from ``h`` by the deterministic threshold rule, and the
   attention RMSNorm of every row (``skipgpt_ext.ops.route_norm``). A decision reads only its
   own token's ``h``, so it does not depend on the other requests in the batch;
3. K and V of every token (their projection, RoPE and vLLM's paged-cache write, inside vLLM's
   attention layer); Q only for the executing tokens (``gather_linear``), zero elsewhere;
4. vLLM's attention backend over every query; the O projection of the executing rows only,
   scatter-added into ``h`` (``linear_scatter_add_``);
5. the MLP of its executing rows only, norm included, scatter-added (``skip_mlp_``).

With tensor parallelism, quantised weights or a biased MLP, steps 3-5 call the model's own
layers on the gathered executing rows instead (their all-reduce included): still real skipping,
without our fused kernels. The layer returns ``(0, h)``, which vLLM's next layer and final norm
read as ``hidden_states + residual`` (between SkipGPT layers the 0 is a stride-0 view, and the
next layer takes ``h`` as it is: no zero tensor, no add).

The counts are data-dependent, so the model runs eagerly: torch.compile and CUDA graphs are
refused with a message naming ``enforce_eager=True``.
"""

from __future__ import annotations

import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

import skipgpt_ext
from skipgpt_ext import reference

from ..config import SkipConfig
from ..export import _ROUTER_KEY, SECTION, skip_config_of
from ..router import Router
from ..sparsity import realised_sparsity

# The export's base architecture -> (vLLM module, class).
VLLM_BASES = {
    "LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
}


class SkipStats:
    """Per-layer counts of the tokens seen and of those that executed each module. The layer
    reads each count on the host anyway (to size the compacted work), so they are plain ints."""

    def __init__(self, attn_params: list[int], mlp_params: list[int]) -> None:
        self.attn_params = torch.tensor(attn_params, dtype=torch.float64)
        self.mlp_params = torch.tensor(mlp_params, dtype=torch.float64)
        self.counts = [[0, 0, 0] for _ in attn_params]  # tokens, attention executed, MLP executed
        self.lock = threading.Lock()
        self.last_log, self.last_tokens = time.monotonic(), 0

    def add(self, layer: int, tokens: int, attn: int, mlp: int) -> None:
        with self.lock:
            c = self.counts[layer]
            c[0] += tokens
            c[1] += attn
            c[2] += mlp

    def reset(self) -> None:
        with self.lock:
            self.counts = [[0, 0, 0] for _ in self.counts]

    def maybe_log(self) -> None:
        """One log line every ``SKIPGPT_LOG_INTERVAL`` seconds while tokens arrive."""
        from . import log_interval

        interval, now = log_interval(), time.monotonic()
        if not interval or now - self.last_log < interval:
            return
        s = self.summary()
        if s["tokens"] == self.last_tokens:
            return
        self.last_log, self.last_tokens = now, s["tokens"]
        _logger().info(
            "SkipGPT: %d tokens routed; realised parameter sparsity %.3f (attention skipped %.3f, MLP skipped %.3f)",
            s["tokens"], s["param_sparsity"], s["attn_skip"], s["mlp_skip"],
        )

    def summary(self) -> dict:
        """Realised sparsity since the last reset, defined as :func:`skipgpt.stats` defines it."""
        with self.lock:
            c = torch.tensor(self.counts, dtype=torch.float64).reshape(-1, 3)
        tokens = float(c[0, 0]) if len(c) else 0.0
        out = {"tokens": int(tokens), "attn_exec_per_layer": [int(x) for x in c[:, 1]],
               "mlp_exec_per_layer": [int(x) for x in c[:, 2]]}
        if not tokens:
            return {**out, "attn_skip": 0.0, "mlp_skip": 0.0, "module_sparsity": 0.0, "param_sparsity": 0.0}
        ea, em = c[:, 1], c[:, 2]
        return {
            **out,
            "attn_skip": float(1 - ea.mean() / tokens),
            "mlp_skip": float(1 - em.mean() / tokens),
            **{f"{key}_sparsity": float(realised_sparsity(ea, em, tokens, self.attn_params, self.mlp_params, metric))
               for key, metric in (("module", "modules"), ("param", "params"))},
        }


def _plain_weight(linear: nn.Module) -> torch.Tensor | None:
    """The full float weight of an unquantised, unsharded vLLM linear layer, else None."""
    method = getattr(linear, "quant_method", None)
    if method is None or type(method).__name__ != "UnquantizedLinearMethod":
        return None
    if getattr(linear, "tp_size", 1) != 1:
        return None
    w = getattr(linear, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2 else None


def _rms_norm_params(norm: nn.Module) -> tuple[torch.Tensor, float]:
    return norm.weight, float(norm.variance_epsilon)


class SkipLayer(nn.Module):
    """Mixed in front of a vLLM decoder-layer class: routers and the skipping forward."""

    router_attention: Router
    router_mlp: Router

    def _skipgpt_init(self, cfg: SkipConfig, hidden: int, layer_index: int, stats: SkipStats, device) -> None:
        self.router_attention = Router(hidden, cfg.router_type, 0.0, device=device)
        self.router_mlp = Router(hidden, cfg.router_type, 0.0, device=device)
        object.__setattr__(self, "_skip_cfg", cfg)
        object.__setattr__(self, "_skip_index", layer_index)
        object.__setattr__(self, "_skip_stats", stats)
        object.__setattr__(self, "_skip_margin", None)
        object.__setattr__(self, "_skip_last", False)
        attn, mlp = self.self_attn, self.mlp
        if getattr(attn, "do_llama_4_scaling", False) or getattr(self, "ada_rms_norm_t_cond", None) is not None:
            raise NotImplementedError("SkipGPT's vLLM layer does not support Llama-4 attention scaling or ada-RMSNorm")
        if not isinstance(getattr(mlp, "act_fn", None), nn.Module) or type(mlp.act_fn).__name__ != "SiluAndMul":
            raise NotImplementedError(f"SkipGPT's vLLM layer needs a SiLU-gated MLP, got {type(getattr(mlp, 'act_fn', None)).__name__}")

    # -- routing ---------------------------------------------------------------------------
    def _margins(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two linear routers as one ``[2, d]`` margin matrix and ``[2]`` bias (cached: the
        weights do not change once loaded)."""
        if self._skip_margin is None:
            wa, ba = self.router_attention.margin_linear()
            wm, bm = self.router_mlp.margin_linear()
            object.__setattr__(self, "_skip_margin", (torch.stack([wa, wm]).contiguous(), torch.stack([ba, bm]).contiguous()))
        return self._skip_margin

    def _route(self, ops, h: torch.Tensor):
        cfg = self._skip_cfg
        w_norm, eps = _rms_norm_params(self.input_layernorm)
        thr = cfg.threshold_logit
        if cfg.router_type == "linear":
            w, b = self._margins()
            return ops.route_norm(h, w_norm, eps, w, b, thr, None)
        logits_a, logits_m = self.router_attention(h), self.router_mlp(h)
        idx_a, n_a = ops.compact((logits_a[:, 0] - logits_a[:, 1]) > thr)
        idx_m, n_m = ops.compact((logits_m[:, 0] - logits_m[:, 1]) > thr)
        return reference.rms_norm(h, w_norm, eps), idx_a, n_a, idx_m, n_m

    # -- the forward -----------------------------------------------------------------------
    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None, **kwargs):
        if residual is None:
            h = hidden_states.clone()  # the embedding output may be an engine buffer: never written
        elif hidden_states.dim() == 2 and hidden_states.stride(0) == 0:
            h = residual  # the previous SkipGPT layer's (0, h): h is this forward's own tensor
        else:
            h = hidden_states + residual
        ops = skipgpt_ext.ops if skipgpt_ext.has_kernels(h.device, h.dtype) else reference
        x_norm, idx_a, count_a, idx_m, count_m = self._route(ops, h)
        n_a, n_m = int(count_a), int(count_m)
        self._skip_stats.add(self._skip_index, h.shape[0], n_a, n_m)
        self._attention(ops, positions, h, x_norm, idx_a, count_a, n_a)
        self._mlp(ops, h, idx_m, count_m, n_m)
        # vLLM's next layer and final norm read hidden_states + residual. Between SkipGPT layers
        # the zero is a stride-0 view (nothing allocated or added); the stage's last layer hands
        # a real one to the final norm (or to the next pipeline stage).
        zero = torch.zeros_like(h) if self._skip_last else h.new_zeros(()).expand_as(h)
        return zero, h

    def _attention(self, ops, positions, h, x_norm, idx, count, n: int) -> None:
        attn = self.self_attn
        w = _plain_weight(attn.qkv_proj)
        qs, kvs = attn.q_size, attn.kv_size
        every = n == h.shape[0]  # all rows execute: the compacted order is the identity
        if w is not None and not every:
            bias = getattr(attn.qkv_proj, "bias", None)
            kv = F.linear(x_norm, w[qs:], None if bias is None else bias[qs:])
            k, v = kv.split([kvs, kvs], dim=-1)
            q = x_norm.new_zeros(x_norm.shape[0], qs)
            if n:
                qc = ops.gather_linear(x_norm, idx, count, w[:qs], None if bias is None else bias[:qs], None, 0.0, None, None)
                q[idx[:n]] = qc[:n]
        else:
            qkv, _ = attn.qkv_proj(x_norm)
            q, k, v = qkv.split([qs, kvs, kvs], dim=-1)
        if hasattr(attn, "q_norm"):  # Qwen3: a per-head RMSNorm of q and k before RoPE
            hd = attn.head_dim
            q = attn.q_norm(q.reshape(*q.shape[:-1], -1, hd)).reshape(q.shape)
            k = attn.k_norm(k.reshape(*k.shape[:-1], -1, hd)).reshape(k.shape)
        q, k = attn.rotary_emb(positions, q, k)
        out = attn.attn(q, k, v)  # writes every token's K and V into the paged cache
        if not n:
            return
        rows = idx[:n]
        wo = _plain_weight(attn.o_proj)
        if wo is not None:
            if every:
                a = out.contiguous()
            else:
                a = out.new_empty(out.shape)
                a[:n] = out[rows]
            ops.linear_scatter_add_(h, a, idx, count, wo, getattr(attn.o_proj, "bias", None))
        else:
            o, _ = attn.o_proj(out[rows].contiguous())
            h.index_add_(0, rows, o.to(h.dtype))

    def _mlp(self, ops, h, idx, count, n: int) -> None:
        if not n:
            return
        mlp = self.mlp
        w_norm, eps = _rms_norm_params(self.post_attention_layernorm)
        gu, down = _plain_weight(mlp.gate_up_proj), _plain_weight(mlp.down_proj)
        if gu is not None and down is not None and getattr(mlp.gate_up_proj, "bias", None) is None \
                and getattr(mlp.down_proj, "bias", None) is None:
            inter = gu.shape[0] // 2
            ops.skip_mlp_(h, idx, count, w_norm, eps, gu[:inter], gu[inter:], down, "silu")
            return
        rows = idx[:n]
        y = mlp(self.post_attention_layernorm(h[rows]))
        h.index_add_(0, rows, y.to(h.dtype))


def _logger():
    from vllm.logger import init_logger

    return init_logger("vllm.skipgpt")


_LAYER_CLASSES: dict[type, type] = {}


def _skip_layer_class(cls: type) -> type:
    if cls not in _LAYER_CLASSES:
        _LAYER_CLASSES[cls] = type(f"SkipGPT{cls.__name__}", (SkipLayer, cls), {})
    return _LAYER_CLASSES[cls]


def _keep_plain_weights(linear: nn.Module) -> None:
    """On the CPU, vLLM repacks an unquantised linear layer's weight for oneDNN after loading and
    drops the plain weight. The layers SkipGPT runs through its own ops keep theirs (and compute
    their dense calls with it), so nothing is held twice."""
    method = getattr(linear, "quant_method", None)
    if method is None or type(method).__name__ != "UnquantizedLinearMethod":
        return
    linear.quant_method = _plain_method_class(type(method))()


_PLAIN_METHOD: dict[type, type] = {}


def _plain_method_class(base: type) -> type:
    if base not in _PLAIN_METHOD:

        def process_weights_after_loading(self, layer: nn.Module) -> None:
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                layer.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)
            else:
                base.process_weights_after_loading(self, layer)

        # The same class name: _plain_weight (and vLLM's own checks) recognise it.
        _PLAIN_METHOD[base] = type(base.__name__, (base,), {"process_weights_after_loading": process_weights_after_loading})
    return _PLAIN_METHOD[base]


def _check_eager(vllm_config) -> None:
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = vllm_config.compilation_config
    if cc.mode not in (CompilationMode.NONE,) or cc.cudagraph_mode != CUDAGraphMode.NONE:
        raise ValueError(
            "SkipGPT models run in vLLM's eager mode only: how many tokens execute each module is known "
            "only at run time, which torch.compile graphs and CUDA graphs cannot capture. Pass "
            "enforce_eager=True (the CLI's --enforce-eager; `skipgpt serve` does)."
        )


def attach(model: nn.Module, vllm_config) -> SkipStats:
    """Give every decoder layer of a vLLM model its routers and the skipping forward."""
    from vllm.model_executor.models.utils import PPMissingLayer

    config = vllm_config.model_config.hf_config
    section = getattr(config, SECTION, None)
    if not isinstance(section, dict):
        raise ValueError(f"{vllm_config.model_config.model} has no '{SECTION}' config section: not a SkipGPT export")
    cfg = skip_config_of(section)
    if cfg.policy != "router":
        raise ValueError(f"SkipGPT in vLLM runs trained routers (policy 'router'), got policy {cfg.policy!r}")
    _check_eager(vllm_config)
    layers = [layer for layer in model.model.layers if not isinstance(layer, PPMissingLayer)]
    first = next(iter(layers[0].parameters())) if layers else torch.zeros(())

    def size(*mods) -> int:
        return sum(p.numel() for m in mods for p in m.parameters())

    stats = SkipStats(
        [size(layer.self_attn) for layer in layers],
        [size(layer.mlp) for layer in layers],
    )
    for i, layer in enumerate(layers):
        layer.__class__ = _skip_layer_class(type(layer))
        layer._skipgpt_init(cfg, config.hidden_size, i, stats, first.device)
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            _keep_plain_weights(linear)
    if layers:
        object.__setattr__(layers[-1], "_skip_last", True)
    return stats


def _make(base_arch: str) -> type:
    import importlib

    module, name = VLLM_BASES[base_arch]
    base = getattr(importlib.import_module(module), name)

    def __init__(self, *, vllm_config, prefix: str = ""):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        object.__setattr__(self, "skipgpt_stats", attach(self, vllm_config))

    def load_weights(self, weights):
        """vLLM's own loading for the base weights; the routers (which some families' loaders
        would not find) straight into their modules, every one required."""
        routers: dict[str, torch.Tensor] = {}

        def base_weights():
            for name, tensor in weights:
                if _ROUTER_KEY.search(name):
                    routers[name] = tensor
                else:
                    yield name, tensor

        loaded = set(base.load_weights(self, base_weights()))
        return loaded | load_routers(self, routers)

    def forward(self, *args, **kwargs):
        out = base.forward(self, *args, **kwargs)
        self.skipgpt_stats.maybe_log()
        return out

    body = {"__init__": __init__, "load_weights": load_weights, "forward": forward, "__module__": __name__}
    return type("SkipGPT" + base_arch, (base,), body)


def load_routers(model: nn.Module, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Copy the router tensors of an export into the model's routers; returns the parameter
    names loaded. A missing or misshapen router tensor is an error naming it."""
    from vllm.model_executor.models.utils import PPMissingLayer

    names = set()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if isinstance(layer, PPMissingLayer):
                continue
            for kind in ("router_attention", "router_mlp"):
                router = getattr(layer, kind)
                for pname, dest in [*router.named_parameters(), *router.named_buffers()]:
                    key = f"model.layers.{i}.{kind}.{pname}"
                    if key not in tensors:
                        if pname == "input_scale":
                            dest.fill_(1.0)
                            continue
                        raise ValueError(f"the SkipGPT export has no {key}: its routers do not fit this model")
                    t = tensors[key]
                    if tuple(t.shape) != tuple(dest.shape):
                        raise ValueError(f"the SkipGPT export's {key} has shape {tuple(t.shape)}, the model's {tuple(dest.shape)}")
                    dest.copy_(t.to(dest.dtype))
                    if pname != "input_scale":
                        names.add(key)
            object.__setattr__(layer, "_skip_margin", None)
    return names


def __getattr__(name: str):
    """``SkipGPTLlamaForCausalLM`` and friends, built on first use (vLLM imports them lazily
    through ``ModelRegistry``, in its worker processes)."""
    if name.startswith("SkipGPT") and name[len("SkipGPT"):] in VLLM_BASES:
        cls = _make(name[len("SkipGPT"):])
        globals()[name] = cls
        return cls
    raise AttributeError(name)
