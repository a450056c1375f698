"""The patched model against its oracles: the unpatched HF model and the masked dense path.

Every family, in prefill (left padding), cached chunks and generate(). The skipping tests run
on both backends (the ``backend`` fixture: the pure-PyTorch reference ops and the native CPU
kernels; the native cases are skipped where the kernels are not built)."""

from __future__ import annotations

import pytest
import torch

import skipgpt
import skipgpt_ext
from skipgpt import SkipConfig
from tiny_models import FAMILY_NAMES, WINDOWED_NAMES, left_padded_batch, tiny_model

TOL = 1e-4


def _logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


@pytest.mark.parametrize("family", FAMILY_NAMES + WINDOWED_NAMES)
def test_execute_all_equals_unpatched(family, any_mode):
    mode = any_mode
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    dense = _logits(model, ids, mask)
    dense_nopad = _logits(model, ids[:, -5:], None)
    skipgpt.apply(model, SkipConfig(threshold=0.0, mode=mode))
    valid = mask.bool()
    assert (_logits(model, ids, mask) - dense)[valid].abs().max() <= TOL
    assert (_logits(model, ids[:, -5:], None) - dense_nopad).abs().max() <= TOL
    s = skipgpt.stats(model)
    assert s["tokens"] == 15 and s["module_sparsity"] == 0.0 and s["param_sparsity"] == 0.0


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_skip_all_is_norm_head_of_embeddings(family, any_mode):
    mode = any_mode
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
    skipgpt.apply(model, SkipConfig(threshold=1.0, mode=mode))
    got = _logits(model, ids, mask)
    assert (got - expected)[mask.bool()].abs().max() <= TOL
    s = skipgpt.stats(model)
    assert s["attn_skip"] == 1.0 and s["mlp_skip"] == 1.0 and s["param_sparsity"] == 1.0


def _mixed(model, ids, mask):
    s = skipgpt.stats(model)
    # The comparison only means something if decisions are really mixed.
    assert 0.1 < s["attn_skip"] < 0.9 and 0.1 < s["mlp_skip"] < 0.9, s
    return s


def _in_modes(model, backend, run):
    """``run(model)`` under the masked oracle, then under ``backend``: both results."""
    out = {}
    for mode in ("masked", backend):
        skipgpt.set_mode(model, mode)
        with torch.no_grad():
            out[mode] = run(model)
    return out["masked"], out[backend]


def assert_skipping_equals_masked_in_chunks(model, backend: str) -> None:
    """A patched model's prefill (left padding, mixed decisions), a 3-token cached chunk and a
    decode step under ``backend`` against the masked oracle: logits within TOL, same decisions."""
    ids, mask = left_padded_batch()
    new = torch.randint(3, 128, (3, 4), generator=torch.Generator().manual_seed(7))
    mask2 = torch.cat([mask, torch.ones_like(new)], 1)
    results = {}
    for mode in ("masked", backend):
        skipgpt.set_mode(model, mode)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            s1 = _mixed(model, ids, mask)
            cache = out.past_key_values
            step = model(input_ids=new[:, :3], attention_mask=mask2[:, :-1], past_key_values=cache, use_cache=True)
            one = model(input_ids=new[:, 3:], attention_mask=mask2, past_key_values=step.past_key_values, use_cache=True)
        results[mode] = (out.logits, step.logits, one.logits, s1)
    (pm, sm, om, stm), (pr, sr, orr, str_) = results["masked"], results[backend]
    valid = mask.bool()
    assert (pm - pr)[valid].abs().max() <= TOL
    assert (sm - sr).abs().max() <= TOL
    assert (om - orr).abs().max() <= TOL
    assert stm == str_


@pytest.mark.parametrize("family", FAMILY_NAMES + WINDOWED_NAMES)
def test_skipping_equals_masked_prefill_and_cached_chunks(family, backend):
    model = tiny_model(family)
    skipgpt.apply(model, SkipConfig(mode="masked"))  # untrained routers: ~50% random decisions
    assert_skipping_equals_masked_in_chunks(model, backend)


@pytest.mark.parametrize("family", FAMILY_NAMES + WINDOWED_NAMES)
def test_generate_matches_masked(family, backend):
    model = tiny_model(family)
    skipgpt.apply(model, SkipConfig(mode="masked"))
    ids, mask = left_padded_batch()
    outs, sparsity = {}, {}
    for mode in ("masked", backend):
        skipgpt.set_mode(model, mode)
        skipgpt.reset_stats(model)
        outs[mode] = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0
        )
        cum = skipgpt.stats(model, cumulative=True)
        # Every prompt token is routed once in prefill, then 3 tokens per step for 31 steps.
        assert cum["tokens"] == int(mask.sum()) + 3 * 31
        assert 0.1 < cum["param_sparsity"] < 0.9
        sparsity[mode] = cum["param_sparsity"]
    assert outs["masked"].shape == (3, ids.shape[1] + 32)
    assert torch.equal(outs["masked"], outs[backend])
    assert sparsity["masked"] == sparsity[backend]


def test_generate_sampling_runs_with_skipping(backend):
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode=backend))
    ids, mask = left_padded_batch()
    torch.manual_seed(0)
    a = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(0)
    skipgpt.set_mode(model, "masked")
    b = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert a.shape == (3, ids.shape[1] + 8) and torch.equal(a, b)


# Two units in the last place of the logits (|logit| < 1 here): the paths differ only in the
# order of half-precision roundings, measured at one unit (2026-11-30).
HALF_TOL = {torch.bfloat16: 2 * 2.0**-8, torch.float16: 2 * 2.0**-11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_half_precision_close_to_masked(family, dtype, backend):
    model = tiny_model(family, dtype=dtype)
    skipgpt.apply(model, SkipConfig(threshold=0.5))
    ids, mask = left_padded_batch()
    skipgpt.set_mode(model, "masked")
    a = _logits(model, ids, mask).float()
    sa = skipgpt.stats(model)
    skipgpt.set_mode(model, backend)
    b = _logits(model, ids, mask).float()
    # Same decisions in both paths, and a real mix of executed and skipped modules.
    assert skipgpt.stats(model) == sa and 0.2 < sa["param_sparsity"] < 0.8
    assert a.dtype == torch.float32 and torch.isfinite(b).all() and a[mask.bool()].abs().max() < 1
    assert (a - b)[mask.bool()].abs().max() <= HALF_TOL[dtype]
    # The routers stay fp32 whatever the model dtype.
    assert all(p.dtype == torch.float32 for p in skipgpt.router_parameters(model))


def test_threshold_moves_sparsity_monotonically():
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode="reference"))
    ids, mask = left_padded_batch()
    rates = []
    for t in (0.2, 0.5, 0.8):
        skipgpt.set_threshold(model, t)
        _logits(model, ids, mask)
        rates.append(skipgpt.stats(model)["module_sparsity"])
    assert rates[0] < rates[1] < rates[2]
    with pytest.raises(ValueError, match="threshold"):
        skipgpt.set_threshold(model, 1.5)


def test_stats_ignore_padding_and_match_manual_count():
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode="masked"))
    ids, mask = left_padded_batch()
    _logits(model, ids, mask)
    st = skipgpt.state(model)
    s = skipgpt.stats(model)
    real = mask.bool()
    ex = []  # per layer: the executed shares of attention and MLP, counted from the gates
    for i, (g_attn, g_mlp) in enumerate(st.gates):
        assert (g_attn[~real] == 0).all() and (g_mlp[~real] == 0).all()
        ex.append((float(g_attn[real].double().mean()), float(g_mlp[real].double().mean())))
        assert abs(s["layers"][i]["attn_skip"] - (1 - ex[-1][0])) < 1e-6
        assert abs(s["layers"][i]["mlp_skip"] - (1 - ex[-1][1])) < 1e-6
    assert len(ex) == 3 and len({round(a, 6) for a, _ in ex}) > 1  # layers differ
    n_attn = sum(p.numel() for p in model.model.layers[0].self_attn.parameters())
    n_mlp = sum(p.numel() for p in model.model.layers[0].mlp.parameters())
    want = 1 - sum(a * n_attn + m * n_mlp for a, m in ex) / (len(ex) * (n_attn + n_mlp))
    assert abs(s["param_sparsity"] - want) < 1e-6
    assert abs(s["module_sparsity"] - (1 - sum(a + m for a, m in ex) / (2 * len(ex)))) < 1e-6


def test_remove_restores_bit_identical():
    model = tiny_model("qwen3")
    ids, mask = left_padded_batch()
    before = _logits(model, ids, mask)
    keys = set(model.state_dict())
    cls = type(model.model.layers[0])
    skipgpt.apply(model, SkipConfig(mode="reference"))
    assert skipgpt.is_patched(model) and any("router_attention" in k for k in model.state_dict())
    _logits(model, ids, mask)
    skipgpt.remove(model)
    assert not skipgpt.is_patched(model)
    assert type(model.model.layers[0]) is cls and set(model.state_dict()) == keys
    assert torch.equal(_logits(model, ids, mask), before)


def test_unsupported_model_names_supported_classes():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(skipgpt.UnsupportedModelError) as err:
        skipgpt.apply(model, SkipConfig())
    for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(err.value)


def test_native_mode_errors_clearly_without_kernels_for_the_device():
    import skipgpt_ext

    # This build has no CUDA kernels (or no CUDA device): the error must say what to do.
    if skipgpt_ext.has_kernels("cuda"):
        pytest.skip("CUDA kernels are built here")
    with pytest.raises(RuntimeError, match="mode='reference'"):
        skipgpt_ext.require_kernels("cuda")
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode="native"))
    assert skipgpt.state(model).resolve_mode(False, torch.device("cpu")) == "native"
    assert skipgpt.state(model).resolve_mode(True, torch.device("cpu")) == "native"
    skipgpt.set_mode(model, "auto")
    expected = "native" if skipgpt_ext.has_kernels("cpu") else "reference"
    assert skipgpt.state(model).resolve_mode(False, torch.device("cpu")) == expected
    assert skipgpt.state(model).resolve_mode(True, torch.device("cpu")) == "masked"


def test_mlp_router_variant_equals_masked(backend):
    model = tiny_model("mistral")
    skipgpt.apply(model, SkipConfig(router_type="mlp", mode="masked"))
    assert model.model.layers[0].router_mlp.weight_predictor[0].weight.shape == (16, 64)
    ids, mask = left_padded_batch()
    a = _logits(model, ids, mask)
    _mixed(model, ids, mask)
    skipgpt.set_mode(model, backend)
    b = _logits(model, ids, mask)
    assert (a - b)[mask.bool()].abs().max() <= TOL


def test_gumbel_gates_are_hard_and_straight_through():
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(gate="auto", tau=2.0))
    model.train()
    ids, mask = left_padded_batch()
    out = model(input_ids=ids, attention_mask=mask)
    st = skipgpt.state(model)
    g_attn, _ = st.gates[0]
    assert set(g_attn.detach().unique().tolist()) <= {0.0, 1.0}  # hard in the forward pass
    s = st.sparsity("modules")
    (out.logits.float().pow(2).mean() + s).backward()
    w = model.model.layers[0].router_attention.weight_predictor.weight
    assert w.grad is not None and w.grad.abs().sum() > 0  # gradient flows through the hard gate
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_deterministic_gate_in_train_mode_equals_eval():
    """gate="deterministic" (LoRA recovery) decides in train mode exactly as in eval mode; the
    default gate samples Gumbel noise in train mode (the control)."""
    ids, mask = left_padded_batch()
    logits, gates = {}, {}
    for gate, train in (("deterministic", False), ("deterministic", True), ("auto", True)):
        model = tiny_model("llama")
        skipgpt.apply(model, SkipConfig(gate=gate, mode="masked"))
        model.train(train)
        torch.manual_seed(3)
        with torch.no_grad():
            logits[gate, train] = model(input_ids=ids, attention_mask=mask).logits
        gates[gate, train] = torch.stack([torch.stack(g) for g in skipgpt.state(model).gates])
    assert model.model.layers[0].self_attn.training and not model.config.attention_dropout
    assert torch.equal(gates["deterministic", True], gates["deterministic", False])
    assert torch.equal(logits["deterministic", True], logits["deterministic", False])
    assert not torch.equal(gates["auto", True], gates["deterministic", False])


def test_mod_d_decode_steps_always_execute():
    """Top-k over a sequence of one keeps its one token: a cached decode step never skips, while
    the prefill skips the requested share."""
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(policy="topk", capacity=0.5, mode="masked"))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        prefill = skipgpt.stats(model)
        step = torch.tensor([[5], [6], [7]])
        model(input_ids=step, attention_mask=torch.cat([mask, torch.ones_like(step)], 1),
              past_key_values=out.past_key_values, use_cache=True)
        decode = skipgpt.stats(model)
    assert 0.4 < prefill["module_sparsity"] < 0.6
    assert decode["tokens"] == 3 and decode["module_sparsity"] == 0.0


def test_inputs_embeds_are_not_mutated(backend):
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode=backend, threshold=0.0))
    ids, mask = left_padded_batch()
    emb = model.model.embed_tokens(ids).detach()
    keep = emb.clone()
    with torch.no_grad():
        a = model(inputs_embeds=emb, attention_mask=mask).logits
    assert torch.equal(emb, keep)
    skipgpt.set_mode(model, "masked")
    b = _logits(model, ids, mask)
    assert (a - b)[mask.bool()].abs().max() <= TOL


def test_output_hidden_states_consistent_across_modes(backend):
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode="masked"))
    ids, mask = left_padded_batch()
    masked, got = _in_modes(model, backend,
                            lambda m: m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states)
    assert len(masked) == len(got) == 4  # the embeddings and 3 layers
    for a, b in zip(masked, got):
        assert (a - b)[mask.bool()].abs().max() <= TOL


def test_calibrate_bias_hits_requested_rate():
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode="reference"))
    ids, mask = left_padded_batch(lengths=(40, 33, 48))
    skipgpt.calibrate_bias(model, ids, 0.3, attention_mask=mask)
    _logits(model, ids, mask)
    s = skipgpt.stats(model)
    # Layers are calibrated in order, so every router skips ~30% of these tokens.
    assert abs(s["module_sparsity"] - 0.3) < 0.03, s
    assert all(abs(l["attn_skip"] - 0.3) < 0.05 and abs(l["mlp_skip"] - 0.3) < 0.05 for l in s["layers"]), s


def test_calibrate_threshold_hits_target_sparsity():
    model = tiny_model("qwen2")
    skipgpt.apply(model, SkipConfig(mode="reference"))
    ids, mask = left_padded_batch(lengths=(40, 33, 48))
    t = skipgpt.calibrate_threshold(model, ids, 0.4, metric="params", attention_mask=mask)
    assert 0.0 < t < 1.0 and skipgpt.state(model).config.threshold == t
    _logits(model, ids, mask)
    # Decisions are per token, so the rate moves in steps of one token-module; 2 points is ample.
    assert abs(skipgpt.stats(model)["param_sparsity"] - 0.4) < 0.02


def test_calibrate_threshold_stops_once_the_rate_is_within_tol():
    """Each halving is a forward; the search ends at the first threshold whose rate is within
    ``tol`` of the target, and with tol 0 runs every halving."""
    model = tiny_model("qwen2")
    skipgpt.apply(model, SkipConfig(mode="reference"))
    ids, mask = left_padded_batch(lengths=(40, 33, 48))
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    t = skipgpt.calibrate_threshold(model, ids, 0.4, attention_mask=mask, tol=0.05)
    early = len(calls)
    calls.clear()
    skipgpt.calibrate_threshold(model, ids, 0.4, attention_mask=mask, tol=0.0, iters=12)
    assert len(calls) == 12 and 1 <= early < 12
    hook.remove()
    with skipgpt.overrides(model, threshold=t):
        _logits(model, ids, mask)
    assert abs(skipgpt.stats(model)["param_sparsity"] - 0.4) <= 0.05


def test_calibrate_threshold_on_several_texts_minimises_the_largest_deviation():
    """With one token set per kind of text, the threshold puts the midpoint of the highest and the
    lowest set's rate on the target, so the set furthest from the target is as close as any
    threshold can bring it: checked against a scan of thresholds (the oracle). Pooling the sets
    instead lets the larger one decide. A one-set list calibrates like the tensor itself."""
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode="reference"))
    # Routers that read which half of the vocabulary a token comes from: two kinds of text,
    # skipped at very different rates by the same threshold.
    emb = model.get_input_embeddings().weight.detach()
    w = emb[3:64].mean(0) - emb[64:128].mean(0)
    with torch.no_grad():
        for layer in skipgpt.state(model).adapter.layers(model):
            for router in (layer.router_attention, layer.router_mlp):
                router.output_layer.weight[0] = 20 * w / w.norm()
                router.output_layer.weight[1] = -20 * w / w.norm()
    gen = torch.Generator().manual_seed(0)
    texts = [torch.randint(3, 64, (6, 40), generator=gen), torch.randint(64, 128, (1, 40), generator=gen)]

    def worst(t, target=0.4):
        with skipgpt.overrides(model, threshold=t), torch.no_grad():
            rates = []
            for ids in texts:
                model(input_ids=ids)
                rates.append(skipgpt.stats(model)["param_sparsity"])
        return max(abs(r - target) for r in rates)

    t = skipgpt.calibrate_threshold(model, texts, 0.4)
    assert skipgpt.state(model).config.threshold == t
    scan = min(worst(x / 200) for x in range(1, 200))
    assert worst(t) <= scan + 0.02, (worst(t), scan)  # one token-module moves a rate by < 2 points
    pooled = skipgpt.calibrate_threshold(model, torch.cat(texts), 0.4)
    assert worst(pooled) > worst(t) + 0.1  # the six-row set decides the pooled threshold
    assert skipgpt.calibrate_threshold(model, texts[:1], 0.4) == skipgpt.calibrate_threshold(model, texts[0], 0.4)
    before = skipgpt.state(model).config.threshold
    with pytest.raises(ValueError, match="2 attention masks for 3 token sets"):
        skipgpt.calibrate_threshold(model, texts + texts[:1], 0.4, attention_mask=[None, None])
    with pytest.raises(TypeError, match="non-empty list"):
        skipgpt.calibrate_threshold(model, [], 0.4)
    assert skipgpt.state(model).config.threshold == before  # refused: nothing changed


# -- the native backend, and what both skipping backends share ---------------------------------------
@pytest.mark.skipif(not skipgpt_ext.has_kernels("cpu"), reason="native CPU kernels not built")
def test_auto_mode_resolves_to_native_in_eval_and_masked_in_train():
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode="auto"))
    st = skipgpt.state(model)
    assert st.resolve_mode(False, torch.device("cpu")) == "native"
    assert st.resolve_mode(True, torch.device("cpu")) == "masked"


@pytest.mark.parametrize("family", WINDOWED_NAMES)
def test_per_layer_windows_execute_all_equals_hf(family, backend):
    """Every module executing, the skipping path equals the unpatched HF model, whose layers 1-2
    use the window (checked: without it the logits differ)."""
    model = tiny_model(family)
    assert [skipgpt.adapters.FAMILIES[type(model).__name__].window(l.self_attn) for l in model.model.layers] == [0, 4, 4]
    ids, mask = left_padded_batch()
    full = tiny_model(family.removesuffix("-sw"))
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        assert (dense - full(input_ids=ids, attention_mask=mask).logits)[mask.bool()].abs().max() > 1e-2
        skipgpt.apply(model, SkipConfig(threshold=0.0, mode=backend))
        got = model(input_ids=ids, attention_mask=mask).logits
    assert skipgpt.stats(model)["param_sparsity"] == 0.0
    assert (got - dense)[mask.bool()].abs().max() <= TOL


def test_router_update_invalidates_cached_margins(backend):
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode=backend))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        before = skipgpt.stats(model)["attn_skip"]
        for layer in model.model.layers:  # make every attention router execute everything
            layer.router_attention.weight_predictor.bias.copy_(torch.tensor([100.0, -100.0]))
        model(input_ids=ids, attention_mask=mask)
    assert before > 0.1 and skipgpt.stats(model)["attn_skip"] == 0.0


def test_router_buffer_update_invalidates_cached_margins(backend):
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode=backend))
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


def _assert_mixed_prefill_equals_masked(model, backend: str) -> None:
    ids, mask = left_padded_batch()

    def logits_of_mixed_decisions(m):
        logits = m(input_ids=ids, attention_mask=mask).logits
        _mixed(m, ids, mask)
        return logits

    masked, got = _in_modes(model, backend, logits_of_mixed_decisions)
    assert (masked - got)[mask.bool()].abs().max() <= TOL


@pytest.mark.parametrize("target", ["k_proj", "v_proj"])
def test_skipping_keeps_a_wrapped_k_or_v_proj(target, backend):
    """K and V run through the fused projection op only for a plain nn.Linear; a LoRA-wrapped
    one (random, non-zero adapter) must keep the module path, so skipping still equals masked."""
    peft = pytest.importorskip("peft")
    model = tiny_model("qwen3")  # k_norm too
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[target], init_lora_weights=False)
    model = peft.get_peft_model(model, lora).base_model.model
    assert type(getattr(model.model.layers[0].self_attn, target)) is not torch.nn.Linear
    skipgpt.apply(model, SkipConfig(mode="masked"))
    _assert_mixed_prefill_equals_masked(model, backend)


@pytest.mark.parametrize("case", ["mlp_bias", "lora_mlp"])
def test_skipping_runs_any_mlp_on_the_executing_rows(case, backend):
    """An MLP the fused op does not cover (biases, a LoRA-wrapped projection) runs as the model's
    own module on the gathered executing rows: still real skipping, still equal to masked."""
    model = tiny_model("llama", mlp_bias=(case == "mlp_bias"))
    if case == "lora_mlp":
        peft = pytest.importorskip("peft")
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj"], init_lora_weights=False)
        model = peft.get_peft_model(model, lora).base_model.model
    skipgpt.apply(model, SkipConfig(mode="masked"))
    _assert_mixed_prefill_equals_masked(model, backend)


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
    "policy": ({}, {"policy": "topk", "capacity": 0.5}, None, ValueError, "policy='topk' runs in mode='masked' only"),
    "lora_wrapped_q": ({}, {}, lambda m, ids, mask: _lora_q(m)(input_ids=ids, attention_mask=mask),
                       NotImplementedError, "need plain nn.Linear projections"),
    "short_mask": ({}, {}, lambda m, ids, mask: m(input_ids=ids, attention_mask=mask[:, 1:]),
                   ValueError, r"attention_mask is \(3, 11\), but the input is 3 sequences of 12 tokens"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_skipping_modes_refuse_what_they_cannot_run(case, backend):
    model_kw, cfg_kw, call, exc, match = REFUSED[case]
    model = tiny_model("llama", **model_kw)
    ids, mask = left_padded_batch()
    skipgpt.apply(model, SkipConfig(mode="masked", **cfg_kw))
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        skipgpt.set_mode(model, backend)
        with pytest.raises(exc, match=match):
            (call or (lambda m, i, k: m(input_ids=i, attention_mask=k)))(model, ids, mask)
        # Nothing lost: the masked path still gives the same logits (a fresh LoRA adds zero).
        skipgpt.set_mode(model, "masked")
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_decode_step_mask_must_cover_the_cache(backend):
    """A decode step whose mask misses the new token is refused before any layer writes the
    cache: a retry with the right mask then gives what a fresh run gives."""
    model = tiny_model("llama")
    skipgpt.apply(model, SkipConfig(mode=backend))
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
