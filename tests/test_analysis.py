"""skipgpt.analysis.analyze: numbers against skipgpt.stats (the oracle), valid PNGs, the table."""

from __future__ import annotations

import re

import pytest
import torch
from matplotlib import image as mpimg

import skipgpt
from skipgpt.analysis import analyze
from tiny_models import tiny_model

LAYERS = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _blocks(n=12, seq=96, seed=0):
    """Token blocks; every third row left-padded by a different amount, so padding is exercised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    for row in range(0, n, 3):
        pad = 5 + 7 * row
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    skipgpt.apply(model, skipgpt.SkipConfig(mode="auto"))
    ids, mask = _blocks()
    skipgpt.calibrate_bias(model, ids, 0.3, attention_mask=mask)
    return model, ids, mask


@pytest.fixture(scope="module")
def report(calibrated, tmp_path_factory):
    model, ids, mask = calibrated
    return analyze(model, ids, mask, out_dir=tmp_path_factory.mktemp("analysis"), batch_size=5, progress=False)


def _oracle_stats(model, ids, mask, batch_size=5):
    """The same blocks through the masked model, counted by skipgpt.stats (cumulative)."""
    skipgpt.set_mode(model, "masked")
    skipgpt.reset_stats(model)
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                model(input_ids=ids[start:start + batch_size], attention_mask=mask[start:start + batch_size])
        return skipgpt.stats(model, cumulative=True)
    finally:
        skipgpt.set_mode(model, "auto")


def test_numbers_equal_skipgpt_stats(calibrated, report):
    model, ids, mask = calibrated
    oracle = _oracle_stats(model, ids, mask)
    assert report["tokens"] == oracle["tokens"] == int(mask.sum())
    assert len(report["layers"]) == LAYERS
    for ours, theirs in zip(report["layers"], oracle["layers"]):
        assert ours == pytest.approx(theirs, abs=1e-12)
    for key in ("attn_skip", "mlp_skip", "module_sparsity", "param_sparsity"):
        assert report[key] == pytest.approx(oracle[key], abs=1e-12), key
    # Calibrated on these very blocks, so the realised rate is the target.
    assert report["module_sparsity"] == pytest.approx(0.3, abs=0.03)


def test_histogram_and_position_curves_are_consistent(report):
    hist = report["modules_executed_hist"]
    assert len(hist) == 2 * LAYERS + 1 and sum(hist) == report["tokens"]
    mean_executed = sum(k * c for k, c in enumerate(hist)) / report["tokens"]
    assert mean_executed == pytest.approx(2 * LAYERS * (1 - report["module_sparsity"]), abs=1e-9)

    pos = report["position"]
    assert sum(pos["tokens"]) == report["tokens"]
    assert pos["bucket_start"][0] == 0 and pos["bucket_end"][-1] == 96
    for name in ("attn_skip", "mlp_skip"):
        # The token-weighted mean of the per-bucket rates is the overall rate.
        weighted = sum(t * r for t, r in zip(pos["tokens"], pos[name])) / report["tokens"]
        assert weighted == pytest.approx(report[name], abs=1e-9)
        assert len(pos[f"{name}_smoothed"]) == len(pos[name])
        assert all(0.0 <= r <= 1.0 for r in pos[f"{name}_smoothed"])


def test_histogram_and_position_curves_equal_the_gates(calibrated, report):
    """Rebuilt here from the masked model's own gates: the per-token count of executed modules,
    and the per-bucket skip rates at true positions (left padding shifts them)."""
    model, ids, mask = calibrated
    skipgpt.set_mode(model, "masked")
    executed, pos_of, valid_of = [], [], []
    try:
        with torch.no_grad():
            for start in range(0, len(ids), 5):
                m = mask[start:start + 5].bool()
                model(input_ids=ids[start:start + 5], attention_mask=mask[start:start + 5])
                g = torch.stack([torch.stack(pair) for pair in skipgpt.state(model).gates])  # [L, 2, B, S]
                executed.append(g.sum(0))  # [2, B, S]: layers executing attention / MLP per token
                pos_of.append(m.long().cumsum(-1) - 1)
                valid_of.append(m)
    finally:
        skipgpt.set_mode(model, "auto")
    executed, pos, valid = torch.cat(executed, 1), torch.cat(pos_of), torch.cat(valid_of)
    per_token = executed.sum(0)[valid].round().long()
    assert report["modules_executed_hist"] == torch.bincount(per_token, minlength=2 * LAYERS + 1).tolist()

    curves = report["position"]
    assert len(curves["bucket_start"]) > 10
    for b, (lo, hi) in enumerate(zip(curves["bucket_start"], curves["bucket_end"])):
        sel = valid & (pos >= lo) & (pos < hi)
        assert curves["tokens"][b] == int(sel.sum())
        for k, name in enumerate(("attn_skip", "mlp_skip")):
            want = 1 - float(executed[k][sel].double().sum()) / (int(sel.sum()) * LAYERS)
            assert curves[name][b] == pytest.approx(want, abs=1e-12), (name, b)


def test_pngs_are_valid_images(report):
    for key in ("layer_rates", "position", "modules_hist"):
        path = report["files"][key]
        with open(path, "rb") as f:
            data = f.read()
        assert data[:8] == PNG_SIGNATURE, path
        assert len(data) > 10_000, (path, len(data))
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 600, img.shape
        assert img[..., :3].std() > 0.05, f"{path} looks blank"


def test_table_lists_every_layer(report):
    with open(report["files"]["table"], encoding="utf-8") as f:
        table = f.read()
    for i, layer in enumerate(report["layers"]):
        assert re.search(rf"^\| {i} \| {100 * layer['attn_skip']:.2f}% \| {100 * layer['mlp_skip']:.2f}% \|$", table, re.M)
    assert f"{100 * report['module_sparsity']:.2f}%" in table
    assert f"{100 * report['param_sparsity']:.2f}%" in table


def test_model_state_is_restored(calibrated, tmp_path):
    model, ids, mask = calibrated
    skipgpt.reset_stats(model)
    with torch.no_grad():
        model(input_ids=ids[:2], attention_mask=mask[:2])
    before = skipgpt.stats(model, cumulative=True)
    model.train()
    analyze(model, ids[:3], mask[:3], out_dir=tmp_path, progress=False)
    assert model.training
    assert skipgpt.state(model).config.mode == "auto" and skipgpt.state(model).config.gate == "auto"
    assert skipgpt.stats(model, cumulative=True) == before
    model.eval()


def test_refuses_unpatched_model(tmp_path):
    with pytest.raises(ValueError, match="skipgpt.apply"):
        analyze(tiny_model("llama"), torch.zeros(1, 4, dtype=torch.long), out_dir=tmp_path)
