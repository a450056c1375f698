"""What happens to a token in decoder layer l: the one skipping layer forward.

    h'  = h  + g_attn * Attn(RMSNorm_1(h))      g_attn decided from h
    h'' = h' + g_mlp  * MLP(RMSNorm_2(h'))      g_mlp  decided from h (not h')

Three backends share this structure:
- ``masked``: the model's own attention and MLP on every token, output times gate. It is the
  oracle and the training path (router gradients need f(h) for skipped tokens too).
- ``reference`` / ``native``: real skipping through the skipgpt op set
  (:mod:`skipgpt_ext.reference` in pure PyTorch, or the compiled :mod:`skipgpt_ext.ops`),
  in five steps:
  1. check: refuse what the ops cannot run (a 4D mask, a static cache, wrapped projections,
     a mask that does not cover the cache) before any statistic or cache write;
  2. route: both decisions and the attention RMSNorm of every row, in one pass over h;
  3. K/V: for every token (later tokens attend to all earlier ones), appended to the cache;
  4. attention: only the executing tokens get the Q projection, an attention row and the O
     projection, scatter-added into the residual in place;
  5. MLP: only its executing tokens run the MLP (its norm included), scatter-added in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import skipgpt_ext
from skipgpt_ext import reference

from . import gates
from .adapters import norm_eps
from .skip_state import FORWARD_KWARG, ForwardState, RowTables, SkipState


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

    # -- real skipping: check, route, K/V, attention, MLP ---------------------------------------
    def _skipping_forward(self, fwd, ops, hidden_states, position_embeddings, kwargs) -> torch.Tensor:
        """The layer through the op set ``ops``, in the steps of the module docstring."""
        layer_idx = self.self_attn.layer_idx
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        B, S, d = hidden_states.shape
        past = self._check_skipping_inputs(fwd, cache, S)
        h = hidden_states
        if fwd.clone_all or (layer_idx == 0 and fwd.clone_first):
            h = h.clone()
        h_rows = h.reshape(B * S, d)  # the residual stream, one row per token, updated in place

        x_norm, attn_idx, attn_count, mlp_idx, mlp_count = self._route(fwd, ops, h_rows)
        fwd.record(layer_idx, attn_count, mlp_count)
        rows = fwd.row_tables(past, B, S, *position_embeddings)
        k, v = self._keys_values(ops, x_norm, rows, position_embeddings, B, S, cache)
        self._attention_(ops, fwd, h_rows, x_norm, attn_idx, attn_count, k, v, rows, past + S, S)
        self._mlp_(ops, h_rows, mlp_idx, mlp_count)
        return h

    def _check_skipping_inputs(self, fwd: ForwardState, cache, S: int) -> int:
        """Refuse what the skipping ops cannot run, before any statistic or cache write; returns
        the number of positions already in the cache."""
        attn, mlp = self.self_attn, self.mlp
        if cache is not None:  # first: generate builds a 4D mask for a static cache
            _check_dynamic_cache(cache, attn.layer_idx)
        if fwd.mask_is_4d:
            raise ValueError(
                "SkipGPT's skipping modes need the 2D attention_mask (batch, keys); got a "
                "pre-built 4D mask. Pass the 2D padding mask, or use mode='masked'."
            )
        _check_plain_linears(attn.q_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        past = cache.get_seq_length(attn.layer_idx) if cache is not None else 0
        if fwd.key_mask is not None and fwd.key_mask.shape[1] != past + S:
            raise ValueError(
                f"attention_mask covers {fwd.key_mask.shape[1]} positions but the cache plus this input hold {past + S}"
            )
        return past

    def _route(self, fwd, ops, h_rows: torch.Tensor):
        """Both decisions plus the attention RMSNorm of every row (K/V need all of them)."""
        st, norm = self.skip_state, self.input_layernorm
        row_valid = fwd.valid.reshape(-1) if fwd.valid is not None else None
        ra, rm = self.router_attention, self.router_mlp
        thr = st.config.threshold_logit
        if ra.router_type == "linear" and rm.router_type == "linear":
            w, b = st.stacked_margins(self.self_attn.layer_idx, ra, rm)
            return ops.route_norm(h_rows, norm.weight, norm_eps(norm), w, b, thr, row_valid)
        # A non-linear router cannot fold into the norm pass: decide in torch, compact natively.
        decide = []
        for router in (ra, rm):
            logits = router(h_rows)
            ex = (logits[:, 0] - logits[:, 1]) > thr
            decide.append(ex & row_valid if row_valid is not None else ex)
        attn_idx, attn_count = ops.compact(decide[0])
        mlp_idx, mlp_count = ops.compact(decide[1])
        return reference.rms_norm(h_rows, norm.weight, norm_eps(norm)), attn_idx, attn_count, mlp_idx, mlp_count

    def _keys_values(self, ops, x_norm, rows: RowTables, position_embeddings, B: int, S: int, cache):
        """K and V of every token (later tokens attend to all earlier ones), with the model's math,
        appended to the cache; returns the cache's K and V ``[B, Hkv, Lk, head_dim]``.

        K is Q's op (gather_linear) over every row (projection, per-head norm, RoPE in one call),
        V the same op without RoPE; a wrapped projection (LoRA) keeps the module path. On CUDA,
        past a decode batch, K and V take the module path too: every row executes, so compaction
        gains nothing, and cuBLAS is the faster dense GEMM ("dense K/V may use cuBLAS"); decode
        batches keep the op's GEMV (one pass over the weights, RoPE fused)."""
        attn, hd = self.self_attn, self.self_attn.head_dim
        k_norm = self.skip_state.adapter.k_norm(attn)
        fuse = x_norm.device.type != "cuda" or B * S <= skipgpt_ext.CUDA_GEMV_MAX_ROWS
        if fuse and type(attn.k_proj) is nn.Linear:
            k = _project_rows(ops, x_norm, rows.all_idx, rows.all_count, attn.k_proj, k_norm, rows)
            k = k.view(B, S, -1, hd).transpose(1, 2)
        else:
            k = attn.k_proj(x_norm).view(B, S, -1, hd)
            if k_norm is not None:
                k = k_norm(k)
            cos, sin = position_embeddings
            k = k.transpose(1, 2)
            k = k * cos.unsqueeze(1) + reference.rotate_half(k) * sin.unsqueeze(1)
        if fuse and type(attn.v_proj) is nn.Linear:
            v = _project_rows(ops, x_norm, rows.all_idx, rows.all_count, attn.v_proj, None, None)
        else:
            v = attn.v_proj(x_norm)
        v = v.view(B, S, -1, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
        return k, v

    def _attention_(self, ops, fwd, h_rows, x_norm, idx, count, k, v, rows: RowTables, end: int, S: int) -> None:
        """Attention of the executing rows, added into ``h_rows`` in place: Q of those rows, their
        attention rows against the cache's keys (positions up to ``end``), the O projection
        scatter-added."""
        attn = self.self_attn
        q = _project_rows(ops, x_norm, idx, count, attn.q_proj, self.skip_state.adapter.q_norm(attn), rows)
        # A dynamic (sliding) cache returns the most recent Lk keys, ending at this step.
        Lk = k.shape[2]
        key_valid = fwd.key_mask[:, end - Lk : end] if fwd.key_mask is not None else None
        o = ops.sparse_query_attention(
            q, idx, count, k, v, rows.positions, key_valid, end - Lk, S, float(attn.scaling),
            self.skip_state.adapter.window(attn),
        )
        ops.linear_scatter_add_(h_rows, o, idx, count, attn.o_proj.weight, attn.o_proj.bias)

    def _mlp_(self, ops, h_rows, idx, count) -> None:
        """The MLP of the executing rows (its norm included), added into ``h_rows`` in place."""
        norm, mlp = self.post_attention_layernorm, self.mlp
        ops.skip_mlp_(
            h_rows, idx, count, norm.weight, norm_eps(norm),
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
        )


def _project_rows(ops, x, idx, count, proj: nn.Linear, head_norm: nn.Module | None, rows: RowTables | None):
    """``proj`` of rows ``idx[:count]`` of ``x``, compacted; with ``rows``, each head normalised by
    ``head_norm`` (Qwen3) and rotated at its row's position (RoPE)."""
    return ops.gather_linear(
        x, idx, count, proj.weight, proj.bias,
        head_norm.weight if head_norm is not None else None,
        norm_eps(head_norm) if head_norm is not None else 0.0,
        rows.cos if rows is not None else None,
        rows.sin if rows is not None else None,
    )


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
