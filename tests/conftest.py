"""Fixtures shared by the test files: the skipping backends, and the real model loaded once."""

from __future__ import annotations

import pytest

import skipgpt_ext

# The native backend runs where the CPU kernels are built; elsewhere its cases are skipped.
NATIVE = pytest.param(
    "native", marks=pytest.mark.skipif(not skipgpt_ext.has_kernels("cpu"), reason="native CPU kernels not built")
)


@pytest.fixture(params=["reference", NATIVE])
def backend(request) -> str:
    """A skipping mode (real skipping): the pure-PyTorch reference ops or the native kernels."""
    return request.param


@pytest.fixture(params=["masked", "reference", NATIVE])
def any_mode(request) -> str:
    """Every mode of the one layer forward: the masked dense oracle and both skipping backends."""
    return request.param


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer (offline, from the skipgpt cache), loaded once
    per session. Tests that patch it must remove the patch (``skipgpt.remove``) before they end."""
    from skipgpt import models

    return models.load_model()
