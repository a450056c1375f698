"""The families beyond Llama's structure (Gemma 2/3, Phi-3, OLMo 2, SmolLM3, Granite, Qwen3-MoE)
against their oracles: the unpatched HF model, the same model with every decoder layer made the
identity (skip-all), and the masked dense path (reference and native skipping), in prefill with
left padding, cached chunks and generate(). Each tiny model has its family's peculiarity active
(tests/tiny_models.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import skipgpt
from skipgpt import SkipConfig
from skipgpt.adapters import active_params, adapter_for
from test_patching import assert_skipping_equals_masked_in_chunks
from tiny_models import NEW_FAMILY_NAMES, left_padded_batch, tiny_model

TOL = 1e-4


def _logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def _identity_layers(model):
    """Hooks that make every decoder layer return its input: what skipping every module is."""
    hooks = []
    for layer in adapter_for(model).layers(model):
        seen = {}

        def pre(mod, args, kwargs, seen=seen):
            seen["h"] = args[0] if args else kwargs["hidden_states"]

        def post(mod, args, kwargs, out, seen=seen):
            return seen["h"]

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.register_forward_hook(post, with_kwargs=True))
    return hooks


@pytest.mark.parametrize("family", NEW_FAMILY_NAMES)
def test_peculiarity_is_active(family):
    """Each tiny model really exercises what its family adds (else the oracles prove nothing)."""
    model = tiny_model(family)
    attn = model.model.layers[0].self_attn
    ad = adapter_for(model)
    if family in ("gemma2", "gemma3"):
        assert ad.softcap(attn) == (0.5 if family == "gemma2" else 0.0)
        assert ad.window(attn) == 3 and ad.window(model.model.layers[1].self_attn) == 0
        assert ad.norm_offset == 1.0 and ad.norm(model.model.layers[0], 3) is not None
        if family == "gemma2":  # the cap changes the logits far beyond the tolerance
            ids, mask = left_padded_batch()
            capped = _logits(model, ids, mask)
            for layer in model.model.layers:
                layer.self_attn.attn_logit_softcapping = None
            assert (capped - _logits(model, ids, mask))[mask.bool()].abs().max() > 0.1
        # Gemma 3's local and global layers rotate with different RoPE bases.
        if family == "gemma3":
            rope = model.model.rotary_emb
            assert not torch.equal(rope.sliding_attention_inv_freq, rope.full_attention_inv_freq)
    elif family == "phi3":
        assert ad.projection(attn, "k")[1] == slice(64, 96) and ad.window(attn) == 5
    elif family == "olmo2":
        assert ad.norm(model.model.layers[0], 0) is None and attn.q_norm.weight.shape == (64,)
    elif family == "smollm3":
        assert [ad.rope(l.self_attn) for l in model.model.layers] == [True, False, True]
    elif family == "granite":
        assert ad.residual_scale(model.model.layers[0]) == 0.6 and attn.scaling == 0.2
    elif family == "qwen3_moe":
        moe, dense = model.model.layers[0].mlp, model.model.layers[1].mlp
        # A token uses the router and 2 of the 4 experts.
        experts = sum(p.numel() for p in moe.experts.parameters())
        assert active_params(moe) == moe.gate.weight.numel() + experts // 2
        assert active_params(dense) == sum(p.numel() for p in dense.parameters())


@pytest.mark.parametrize("family", NEW_FAMILY_NAMES)
def test_execute_all_equals_unpatched(family, any_mode):
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    dense = _logits(model, ids, mask)
    skipgpt.apply(model, SkipConfig(threshold=0.0, mode=any_mode))
    assert (_logits(model, ids, mask) - dense)[mask.bool()].abs().max() <= TOL
    s = skipgpt.stats(model)
    assert s["module_sparsity"] == 0.0 and s["param_sparsity"] == 0.0


@pytest.mark.parametrize("family", NEW_FAMILY_NAMES)
def test_skip_all_equals_identity_layers(family, any_mode):
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    hooks = _identity_layers(model)
    expected = _logits(model, ids, mask)
    for h in hooks:
        h.remove()
    assert (expected - _logits(model, ids, mask))[mask.bool()].abs().max() > 1e-2  # the layers matter
    skipgpt.apply(model, SkipConfig(threshold=1.0, mode=any_mode))
    assert (_logits(model, ids, mask) - expected)[mask.bool()].abs().max() <= TOL
    assert skipgpt.stats(model)["param_sparsity"] == 1.0


@pytest.mark.parametrize("family", NEW_FAMILY_NAMES)
def test_skipping_equals_masked_prefill_and_cached_chunks(family, backend):
    model = tiny_model(family)
    skipgpt.apply(model, SkipConfig(mode="masked"))  # untrained routers: ~50% random decisions
    assert_skipping_equals_masked_in_chunks(model, backend)


@pytest.mark.parametrize("family", NEW_FAMILY_NAMES)
def test_generate_matches_masked(family, backend):
    model = tiny_model(family)
    skipgpt.apply(model, SkipConfig(mode="masked"))
    ids, mask = left_padded_batch()
    outs = {}
    for mode in ("masked", backend):
        skipgpt.set_mode(model, mode)
        skipgpt.reset_stats(model)
        outs[mode] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert 0.1 < skipgpt.stats(model, cumulative=True)["param_sparsity"] < 0.9
    assert outs["masked"].shape == (3, ids.shape[1] + 16)
    assert torch.equal(outs["masked"], outs[backend])


@pytest.mark.parametrize("family", NEW_FAMILY_NAMES)
def test_save_load_and_remove(family, tmp_path):
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    before = _logits(model, ids, mask)
    state = copy.deepcopy(model.state_dict())
    skipgpt.apply(model, SkipConfig(mode="reference", threshold=0.55))
    patched = _logits(model, ids, mask)
    skipgpt.save_routers(model, tmp_path)
    other = skipgpt.apply(tiny_model(family), from_dir=tmp_path)
    assert torch.equal(_logits(other, ids, mask), patched)
    skipgpt.remove(model)
    assert torch.equal(_logits(model, ids, mask), before)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_lora_on_fused_projections_then_merged_skipping(backend):
    """Phi-3's LoRA targets are its fused projections; merged, the skipping modes run them and
    equal the masked path, which runs the unmerged adapter."""
    peft = pytest.importorskip("peft")
    from skipgpt.train import lora_targets

    model = tiny_model("phi3")
    targets = lora_targets(model, ("q_proj", "v_proj", "gate_proj"))
    assert targets == ["qkv_proj", "gate_up_proj"]
    skipgpt.apply(model, SkipConfig(mode="masked"))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    ids, mask = left_padded_batch()
    with_adapter = _logits(lora, ids, mask)
    merged = lora.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.qkv_proj) is torch.nn.Linear
    skipgpt.set_mode(merged, backend)
    assert (_logits(merged, ids, mask) - with_adapter)[mask.bool()].abs().max() <= TOL
