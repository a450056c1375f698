"""The Hopper (wgmma) kernels' shared-memory layouts against the PTX ISA's canonical layouts.

csrc/cuda/sm90_layout.h holds, as constexpr C++, the swizzled tiles the wgmma GEMM and attention
kernels store and the descriptor starts and strides they read them with, plus static_asserts
that every operand element a descriptor addresses (by the ISA's canonical K-major and MN-major
128-byte-swizzle layouts) is the element stored there, and that the TMA boxes of the weight
tiles (wgmma-tma) land, under the hardware's 128-byte swizzle, as that same tile. Compiling the header runs those checks;
no GPU is needed. A deliberately wrong stride must make the same compile fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")


def _compile(*defines: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CXX, "-std=c++20", "-fsyntax-only", "-x", "c++", "-", "-I", os.path.join(ROOT, "csrc", "cuda"), *defines],
        input='#include "sm90_layout.h"\n', capture_output=True, text=True, timeout=120,
    )


def test_descriptors_read_what_the_kernels_store():
    r = _compile()
    assert r.returncode == 0, r.stderr


def test_a_wrong_stride_fails_the_check():
    r = _compile("-DSKIPGPT_LAYOUT_BREAK=16")  # 16 bytes off: the next 16-byte chunk
    assert r.returncode != 0
    assert "GEMM A, warpgroup 0" in r.stderr and "attention V, head_dim 128" in r.stderr
    assert "GEMM B by TMA, 256 rows" in r.stderr
    assert "GEMM B, 256 rows" not in r.stderr  # only the broken checks fail
