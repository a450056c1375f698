"""The router-tuning recipe: distillation loss, target ramp, gate noise, importance prior,
validation selection, data mixtures and the chat metric, against hand-computed oracles."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import skipgpt
from skipgpt import chat, data, gates, importance
from skipgpt.train import RouterArgs, kd_loss, noise_at, target_at, train_routers
from test_train import _common, tiny_dir  # noqa: F401  (the module-scoped tiny model fixture)
from tiny_models import tiny_model


def test_kd_loss_equals_hand_computed_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g) * 2
    total = 0.0
    for b in range(2):
        for i in range(3):
            zs = [math.exp(x) for x in s[b, i].double().tolist()]
            zt = [math.exp(x) for x in t[b, i].double().tolist()]
            ps = [z / sum(zs) for z in zs]
            pt = [z / sum(zt) for z in zt]
            total += sum(a * (math.log(a) - math.log(c)) for a, c in zip(pt, ps))
    assert abs(float(kd_loss(s, t)) - total / 6) < 1e-6
    assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-7)


def test_target_ramp_and_noise_anneal_schedules():
    a = RouterArgs(out="x", steps=100, sparsity=0.4, target_ramp=0.2, gate_noise=1.0, gate_noise_end=0.0, noise_anneal=0.5)
    assert [target_at(a, s) for s in (0, 9, 19, 20, 99)] == pytest.approx([0.02, 0.2, 0.4, 0.4, 0.4])
    assert [noise_at(a, s) for s in (0, 25, 50, 99)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    flat = dataclasses.replace(a, target_ramp=0.0, noise_anneal=0.0, gate_noise=0.3, gate_noise_end=0.3)
    assert {target_at(flat, s) for s in range(100)} == {0.4} and {noise_at(flat, s) for s in range(100)} == {0.3}


def test_deterministic_straight_through_gate_is_the_inference_rule():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 50, 2, generator=g) * 3).requires_grad_(True)
    for p in (0.2, 0.5, 0.7):
        thr = skipgpt.config.threshold_to_logit(p)
        st = gates.router_gate(logits, True, 2.0, thr, noise=0.0)
        rule = (torch.softmax(logits.detach(), -1)[..., 0] > p).float()  # p_exec > threshold
        assert torch.equal(st.detach(), rule) and 0 < rule.mean() < 1
    st.sum().backward()  # the straight-through gradient: d sigmoid(margin / tau) / d logits
    z = (logits[..., 0] - logits[..., 1]).detach() - thr
    d = torch.sigmoid(z / 2.0) * (1 - torch.sigmoid(z / 2.0)) / 2.0
    assert torch.allclose(logits.grad[..., 0], d) and torch.allclose(logits.grad[..., 1], -d)
    # With noise the forward samples: sometimes against the rule, at the logistic's rate.
    torch.manual_seed(0)
    margins = torch.full((20000,), 1.0)
    sampled = gates.router_gate(torch.stack([margins, torch.zeros_like(margins)], -1), True, 1.0, 0.0, noise=1.0)
    assert abs(float(sampled.mean()) - 1 / (1 + math.exp(-1))) < 0.015  # P(1 + L > 0) = sigmoid(1)


def test_module_costs_and_prior_order_the_biases():
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    prior = importance.module_costs(model, ids)
    # Oracle: the patched model in masked mode with that one router forced to skip.
    skipgpt.apply(model, skipgpt.SkipConfig(mode="masked", threshold=0.0))
    with torch.no_grad():
        dense = float(model(input_ids=ids, labels=ids).loss)
        assert dense == pytest.approx(prior["base_loss"], abs=1e-5)
        for i, layer in enumerate(model.model.layers):
            for j, kind in enumerate(importance.MODULES):
                router = getattr(layer, f"router_{kind}")
                saved = router.weight_predictor.bias.clone()
                router.weight_predictor.bias.copy_(torch.tensor([-math.inf, 0.0]))  # never executes
                ablated = float(model(input_ids=ids, labels=ids).loss)
                router.weight_predictor.bias.copy_(saved)
                assert ablated - dense == pytest.approx(prior["costs"][i][j], abs=1e-5)
    skipgpt.remove(model)
    skipgpt.apply(model, skipgpt.SkipConfig(init_execute_bias=2.0))
    costs = prior["costs"]
    flat = sorted(c for row in costs for c in row)
    pin = flat[-2]  # the two costliest modules are pinned
    pinned = importance.apply_prior(model, costs, pin_cost=pin, bias_scale=2.0)
    margins = {}
    for i, layer in enumerate(model.model.layers):
        for j, kind in enumerate(importance.MODULES):
            w, b = getattr(layer, f"router_{kind}").margin_linear()
            margins[i, j] = (float(b), float(w.abs().max()))
    assert sorted(pinned) == sorted((i, importance.MODULES[j]) for i in range(3) for j in range(2) if costs[i][j] >= pin)
    assert len(pinned) == 2 and all(margins[i, importance.MODULES.index(k)] == (importance.PIN_MARGIN, 0.0) for i, k in pinned)
    free = [(costs[i][j], margins[i, j][0]) for i in range(3) for j in range(2) if costs[i][j] < pin]
    free.sort()
    assert all(b1 <= b2 for (_, b1), (_, b2) in zip(free, free[1:]))  # margins ordered by cost
    assert free[0][1] >= 2.0 and free[-1][1] > free[0][1]  # never below the base margin
    # A pinned module executes for every token, even at a threshold of 0.999.
    skipgpt.set_mode(model, "masked")
    skipgpt.set_threshold(model, 0.999)
    with torch.no_grad():
        model(input_ids=ids)
    layers = skipgpt.stats(model)["layers"]
    for i, kind in pinned:
        assert layers[i]["attn_skip" if kind == "attention" else "mlp_skip"] == 0.0


def test_recipe_run_pins_selects_best_and_resumes_exactly(tiny_dir, tmp_path):
    """KD loss, prior (one module pinned), ramp, noise anneal, validation and best-of-run
    selection; a run split in two by a kill-and-resume ends with the same routers and logs."""
    kw = dict(steps=8, lr=0.05, sparsity=0.4, loss="kd+lm", eval_every=3, val_blocks=4, pin_cost=1.0,
              prior_bias_scale=1.0, target_ramp=0.5, noise_anneal=0.5, gate_noise_end=0.0, select="best")
    # The run reads the ablation costs from importance.json when present: layer-0 attention
    # costs over pin_cost, so it is pinned.
    prior = {"base_loss": 10.0, "costs": [[5.0, 0.1], [0.2, 0.3]], "tokens": 128}
    for d in ("full", "part"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "importance.json").write_text(json.dumps(prior))
    full = RouterArgs(**_common(tiny_dir, tmp_path / "full", **kw))
    res = train_routers(full)
    logs = [json.loads(l) for l in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [l["target"] for l in logs[:4]] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert logs[0]["gate_noise"] == 1.0 and logs[-1]["gate_noise"] == 0.0
    assert all(l["kd_loss"] >= 0 for l in logs)
    evals = [l for l in logs if "val_nll" in l]
    assert [l["step"] for l in evals] == [3, 6, 8]
    best = min(evals, key=lambda l: l["val_nll"])
    assert res["best"]["step"] == best["step"] and res["best"]["val_nll"] == best["val_nll"]
    assert res["pinned"] == ["0.attention"]
    a = load_file(str(tmp_path / "full" / "routers.safetensors"))
    w, b = a["model.layers.0.router_attention.weight_predictor.weight"], a["model.layers.0.router_attention.weight_predictor.bias"]
    assert not w.any() and float(b[0] - b[1]) == importance.PIN_MARGIN  # untouched by training
    # The routers the run ends with are the best snapshot's (threshold recalibrated).
    b = load_file(str(tmp_path / "full" / "best" / "routers.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    part = RouterArgs(**_common(tiny_dir, tmp_path / "part", **kw, max_steps_this_run=4))
    train_routers(part)
    res2 = train_routers(dataclasses.replace(part, resume=True, max_steps_this_run=None))
    c = load_file(str(tmp_path / "part" / "routers.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert res2["best"] == res["best"]
    lb = [json.loads(l) for l in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [l["loss"] for l in lb] == [l["loss"] for l in logs]


def test_data_mixture_takes_each_source_at_its_weight(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    (tmp_path / "a.txt").write_text("alpha beta gamma delta. " * 4000)
    (tmp_path / "b.txt").write_text("one two three four five. " * 600)
    spec = f"{tmp_path / 'a.txt'}:3+{tmp_path / 'b.txt'}:1"
    assert data.parse_mix(spec) == [(str(tmp_path / "a.txt"), 0.75), (str(tmp_path / "b.txt"), 0.25)]
    blocks = data.load_blocks(spec, "train", tok, 16)
    na = len(data.pack_tokens(data.load_texts(str(tmp_path / "a.txt"), "train"), tok, 16))
    nb = len(data.pack_tokens(data.load_texts(str(tmp_path / "b.txt"), "train"), tok, 16))
    total = min(na / 0.75, nb / 0.25)
    from_b = sum(int(("one" in tok.decode(r))) for r in blocks)
    assert len(blocks) == round(0.75 * total) + round(0.25 * total) and from_b == round(0.25 * total)
    assert nb < na and from_b == nb  # the scarce source is used whole, never repeated
    with pytest.raises(ValueError, match="weight"):
        data.parse_mix("chat:x")


def test_repeated_ngram_fraction_and_chat_split():
    assert chat.repeated_ngram_fraction([1, 2, 3, 4, 5, 6]) == 0.0
    loop = [7, 8, 9] * 10  # 27 4-grams, 3 distinct
    assert chat.repeated_ngram_fraction(loop) == pytest.approx(1 - 3 / 27)
    assert chat.repeated_ngram_fraction([1, 2, 3]) == 0.0
    splits = [chat.split_of(p) for p in chat.prompts()]
    assert set(splits) == {"train", "validation", "test"}
    assert 0.05 < splits.count("test") / len(splits) < 0.15
    assert not set(chat.EVAL_PROMPTS) & set(chat.prompts())


def _tiny_chat_model(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_dir / "model").eval(), AutoTokenizer.from_pretrained(tiny_dir / "model")


def _alone(model, tok, prompt: str, max_new_tokens: int) -> list[int]:
    """The oracle: one prompt, no padding, plain HF greedy generate, cut at the first EOS."""
    ids = tok(chat.format_chat(tok, prompt), return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    return gen[: gen.index(tok.eos_token_id)] if tok.eos_token_id in gen else gen


def test_chat_eval_in_batches_answers_as_each_prompt_alone(tiny_dir):
    """Left-padded batches of 2 (the last one short) give every prompt the answer it gets alone,
    and rep4 is the repeated-4-gram fraction of those answers' tokens."""
    model, tok = _tiny_chat_model(tiny_dir)
    prompts = list(chat.EVAL_PROMPTS[:5])
    res = chat.chat_eval(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert [r["prompt"] for r in res["answers"]] == prompts
    reps = []
    for row, p in zip(res["answers"], prompts):
        ids = _alone(model, tok, p, 12)
        assert ids and row["answer"] == tok.decode(ids, skip_special_tokens=True)
        reps.append(chat.repeated_ngram_fraction(ids))
        assert row["rep4"] == reps[-1]
    assert res["rep4"] == pytest.approx(sum(reps) / len(reps))


def test_eval_chat_cli_reads_a_prompt_file_and_refuses_one_without_prompts(tiny_dir, tmp_path, capsys):
    from skipgpt import cli

    model, tok = _tiny_chat_model(tiny_dir)
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\n\nName a colour.\n  What is rain?  \n")
    assert cli.main(["eval-chat", "--model", str(tiny_dir / "model"), "--prompts", str(f), "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{") + 1:])
    reps = [chat.repeated_ngram_fraction(_alone(model, tok, p, 10)) for p in ("Name a colour.", "What is rain?")]
    assert summary["prompts"] == 2 and summary["rep4"] == pytest.approx(sum(reps) / 2)
    assert "[rep4 " in out and "What is rain?" in out
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    for path, why in ((empty, "no prompts in it"), (tmp_path / "missing.txt", "no such file")):
        with pytest.raises(SystemExit, match=f"--prompts {re.escape(str(path))}: {why}"):
            cli.main(["eval-chat", "--model", str(tiny_dir / "model"), "--prompts", str(path)])


def test_shipped_chat_corpus_matches_the_prompt_list():
    records = chat.load_corpus(data.CHAT_CORPUS)
    assert [r["prompt"] for r in records] == chat.prompts(len(records))
    assert all(r["split"] == chat.split_of(r["prompt"]) and r["answer"] in r["text"] for r in records)
    assert data.load_texts("chat", "test") == [r["text"] for r in records if r["split"] == "test"]


def test_chat_generation_resumes_to_the_uninterrupted_corpus(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    prompts = chat.prompts(6)
    kw = dict(max_new_tokens=6, batch_size=2, progress=False)
    whole = chat.generate_corpus(model, tok, prompts, **kw)
    partial = tmp_path / "part.jsonl"
    chat.generate_corpus(model, tok, prompts[:4], partial=partial, **kw)  # "killed" after 2 batches
    with open(partial, "a") as f:
        f.write('{"prompt": "a torn line')  # and mid-write
    resumed = chat.generate_corpus(model, tok, prompts, partial=partial, **kw)
    assert resumed == whole and chat.load_corpus(partial) == whole
    assert [r["prompt"] for r in whole] == prompts and len({r["answer"] for r in whole}) > 1


def test_sequence_penalty_measures_each_sequence_alone():
    """Per-sequence sparsity: each row of a padded batch equals that sequence run alone (the
    stats of an unpadded forward, float64 over the recorded gates), and the penalty averages
    ``|target - s_b|`` over the rows that hold tokens, with a gradient to the routers."""
    from skipgpt.skip_state import state
    from skipgpt.train import sparsity_penalty

    model = tiny_model("llama", num_hidden_layers=3)
    # Straight-through gates without noise: the forward is the deterministic rule, with a gradient.
    skipgpt.apply(model, skipgpt.SkipConfig(mode="masked", gate_noise=0.0, threshold=0.5, init_execute_bias=0.0))
    torch.manual_seed(0)
    for r in skipgpt.router_parameters(model):
        r.data.normal_(0, 0.5)
    model.train()
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding: row 1 has 7 tokens
    st = state(model)
    alone = []
    for b in range(3):
        keep = mask[b].bool()
        with torch.no_grad():
            model(input_ids=ids[b:b + 1, keep])
        alone.append({m: float(st.sparsity(m)) for m in ("params", "modules")})
    model(input_ids=ids, attention_mask=mask)
    for m in ("params", "modules"):
        per_seq = st.sequence_sparsity(m)
        assert per_seq.tolist() == pytest.approx([a[m] for a in alone], abs=1e-5)
        # The batch's sparsity is the token-weighted mean of the rows'.
        n = mask.sum(-1).double()
        assert float(st.sparsity(m)) == pytest.approx(float((per_seq.detach().double() * n).sum() / n.sum()), abs=1e-5)
    assert len({round(a["params"], 4) for a in alone}) == 3  # the rows differ, so the test can tell them apart
    target = 0.3
    pen = sparsity_penalty(st, "sequence", target, "params")
    assert float(pen) == pytest.approx(sum(abs(target - a["params"]) for a in alone) / 3, abs=1e-5)
    assert float(sparsity_penalty(st, "batch", target, "params")) == pytest.approx(abs(target - float(st.sparsity("params"))), abs=1e-6)
    pen.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in skipgpt.router_parameters(model))
    with pytest.raises(ValueError, match="penalty"):
        sparsity_penalty(st, "tokens", target, "params")
    mask[2] = 0  # a row of padding only does not count
    model(input_ids=ids, attention_mask=mask)
    per_seq = st.sequence_sparsity("params")
    assert float(sparsity_penalty(st, "sequence", target, "params")) == pytest.approx(
        float((target - per_seq[:2]).abs().mean()), abs=1e-6)
