"""`make demo`: SkipGPT on the embedded default model (SmolLM2-135M-Instruct), end to end.

Loads the model, attaches routers, generates with real skipping and prints the realised
sparsity, dense and skipping decode speed, and the largest logit difference between the
skipping path and the masked dense oracle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import data, models
from .config import SkipConfig
from .patch import apply, calibrate_bias, set_mode, state, stats, reset_stats


@dataclass
class DemoArgs:
    model: str | None = None
    sparsity: float = 0.25
    prompt: str = "Write one sentence about the sea."
    max_new_tokens: int = 48
    threads: int | None = None
    routers: str | None = None


def _timed_generate(model, tok, prompt_ids, max_new_tokens):
    model.generate(input_ids=prompt_ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=prompt_ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=tok.pad_token_id,
    )
    dt = time.perf_counter() - t0
    return out[0, prompt_ids.shape[1] :], dt


def run(args: DemoArgs) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"loading {args.model or models.DEFAULT_MODEL} ...", flush=True)
    model, tok = models.load_model(args.model)
    messages = [{"role": "user", "content": args.prompt}]
    if getattr(tok, "chat_template", None):
        prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        prompt_ids = tok(args.prompt, return_tensors="pt").input_ids

    with torch.no_grad():
        dense_tokens, dense_s = _timed_generate(model, tok, prompt_ids, args.max_new_tokens)

        # Held-out text: calibration block (validation) and the oracle comparison block (test).
        calib = data.pack_tokens(data.load_texts("shakespeare", "validation"), tok, 256, max_blocks=4)
        check = data.pack_tokens(data.load_texts("shakespeare", "test"), tok, 256, max_blocks=2)

        if args.routers:
            apply(model, SkipConfig(mode="auto"), from_dir=args.routers)
        else:
            # Untrained routers, their biases shifted so each skips ~`sparsity` of the tokens.
            apply(model, SkipConfig(mode="auto"))
            calibrate_bias(model, calib, args.sparsity)
        mode = state(model).resolve_mode(False, torch.device("cpu"))

        skip_tokens, skip_s = _timed_generate(model, tok, prompt_ids, args.max_new_tokens)
        reset_stats(model)
        skip_tokens, skip_s = _timed_generate(model, tok, prompt_ids, args.max_new_tokens)
        gen_stats = stats(model, cumulative=True)

        set_mode(model, mode)
        skip_logits = model(input_ids=check).logits
        held_out = stats(model)
        set_mode(model, "masked")
        oracle_logits = model(input_ids=check).logits
        set_mode(model, "auto")
    max_diff = float((skip_logits - oracle_logits).abs().max())

    n = args.max_new_tokens
    result = {
        "mode": mode,
        "dense_tok_s": n / dense_s,
        "skip_tok_s": n / skip_s,
        "gen_param_sparsity": gen_stats["param_sparsity"],
        "gen_module_sparsity": gen_stats["module_sparsity"],
        "heldout_param_sparsity": held_out["param_sparsity"],
        "heldout_attn_skip": held_out["attn_skip"],
        "heldout_mlp_skip": held_out["mlp_skip"],
        "max_logit_diff_vs_masked": max_diff,
    }
    print()
    print(f"prompt: {args.prompt!r}")
    print(f"dense HF      : {tok.decode(dense_tokens, skip_special_tokens=True)!r}")
    print(f"skipgpt ({mode}): {tok.decode(skip_tokens, skip_special_tokens=True)!r}")
    print("  (routers are untrained, only bias-calibrated to the target rate: expect degraded text)")
    print()
    print(f"target skip rate per router      : {args.sparsity:.2f}")
    print(f"realised sparsity, generation    : {gen_stats['param_sparsity']:.3f} params, "
          f"{gen_stats['module_sparsity']:.3f} modules ({gen_stats['tokens']} tokens)")
    print(f"realised sparsity, held-out text : {held_out['param_sparsity']:.3f} params "
          f"(attention {held_out['attn_skip']:.3f}, MLP {held_out['mlp_skip']:.3f} skipped)")
    print(f"decode speed, dense HF           : {n / dense_s:7.1f} tokens/s")
    print(f"decode speed, skipgpt {mode:<10} : {n / skip_s:7.1f} tokens/s  ({dense_s / skip_s:.2f}x dense)")
    print(f"max |logit diff| {mode} vs masked oracle on 2x256 held-out tokens: {max_diff:.2e}")
    return result
