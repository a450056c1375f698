"""skipgpt_ext: the native op package of SkipGPT.

- :mod:`skipgpt_ext.ops` wraps ``torch.ops.skipgpt`` (schemas declared in C++).
- :mod:`skipgpt_ext.reference` is the pure-PyTorch reference with the same signatures.
- :mod:`skipgpt_ext._fake` registers fake kernels for ``torch.compile``.
"""

from __future__ import annotations

import functools

import torch  # noqa: F401  (must precede _C: the extension has no RPATH to torch's libraries)

from . import ops, reference  # noqa: F401  (reference: the public pure-PyTorch op set)

OP_NAMES = tuple(ops.__all__)  # every op declared in csrc/registration.cpp

try:
    from . import _C  # noqa: F401  (registers the schemas and any compiled kernels)
except ImportError as exc:  # a source checkout that was never built
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None
    from . import _fake  # noqa: F401


def is_built() -> bool:
    """True when the compiled extension (and so the op schemas) is loaded."""
    return _C is not None


def cpu_isa() -> str:
    """The vector ISA the CPU kernels use in this process: ``"avx512"``, ``"avx2"`` or
    ``"generic"``. Chosen once, by CPU feature; ``SKIPGPT_CPU_ISA=avx2|generic`` caps it."""
    if _C is None:
        raise RuntimeError(f"skipgpt_ext._C is not built ({_IMPORT_ERROR})")
    return _C.cpu_isa()


# Row capacities up to which the CUDA linear ops run a GEMV (decode batches) rather than a tiled
# GEMM, as the extension exports it (kGemvMaxRows, csrc/cuda/gemv_rows.h; CPU-only builds carry
# it too). 0 without the extension: there is no GEMV then.
CUDA_GEMV_MAX_ROWS: int = _C.CUDA_GEMV_MAX_ROWS if _C is not None else 0

# dtypes each device's kernels take (the CUDA GEMMs run on tensor cores: no float32 there).
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16, torch.float16),
}


def has_kernels(device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> bool:
    """True when every op has a compiled kernel for ``device``'s dispatch key (and, when
    ``dtype`` is given, when those kernels take that dtype)."""
    if _C is None:
        return False
    kind = torch.device(device).type
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(kind)
    if key is None:
        return False
    if dtype is not None and dtype not in KERNEL_DTYPES[kind]:
        return False
    return _has_key_kernels(key)


@functools.cache
def _has_key_kernels(key: str) -> bool:
    # Kernels register when _C loads and never change afterwards: ask the dispatcher once, not
    # on every layer forward (auto mode calls has_kernels per layer).
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"skipgpt::{name}", key) for name in OP_NAMES)


def require_kernels(device: str | torch.device) -> None:
    """Raise a clear error when the native ops cannot run on ``device``."""
    if _C is None:
        raise RuntimeError(
            "skipgpt_ext._C is not built, so mode='native' is unavailable "
            f"({_IMPORT_ERROR}). Build it with `pip install --no-build-isolation -e .`, "
            "or use mode='reference'."
        )
    if not has_kernels(device):
        raise RuntimeError(
            f"skipgpt_ext has no native kernels for device '{torch.device(device).type}' in this "
            "build: the op schemas are registered but their kernels are not compiled in. "
            "Use mode='reference' (pure PyTorch, same semantics)."
        )
