"""SkipConfig: everything that describes a SkipGPT adapter, saved as JSON beside the routers."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any

from .gates import POLICIES, check_capacity

MODES = ("masked", "reference", "native", "auto")
ROUTER_TYPES = ("linear", "mlp")
SPARSITY_METRICS = ("modules", "params")
GATE_MODES = ("auto", "gumbel", "deterministic")


@dataclasses.dataclass
class SkipConfig:
    """Configuration of the two routers per decoder layer and of how they run.

    Attributes:
        router_type: ``"linear"`` (``Linear(d, 2)``, the paper's and the released checkpoints')
            or ``"mlp"`` (``d -> d/4 -> ReLU -> 2``, the authors' current training code).
        init_execute_bias: initial value of ``b_exec - b_skip`` for fresh routers. ``0.0`` is
            the paper's zero-bias Kaiming init; a positive value starts near "execute all".
        threshold: inference decision: execute iff ``p_exec > threshold``. ``0.0`` executes
            every token, ``1.0`` skips every token. Settable at run time.
        mode: ``masked`` (dense compute times gate: the oracle and training path),
            ``reference`` (real skipping in pure PyTorch), ``native`` (the skipgpt_ext
            kernels), or ``auto`` (native when its kernels are built, else reference).
        gate: ``auto`` (hard straight-through gates in train mode, deterministic in eval
            mode), ``gumbel`` (straight-through in both) or ``deterministic`` (the inference
            rule, no gradient; e.g. LoRA recovery with frozen routers).
        tau: temperature of the straight-through gradient (training anneals it).
        gate_noise: scale of the Gumbel noise in straight-through gates: ``1.0`` is the
            paper's hard Gumbel-softmax sample, ``0.0`` the deterministic straight-through gate
            (its forward is the inference rule). Router tuning anneals it.
        sparsity_target / alpha / sparsity_metric: the global sparsity objective
            ``L = L_LM + alpha * |target - s|`` used by router tuning.
        policy: ``router`` (SkipGPT), or a dynamic baseline: ``topk`` (MoD-D: the ``capacity``
            fraction of each sequence's tokens with the highest margin executes) or ``random``
            (each token executes with probability ``capacity``; ``seed`` fixes the pattern).
            See :mod:`skipgpt.gates`. The baselines run in ``masked`` mode.
    """

    router_type: str = "linear"
    init_execute_bias: float = 0.0
    threshold: float = 0.5
    mode: str = "auto"
    gate: str = "auto"
    tau: float = 1.0
    gate_noise: float = 1.0
    sparsity_target: float = 0.25
    alpha: float = 8.0
    sparsity_metric: str = "params"
    policy: str = "router"
    capacity: float = 0.75
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; numbers of other types (numpy scalars, ints) become Python
        ``float``/``int`` (so the config saves as JSON). Errors name the field."""
        for name in _FLOAT_FIELDS:
            setattr(self, name, _real(name, getattr(self, name)))
        self.seed = _integer("seed", self.seed)
        _check_choice("router_type", self.router_type, ROUTER_TYPES)
        _check_choice("mode", self.mode, MODES)
        _check_choice("gate", self.gate, GATE_MODES)
        _check_choice("sparsity_metric", self.sparsity_metric, SPARSITY_METRICS)
        _check_choice("policy", self.policy, POLICIES)
        check_capacity(self.capacity)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1], got {self.threshold}")
        if not 0.0 <= self.sparsity_target < 1.0:
            raise ValueError(f"sparsity_target must be in [0, 1), got {self.sparsity_target}")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if not (self.gate_noise >= 0 and math.isfinite(self.gate_noise)):
            raise ValueError(f"gate_noise must be finite and >= 0, got {self.gate_noise}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")

    @property
    def threshold_logit(self) -> float:
        """The decision threshold on the router margin ``logit_exec - logit_skip``."""
        return threshold_to_logit(self.threshold)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SkipConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SkipConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path, **extra: Any) -> None:
        Path(path).write_text(json.dumps({**self.to_dict(), **extra}, indent=2, sort_keys=True))


def threshold_to_logit(p: float) -> float:
    """``p_exec > p``  <=>  ``margin > log(p / (1 - p))``, with 0 and 1 mapped to -inf and +inf."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


_FLOAT_FIELDS = ("init_execute_bias", "threshold", "tau", "sparsity_target", "alpha", "capacity")


def _real(name: str, value: Any) -> float:
    """``value`` as a finite Python float; a string, bool, None, NaN or inf is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
