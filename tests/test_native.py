"""The native mode end to end against the masked dense oracle: every family and SmolLM2, in
prefill (left padding), cached chunks and generate()."""

from __future__ import annotations

import pytest
import torch

import skipgpt
import skipgpt_ext
from skipgpt import SkipConfig
from tiny_models import FAMILY_NAMES, WINDOWED_NAMES, left_padded_batch, tiny_model

pytestmark = pytest.mark.skipif(not skipgpt_ext.has_kernels("cpu"), reason="native CPU kernels not built")
TOL = 1e-4


def _mixed_stats(model):
    s = skipgpt.stats(model)
    assert 0.1 < s["attn_skip"] < 0.9 and 0.1 < s["mlp_skip"] < 0.9, s  # decisions really mixed
    return s


def test_auto_mode_resolves_to_native_in_eval_and_masked_in_train():
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode="auto"))
    st = skipgpt.state(model)
    assert st.resolve_mode(False, torch.device("cpu")) == "native"
    assert st.resolve_mode(True, torch.device("cpu")) == "masked"


@pytest.mark.parametrize("family", FAMILY_NAMES + WINDOWED_NAMES)
def test_native_equals_masked_prefill_and_cached_chunks(family):
    model = tiny_model(family)
    skipgpt.apply(model, SkipConfig(mode="masked"))
    ids, mask = left_padded_batch()
    new = torch.randint(3, 128, (3, 4), generator=torch.Generator().manual_seed(7))
    mask2 = torch.cat([mask, torch.ones_like(new)], 1)
    results = {}
    for mode in ("masked", "native"):
        skipgpt.set_mode(model, mode)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            s = _mixed_stats(model)
            step = model(input_ids=new[:, :3], attention_mask=mask2[:, :-1], past_key_values=out.past_key_values, use_cache=True)
            one = model(input_ids=new[:, 3:], attention_mask=mask2, past_key_values=step.past_key_values, use_cache=True)
        results[mode] = (out.logits, step.logits, one.logits, s)
    (pm, sm, om, stm), (pn, sn, on, stn) = results["masked"], results["native"]
    assert (pm - pn)[mask.bool()].abs().max() <= TOL
    assert (sm - sn).abs().max() <= TOL
    assert (om - on).abs().max() <= TOL
    assert stm == stn


@pytest.mark.parametrize("family", FAMILY_NAMES + WINDOWED_NAMES)
def test_native_generate_equals_masked(family):
    model = tiny_model(family)
    skipgpt.apply(model, SkipConfig(mode="masked"))
    ids, mask = left_padded_batch()
    outs = {}
    for mode in ("masked", "native"):
        skipgpt.set_mode(model, mode)
        skipgpt.reset_stats(model)
        outs[mode] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
        outs[mode + "_sparsity"] = skipgpt.stats(model, cumulative=True)["param_sparsity"]
    assert 0.1 < outs["native_sparsity"] < 0.9
    assert outs["masked_sparsity"] == outs["native_sparsity"]
    assert torch.equal(outs["masked"], outs["native"])


@pytest.mark.parametrize("family", WINDOWED_NAMES)
def test_per_layer_windows_execute_all_equals_hf(family):
    """Every module executing, native equals the unpatched HF model, whose layers 1-2 use the
    window (checked: without it the logits differ)."""
    model = tiny_model(family)
    assert [skipgpt.adapters.FAMILIES[type(model).__name__].window(l.self_attn) for l in model.model.layers] == [0, 4, 4]
    ids, mask = left_padded_batch()
    full = tiny_model(family.removesuffix("-sw"))
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        assert (dense - full(input_ids=ids, attention_mask=mask).logits)[mask.bool()].abs().max() > 1e-2
        skipgpt.apply(model, SkipConfig(threshold=0.0, mode="native"))
        got = model(input_ids=ids, attention_mask=mask).logits
    assert skipgpt.stats(model)["param_sparsity"] == 0.0
    assert (got - dense)[mask.bool()].abs().max() <= TOL


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_native_execute_all_and_skip_all(threshold):
    model = tiny_model("qwen3")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        embed_only = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
    skipgpt.apply(model, SkipConfig(threshold=threshold, mode="native"))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    want = dense if threshold == 0.0 else embed_only
    assert (got - want)[mask.bool()].abs().max() <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_half_precision_close_to_masked(dtype):
    model = tiny_model("llama", dtype=dtype)
    skipgpt.apply(model, SkipConfig(mode="masked"))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits.float()
        sa = skipgpt.stats(model)
        skipgpt.set_mode(model, "native")
        b = model(input_ids=ids, attention_mask=mask).logits.float()
    # Same decisions, a real mix of them, and two units in the last place of |logit| < 1
    # (the paths differ in the order of half-precision roundings; measured at one unit).
    assert skipgpt.stats(model) == sa and 0.2 < sa["param_sparsity"] < 0.8
    assert a[mask.bool()].abs().max() < 1
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert (a - b)[mask.bool()].abs().max() <= 2 * ulp


def test_router_update_invalidates_cached_margins():
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode="native"))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        before = skipgpt.stats(model)["attn_skip"]
        for layer in model.model.layers:  # make every attention router execute everything
            layer.router_attention.weight_predictor.bias.copy_(torch.tensor([100.0, -100.0]))
        model(input_ids=ids, attention_mask=mask)
    assert before > 0.1 and skipgpt.stats(model)["attn_skip"] == 0.0


def test_router_buffer_update_invalidates_cached_margins():
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode="native"))
    ids, mask = left_padded_batch()
    layer = model.model.layers[0]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        # Any router tensor may enter the margin (e.g. an input-scale buffer): a change to a
        # buffer must rebuild the cached margins just like a parameter change.
        buf = next(layer.router_attention.buffers(), None)
        if buf is None:
            pytest.skip("this Router has no buffers")
        buf.mul_(0.5)
        w, b = skipgpt.state(model).stacked_margins(0, layer.router_attention, layer.router_mlp)
        wa, ba = layer.router_attention.margin_linear()
        assert torch.equal(w[0], wa) and torch.equal(b[0], ba)


@pytest.mark.parametrize("target", ["k_proj", "v_proj"])
def test_native_keeps_a_wrapped_k_or_v_proj(target):
    """K and V run through the fused projection op only for a plain nn.Linear; a LoRA-wrapped
    one (random, non-zero adapter) must keep the module path, so native still equals masked."""
    peft = pytest.importorskip("peft")
    model = tiny_model("qwen3")  # k_norm too
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[target], init_lora_weights=False)
    model = peft.get_peft_model(model, lora).base_model.model
    assert type(getattr(model.model.layers[0].self_attn, target)) is not torch.nn.Linear
    skipgpt.apply(model, SkipConfig(mode="masked"))
    ids, mask = left_padded_batch()
    logits = {}
    for mode in ("masked", "native"):
        skipgpt.set_mode(model, mode)
        with torch.no_grad():
            logits[mode] = model(input_ids=ids, attention_mask=mask).logits
        _mixed_stats(model)
    assert (logits["masked"] - logits["native"])[mask.bool()].abs().max() <= TOL


# -- what the skipping modes refuse, with a clear error, and nothing lost ----------------------------
def _four_d_mask(ids, mask):
    B, S = ids.shape
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    keep = causal[None, None] & mask.bool()[:, None, None, :]
    return torch.zeros(B, 1, S, S).masked_fill(~keep, float("-inf"))


def _lora_q(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))


REFUSED = {
    "4d_mask": ({}, {}, lambda m, ids, mask: m(input_ids=ids, attention_mask=_four_d_mask(ids, mask)),
                ValueError, "need the 2D attention_mask"),
    "static_cache": ({}, {}, lambda m, ids, mask: m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                                                             do_sample=False, pad_token_id=0, cache_implementation="static"),
                     NotImplementedError, "support the dynamic KV cache.*got StaticLayer"),
    "mlp_bias": ({"mlp_bias": True}, {}, None, NotImplementedError, "do not support MLP biases"),
    "policy": ({}, {"policy": "topk", "capacity": 0.5}, None, ValueError, "policy='topk' runs in mode='masked' only"),
    "lora_wrapped_q": ({}, {}, lambda m, ids, mask: _lora_q(m)(input_ids=ids, attention_mask=mask),
                       NotImplementedError, "need plain nn.Linear projections"),
    "short_mask": ({}, {}, lambda m, ids, mask: m(input_ids=ids, attention_mask=mask[:, 1:]),
                   ValueError, r"attention_mask is \(3, 11\), but the input is 3 sequences of 12 tokens"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_skipping_modes_refuse_what_they_cannot_run(case):
    model_kw, cfg_kw, call, exc, match = REFUSED[case]
    model = tiny_model("llama", **model_kw)
    ids, mask = left_padded_batch()
    skipgpt.apply(model, SkipConfig(mode="masked", **cfg_kw))
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        skipgpt.set_mode(model, "native")
        with pytest.raises(exc, match=match):
            (call or (lambda m, i, k: m(input_ids=i, attention_mask=k)))(model, ids, mask)
        # Nothing lost: the masked path still gives the same logits (a fresh LoRA adds zero).
        skipgpt.set_mode(model, "masked")
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_decode_step_mask_must_cover_the_cache():
    """A decode step whose mask misses the new token is refused before any layer writes the
    cache: a retry with the right mask then gives what a fresh run gives."""
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode="native"))
    ids, mask = left_padded_batch()
    step, mask2 = torch.tensor([[5], [6], [7]]), torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        fresh = model(input_ids=ids, attention_mask=mask, use_cache=True)
        want = model(input_ids=step, attention_mask=mask2, past_key_values=fresh.past_key_values).logits
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache, before = out.past_key_values, skipgpt.stats(model)
        with pytest.raises(ValueError, match="attention_mask covers 12 positions but the cache plus this input hold 13"):
            model(input_ids=step, attention_mask=mask, past_key_values=cache)
        assert [cache.get_seq_length(i) for i in range(3)] == [12, 12, 12]
        assert skipgpt.stats(model) == before  # still the last complete forward's
        got = model(input_ids=step, attention_mask=mask2, past_key_values=cache).logits
    assert torch.equal(got, want)
