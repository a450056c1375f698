"""The CUDA kernel choices, for the GPU tests and benchmarks: ``SKIPGPT_CUDA_GEMM`` (the tiled
GEMM mainloop) and ``SKIPGPT_CUDA_ATTN`` (the prefill attention kernel).

The kernels read these variables at every launch, so one process can run and compare the
variants by switching them. The ``skipgpt_ext`` package never sets them; the GPU tests
(``tests/test_cuda.py``), the layout probe and the CUDA benchmarks do, through this module,
and always restore them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def kernel_env(var: str, value: str) -> Iterator[None]:
    """``os.environ[var] = value`` for the ``with`` block; the old value (or its absence) after."""
    saved = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = saved


def gemm_unavailable(mainloop: str) -> str | None:
    """Why ``SKIPGPT_CUDA_GEMM=mainloop`` cannot run on the current CUDA device and build (the
    ops' own error message), or None.

    A one-row GEMM takes the GEMV, so the op checks the variable without launching a tiled
    kernel. The wgmma GEMMs and the wgmma prefill attention kernels share one condition
    (compute capability 9.0 and sm_90a code), so ``"wgmma"`` also answers for
    ``SKIPGPT_CUDA_ATTN=wgmma`` / ``wgmma-overlap``.
    """
    from skipgpt_ext import ops, reference

    with kernel_env("SKIPGPT_CUDA_GEMM", mainloop):
        try:
            x = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
            idx, cnt = reference.compact(torch.ones(1, dtype=torch.bool, device="cuda"))
            ops.linear_scatter_add_(x.clone(), x, idx, cnt, torch.randn(64, 64, device="cuda", dtype=x.dtype), None)
        except RuntimeError as e:
            if "needs a compute-capability 9.0 GPU" not in str(e):
                raise
            return str(e).splitlines()[0]
    return None
