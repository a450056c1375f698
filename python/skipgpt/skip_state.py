"""The run-time state of a patched model, and where to find it.

:class:`SkipState` is what the layers of one patched model share (the config, the family
adapter, statistics); :class:`ForwardState` is what one forward of the decoder knows and
records. :func:`state` and :func:`is_patched` find a model's state, :meth:`SkipState.set_config`
changes its config fields (all or nothing) and :func:`overrides` changes them for a ``with``
block. Everything else (patching, checkpoints, calibration, the layer forward) builds on this
module, which imports none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, NamedTuple

import torch
from torch import nn

import skipgpt_ext
from skipgpt_ext import reference

from .adapters import FamilyAdapter, active_params, unwrap
from .config import SkipConfig
from .sparsity import realised_sparsity


# The keyword argument through which the decoder's pre-hook hands one forward's state to that
# forward's layers (HF passes a decoder's extra keyword arguments on to every layer).
FORWARD_KWARG = "skipgpt_forward"


class RowTables(NamedTuple):
    """Per-row tables of one forward's ``T = B * S`` token rows, shared by its layers."""

    positions: torch.Tensor  # [T] int64: each row's position in the cache
    cos: torch.Tensor  # [T, head_dim]: each row's RoPE table
    sin: torch.Tensor  # [T, head_dim]
    all_idx: torch.Tensor  # [T] int64: the identity compaction (every row), that K and V run with
    all_count: torch.Tensor  # 0-dim int64: T


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
        self._row_tables: tuple[torch.Tensor, tuple, RowTables] | None = None  # see row_tables()
        self.exec_counts: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.gates: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def complete(self) -> bool:
        return all(c is not None for c in self.exec_counts)

    def record(self, layer_idx: int, exec_attn: torch.Tensor, exec_mlp: torch.Tensor) -> None:
        self.exec_counts[layer_idx] = (exec_attn, exec_mlp)

    def row_tables(self, past: int, B: int, S: int, cos: torch.Tensor, sin: torch.Tensor) -> RowTables:
        """The :class:`RowTables` of this forward's ``B x S`` token rows, whose first position
        in the cache is ``past``. The same for every layer of a forward, so built once (the
        cache entry holds ``cos`` itself, so a hit is exact)."""
        cached = self._row_tables
        if cached is None or cached[0] is not cos or cached[1] != (past, B, S):
            hd, T, dev = cos.shape[-1], B * S, cos.device
            tables = RowTables(
                positions=torch.arange(past, past + S, device=dev).repeat(B),
                cos=cos.expand(B, S, hd).reshape(T, hd),
                sin=sin.expand(B, S, hd).reshape(T, hd),
                all_idx=torch.arange(T, device=dev),
                all_count=torch.full((), T, dtype=torch.long, device=dev),
            )
            cached = self._row_tables = (cos, (past, B, S), tables)
        return cached[2]


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
        # A mixture of experts counts what one token uses: the router and its top-k experts.
        self.mlp_params = torch.tensor([active_params(l.mlp) for l in layers], dtype=torch.float64)
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
    def _begin(self, attention_mask: torch.Tensor | None, batch: int, seq: int, **options: Any) -> ForwardState:
        """Called before the decoder runs: a new forward in this thread (``options`` are
        :class:`ForwardState`'s; refused before anything is set when the mask does not fit the
        input)."""
        fwd = ForwardState(self.num_layers, attention_mask, batch, seq, **options)
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

    def set_config(self, **fields: Any) -> None:
        """Set config fields if the result validates; a refused value changes nothing."""
        new = dataclasses.replace(self.config, **fields)  # validated (and numbers normalised) here
        for name in fields:
            setattr(self.config, name, getattr(new, name))

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

    def summary(self, exec_counts, n_valid) -> dict[str, Any]:
        """The statistics of one forward (its per-layer execute counts and its real-token count),
        as :func:`skipgpt.stats` reports them."""
        counts = torch.tensor([[float(a), float(m)] for a, m in exec_counts], dtype=torch.float64)
        return self.summary_of_counts(counts, float(n_valid))

    def summary_of_counts(self, counts: torch.Tensor, n: float) -> dict[str, Any]:
        """Skip rates and sparsities of ``counts`` ``[layers, 2]`` executed tokens out of ``n``."""
        ea, em = counts[:, 0], counts[:, 1]
        denom = max(n, 1.0)
        return {
            "tokens": int(n),
            "layers": [
                {"attn_skip": 1 - float(a) / denom, "mlp_skip": 1 - float(m) / denom} for a, m in zip(ea, em)
            ],
            "attn_skip": 1 - float(ea.mean()) / denom,
            "mlp_skip": 1 - float(em.mean()) / denom,
            "module_sparsity": float(realised_sparsity(ea, em, n, self.attn_params, self.mlp_params, "modules")),
            "param_sparsity": float(realised_sparsity(ea, em, n, self.attn_params, self.mlp_params, "params")),
        }

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

    def sequence_sparsity(self, metric: str | None = None) -> torch.Tensor:
        """``[B]``: the realised sparsity of each sequence of this thread's last forward, over its
        valid tokens. Differentiable; needs the per-token gates, which only the masked (training)
        path records."""
        fwd = self.forward_state()
        if any(g is None for g in fwd.gates):
            raise RuntimeError("per-sequence sparsity needs the per-token gates of a complete forward in "
                               "mode='masked' (router tuning); this forward did not record them")
        # Gates are [B, S] (padding already zeroed); per layer, each sequence's execute count.
        ea = torch.stack([g[0].sum(-1) for g in fwd.gates]).to(torch.float32)
        em = torch.stack([g[1].sum(-1) for g in fwd.gates]).to(torch.float32)
        B, S = fwd.gates[0][0].shape
        n = fwd.valid.sum(-1) if fwd.valid is not None else torch.full((B,), S, device=ea.device)
        return realised_sparsity(
            ea, em, n.to(ea.device), self.attn_params, self.mlp_params, metric or self.config.sparsity_metric,
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



def is_patched(model: nn.Module) -> bool:
    return hasattr(unwrap(model), "skipgpt_state")


def state(model: nn.Module) -> SkipState:
    """The :class:`SkipState` of a patched model (or of the model inside a peft wrapper)."""
    base = unwrap(model)
    if not hasattr(base, "skipgpt_state"):
        raise ValueError("this model has no SkipGPT routers; call skipgpt.apply(model, SkipConfig()) first")
    return base.skipgpt_state


@contextlib.contextmanager
def overrides(model: nn.Module, **fields: Any):
    """Set :class:`SkipConfig` fields for the duration of a ``with`` block, then restore them
    (also on error; a refused value changes nothing). E.g. ``with overrides(model, threshold=0.0,
    gate="deterministic"):`` runs the dense model."""
    st = state(model)
    old = {name: getattr(st.config, name) for name in fields}
    st.set_config(**fields)
    try:
        yield st.config
    finally:
        for name, value in old.items():
            setattr(st.config, name, value)
