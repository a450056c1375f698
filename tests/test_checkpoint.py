"""Router save/load: our safetensors+JSON format and the authors' released key format."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import skipgpt
from skipgpt import CheckpointMismatchError, SkipConfig
from tiny_models import left_padded_batch, tiny_model


def _router_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "router_" in n}


def test_save_load_round_trip_bit_exact(tmp_path):
    a = skipgpt.apply(tiny_model("qwen2"), SkipConfig(threshold=0.6, init_execute_bias=1.0))
    skipgpt.save_routers(a, tmp_path)
    cfg = json.loads((tmp_path / "skip_config.json").read_text())
    assert cfg["family"] == "qwen2" and cfg["num_layers"] == 3 and cfg["hidden_size"] == 64
    assert cfg["threshold"] == 0.6

    # Fresh routers are drawn from the global RNG: draw b's from another state, so that only
    # the load can make them equal to a's.
    m, m_fresh = tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=0)
    torch.manual_seed(999)
    fresh = _router_tensors(skipgpt.apply(m_fresh, SkipConfig()))
    torch.manual_seed(999)
    b = skipgpt.apply(m, from_dir=tmp_path)
    assert skipgpt.state(b).config.threshold == 0.6
    ta, tb = _router_tensors(a), _router_tensors(b)
    assert ta.keys() == tb.keys() == fresh.keys() and len(ta) == 12
    assert not any(torch.equal(ta[k], fresh[k]) for k in ta if k.endswith("weight"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)

    ids, mask = left_padded_batch()
    with torch.no_grad():
        la = a(input_ids=ids, attention_mask=mask).logits
        lb = b(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(la, lb)


def test_load_into_patched_model_overwrites(tmp_path):
    a = skipgpt.apply(tiny_model("llama"), SkipConfig())
    skipgpt.save_routers(a, tmp_path)
    b = skipgpt.apply(tiny_model("llama"), SkipConfig())
    torch.manual_seed(123)
    for p in skipgpt.router_parameters(b):
        torch.nn.init.normal_(p)
    skipgpt.load_routers(b, tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(skipgpt.router_parameters(a), skipgpt.router_parameters(b)))


@pytest.mark.parametrize(
    "other,match",
    [
        (dict(family="llama", num_hidden_layers=2), "num_layers"),
        (dict(family="llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1), "hidden_size"),
        (dict(family="mistral"), "family"),
    ],
)
def test_mismatched_checkpoint_raises(tmp_path, other, match):
    skipgpt.save_routers(skipgpt.apply(tiny_model("llama"), SkipConfig()), tmp_path)
    family = other.pop("family")
    model = skipgpt.apply(tiny_model(family, **other), SkipConfig())
    before = _router_tensors(model)
    with pytest.raises(CheckpointMismatchError, match=match):
        skipgpt.load_routers(model, tmp_path)
    after = _router_tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded


def test_router_type_mismatch_raises(tmp_path):
    skipgpt.save_routers(skipgpt.apply(tiny_model("llama"), SkipConfig(router_type="mlp")), tmp_path)
    model = skipgpt.apply(tiny_model("llama"), SkipConfig(router_type="linear"))
    with pytest.raises(CheckpointMismatchError, match="mlp"):
        skipgpt.load_routers(model, tmp_path)


@pytest.mark.parametrize("flag", ["check_router_type", "strict_config"])  # the new name and the old one
def test_router_type_check_can_be_turned_off(tmp_path, flag):
    """Only the config's router type is checked by the flag: weights of the model's shapes under a
    config that names another type load with it off, and are refused with it on."""
    saved = skipgpt.apply(tiny_model("llama"), SkipConfig(router_type="linear"))
    skipgpt.save_routers(saved, tmp_path)
    cfg = json.loads((tmp_path / "skip_config.json").read_text())
    (tmp_path / "skip_config.json").write_text(json.dumps({**cfg, "router_type": "mlp"}))
    model = skipgpt.apply(tiny_model("llama", seed=1), SkipConfig(router_type="linear"))
    assert not torch.equal(*(next(iter(_router_tensors(m).values())) for m in (saved, model)))
    with pytest.raises(CheckpointMismatchError, match="holds 'mlp' routers"):
        skipgpt.load_routers(model, tmp_path, **{flag: True})
    skipgpt.load_routers(model, tmp_path, **{flag: False})
    want, got = _router_tensors(saved), _router_tensors(model)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # the authors' two families
def test_authors_pth_format_loads(tmp_path, family):
    """The released checkpoints: full-model-style keys, router_{attention,mlp}.weight_predictor."""
    torch.manual_seed(5)
    sd = {"model.embed_tokens.weight": torch.randn(128, 64)}  # non-router keys are ignored
    for i in range(3):
        for kind in ("router_attention", "router_mlp"):
            sd[f"model.layers.{i}.{kind}.weight_predictor.weight"] = torch.randn(2, 64, dtype=torch.bfloat16)
            sd[f"model.layers.{i}.{kind}.weight_predictor.bias"] = torch.randn(2, dtype=torch.bfloat16)
    path = tmp_path / "router.pth"
    torch.save(sd, path)
    model = skipgpt.apply(tiny_model(family), SkipConfig())
    skipgpt.load_routers(model, path)
    w = model.model.layers[2].router_mlp.weight_predictor.weight
    assert w.dtype == torch.float32 and float(model.model.layers[2].router_mlp.input_scale) == 1.0
    assert torch.equal(w, sd["model.layers.2.router_mlp.weight_predictor.weight"].float())


def test_pth_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model.layers.0.router_attention.weight_predictor.weight": Evil()}, f)
    model = skipgpt.apply(tiny_model("llama"), SkipConfig())
    with pytest.raises(pickle.UnpicklingError):
        skipgpt.load_routers(model, path)


def test_checkpoint_without_routers_raises(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointMismatchError, match="no router weights"):
        skipgpt.load_routers(skipgpt.apply(tiny_model("llama"), SkipConfig()), path)


def test_input_scale_round_trips_and_folds_into_decisions(tmp_path):
    from tiny_models import left_padded_batch

    model = skipgpt.apply(tiny_model("llama"), SkipConfig(mode="masked"))
    ids, mask = left_padded_batch()
    scales = skipgpt.calibrate_input_scale(model, ids, attention_mask=mask)
    assert len(scales) == 3 and all(s > 0 for s in scales)
    # Layer 1's input, scaled, has median RMS 1 over the valid tokens.
    seen = {}
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda m, a, kw: seen.update(h=kw.get("hidden_states", a[0] if a else None)), with_kwargs=True)
    skipgpt.set_threshold(model, 0.0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    hook.remove()
    rms = (seen["h"][mask.bool()] * scales[1]).pow(2).mean(-1).sqrt().median()
    assert abs(float(rms) - 1.0) < 1e-4
    skipgpt.set_threshold(model, 0.5)
    # The scale folds into route_norm's margin weights: skipping path == masked oracle.
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        skipgpt.set_mode(model, "reference")
        b = model(input_ids=ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() <= 1e-4
    skipgpt.save_routers(model, tmp_path)
    other = skipgpt.apply(tiny_model("llama"), from_dir=tmp_path)
    assert float(other.model.layers[2].router_mlp.input_scale) == scales[2]


def test_saved_threshold_comes_with_the_routers(tmp_path):
    model = skipgpt.apply(tiny_model("llama"), SkipConfig())
    skipgpt.set_threshold(model, 0.63)
    skipgpt.save_routers(model, tmp_path)
    # load_routers into a model patched with the default threshold restores the saved one ...
    b = skipgpt.apply(tiny_model("llama"), SkipConfig())
    skipgpt.load_routers(b, tmp_path)
    assert skipgpt.state(b).config.threshold == pytest.approx(0.63)
    # ... as does apply(from_dir=...) without a config; an explicit config keeps its own.
    assert skipgpt.state(skipgpt.apply(tiny_model("llama"), from_dir=tmp_path)).config.threshold == pytest.approx(0.63)
    c = skipgpt.apply(tiny_model("llama"), SkipConfig(threshold=0.4), from_dir=tmp_path)
    assert skipgpt.state(c).config.threshold == pytest.approx(0.4)
    d = skipgpt.apply(tiny_model("llama"), SkipConfig())
    skipgpt.load_routers(d, tmp_path, restore_threshold=False)
    assert skipgpt.state(d).config.threshold == pytest.approx(0.5)
