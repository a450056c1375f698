"""The baselines drop what they claim to drop, checked against oracles computed here:
float64 similarities from the unpatched model's own hidden states (ShortGPT, LLM-Drop), the HF
model with the dropped layers removed, the routers' float64 margins (MoD-D), and content
independence (random)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

import skipgpt
from skipgpt.baselines import baseline

L = 8  # layers: static plans drop whole modules, so 0.25 and 0.4 need more than the default 3


def _ids(seed=0, batch=4, seq=64):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _residuals(model, ids):
    """Per layer: its input, the residual after attention and its output, captured from the
    unpatched model through the layer and post-attention-norm hooks (not the modules the
    baselines hook), in float64, flattened over tokens."""
    x_in, mid, out, hooks = [], [], [], []
    for layer in model.model.layers:
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, kw: x_in.append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: mid.append(a[0])))
        hooks.append(layer.register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o)))
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    flat = lambda ts: [t.reshape(-1, t.shape[-1]).double() for t in ts]  # noqa: E731
    return flat(x_in), flat(mid), flat(out)


def _cos(a, b):
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def _closest_count(sizes: list[int], total: int, target: float) -> int:
    """The prefix length of ``sizes`` whose sum is the closest share of total to target."""
    shares = [sum(sizes[:n]) / total for n in range(len(sizes) + 1)]
    return min(range(len(shares)), key=lambda n: (abs(shares[n] - target), n))


def _param_sizes(model):
    pa = [sum(p.numel() for p in l.self_attn.parameters()) for l in model.model.layers]
    pm = [sum(p.numel() for p in l.mlp.parameters()) for l in model.model.layers]
    return pa, pm


@pytest.mark.parametrize("target", [0.25, 0.4])
def test_shortgpt_drops_lowest_block_influence_layers(target):
    ids = _ids()
    dense = tiny_model("llama", num_hidden_layers=L)
    x_in, _, out = _residuals(dense, ids)
    bi = [1 - _cos(x, y) for x, y in zip(x_in, out)]
    k = round(target * L)  # equal layers: the closest share of whole layers
    want = sorted(sorted(range(L), key=lambda i: bi[i])[:k])
    assert len(set(bi)) == L and want != list(range(k))  # distinct scores, and not just a prefix

    model = tiny_model("llama", num_hidden_layers=L)
    info = baseline(model, "shortgpt", target, calib_ids=ids)
    assert info["plan"] == {"attn": want, "mlp": want}

    # The patched model equals the HF model with those layers removed, in every mode.
    dense.model.layers = torch.nn.ModuleList(l for i, l in enumerate(dense.model.layers) if i not in want)
    with torch.no_grad():
        oracle = dense(input_ids=ids, use_cache=False).logits
        for mode in ("masked", "reference", "native"):
            skipgpt.set_mode(model, mode)
            got = model(input_ids=ids, use_cache=False).logits
            assert (got - oracle).abs().max() <= 1e-4 * oracle.abs().max(), mode
            s = skipgpt.stats(model)
            dropped = [i for i, l in enumerate(s["layers"]) if l["attn_skip"] == 1.0 and l["mlp_skip"] == 1.0]
            assert dropped == want and all(
                l["attn_skip"] == 0.0 and l["mlp_skip"] == 0.0 for i, l in enumerate(s["layers"]) if i not in want)


@pytest.mark.parametrize("target", [0.25, 0.4])
def test_module_drop_drops_least_important_sublayers(target):
    ids = _ids()
    dense = tiny_model("llama", num_hidden_layers=L)
    x_in, mid, out = _residuals(dense, ids)
    imp = {(i, "attn"): 1 - _cos(x_in[i], mid[i]) for i in range(L)} | {(i, "mlp"): 1 - _cos(mid[i], out[i]) for i in range(L)}
    order = sorted(imp, key=imp.get)
    pa, pm = _param_sizes(dense)
    size = {(i, "attn"): pa[i] for i in range(L)} | {(i, "mlp"): pm[i] for i in range(L)}
    n = _closest_count([size[m] for m in order], sum(size.values()), target)
    want = {kind: sorted(i for i, k in order[:n] if k == kind) for kind in ("attn", "mlp")}
    assert n >= 2 and order[:n] != sorted(order[:n])  # several modules, not in layer order

    model = tiny_model("llama", num_hidden_layers=L)
    info = baseline(model, "module_drop", target, calib_ids=ids)
    assert info["plan"] == want
    with torch.no_grad():
        model(input_ids=ids)
    s = skipgpt.stats(model)
    assert [i for i, l in enumerate(s["layers"]) if l["attn_skip"] == 1.0] == want["attn"]
    assert [i for i, l in enumerate(s["layers"]) if l["mlp_skip"] == 1.0] == want["mlp"]
    dropped = sum(size[m] for m in order[:n]) / sum(size.values())
    assert s["param_sparsity"] == pytest.approx(dropped, abs=1e-6)


@pytest.mark.parametrize("target", [0.25, 0.4])
def test_mod_d_executes_the_top_margin_tokens_of_each_sequence(target):
    ids = _ids(batch=3, seq=40)
    model = tiny_model("llama", num_hidden_layers=3)
    baseline(model, "mod_d", target)
    st = skipgpt.state(model)
    layers = model.model.layers
    x_in = []
    hooks = [l.register_forward_pre_hook(lambda m, a, kw: x_in.append(kw.get("hidden_states", a[0] if a else None)),
                                         with_kwargs=True) for l in layers]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    S = ids.shape[1]
    k = math.ceil((1 - target) * S)
    for i, layer in enumerate(layers):
        for g, router in zip(st.gates[i], (layer.router_attention, layer.router_mlp)):
            w, b = router.margin_linear()
            margin = x_in[i].double() @ w.double() + b.double()  # [B, S], float64
            run = g.bool()
            assert torch.equal(run.sum(-1), torch.full((ids.shape[0],), k)), i
            # The executed tokens are the top-k by margin: up to float32 rounding near the cut.
            lowest_run = margin.masked_fill(~run, math.inf).min(-1).values
            highest_skipped = margin.masked_fill(run, -math.inf).max(-1).values
            assert (lowest_run >= highest_skipped - 1e-5).all(), i
    assert skipgpt.stats(model)["module_sparsity"] == pytest.approx(1 - k / S)


def test_random_baseline_is_deterministic_and_content_blind():
    def gates(ids, seed=0):
        model = tiny_model("llama", num_hidden_layers=3)
        baseline(model, "random", 0.4, seed=seed)
        with torch.no_grad():
            model(input_ids=ids)
        return [torch.stack(g) for g in skipgpt.state(model).gates]

    a, b = gates(_ids(0)), gates(_ids(0))
    other_tokens, other_seed = gates(_ids(5)), gates(_ids(0), seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, other_tokens))  # decisions ignore the content
    assert not all(torch.equal(x, y) for x, y in zip(a, other_seed))
    # Each layer and module its own draw, and the rate near 1 - 0.4.
    flat = torch.stack(a).flatten(0, 1)  # [layers * 2, B, S]
    assert len({tuple(g.flatten().tolist()) for g in flat}) == flat.shape[0]
    assert abs(float(flat.mean()) - 0.6) < 0.05
