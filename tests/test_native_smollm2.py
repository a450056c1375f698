"""The native mode on the real model (SmolLM2-135M, offline) against the masked dense oracle."""

from __future__ import annotations

import pytest
import torch

import skipgpt
import skipgpt_ext
from skipgpt import SkipConfig

pytestmark = pytest.mark.skipif(not skipgpt_ext.has_kernels("cpu"), reason="native CPU kernels not built")


def test_smollm2_native_equals_masked_prefill_and_generate():
    from skipgpt import data, models

    model, tok = models.load_model()
    ids = data.pack_tokens(data.load_texts("shakespeare", "test"), tok, 64, max_blocks=2)
    mask = torch.ones_like(ids)
    ids[1, :12] = tok.pad_token_id
    mask[1, :12] = 0
    skipgpt.apply(model, SkipConfig(mode="masked"))
    try:
        res = {}
        for mode in ("masked", "native"):
            skipgpt.set_mode(model, mode)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
            s = skipgpt.stats(model)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            res[mode] = (logits, s, gen)
        (lm, sm, gm), (ln, sn, gn) = res["masked"], res["native"]
        assert sm == sn and 0.1 < sn["param_sparsity"] < 0.9  # untrained routers: ~half skip
        v = mask.bool()
        assert (lm - ln)[v].abs().max() <= 2e-4 * lm[v].abs().max()
        assert torch.equal(gm, gn)
    finally:
        skipgpt.remove(model)
