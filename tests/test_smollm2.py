"""The real model (SmolLM2-135M-Instruct, offline) patched, against the unpatched HF model."""

from __future__ import annotations

import pytest
import torch

import skipgpt
from skipgpt import SkipConfig, data, models


@pytest.fixture(scope="module")
def smollm2():
    model, tok = models.load_model()
    blocks = data.pack_tokens(data.load_texts("shakespeare", "test"), tok, 96, max_blocks=2)
    # Left-pad the second row by 16 tokens, as a batched generate would.
    mask = torch.ones_like(blocks)
    blocks[1, :16] = tok.pad_token_id
    mask[1, :16] = 0
    with torch.no_grad():
        dense = model(input_ids=blocks, attention_mask=mask).logits
    return model, tok, blocks, mask, dense


@pytest.mark.parametrize("mode", ["masked", "reference"])
def test_smollm2_execute_all_equals_unpatched(smollm2, mode):
    model, _, ids, mask, dense = smollm2
    skipgpt.apply(model, SkipConfig(threshold=0.0, mode=mode))
    try:
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
        assert (got - dense)[mask.bool()].abs().max() <= 1e-4
        assert skipgpt.stats(model)["param_sparsity"] == 0.0
    finally:
        skipgpt.remove(model)


def test_smollm2_reference_close_to_masked_at_25_percent(smollm2):
    model, _, ids, mask, _ = smollm2
    skipgpt.apply(model, SkipConfig(mode="masked"))
    try:
        skipgpt.calibrate_bias(model, ids, 0.25, attention_mask=mask)
        with torch.no_grad():
            masked = model(input_ids=ids, attention_mask=mask).logits
            s_masked = skipgpt.stats(model)
            skipgpt.set_mode(model, "reference")
            ref = model(input_ids=ids, attention_mask=mask).logits
            s_ref = skipgpt.stats(model)
        assert s_masked == s_ref
        assert 0.15 < s_ref["param_sparsity"] < 0.35
        v = mask.bool()
        # 30 layers of fp32 reassociation (compacted GEMMs, fp32 attention): relative ~1e-4.
        scale = masked[v].abs().max()
        assert (masked - ref)[v].abs().max() <= 2e-4 * scale
        assert (masked.argmax(-1) == ref.argmax(-1))[v].float().mean() >= 0.99
    finally:
        skipgpt.remove(model)
