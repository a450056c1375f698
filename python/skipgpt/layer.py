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

import threading
from typing import Any

import torch
from torch import nn

import skipgpt_ext
from skipgpt_ext import reference

from . import gates
from .adapters import FamilyAdapter, norm_eps
from .config import SkipConfig
from .sparsity import realised_sparsity


# The keyword argument through which the decoder's pre-hook hands one forward's state to that
# forward's layers (HF passes a decoder's extra keyword arguments on to every layer).
FORWARD_KWARG = "skipgpt_forward"


class ForwardState:
    """What one forward of the decoder knows and records: which keys and rows are real tokens,
    and each layer's execute counts and gates. Created by the decoder's pre-hook and handed to
    that forward's layers only, so concurrent forwards (threads) and copies of the model never
    share one."""

    def __init__(
        self,
        num_layers: int,
        attention_mask: torch.Tensor | None,
        batch: int,
        seq: int,
        clone_first: bool = False,
        clone_all: bool = False,
        device: torch.device | None = None,
    ) -> None:
        mask_is_4d = attention_mask is not None and attention_mask.dim() != 2
        if not mask_is_4d and attention_mask is not None and (
            attention_mask.shape[0] != batch or attention_mask.shape[1] < seq
        ):
            raise ValueError(
                f"attention_mask is {tuple(attention_mask.shape)}, but the input is {batch} sequences of {seq} "
                f"tokens: it needs {batch} rows and at least {seq} positions (the cache's plus this input's)"
            )
        self.mask_is_4d = mask_is_4d
        self.key_mask = attention_mask.bool() if attention_mask is not None and not mask_is_4d else None
        self.valid = self.key_mask[:, -seq:] if self.key_mask is not None and seq > 0 else None
        # Made on the device (a fill, not a host-to-device copy): a CUDA graph may capture a forward.
        self.n_valid = self.valid.sum() if self.valid is not None else torch.full((), batch * seq, device=device)
        # In-place residual updates must not reach tensors the caller can see: the caller's
        # inputs_embeds (layer 0), or every layer's output when hidden states are recorded.
        self.clone_first = clone_first
        self.clone_all = clone_all
        self._rows: tuple | None = None  # row positions and RoPE rows, shared by the layers
        self.exec_counts: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.gates: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def complete(self) -> bool:
        return all(c is not None for c in self.exec_counts)

    def record(self, layer_idx: int, exec_attn: torch.Tensor, exec_mlp: torch.Tensor) -> None:
        self.exec_counts[layer_idx] = (exec_attn, exec_mlp)

    def row_positions(self, past: int, B: int, S: int, cos: torch.Tensor, sin: torch.Tensor):
        """Per-row cache positions and RoPE rows ``[T]``, ``[T, hd]``, plus the identity
        compaction (every row, count T) that the K and V projections run with: the same for every
        layer of a forward, so they are built once (the entry holds ``cos`` itself, so a hit is
        exact)."""
        hit = self._rows
        if hit is None or hit[0] is not cos or hit[1] != (past, B, S):
            hd, T, dev = cos.shape[-1], B * S, cos.device
            q_pos = torch.arange(past, past + S, device=dev).repeat(B)
            every = torch.arange(T, device=dev)
            hit = (cos, (past, B, S), q_pos, cos.expand(B, S, hd).reshape(T, hd), sin.expand(B, S, hd).reshape(T, hd),
                   every, torch.full((), T, dtype=torch.long, device=dev))
            self._rows = hit
        return hit[2:]


class SkipState:
    """What the layers of one patched model share (not a Module: no weights): the config, the
    family adapter, the margin cache and the statistics of complete forwards.

    Per-forward state lives in a :class:`ForwardState`. Each thread's latest forward stays
    readable here (``exec_counts``, ``gates``, ``n_valid``, ``sparsity()``: the router-tuning
    loop reads them after its forward); ``last_complete`` and the cumulative counters are
    updated under a lock when any thread's forward completes. A deep copy (or an unpickled
    model) gets a state of its own.
    """

    def __init__(self, config: SkipConfig, adapter: FamilyAdapter, layers: nn.ModuleList) -> None:
        self.config = config
        self.adapter = adapter
        self.num_layers = len(layers)
        self.attn_params = torch.tensor([_numel(l.self_attn) for l in layers], dtype=torch.float64)
        self.mlp_params = torch.tensor([_numel(l.mlp) for l in layers], dtype=torch.float64)
        self.reset_cumulative()
        # The counts of the last forward that completed (skipgpt.stats): a refused or interrupted
        # forward leaves them as they were.
        self.last_complete: tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None = None
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()  # .forward: this thread's current or latest forward
        self._margins: dict[int, tuple] = {}

    # A lock and a thread-local cannot be copied or pickled; a copy starts with fresh ones (and an
    # empty margin cache, whose keys name the original's tensors).
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_local", "_margins")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- per forward ---------------------------------------------------------------------------
    def _begin(
        self,
        attention_mask: torch.Tensor | None,
        batch: int,
        seq: int,
        clone_first: bool = False,
        clone_all: bool = False,
        device: torch.device | None = None,
    ) -> ForwardState:
        """Called before the decoder runs: a new forward in this thread (refused before anything
        is set when the mask does not fit the input)."""
        fwd = ForwardState(self.num_layers, attention_mask, batch, seq, clone_first, clone_all, device)
        self._local.forward = fwd
        return fwd

    def forward_state(self) -> ForwardState:
        """This thread's current forward, or its latest one."""
        fwd = getattr(self._local, "forward", None)
        if fwd is None:
            fwd = self._local.forward = ForwardState(self.num_layers, None, 0, 0)
        return fwd

    def _end(self, fwd: ForwardState | None = None, completed: bool = True) -> None:
        """Called after the decoder ran: add a complete forward's counts to the running totals."""
        fwd = fwd if fwd is not None else self.forward_state()
        self._local.forward = fwd  # after a nested forward, the outer one is this thread's latest
        if not completed or not fwd.complete():
            return  # e.g. a forward that stopped early; nothing consistent to accumulate
        # Stays on the device: no host sync per forward.
        counts = torch.stack([torch.stack(c) for c in fwd.exec_counts]).detach().to(torch.float64)
        with self._lock:
            self.last_complete = (fwd.exec_counts, fwd.n_valid)
            if self.cum_exec.device != counts.device:  # once: the totals move to the model's device
                self.cum_exec, self.cum_tokens = self.cum_exec.to(counts.device), self.cum_tokens.to(counts.device)
            self.cum_exec = self.cum_exec + counts
            self.cum_tokens = self.cum_tokens + fwd.n_valid.to(counts.device)

    def reset_cumulative(self) -> None:
        self.cum_exec = torch.zeros(self.num_layers, 2, dtype=torch.float64)
        self.cum_tokens = torch.zeros((), dtype=torch.float64)

    # This thread's latest forward, as attributes (the training loop and the analysis read them).
    exec_counts = property(lambda self: self.forward_state().exec_counts)
    gates = property(lambda self: self.forward_state().gates)
    valid = property(lambda self: self.forward_state().valid)
    n_valid = property(lambda self: self.forward_state().n_valid)

    def record(self, layer_idx: int, exec_attn: torch.Tensor, exec_mlp: torch.Tensor) -> None:
        self.forward_state().record(layer_idx, exec_attn, exec_mlp)

    def sparsity(self, metric: str | None = None) -> torch.Tensor:
        """Realised sparsity of this thread's last forward, differentiable in masked mode (router
        tuning)."""
        fwd = self.forward_state()
        ea = torch.stack([c[0] for c in fwd.exec_counts]).to(torch.float32)
        em = torch.stack([c[1] for c in fwd.exec_counts]).to(torch.float32)
        return realised_sparsity(
            ea, em, fwd.n_valid.to(ea.device), self.attn_params, self.mlp_params,
            metric or self.config.sparsity_metric,
        )

    # -- backend choice --------------------------------------------------------------------------
    def resolve_mode(self, training: bool, device: torch.device, dtype: torch.dtype | None = None) -> str:
        """The concrete backend ``auto`` stands for: masked when training, else native when this
        build has kernels for ``device`` and ``dtype`` (CUDA: bf16/fp16), else reference."""
        mode = self.config.mode
        if self.config.policy != "router":
            # The top-k and random baselines decide outside the routers' linear rule.
            if mode in ("reference", "native"):
                raise ValueError(f"policy={self.config.policy!r} runs in mode='masked' only")
            return "masked"
        if mode != "auto":
            return mode
        if training:
            return "masked"
        return "native" if skipgpt_ext.has_kernels(device, dtype) else "reference"

    def backend(self, training: bool, device: torch.device, dtype: torch.dtype | None = None):
        """``None`` for the masked path, else the op module that implements the skipping."""
        mode = self.resolve_mode(training, device, dtype)
        if mode == "masked":
            return None
        if mode == "native":
            skipgpt_ext.require_kernels(device)
            return skipgpt_ext.ops
        return reference

    def stacked_margins(self, layer_idx: int, ra: nn.Module, rm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Both linear routers' margins as route_norm's ``[2, d]`` weight and ``[2]`` bias.

        Cached per layer until any router parameter or buffer changes (in place or replaced): a
        decode step should not pay a handful of small torch calls per layer to rebuild them.
        """
        tensors = [*ra.parameters(), *ra.buffers(), *rm.parameters(), *rm.buffers()]
        key = tuple((id(t), t.data_ptr(), t._version, t.device) for t in tensors)
        hit = self._margins.get(layer_idx)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        with torch.no_grad():
            (wa, ba), (wm, bm) = ra.margin_linear(), rm.margin_linear()
            w, b = torch.stack([wa, wm]).contiguous(), torch.stack([ba, bm])
        self._margins[layer_idx] = (key, w, b)
        return w, b

    def use_gumbel(self, training: bool) -> bool:
        return self.config.gate == "gumbel" or (self.config.gate == "auto" and training)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
