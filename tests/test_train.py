"""Router tuning, LoRA recovery, resume, multi-process, baselines and perplexity, on tiny models."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import skipgpt
from skipgpt import data, load_skipgpt, models
from skipgpt.baselines import baseline
from skipgpt.perplexity import perplexity, token_stream
from skipgpt.train import LoraArgs, RouterArgs, finetune_lora, train_routers


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, saved as a normal HF folder, plus text."""
    d = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(models.ensure_smollm2())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    text = data.corpus_documents("shakespeare")["shakespeare/macbeth"][:60_000]
    (d / "text.txt").write_text(text)
    return d


def _common(tiny_dir, out, **kw):
    return dict(out=str(out), model=str(tiny_dir / "model"), data=str(tiny_dir / "text.txt"),
                block_size=32, batch_size=4, save_every=2, log_every=1, **kw)


def _frozen_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "router_" not in n and "lora_" not in n}


def test_router_tuning_moves_sparsity_and_trains_only_routers(tiny_dir, tmp_path):
    args = RouterArgs(**_common(tiny_dir, tmp_path / "rt", steps=12, lr=0.2, sparsity=0.5,
                                sparsity_metric="modules", init_execute_bias=3.0))
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model, tok = models.load_model(args.model)
    blocks = data.pack_tokens(data.load_texts(args.data, "train"), tok, 32)
    frozen = _frozen_snapshot(model)
    res = train_routers(args, model=model, blocks=blocks, accelerator=acc)
    logs = [json.loads(l) for l in (tmp_path / "rt" / "log.jsonl").read_text().splitlines()]
    assert logs[0]["sparsity"] < 0.15  # init bias 3: p_exec = sigmoid(3), nearly all execute
    assert logs[-1]["sparsity"] > logs[0]["sparsity"] + 0.15  # moved toward the 0.5 target
    assert abs(logs[-1]["tau"] - 1.0) < 1e-9 and abs(logs[0]["tau"] - 5.0) < 1e-9
    after = _frozen_snapshot(model)
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert res["done"] and (tmp_path / "rt" / "routers.safetensors").exists()
    ckpts = sorted(p.name for p in (tmp_path / "rt" / "checkpoints").iterdir())
    assert ckpts == ["step-10", "step-12"]  # keeps the last two, no temp dirs left


def test_router_tuning_can_calibrate_the_inference_threshold(tiny_dir, tmp_path):
    args = RouterArgs(**_common(tiny_dir, tmp_path / "rt", steps=3, lr=0.05, sparsity=0.3,
                                sparsity_metric="modules", calibrate_threshold=True))
    res = train_routers(args)
    cfg = json.loads((tmp_path / "rt" / "skip_config.json").read_text())
    assert cfg["threshold"] == res["threshold"] and 0.0 < cfg["threshold"] < 1.0
    model, tok = load_skipgpt(args.model, tmp_path / "rt")
    blocks = data.load_blocks(args.data, "validation", tok, 32, max_blocks=args.calib_blocks, seed=0, spread=True)  # calibrated on these
    with torch.no_grad():
        model(input_ids=blocks)
    assert abs(skipgpt.stats(model)["module_sparsity"] - 0.3) < 0.02


def test_router_tuning_on_a_mixture_balances_the_threshold_over_its_sources(tiny_dir, tmp_path):
    """On a mixture, the threshold is calibrated on each source's validation blocks (the largest
    deviation from the target smallest, skipgpt.calibrate_threshold with a list); --calibration
    pooled calibrates on the mixture's validation blocks together."""
    from skipgpt.train import source_blocks

    mix = "shakespeare:0.5+pydoc:0.5"
    thresholds = {}
    for how in ("balanced", "pooled"):
        args = RouterArgs(**{**_common(tiny_dir, tmp_path / how, steps=2, lr=0.05, sparsity=0.3, calibration=how),
                             "data": mix})
        thresholds[how] = train_routers(args)["threshold"]
    model, tok = load_skipgpt(args.model, tmp_path / "balanced")
    sets = source_blocks(mix, "validation", tok, 32, args.calib_blocks)
    assert len(sets) == 2 and all(len(b) == args.calib_blocks for b in sets)
    with torch.no_grad():
        again = skipgpt.calibrate_threshold(model, sets, 0.3)
        rates = []
        for ids in sets:
            model(input_ids=ids)
            rates.append(skipgpt.stats(model)["param_sparsity"])
    assert again == thresholds["balanced"]  # calibrated on exactly these sets
    assert abs((max(rates) + min(rates)) / 2 - 0.3) < 0.02, rates
    model, tok = load_skipgpt(args.model, tmp_path / "pooled")
    val = data.load_blocks(mix, "validation", tok, 32, max_blocks=args.calib_blocks, seed=0)
    with torch.no_grad():
        assert skipgpt.calibrate_threshold(model, val, 0.3) == thresholds["pooled"]


def test_calibrate_command_moves_only_the_threshold(tiny_dir, tmp_path):
    """`skipgpt calibrate` copies an artefact with its threshold calibrated onto a new sparsity;
    the routers are the same tensors, and a refused call writes nothing."""
    from skipgpt.cli import main

    rt = RouterArgs(**_common(tiny_dir, tmp_path / "rt", steps=2, lr=0.05, sparsity=0.3))
    train_routers(rt)
    out = tmp_path / "rt50"
    assert main(["calibrate", "--routers", str(tmp_path / "rt"), "--out", str(out), "--sparsity", "0.5"]) == 0
    a = skipgpt.checkpoint._read(tmp_path / "rt" / "routers.safetensors")
    b = skipgpt.checkpoint._read(out / "routers.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    old = json.loads((tmp_path / "rt" / "skip_config.json").read_text())
    new = json.loads((out / "skip_config.json").read_text())
    assert {k for k in old if old[k] != new[k]} == {"threshold", "sparsity_target", "save_id"}
    assert new["sparsity_target"] == 0.5 and new["threshold"] > old["threshold"]
    assert json.loads((out / "train_args.json").read_text()) == json.loads((tmp_path / "rt" / "train_args.json").read_text())
    model, tok = load_skipgpt(rt.model, out)
    val = data.load_blocks(rt.data, "validation", tok, 32, max_blocks=32, seed=0, spread=True)  # `calibrate`'s default
    with torch.no_grad():
        model(input_ids=val)
    assert abs(skipgpt.stats(model)["param_sparsity"] - 0.5) < 0.03
    listing = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match="not an empty folder"):
        main(["calibrate", "--routers", str(tmp_path / "rt"), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == listing
    assert json.loads((out / "skip_config.json").read_text()) == new
    with pytest.raises(SystemExit):
        main(["calibrate", "--routers", str(tmp_path / "rt"), "--out", str(tmp_path / "x"), "--sparsity", "1.5"])
    assert not (tmp_path / "x").exists()


def test_resume_reproduces_uninterrupted_run(tiny_dir, tmp_path):
    full = RouterArgs(**_common(tiny_dir, tmp_path / "full", steps=6, lr=0.05, sparsity=0.4))
    train_routers(full)
    part = RouterArgs(**_common(tiny_dir, tmp_path / "part", steps=6, lr=0.05, sparsity=0.4, max_steps_this_run=3))
    r1 = train_routers(part)
    assert not r1["done"] and not (tmp_path / "part" / "routers.safetensors").exists()
    r2 = train_routers(dataclasses.replace(part, resume=True, max_steps_this_run=None))
    assert r2["done"] and r2["step"] == 6
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "routers.safetensors"))
    b = load_file(str(tmp_path / "part" / "routers.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(l) for l in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [l["loss"] for l in la] == [l["loss"] for l in lb]


def test_lora_stage_changes_no_router_and_artefact_reloads(tiny_dir, tmp_path):
    rt = RouterArgs(**_common(tiny_dir, tmp_path / "rt", steps=2, lr=0.05))
    train_routers(rt)
    lo = LoraArgs(**_common(tiny_dir, tmp_path / "lora", steps=4, routers=str(tmp_path / "rt"), lr=5e-3))
    train_routers_weights = skipgpt.checkpoint._read(tmp_path / "rt" / "routers.safetensors")
    finetune_lora(lo)
    after = skipgpt.checkpoint._read(tmp_path / "lora" / "routers.safetensors")
    assert all(torch.equal(train_routers_weights[k], after[k]) for k in train_routers_weights)
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()

    # One artefact: routers + adapter. Unmerged (masked) and merged (reference) agree.
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    m1, _ = load_skipgpt(lo.model, tmp_path / "lora", merge=False)
    skipgpt.set_mode(m1, "masked")
    m2, _ = load_skipgpt(lo.model, tmp_path / "lora", merge=True)
    skipgpt.set_mode(m2, "reference")
    base, _ = load_skipgpt(lo.model, tmp_path / "rt")
    skipgpt.set_mode(base, "masked")
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (m1, m2, base))
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-3  # the adapter really changed the model


def test_kd_weight_scales_the_kl_term_and_is_refused_where_unused(tiny_dir, tmp_path):
    """--loss kd+lm optimises lm + kd_weight * kd (each term as logged); a weight the loss would
    ignore is refused before anything is written."""
    rt = RouterArgs(**_common(tiny_dir, tmp_path / "rt", steps=2, lr=0.05, sparsity=0.3))
    train_routers(rt)
    lo = LoraArgs(**_common(tiny_dir, tmp_path / "lora", steps=3, routers=str(tmp_path / "rt"), lr=5e-3,
                            loss="kd+lm", kd_weight=3.0))
    finetune_lora(lo)
    logs = [json.loads(l) for l in (tmp_path / "lora" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 3 and all(l["kd_loss"] > 1e-4 for l in logs)
    for l in logs:
        assert l["loss"] == pytest.approx(l["lm_loss"] + 3.0 * l["kd_loss"], rel=1e-5)
    assert json.loads((tmp_path / "lora" / "train_args.json").read_text())["kd_weight"] == 3.0
    for stage, args in ((finetune_lora, LoraArgs(**_common(tiny_dir, tmp_path / "no", steps=2, loss="lm", kd_weight=2.0,
                                                           routers=str(tmp_path / "rt")))),
                        (train_routers, RouterArgs(**_common(tiny_dir, tmp_path / "no", steps=2, loss="kd",
                                                             kd_weight=0.5)))):
        with pytest.raises(ValueError, match="--kd-weight"):
            stage(args)
        assert not (tmp_path / "no").exists()
    with pytest.raises(ValueError, match="--kd-weight must be > 0"):
        finetune_lora(LoraArgs(**_common(tiny_dir, tmp_path / "no", steps=2, kd_weight=0.0, routers=str(tmp_path / "rt"))))


def test_lora_on_a_static_plan_keeps_its_threshold_and_decisions(tiny_dir, tmp_path):
    """Constant routers (a static plan: zero weights, +/- margins) decide the same for any hidden
    state, so finetune-lora does not recalibrate them: the threshold and every decision stay."""
    from skipgpt.baselines import apply_static_plan

    model, _ = models.load_model(str(tiny_dir / "model"))
    apply_static_plan(model, {"attn": [1], "mlp": [0]})
    skipgpt.save_routers(model, tmp_path / "plan")
    lo = LoraArgs(**_common(tiny_dir, tmp_path / "lora", steps=2, routers=str(tmp_path / "plan"), lr=5e-3))
    res = finetune_lora(lo)
    assert "threshold" not in res
    before = json.loads((tmp_path / "plan" / "skip_config.json").read_text())["threshold"]
    assert json.loads((tmp_path / "lora" / "skip_config.json").read_text())["threshold"] == before
    m, _ = load_skipgpt(lo.model, tmp_path / "lora")
    skipgpt.set_mode(m, "masked")
    with torch.no_grad():
        m(input_ids=torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0)))
    layers = skipgpt.stats(m)["layers"]
    assert [(l["attn_skip"], l["mlp_skip"]) for l in layers] == [(0.0, 1.0), (1.0, 0.0)]


def test_lora_stage_recalibrates_the_threshold_onto_the_target(tiny_dir, tmp_path):
    """LoRA changes the hidden states the frozen routers read, so the realised sparsity drifts;
    finetune-lora moves the threshold back onto the routers' target on the validation blocks
    (and --no-calibrate-threshold keeps the routers' own threshold)."""
    rt = RouterArgs(**_common(tiny_dir, tmp_path / "rt", steps=3, lr=0.05, sparsity=0.3, sparsity_metric="modules"))
    train_routers(rt)
    before = json.loads((tmp_path / "rt" / "skip_config.json").read_text())["threshold"]
    lo = LoraArgs(**_common(tiny_dir, tmp_path / "lora", steps=4, routers=str(tmp_path / "rt"), lr=2e-2))
    res = finetune_lora(lo)
    cfg = json.loads((tmp_path / "lora" / "skip_config.json").read_text())
    assert cfg["threshold"] == res["threshold"] != before
    model, tok = load_skipgpt(lo.model, tmp_path / "lora")
    val = data.load_blocks(lo.data, "validation", tok, 32, max_blocks=lo.calib_blocks, seed=0, spread=True)  # calibrated on these

    def rate(threshold):
        skipgpt.set_threshold(model, threshold)
        with torch.no_grad():
            model(input_ids=val)
        return skipgpt.stats(model)["module_sparsity"]

    # A tiny model's rate jumps in steps (many tokens share a margin), so the target sits inside
    # the jump at the calibrated threshold: a little below it skips less, a little above more.
    below, at, above = rate(cfg["threshold"] - 0.01), rate(cfg["threshold"]), rate(cfg["threshold"] + 0.01)
    assert below - 0.02 <= 0.3 <= above + 0.02 and below <= at <= above and above - below < 0.2
    keep = LoraArgs(**_common(tiny_dir, tmp_path / "keep", steps=2, routers=str(tmp_path / "rt"), calibrate_threshold=False))
    assert "threshold" not in finetune_lora(keep)
    assert json.loads((tmp_path / "keep" / "skip_config.json").read_text())["threshold"] == before
    # Routers at threshold 0 execute every module (the dense reference of a LoRA comparison):
    # there is no rate to restore, so they stay dense.
    model, _ = load_skipgpt(rt.model, tmp_path / "rt")
    skipgpt.set_threshold(model, 0.0)
    skipgpt.save_routers(model, tmp_path / "dense")
    dense = LoraArgs(**_common(tiny_dir, tmp_path / "dense-lora", steps=2, routers=str(tmp_path / "dense"), lr=2e-2))
    assert "threshold" not in finetune_lora(dense)
    assert json.loads((tmp_path / "dense-lora" / "skip_config.json").read_text())["threshold"] == 0.0


def test_two_process_accelerate_run(tiny_dir, tmp_path):
    out = tmp_path / "ddp"
    # On a GPU-less machine `--multi_gpu` makes accelerate start torchrun, and Accelerator(cpu=True)
    # then runs MULTI_CPU over gloo (`--cpu` alone would start a single process).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "skipgpt.cli", "train-routers", "--out", str(out), "--model", str(tiny_dir / "model"),
           "--data", str(tiny_dir / "text.txt"), "--block-size", "32", "--batch-size", "2", "--steps", "4",
           "--save-every", "2", "--log-every", "1", "--lr", "0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "routers.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert sorted(p.name for p in (out / "checkpoints" / "step-4").glob("rng-*")) == ["rng-0.safetensors", "rng-1.safetensors"]
    logs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in logs] == [1, 2, 3, 4]  # written once, by the main process

    # The gradients are averaged across the processes: LoRA (deterministic routers, no dropout)
    # over 2 processes x 2 blocks gives the adapter of one process x 4 blocks (same blocks per
    # step, rank 0's initialisation), up to the reduction order.
    lora = ["--routers", str(out), "--data", str(tiny_dir / "text.txt"), "--model", str(tiny_dir / "model"),
            "--block-size", "32", "--steps", "3", "--save-every", "3", "--lr", "5e-3", "--lora-dropout", "0"]
    proc = subprocess.run(cmd[: cmd.index("train-routers")] + ["finetune-lora", "--out", str(tmp_path / "l2"),
                          "--batch-size", "2", *lora], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "skipgpt.cli", "finetune-lora", "--out", str(tmp_path / "l1"),
                           "--batch-size", "4", *lora], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = skipgpt.checkpoint._read(tmp_path / "l2" / "adapter_model.safetensors")
    one = skipgpt.checkpoint._read(tmp_path / "l1" / "adapter_model.safetensors")
    init_b = [k for k in one if "lora_B" in k]
    assert one.keys() == two.keys() and init_b and all(one[k].abs().max() > 1e-3 for k in init_b)  # B moved off 0
    # Adam divides by the root of the squared gradient, so on entries whose gradient is near 0
    # the reduction-order noise grows to ~1e-6; a missing average would differ by ~lr (5e-3).
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-5), (k, (one[k] - two[k]).abs().max())


@pytest.mark.parametrize("name", ["shortgpt", "module_drop", "random", "mod_d"])
@pytest.mark.parametrize("target", [0.25, 0.4])
def test_baselines_reach_requested_sparsity(name, target):
    from tiny_models import tiny_model

    model = tiny_model("llama", num_hidden_layers=8)
    ids = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    baseline(model, name, target, calib_ids=ids)
    with torch.no_grad():
        model(input_ids=ids)
    s = skipgpt.stats(model)
    # Static plans come in whole modules (8 layers: steps of ~3-9%); dynamic ones are per token.
    tol = 0.06 if name in ("shortgpt", "module_drop") else 0.03
    assert abs(s["param_sparsity"] - target) <= tol, s
    if name == "shortgpt":
        dropped = [i for i, l in enumerate(s["layers"]) if l["attn_skip"] == 1.0]
        assert dropped and all(s["layers"][i]["mlp_skip"] == 1.0 for i in dropped)


def test_perplexity_is_deterministic_and_matches_manual(tiny_dir):
    model, tok = models.load_model(str(tiny_dir / "model"))
    tokens = token_stream(str(tiny_dir / "text.txt"), "test", tok)[:256]
    a = perplexity(model, tokens, window=64, batch_size=3, progress=False)
    b = perplexity(model, tokens, window=64, batch_size=1, progress=False)
    assert abs(a["ppl"] - b["ppl"]) < 1e-6 * a["ppl"]
    # Oracle: non-overlapping windows; each window scores its tokens 1..63 (token 0 has no context).
    nll, count = 0.0, 0
    for s in range(0, 256, 64):
        ids = tokens[s : s + 64].unsqueeze(0)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        nll -= lp.gather(-1, ids[0, 1:, None]).sum().item()
        count += 63
    assert a["tokens"] == count == 252
    assert abs(a["ppl"] - torch.tensor(nll / count).exp().item()) < 1e-5 * a["ppl"]
    # Overlapping windows score every token but the first, each once, with more context:
    # (window start, first scored target) for 250 tokens, window 64, stride 32. The last window
    # is pulled back to end at the last token.
    c = perplexity(model, tokens[:250], window=64, stride=32, batch_size=2, progress=False)
    nll = 0.0
    for s, first in [(0, 1), (32, 64), (64, 96), (96, 128), (128, 160), (160, 192), (186, 224)]:
        ids = tokens[s : s + 64].unsqueeze(0)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        nll -= lp.gather(-1, ids[0, 1:, None])[first - s - 1 :].sum().item()
    assert c["tokens"] == 249 and c["window"] == 64 and c["stride"] == 32
    assert abs(c["ppl"] - math.exp(nll / 249)) < 1e-5 * c["ppl"]
    skipgpt.apply(model, skipgpt.SkipConfig(threshold=0.0))
    d = perplexity(model, tokens, window=64, progress=False)
    assert abs(d["ppl"] - a["ppl"]) < 1e-5 * a["ppl"] and d["param_sparsity"] == 0.0


def test_lora_kd_teacher_is_the_dense_base_model(tiny_dir, tmp_path):
    """RT-L's KD teacher is the unpatched base model (adapter off, every module executing),
    while the student skips and carries the adapter; the teacher call changes no setting."""
    from skipgpt.train import add_lora, kd_loss, lora_teacher_logits

    oracle, _ = models.load_model(str(tiny_dir / "model"))  # never patched
    model, _ = models.load_model(str(tiny_dir / "model"))
    skipgpt.apply(model, skipgpt.SkipConfig(mode="masked", gate="deterministic"))
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    skipgpt.calibrate_bias(model, ids, 0.4)
    peft = add_lora(model, LoraArgs(out=str(tmp_path), routers=str(tmp_path)))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    peft.eval()
    with torch.no_grad():
        student = peft(input_ids=ids).logits
        teacher = lora_teacher_logits(peft, ids)
        again = peft(input_ids=ids).logits
        dense = oracle(input_ids=ids).logits
    assert skipgpt.stats(peft)["module_sparsity"] > 0.2  # the student really skips
    torch.testing.assert_close(teacher, dense, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, student)  # adapter back on, threshold and gate restored
    assert (student - dense).abs().max() > 1e-2
    assert float(kd_loss(student, teacher)) > 1e-3 and float(kd_loss(teacher, dense)) < 1e-6
