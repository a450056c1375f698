"""Hostile and edge inputs at the API level (issue 14, points 1-6 and 10): a refused call
changes nothing (model outputs, router weights, settings, files on disk), state belongs to one
model and one forward (deep copies, threads), and nonsense is refused naming the argument."""

from __future__ import annotations

import copy
import json
import math
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import skipgpt
import skipgpt_ext
from skipgpt import SkipConfig
from tiny_models import left_padded_batch, tiny_model

SKIP_MODE = "native" if skipgpt_ext.has_kernels("cpu") else "reference"


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the model, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _files(folder) -> dict[str, bytes]:
    """The bytes of every file under ``folder`` (temp files included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _routers(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "router_" in n}


# -- 1. a refused apply leaves the model exactly as it was --------------------------------------
@pytest.mark.parametrize("problem", ["other_size", "other_router_type", "damaged_weights", "bad_config"])
def test_refused_apply_leaves_the_model_as_it_was(tmp_path, problem):
    ckpt = tmp_path / "ckpt"
    if problem == "other_size":
        skipgpt.save_routers(skipgpt.apply(tiny_model("llama", num_hidden_layers=2), SkipConfig()), ckpt)
    else:
        skipgpt.save_routers(skipgpt.apply(tiny_model("llama"), SkipConfig()), ckpt)
    config = None
    if problem == "other_router_type":
        config = SkipConfig(router_type="mlp")  # the checkpoint holds linear routers
    elif problem == "damaged_weights":
        blob = (ckpt / "routers.safetensors").read_bytes()
        (ckpt / "routers.safetensors").write_bytes(blob[: len(blob) // 2])
    elif problem == "bad_config":
        cfg = json.loads((ckpt / "skip_config.json").read_text())
        (ckpt / "skip_config.json").write_text(json.dumps({**cfg, "tau": -1.0}))

    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    before, out_before = _snapshot(model), _logits(model, ids, mask)
    cls = [type(layer) for layer in model.model.layers]
    rng = torch.get_rng_state()
    with pytest.raises(skipgpt.CheckpointError):
        skipgpt.apply(model, config, from_dir=ckpt)
    assert not skipgpt.is_patched(model)
    assert [type(layer) for layer in model.model.layers] == cls
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    assert _same(_snapshot(model), before)
    assert torch.equal(_logits(model, ids, mask), out_before)
    assert torch.equal(torch.get_rng_state(), rng)  # not even fresh routers were drawn
    skipgpt.apply(model, SkipConfig())  # and a second apply is accepted
    assert skipgpt.is_patched(model)


# -- 2. load_routers validates everything, config fields included, before assigning ------------
@pytest.mark.parametrize(
    "field,value,match",
    [
        ("threshold", None, "threshold must be a number"),
        ("threshold", "0.5", "threshold must be a number"),
        ("threshold", 1.5, "threshold must be a probability"),
        ("alpha", math.nan, "alpha must be finite"),
        ("mode", "fast", "mode must be one of"),
        ("surprise", 1, "unknown SkipConfig fields"),
    ],
)
def test_load_routers_checks_the_config_before_touching_weights(tmp_path, field, value, match):
    skipgpt.save_routers(skipgpt.apply(tiny_model("llama"), SkipConfig(threshold=0.7)), tmp_path)
    cfg = json.loads((tmp_path / "skip_config.json").read_text())
    (tmp_path / "skip_config.json").write_text(json.dumps({**cfg, field: value}))
    model = skipgpt.apply(tiny_model("llama"), SkipConfig(threshold=0.4))
    before = _routers(model)
    with pytest.raises(skipgpt.CheckpointError, match=match) as err:
        skipgpt.load_routers(model, tmp_path)
    assert "skip_config.json" in str(err.value)  # names the file (and, by the match, the field)
    assert _same(_routers(model), before)
    assert skipgpt.state(model).config.threshold == 0.4


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_router_weight_is_refused(tmp_path, bad):
    skipgpt.save_routers(skipgpt.apply(tiny_model("llama"), SkipConfig()), tmp_path)
    tensors = load_file(str(tmp_path / "routers.safetensors"))
    key = "model.layers.1.router_mlp.weight_predictor.weight"
    tensors[key][0, 3] = bad
    save_file(tensors, str(tmp_path / "routers.safetensors"))
    model = skipgpt.apply(tiny_model("llama"), SkipConfig())
    before = _routers(model)
    with pytest.raises(skipgpt.CheckpointError, match=r"layer 1 router_mlp.weight_predictor.weight holds NaN or inf"):
        skipgpt.load_routers(model, tmp_path / "routers.safetensors")
    assert _same(_routers(model), before)
    # save_routers refuses such routers too, before writing anything.
    with torch.no_grad():
        model.model.layers[0].router_attention.weight_predictor.bias[0] = bad
    out = tmp_path / "again"
    with pytest.raises(ValueError, match="router_attention.weight_predictor.bias holds NaN or inf"):
        skipgpt.save_routers(model, out)
    assert not out.exists()


# -- 3. numbers normalised; save_routers writes a matching pair or nothing ------------------------
def test_numpy_numbers_are_normalised_and_save_as_json(tmp_path):
    cfg = SkipConfig(threshold=np.float32(0.3), alpha=np.float64(8), tau=np.int64(2), seed=np.int32(4))
    assert type(cfg.threshold) is float and cfg.threshold == float(np.float32(0.3))
    assert type(cfg.tau) is float and type(cfg.seed) is int
    model = skipgpt.apply(tiny_model("llama"), cfg)
    skipgpt.set_threshold(model, np.float32(0.6))
    assert type(skipgpt.state(model).config.threshold) is float
    skipgpt.save_routers(model, tmp_path)
    saved = json.loads((tmp_path / "skip_config.json").read_text())
    assert saved["threshold"] == float(np.float32(0.6)) and saved["seed"] == 4
    other = skipgpt.apply(tiny_model("llama"), from_dir=tmp_path)
    assert _same(_routers(other), _routers(model))


def test_failed_save_leaves_the_old_pair(tmp_path):
    model = skipgpt.apply(tiny_model("llama"), SkipConfig(threshold=0.3))
    skipgpt.save_routers(model, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    disk = _files(tmp_path)
    with torch.no_grad():
        for p in skipgpt.router_parameters(model):
            p.add_(1.0)  # new routers ...
    skipgpt.state(model).config.threshold = object()  # ... and a config that cannot be saved
    with pytest.raises(TypeError, match="threshold must be a number"):
        skipgpt.save_routers(model, tmp_path)
    assert _files(tmp_path) == disk  # the old pair, byte for byte, and no temp file
    # With a valid config the new pair replaces the old one, and the folder's other files stay.
    skipgpt.state(model).config.threshold = 0.45
    skipgpt.save_routers(model, tmp_path)
    after = _files(tmp_path)
    assert sorted(after) == sorted(disk) and after["notes.txt"] == b"mine"
    fresh = skipgpt.apply(tiny_model("llama"), from_dir=tmp_path)
    assert _same(_routers(fresh), _routers(model)) and skipgpt.state(fresh).config.threshold == 0.45


def test_save_routers_new_folder_appears_whole_and_unpatched_model_writes_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "routers"
    with pytest.raises(ValueError, match="no SkipGPT routers"):
        skipgpt.save_routers(tiny_model("llama"), target)
    assert not (tmp_path / "a").exists()
    model = skipgpt.apply(tiny_model("llama"), SkipConfig())
    skipgpt.save_routers(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["routers.safetensors", "skip_config.json"]
    assert [p.name for p in target.parent.iterdir()] == ["routers"]  # no temp folder left
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(NotADirectoryError):
        skipgpt.save_routers(model, file)
    assert file.read_text() == "x"


def test_torn_pair_is_refused(tmp_path):
    """A crash between save_routers' two renames leaves new weights beside the old config: the
    pair's save ids differ and load refuses it instead of mixing them."""
    a, b = tmp_path / "a", tmp_path / "b"
    m1 = skipgpt.apply(tiny_model("llama", seed=1), SkipConfig(threshold=0.2))
    skipgpt.save_routers(m1, a)
    skipgpt.save_routers(skipgpt.apply(tiny_model("llama", seed=2), SkipConfig(threshold=0.8)), b)
    (a / "routers.safetensors").write_bytes((b / "routers.safetensors").read_bytes())
    model = skipgpt.apply(tiny_model("llama"), SkipConfig())
    before = _routers(model)
    with pytest.raises(skipgpt.CheckpointError, match="different saves"):
        skipgpt.load_routers(model, a)
    assert _same(_routers(model), before) and skipgpt.state(model).config.threshold == 0.5
    # A hand edit of the config keeps the pair's id: still loads.
    cfg = json.loads((b / "skip_config.json").read_text())
    (b / "skip_config.json").write_text(json.dumps({**cfg, "threshold": 0.65}))
    skipgpt.load_routers(model, b)
    assert skipgpt.state(model).config.threshold == 0.65


# -- 4. a deep copy is an independent, correct model --------------------------------------------
def test_deepcopy_is_independent_and_correct():
    model = skipgpt.apply(tiny_model("llama"), SkipConfig(mode=SKIP_MODE))
    ids, mask = left_padded_batch()
    want = _logits(model, ids, mask)
    want_stats = skipgpt.stats(model)
    clone = copy.deepcopy(model)
    assert skipgpt.state(clone) is not skipgpt.state(model)
    other_ids, other_mask = left_padded_batch((3, 7), seed=5)
    for _ in range(2):
        got = _logits(clone, ids, mask)
        assert (got - want)[mask.bool()].abs().max() <= 1e-5
        _logits(clone, other_ids, other_mask)  # a forward of the copy with another padding
        got = _logits(clone, ids, mask)
        assert (got - want)[mask.bool()].abs().max() <= 1e-5
    assert skipgpt.stats(clone) == want_stats  # the copy's stats fill, from its own forwards
    assert skipgpt.stats(model) == want_stats  # the original's are untouched
    assert skipgpt.stats(model, cumulative=True)["tokens"] == int(mask.sum())
    skipgpt.set_threshold(clone, 0.9)
    assert skipgpt.state(model).config.threshold == 0.5
    # remove() on the copy restores a plain model and leaves the original patched.
    plain = tiny_model("llama")
    skipgpt.remove(clone)
    assert not skipgpt.is_patched(clone) and skipgpt.is_patched(model)
    assert torch.equal(_logits(clone, ids, mask), _logits(plain, ids, mask))
    assert (_logits(model, ids, mask) - want)[mask.bool()].abs().max() <= 1e-5


# -- 5. concurrent inference gives correct outputs ----------------------------------------------
@pytest.mark.parametrize("mode", ["masked", SKIP_MODE])
def test_threads_share_one_model_correctly(mode):
    model = skipgpt.apply(tiny_model("qwen2"), SkipConfig(mode=mode))
    st = skipgpt.state(model)
    batches = [left_padded_batch(lengths, seed=i) for i, lengths in
               enumerate([(9, 5, 12), (4,), (7, 7), (2, 11, 6, 3), (13, 1)])]
    want = []
    for ids, mask in batches:
        logits = _logits(model, ids, mask)
        want.append((logits, float(st.sparsity("modules")), int(mask.sum())))
    errors: list[str] = []
    start = threading.Barrier(4)

    def serve(k: int) -> None:
        start.wait()
        for r in range(6):
            i = (k + r) % len(batches)
            ids, mask = batches[i]
            got = _logits(model, ids, mask)
            err = float((got - want[i][0])[mask.bool()].abs().max())
            if err > 1e-5:
                errors.append(f"thread {k} batch {i}: logits off by {err}")
            # This thread's own forward is what the state shows it, whatever the others ran.
            if abs(float(st.sparsity("modules")) - want[i][1]) > 1e-6 or int(st.n_valid) != want[i][2]:
                errors.append(f"thread {k} batch {i}: state of another forward")

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # Totals count every forward once: 5 single-threaded + 24 threaded.
    tokens = sum(w[2] for w in want) + sum(want[(k + r) % 5][2] for k in range(4) for r in range(6))
    assert skipgpt.stats(model, cumulative=True)["tokens"] == tokens


def test_threads_generate_like_one_thread():
    model = skipgpt.apply(tiny_model("llama"), SkipConfig(mode=SKIP_MODE))
    prompts = [left_padded_batch(lengths, seed=i) for i, lengths in enumerate([(6, 3), (9,), (4, 8, 2)])]
    want = [model.generate(input_ids=i, attention_mask=m, max_new_tokens=6, do_sample=False) for i, m in prompts]
    results: dict[int, list[torch.Tensor]] = {k: [] for k in range(3)}

    def run(k: int) -> None:
        for r in range(3):
            ids, mask = prompts[(k + r) % 3]
            results[k].append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):
        for r in range(3):
            assert torch.equal(results[k][r], want[(k + r) % 3])


# -- 6. the skipping modes have no gradients: train-mode forwards with grad are refused -----------
@pytest.mark.parametrize("mode", ["reference", SKIP_MODE])
def test_skipping_modes_refuse_training_with_gradients(mode):
    model = skipgpt.apply(tiny_model("llama"), SkipConfig(mode=mode))
    ids, mask = left_padded_batch()
    want = _logits(model, ids, mask)
    snap = skipgpt.stats(model)
    cum = skipgpt.stats(model, cumulative=True)
    model.train()
    with pytest.raises(RuntimeError, match="mode='masked'"):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    assert skipgpt.stats(model) == snap and skipgpt.stats(model, cumulative=True) == cum
    assert all(p.grad is None for p in model.parameters())
    # Without gradients (no_grad) a train-mode forward runs, deciding as in eval mode.
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    assert (got - want)[mask.bool()].abs().max() <= 1e-5
    # masked mode trains: the routers, q_proj and the MLP all get gradients.
    skipgpt.set_mode(model, "masked")
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    layer = model.model.layers[1]
    for p in (layer.self_attn.q_proj.weight, layer.mlp.down_proj.weight, layer.router_attention.weight_predictor.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_gradient_checkpointing_recomputes_with_its_forwards_state():
    """Masked-mode training under gradient checkpointing: the layers re-run in backward get
    their forward's state (through the keyword argument), so the gradients are those of a run
    without checkpointing."""
    ids, mask = left_padded_batch()
    grads = []
    for checkpointing in (False, True):
        model = skipgpt.apply(tiny_model("llama"), SkipConfig(mode="masked"))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)  # the same Gumbel samples (checkpointing replays the RNG state)
        out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        (out.loss + skipgpt.state(model).sparsity()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("router_" in n for n in grads[0])
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_eval_mode_forward_with_grad_enabled_still_runs():
    """Inference without torch.no_grad() (what many users write) is not refused."""
    model = skipgpt.apply(tiny_model("llama"), SkipConfig(mode=SKIP_MODE))
    ids, mask = left_padded_batch()
    want = _logits(model, ids, mask)
    got = model(input_ids=ids, attention_mask=mask).logits
    assert (got.detach() - want)[mask.bool()].abs().max() <= 1e-5


# -- 10. nonsense refused, naming the argument ---------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(alpha=math.nan), "alpha must be finite"),
        (dict(init_execute_bias=math.inf), "init_execute_bias must be finite"),
        (dict(threshold="0.5"), "threshold must be a number"),
        (dict(threshold=True), "threshold must be a number"),
        (dict(tau=math.nan), "tau must be finite"),
        (dict(capacity=math.nan), "capacity must be finite"),
        (dict(alpha=-1.0), "alpha must be >= 0"),
        (dict(seed=0.5), "seed must be an integer"),
        (dict(router_type=None), "router_type must be one of"),
    ],
)
def test_skipconfig_refuses_nonsense(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        SkipConfig(**kw)


@pytest.mark.parametrize("target", [1.5, -0.5, math.nan, "0.3", None])
def test_calibrate_threshold_refuses_a_bad_target(target):
    model = skipgpt.apply(tiny_model("llama"), SkipConfig(threshold=0.6))
    ids, mask = left_padded_batch()
    before = _routers(model)
    with pytest.raises(ValueError, match="target must be a sparsity in"):
        skipgpt.calibrate_threshold(model, ids, target, attention_mask=mask)
    assert skipgpt.state(model).config.threshold == 0.6 and _same(_routers(model), before)
    with pytest.raises(ValueError, match="metric must be"):
        skipgpt.calibrate_threshold(model, ids, 0.3, metric="flops", attention_mask=mask)
    assert skipgpt.state(model).config.threshold == 0.6
    for tol in (-0.1, 1.0, math.nan, True):
        with pytest.raises(ValueError, match="tol must be a sparsity difference"):
            skipgpt.calibrate_threshold(model, ids, 0.3, attention_mask=mask, tol=tol)
    assert skipgpt.state(model).config.threshold == 0.6


def test_calibrate_threshold_that_fails_midway_restores_the_threshold():
    model = skipgpt.apply(tiny_model("llama"), SkipConfig(threshold=0.6))
    bad_ids = torch.full((1, 5), 10_000)  # past the vocabulary: the first forward raises
    with pytest.raises(IndexError):
        skipgpt.calibrate_threshold(model, bad_ids, 0.3)
    assert skipgpt.state(model).config.threshold == 0.6
    # A good call lands on the target (the oracle: the realised sparsity of a forward).
    ids, mask = left_padded_batch()
    thr = skipgpt.calibrate_threshold(model, ids, 0.3, metric="modules", attention_mask=mask)
    _logits(model, ids, mask)
    assert skipgpt.state(model).config.threshold == thr
    assert abs(skipgpt.stats(model)["module_sparsity"] - 0.3) < 0.05


def test_set_threshold_set_mode_and_calibrate_bias_refuse_without_changing_anything():
    model = skipgpt.apply(tiny_model("llama"), SkipConfig(threshold=0.6, mode="masked"))
    ids, _ = left_padded_batch()
    before = _routers(model)
    for value in ("0.5", math.nan, 2.0, None):
        with pytest.raises((TypeError, ValueError), match="threshold"):
            skipgpt.set_threshold(model, value)
    with pytest.raises(ValueError, match="mode"):
        skipgpt.set_mode(model, "fast")
    for rate in (0.0, 1.5, math.nan, "0.2"):
        with pytest.raises(ValueError, match="skip_rate"):
            skipgpt.calibrate_bias(model, ids, rate)
    cfg = skipgpt.state(model).config
    assert (cfg.threshold, cfg.mode) == (0.6, "masked") and _same(_routers(model), before)


def test_overrides_set_fields_for_the_block_only():
    """skipgpt.overrides: the fields hold inside the block (validated and normalised), are restored
    after it and after an error in it, and a refused value changes no field at all."""
    model = skipgpt.apply(tiny_model("llama"), SkipConfig(threshold=0.6, mode="masked"))
    cfg = skipgpt.state(model).config
    with skipgpt.overrides(model, threshold=0, gate="deterministic") as inside:
        assert inside is cfg and cfg.threshold == 0.0 and type(cfg.threshold) is float and cfg.gate == "deterministic"
    assert (cfg.threshold, cfg.gate, cfg.mode) == (0.6, "auto", "masked")
    with pytest.raises(RuntimeError, match="in the block"):
        with skipgpt.overrides(model, threshold=0.1, mode="reference"):
            raise RuntimeError("in the block")
    assert (cfg.threshold, cfg.mode) == (0.6, "masked")
    with pytest.raises(ValueError, match="threshold"):
        with skipgpt.overrides(model, mode="reference", threshold=2.0):
            pytest.fail("the block must not run")
    assert (cfg.threshold, cfg.mode) == (0.6, "masked")


def test_calibration_leaves_the_config_as_it_was():
    """The calibration routines run under their own settings (masked, dense or trial thresholds)
    and leave the user's config as it was: calibrate_threshold changes the threshold only."""
    model = skipgpt.apply(tiny_model("llama"), SkipConfig(threshold=0.6, mode="reference", gate="deterministic"))
    ids, mask = left_padded_batch()
    cfg = skipgpt.state(model).config
    want = cfg.to_dict()
    skipgpt.calibrate_input_scale(model, ids, attention_mask=mask)
    skipgpt.calibrate_bias(model, ids, 0.3, attention_mask=mask)
    assert cfg.to_dict() == want
    thr = skipgpt.calibrate_threshold(model, ids, 0.3, attention_mask=mask)
    assert cfg.to_dict() == {**want, "threshold": thr} and thr != 0.6


def test_calibrate_bias_that_fails_midway_leaves_the_routers():
    model = skipgpt.apply(tiny_model("llama"), SkipConfig())
    ids, _ = left_padded_batch()
    before = _routers(model)

    def broken(module, args):
        raise RuntimeError("layer 2 fails")

    # Layers 0 and 1 are calibrated (their biases shifted) before layer 2's input is needed.
    handle = model.model.layers[2].register_forward_pre_hook(broken)
    with pytest.raises(RuntimeError, match="layer 2 fails"):
        skipgpt.calibrate_bias(model, ids, 0.3)
    assert _same(_routers(model), before) and skipgpt.state(model).config.mode == "auto"
    handle.remove()
    skipgpt.calibrate_bias(model, ids, 0.3)
    assert not _same(_routers(model), before)
