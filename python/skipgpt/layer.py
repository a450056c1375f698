"""What happens to a token in decoder layer l: the one skipping layer forward.

    h'  = h  + g_attn * Attn(RMSNorm_1(h))      g_attn decided from h
    h'' = h' + g_mlp  * MLP(RMSNorm_2(h'))      g_mlp  decided from h (not h')

Three backends share this structure:
- ``masked``: the model's own attention and MLP on every token, output times gate. It is the
  oracle and the training path (router gradients need f(h) for skipped tokens too).
- ``reference`` / ``native``: real skipping through the skipgpt op set
  (:mod:`skipgpt_ext.reference` in pure PyTorch, or the compiled :mod:`skipgpt_ext.ops`).
  K/V run for every token (later tokens attend to all earlier ones); only executing tokens
  get the Q projection, an attention row, the O projection and the MLP, whose results are
  scatter-added into the residual in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import skipgpt_ext
from skipgpt_ext import reference

from . import gates
from .adapters import norm_eps
from .skip_state import FORWARD_KWARG, ForwardState, SkipState


class SkipDecoderLayerMixin:
    """Mixed in front of a family's decoder-layer class by :func:`skipgpt.apply`.

    The layer keeps its own ``self_attn``, ``mlp`` and norms; it gains ``router_attention``,
    ``router_mlp`` and a shared ``skip_state``. The state of the forward in progress comes in as
    the ``skipgpt_forward`` keyword argument (the decoder's pre-hook adds it); a layer called on
    its own uses its thread's latest :class:`ForwardState`.
    """

    skip_state: SkipState
    router_attention: nn.Module
    router_mlp: nn.Module

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        st = self.skip_state
        fwd = kwargs.pop(FORWARD_KWARG, None)
        if fwd is None:
            fwd = st.forward_state()
        ops = st.backend(self.training, hidden_states.device, hidden_states.dtype)
        if ops is None:
            return self._masked_forward(fwd, hidden_states, attention_mask, position_embeddings, kwargs)
        if self.training and torch.is_grad_enabled():
            # The skipping ops run outside autograd (and the reference updates h in place): a
            # backward would silently leave every gradient None. Refused before anything runs.
            raise RuntimeError(
                f"SkipGPT mode={st.config.mode!r} has no "
                "gradients: it is for inference. Train with mode='masked' (skipgpt.set_mode(model, 'masked'); "
                "mode='auto' does this in train mode), or run this forward under model.eval() or torch.no_grad()."
            )
        return self._skipping_forward(fwd, ops, hidden_states, position_embeddings, kwargs)

    # -- the oracle and training path ------------------------------------------------------------
    def _gate(self, fwd: ForwardState, logits: torch.Tensor, module: int, kwargs: dict) -> torch.Tensor:
        st, cfg = self.skip_state, self.skip_state.config
        if cfg.policy == "topk":
            g = gates.topk_gate(logits, fwd.valid, cfg.capacity, straight_through=self.training)
        elif cfg.policy == "random":
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
            g = gates.random_gate(logits.shape[:2], pos, cfg.capacity, cfg.seed, self.self_attn.layer_idx, module)
            g = g.to(logits.device)
        else:
            g = gates.router_gate(logits, st.use_gumbel(self.training), cfg.tau, cfg.threshold_logit, cfg.gate_noise)
        if fwd.valid is not None:
            g = g * fwd.valid.to(g.dtype)  # padding never executes and never counts
        return g

    def _masked_forward(self, fwd, h, attention_mask, position_embeddings, kwargs) -> torch.Tensor:
        g_attn = self._gate(fwd, self.router_attention(h), 0, kwargs)
        g_mlp = self._gate(fwd, self.router_mlp(h), 1, kwargs)
        fwd.record(self.self_attn.layer_idx, g_attn.sum(), g_mlp.sum())
        fwd.gates[self.self_attn.layer_idx] = (g_attn, g_mlp)

        a, _ = self.self_attn(
            hidden_states=self.input_layernorm(h),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        h = h + a * g_attn.unsqueeze(-1).to(a.dtype)
        m = self.mlp(self.post_attention_layernorm(h))
        return h + m * g_mlp.unsqueeze(-1).to(m.dtype)

    # -- real skipping ---------------------------------------------------------------------------
    def _route(self, fwd, ops, h2: torch.Tensor):
        """Both decisions plus the attention RMSNorm of every row (K/V need all of them)."""
        st, norm = self.skip_state, self.input_layernorm
        row_valid = fwd.valid.reshape(-1) if fwd.valid is not None else None
        ra, rm = self.router_attention, self.router_mlp
        thr = st.config.threshold_logit
        if ra.router_type == "linear" and rm.router_type == "linear":
            w, b = st.stacked_margins(self.self_attn.layer_idx, ra, rm)
            return ops.route_norm(h2, norm.weight, norm_eps(norm), w, b, thr, row_valid)
        # A non-linear router cannot fold into the norm pass: decide in torch, compact natively.
        decide = []
        for router in (ra, rm):
            logits = router(h2)
            ex = (logits[:, 0] - logits[:, 1]) > thr
            decide.append(ex & row_valid if row_valid is not None else ex)
        a_idx, a_cnt = ops.compact(decide[0])
        m_idx, m_cnt = ops.compact(decide[1])
        return reference.rms_norm(h2, norm.weight, norm_eps(norm)), a_idx, a_cnt, m_idx, m_cnt

    def _skipping_forward(self, fwd, ops, hidden_states, position_embeddings, kwargs) -> torch.Tensor:
        st, attn, ad = self.skip_state, self.self_attn, self.skip_state.adapter
        layer_idx = attn.layer_idx
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:  # first: generate builds a 4D mask for a static cache
            _check_dynamic_cache(cache, layer_idx)
        if fwd.mask_is_4d:
            raise ValueError(
                "SkipGPT's skipping modes need the 2D attention_mask (batch, keys); got a "
                "pre-built 4D mask. Pass the 2D padding mask, or use mode='masked'."
            )
        _check_plain_linears(attn.q_proj, attn.o_proj, self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj)
        B, S, d = hidden_states.shape
        T, hd = B * S, attn.head_dim
        past = cache.get_seq_length(layer_idx) if cache is not None else 0
        end = past + S
        if fwd.key_mask is not None and fwd.key_mask.shape[1] != end:  # before any statistic or cache write
            raise ValueError(
                f"attention_mask covers {fwd.key_mask.shape[1]} positions but the cache plus this input hold {end}"
            )
        h = hidden_states
        if fwd.clone_all or (layer_idx == 0 and fwd.clone_first):
            h = h.clone()
        h2 = h.reshape(T, d)
        x_norm, a_idx, a_cnt, m_idx, m_cnt = self._route(fwd, ops, h2)
        fwd.record(layer_idx, a_cnt, m_cnt)

        cos, sin = position_embeddings
        q_pos, cos_rows, sin_rows, every, n_rows = fwd.row_positions(past, B, S, cos, sin)

        # K/V for every token, with the model's math, then into the cache. K is the Q op over
        # every row (projection, per-head norm, RoPE in one call), V the same op without RoPE;
        # a wrapped projection (LoRA) keeps the module path. On CUDA, past a decode batch, K and
        # V take the module path too: every row executes, so compaction gains nothing, and
        # cuBLAS is the faster dense GEMM ("dense K/V may use cuBLAS"); decode batches keep the
        # op's GEMV (one pass over the weights, RoPE fused).
        k_norm = ad.k_norm(attn)
        fuse_kv = x_norm.device.type != "cuda" or B * S <= skipgpt_ext.CUDA_GEMV_MAX_ROWS
        if fuse_kv and type(attn.k_proj) is nn.Linear:
            k = ops.q_proj_rope(
                x_norm, every, n_rows, attn.k_proj.weight, attn.k_proj.bias,
                k_norm.weight if k_norm is not None else None,
                norm_eps(k_norm) if k_norm is not None else 0.0,
                cos_rows, sin_rows,
            ).view(B, S, -1, hd).transpose(1, 2)
        else:
            k = attn.k_proj(x_norm).view(B, S, -1, hd)
            if k_norm is not None:
                k = k_norm(k)
            k = k.transpose(1, 2)
            k = k * cos.unsqueeze(1) + reference.rotate_half(k) * sin.unsqueeze(1)
        if fuse_kv and type(attn.v_proj) is nn.Linear:
            v = ops.q_proj_rope(x_norm, every, n_rows, attn.v_proj.weight, attn.v_proj.bias, None, 0.0, None, None)
        else:
            v = attn.v_proj(x_norm)
        v = v.view(B, S, -1, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        # A dynamic (sliding) cache returns the most recent Lk keys, ending at this step.
        Lk = k.shape[2]
        key_valid = fwd.key_mask[:, end - Lk : end] if fwd.key_mask is not None else None
        q_norm = ad.q_norm(attn)
        q = ops.q_proj_rope(
            x_norm, a_idx, a_cnt, attn.q_proj.weight, attn.q_proj.bias,
            q_norm.weight if q_norm is not None else None,
            norm_eps(q_norm) if q_norm is not None else 0.0,
            cos_rows, sin_rows,
        )
        o = ops.sparse_query_attention(
            q, a_idx, a_cnt, k, v, q_pos, key_valid, end - Lk, S, float(attn.scaling), ad.window(attn)
        )
        ops.linear_scatter_add_(h2, o, a_idx, a_cnt, attn.o_proj.weight, attn.o_proj.bias)

        norm, mlp = self.post_attention_layernorm, self.mlp
        ops.skip_mlp_(
            h2, m_idx, m_cnt, norm.weight, norm_eps(norm),
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
        )
        return h


def _check_plain_linears(*modules: nn.Module) -> None:
    # The skipping ops read weights directly, so a wrapped projection (a LoRA layer) or an MLP
    # bias would be silently ignored: refuse instead.
    for m in modules:
        if type(m) is not nn.Linear:
            raise NotImplementedError(
                f"SkipGPT's skipping modes need plain nn.Linear projections, got {type(m).__name__}. "
                "Merge LoRA adapters first (peft's merge_and_unload()), or use mode='masked'."
            )
    if any(m.bias is not None for m in modules[2:]):
        raise NotImplementedError("SkipGPT's skipping modes do not support MLP biases; use mode='masked'.")


def _check_dynamic_cache(cache, layer_idx: int) -> None:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers) and not isinstance(layers[layer_idx], DynamicLayer):
        raise NotImplementedError(
            f"SkipGPT's skipping modes support the dynamic KV cache (generate's default); got "
            f"{type(layers[layer_idx]).__name__}. Use cache_implementation='dynamic' or mode='masked'."
        )
