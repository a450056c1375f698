"""What happens to a token in decoder layer l: the one skipping layer forward.

    h'  = h  + g_attn * c * Post_1(Attn(Pre_1(h)))     g_attn decided from h
    h'' = h' + g_mlp  * c * Post_2(MLP(Pre_2(h')))     g_mlp  decided from h (not h')

Pre and Post are the family's norms (Llama has only the pre-norms, OLMo 2 only the post-norms,
Gemma both) and c its residual multiplier (Granite; 1 elsewhere): :class:`FamilyAdapter`.

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

Where a family needs a feature the fused ops do not have (a q/k norm without RoPE, an MLP
that is neither SiLU- nor GeLU-gated, a mixture of experts), that step runs on the compacted
executing rows in PyTorch instead: the model's own module on the gathered rows,
the result scatter-added. The skipping stays real (skipped rows cost nothing); only the fusion
is lost, and the step reads the executing count on the host.
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
            hidden_states=self._pre(0, h),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        a = self._post(1, a)
        h = h + a * g_attn.unsqueeze(-1).to(a.dtype)
        m = self._post(3, _tensor(self.mlp(self._pre(2, h))))
        return h + m * g_mlp.unsqueeze(-1).to(m.dtype)

    def _pre(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        norm = self.skip_state.adapter.norm(self, slot)
        return norm(x) if norm is not None else x

    def _post(self, slot: int, y: torch.Tensor) -> torch.Tensor:
        """A module's output as the residual receives it: post-normed, times the multiplier."""
        ad = self.skip_state.adapter
        norm = ad.norm(self, slot)
        if norm is not None:
            y = norm(y)
        c = ad.residual_scale(self)
        return y * c if c != 1.0 else y

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
        attn, ad = self.self_attn, self.skip_state.adapter
        if cache is not None:  # first: generate builds a 4D mask for a static cache
            _check_dynamic_cache(cache, attn.layer_idx)
        if fwd.mask_is_4d:
            raise ValueError(
                "SkipGPT's skipping modes need the 2D attention_mask (batch, keys); got a "
                "pre-built 4D mask. Pass the 2D padding mask, or use mode='masked'."
            )
        # Q and O run compacted through the ops, which read their weights directly: a wrapped
        # projection (LoRA) would be silently ignored. K, V and the MLP may be wrapped: they run
        # the module itself.
        _check_plain_linears(ad.projection(attn, "q")[0], ad.projection(attn, "o")[0])
        past = cache.get_seq_length(attn.layer_idx) if cache is not None else 0
        if fwd.key_mask is not None and fwd.key_mask.shape[1] != past + S:
            raise ValueError(
                f"attention_mask covers {fwd.key_mask.shape[1]} positions but the cache plus this input hold {past + S}"
            )
        return past

    def _route(self, fwd, ops, h_rows: torch.Tensor):
        """Both decisions plus the attention input of every row (K/V need all of them): the
        pre-attention norm of ``h``, or ``h`` itself where the family has none (OLMo 2)."""
        st, ad = self.skip_state, self.skip_state.adapter
        norm = ad.norm(self, 0)
        if norm is not None:
            norm_w, eps = ad.norm_weight(norm), norm_eps(norm)
        else:  # the decisions still come from route_norm; its normed rows are not used
            norm_w, eps = torch.ones(h_rows.shape[1], dtype=h_rows.dtype, device=h_rows.device), 1e-6
        row_valid = fwd.valid.reshape(-1) if fwd.valid is not None else None
        ra, rm = self.router_attention, self.router_mlp
        thr = st.config.threshold_logit
        if ra.router_type == "linear" and rm.router_type == "linear":
            w, b = st.stacked_margins(self.self_attn.layer_idx, ra, rm)
            x, attn_idx, attn_count, mlp_idx, mlp_count = ops.route_norm(h_rows, norm_w, eps, w, b, thr, row_valid)
        else:
            # A non-linear router cannot fold into the norm pass: decide in torch, compact natively.
            decide = []
            for router in (ra, rm):
                logits = router(h_rows)
                ex = (logits[:, 0] - logits[:, 1]) > thr
                decide.append(ex & row_valid if row_valid is not None else ex)
            attn_idx, attn_count = ops.compact(decide[0])
            mlp_idx, mlp_count = ops.compact(decide[1])
            x = reference.rms_norm(h_rows, norm_w, eps) if norm is not None else None
        # Without a pre-norm, attention reads h itself: every read of it (K, V, Q) happens
        # before the attention output is added into h.
        return (x if norm is not None else h_rows), attn_idx, attn_count, mlp_idx, mlp_count

    def _keys_values(self, ops, x_norm, rows: RowTables, position_embeddings, B: int, S: int, cache):
        """K and V of every token (later tokens attend to all earlier ones), with the model's math,
        appended to the cache; returns the cache's K and V ``[B, Hkv, Lk, head_dim]``.

        K is Q's op (gather_linear) over every row (projection, per-head norm, RoPE in one call),
        V the same op without RoPE; a wrapped projection (LoRA) keeps the module path. On CUDA,
        past a decode batch, K and V take the module path too: every row executes, so compaction
        gains nothing, and cuBLAS is the faster dense GEMM ("dense K/V may use cuBLAS"); decode
        batches keep the op's GEMV (one pass over the weights, RoPE fused)."""
        attn, hd = self.self_attn, self.self_attn.head_dim
        fuse = x_norm.device.type != "cuda" or B * S <= skipgpt_ext.CUDA_GEMV_MAX_ROWS
        k = self._project(ops, x_norm, rows.all_idx, rows.all_count, "k", rows, all_rows=True, fuse=fuse)
        v = self._project(ops, x_norm, rows.all_idx, rows.all_count, "v", rows, all_rows=True, fuse=fuse)
        k = k.view(B, S, -1, hd).transpose(1, 2)
        v = v.view(B, S, -1, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
        return k, v

    def _project(self, ops, x, idx, count, which: str, rows: RowTables, all_rows: bool = False, fuse: bool = True):
        """Projection ``which`` (q, k or v) of rows ``idx[:count]`` of ``x``, compacted, with the
        family's q/k norm and RoPE. One gather_linear call where the op covers the family's
        math; otherwise the op's plain projection (or, for every row, the module itself) and the
        norm and RoPE in PyTorch on the executing rows."""
        attn, ad, hd = self.self_attn, self.skip_state.adapter, self.self_attn.head_dim
        mod, part = ad.projection(attn, which)
        norm = (ad.q_norm(attn) if which == "q" else ad.k_norm(attn)) if which != "v" else None
        rope = which != "v" and ad.rope(attn)
        cos, sin = (rows.cos, rows.sin) if rope else (None, None)
        if all_rows and not (fuse and type(mod) is nn.Linear):
            y = mod(x)  # the module path: every row, the module's own forward (LoRA included)
            y = y[:, part] if part is not None else y
            return self._qk_epilogue(y, norm, cos, sin) if which != "v" else y
        w = mod.weight if part is None else mod.weight[part]
        b = mod.bias if part is None or mod.bias is None else mod.bias[part]
        if norm is None or rope:  # the op's norm is that of RoPE heads (per head, or the whole row)
            return ops.gather_linear(
                x, idx, count, w, b, ad.norm_weight(norm) if norm is not None else None,
                norm_eps(norm) if norm is not None else 0.0, cos, sin,
                hd if rope else 0, norm is not None and ad.qk_norm == "proj",
            )
        y = ops.gather_linear(x, idx, count, w, b, None, 0.0, None, None)
        n = y.shape[0] if all_rows else int(count)
        if n:
            sel = idx[:n]
            y[:n] = self._qk_epilogue(
                y[:n], norm, cos.index_select(0, sel) if rope else None, sin.index_select(0, sel) if rope else None
            )
        return y

    def _qk_epilogue(self, y, norm, cos, sin) -> torch.Tensor:
        """The family's q/k norm and RoPE (full or partial) on projected rows ``y [n, H * hd]``."""
        n, hd = y.shape[0], self.self_attn.head_dim
        if norm is not None:
            y = norm(y) if self.skip_state.adapter.qk_norm == "proj" else norm(y.view(n, -1, hd)).reshape(n, -1)
        if cos is None:
            return y
        y, rd = y.reshape(n, -1, hd), cos.shape[-1]
        c, s_ = cos.unsqueeze(1).to(y.dtype), sin.unsqueeze(1).to(y.dtype)
        r = y[..., :rd]
        r = r * c + reference.rotate_half(r) * s_
        return (torch.cat([r, y[..., rd:]], -1) if rd < hd else r).reshape(n, -1)

    def _attention_(self, ops, fwd, h_rows, x_norm, idx, count, k, v, rows: RowTables, end: int, S: int) -> None:
        """Attention of the executing rows, added into ``h_rows`` in place: Q of those rows, their
        attention rows against the cache's keys (positions up to ``end``), the O projection
        scatter-added (through the post-norm and multiplier, where the family has them)."""
        attn, ad = self.self_attn, self.skip_state.adapter
        q = self._project(ops, x_norm, idx, count, "q", rows)
        # A dynamic (sliding) cache returns the most recent Lk keys, ending at this step.
        Lk = k.shape[2]
        key_valid = fwd.key_mask[:, end - Lk : end] if fwd.key_mask is not None else None
        o = ops.sparse_query_attention(
            q, idx, count, k, v, rows.positions, key_valid, end - Lk, S, float(attn.scaling),
            ad.window(attn), ad.softcap(attn),
        )
        o_proj = ad.projection(attn, "o")[0]
        post, c = ad.norm(self, 1), ad.residual_scale(self)
        if post is None and c == 1.0:
            ops.linear_scatter_add_(h_rows, o, idx, count, o_proj.weight, o_proj.bias)
        elif _epilogue_in_ops(ops, h_rows) and _is_rms_norm(post):
            ops.linear_scatter_add_(
                h_rows, o, idx, count, o_proj.weight, o_proj.bias, *self._epilogue_args(post, c)
            )
        else:
            n = int(count)
            if n:
                y = torch.nn.functional.linear(o[:n], o_proj.weight, o_proj.bias)
                h_rows.index_add_(0, idx[:n], self._post(1, y))

    def _epilogue_args(self, post: nn.Module | None, c: float) -> tuple:
        """The ops' ``post_norm_weight, post_norm_eps, out_scale`` for a post-norm and multiplier."""
        ad = self.skip_state.adapter
        return (ad.norm_weight(post), norm_eps(post), c) if post is not None else (None, 0.0, c)

    def _mlp_(self, ops, h_rows, idx, count) -> None:
        """The MLP of the executing rows (its norms included), added into ``h_rows`` in place:
        the fused op for a gated MLP (SiLU, or GeLU-tanh with the epilogue features); otherwise
        the model's own MLP module on the gathered rows (a mixture of experts routes only these
        rows)."""
        ad, mlp = self.skip_state.adapter, self.mlp
        pre, post, c = ad.norm(self, 2), ad.norm(self, 3), ad.residual_scale(self)
        proj = ad.mlp_projections(mlp)
        act = _ACTIVATIONS.get(type(ad.mlp_activation(mlp)).__name__)
        plain = proj is not None and all(type(m) is nn.Linear and m.bias is None for m in proj[::2])
        llama_like = pre is not None and post is None and c == 1.0 and act == "silu"
        if plain and act is not None and (llama_like or (
            _epilogue_in_ops(ops, h_rows) and (pre is None or _is_rms_norm(pre)) and (post is None or _is_rms_norm(post))
        )):
            gate, g_part, up, u_part, down = proj
            args = (
                h_rows, idx, count, ad.norm_weight(pre) if pre is not None else None, norm_eps(pre) if pre is not None else 0.0,
                gate.weight if g_part is None else gate.weight[g_part],
                up.weight if u_part is None else up.weight[u_part], down.weight,
            )
            if llama_like:
                ops.skip_mlp_(*args)
            else:
                ops.skip_mlp_(*args, act, *self._epilogue_args(post, c))
            return
        n = int(count)
        if n:
            sel = idx[:n]
            x = h_rows.index_select(0, sel)
            if pre is not None:
                x = pre(x)
            y = _tensor(mlp(x.unsqueeze(0))).squeeze(0)
            h_rows.index_add_(0, sel, self._post(3, y))


# The MLP activations the fused op computes, by the class transformers' ACT2FN gives.
_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}


def _epilogue_in_ops(ops, x: torch.Tensor) -> bool:
    """Whether ``ops`` run the scatter-adding ops' extra features (post-norm, multiplier, no
    pre-norm, GeLU-tanh) on ``x``'s device: the reference everywhere, the kernels per device."""
    return ops is reference or x.device.type in ops.EPILOGUE_DEVICES


def _is_rms_norm(norm: nn.Module | None) -> bool:
    """An RMSNorm the ops can compute from its weight and epsilon (all the supported families')."""
    return norm is None or (type(norm).__name__.endswith("RMSNorm") and getattr(norm, "bias", None) is None)


def _tensor(out) -> torch.Tensor:
    """A module's output tensor (some mixture-of-experts blocks also return router logits)."""
    return out[0] if isinstance(out, tuple) else out


def _check_plain_linears(*modules: nn.Module) -> None:
    for m in modules:
        if type(m) is not nn.Linear:
            raise NotImplementedError(
                f"SkipGPT's skipping modes need plain nn.Linear projections for attention's q and o, got {type(m).__name__}. "
                "Merge LoRA adapters first (peft's merge_and_unload()), or use mode='masked'."
            )


def _check_dynamic_cache(cache, layer_idx: int) -> None:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers) and not isinstance(layers[layer_idx], DynamicLayer):
        raise NotImplementedError(
            f"SkipGPT's skipping modes support the dynamic KV cache (generate's default); got "
            f"{type(layers[layer_idx]).__name__}. Use cache_implementation='dynamic' or mode='masked'."
        )
