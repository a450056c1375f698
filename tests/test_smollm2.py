"""The real model (SmolLM2-135M-Instruct, offline) patched, against the unpatched HF model and the
masked dense oracle, on every backend."""

from __future__ import annotations

import pytest
import torch

import skipgpt
from skipgpt import SkipConfig, data


@pytest.fixture(scope="module")
def smollm2_batch(smollm2):
    model, tok = smollm2
    blocks = data.pack_tokens(data.load_texts("shakespeare", "test"), tok, 96, max_blocks=2)
    # Left-pad the second row by 16 tokens, as a batched generate would.
    mask = torch.ones_like(blocks)
    blocks[1, :16] = tok.pad_token_id
    mask[1, :16] = 0
    with torch.no_grad():
        dense = model(input_ids=blocks, attention_mask=mask).logits
    return model, tok, blocks, mask, dense


def test_smollm2_execute_all_equals_unpatched(smollm2_batch, any_mode):
    model, _, ids, mask, dense = smollm2_batch
    skipgpt.apply(model, SkipConfig(threshold=0.0, mode=any_mode))
    try:
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
        v = mask.bool()
        # fp32 reassociation over 30 layers: the torch paths stay under 1e-4; the native kernels
        # (their own GEMM splits, blocked attention) at ~3e-6 of the logits' scale (1.2e-4 measured).
        tol = 1e-5 * dense[v].abs().max() if any_mode == "native" else 1e-4
        assert (got - dense)[v].abs().max() <= tol
        assert skipgpt.stats(model)["param_sparsity"] == 0.0
    finally:
        skipgpt.remove(model)


def test_smollm2_skipping_close_to_masked_at_25_percent(smollm2_batch, backend):
    """Prefill logits and statistics, then greedy generation, against the masked oracle."""
    model, tok, ids, mask, _ = smollm2_batch
    skipgpt.apply(model, SkipConfig(mode="masked"))
    try:
        skipgpt.calibrate_bias(model, ids, 0.25, attention_mask=mask)
        res = {}
        for mode in ("masked", backend):
            skipgpt.set_mode(model, mode)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
            s = skipgpt.stats(model)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            res[mode] = (logits, s, gen)
        (masked, s_masked, g_masked), (got, s_got, g_got) = res["masked"], res[backend]
        assert s_masked == s_got
        assert 0.15 < s_got["param_sparsity"] < 0.35
        v = mask.bool()
        # 30 layers of fp32 reassociation (compacted GEMMs, fp32 attention): relative ~1e-4.
        scale = masked[v].abs().max()
        assert (masked - got)[v].abs().max() <= 2e-4 * scale
        assert (masked.argmax(-1) == got.argmax(-1))[v].float().mean() >= 0.99
        assert torch.equal(g_masked, g_got)
    finally:
        skipgpt.remove(model)
