"""`make demo`: SkipGPT on the embedded default model (SmolLM2-135M-Instruct), end to end.

Loads the model and its committed trained routers (25% or 40% parameter sparsity), generates
with real skipping, and prints the realised sparsity, decode speed against dense, perplexity
against dense on held-out text (Shakespeare and chat), the repeated-4-gram fraction of greedy
answers to ten chat prompts against dense's, and the largest logit difference between the
skipping path and the masked dense oracle. Without trained routers (another model), it falls back to untrained
routers whose biases are calibrated to the requested skip rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import chat, data, models
from .config import SkipConfig
from .calibration import calibrate_bias
from .patch import apply, load_skipgpt, set_mode, state, stats, reset_stats
from .perplexity import perplexity, token_stream

ASSETS = Path(__file__).parent / "assets" / "routers"


@dataclass
class DemoArgs:
    model: str | None = None
    sparsity: float = 0.25
    prompt: str = "Write one sentence about the sea."
    max_new_tokens: int = 48
    threads: int | None = None
    routers: str | None = None
    ppl_tokens: int = 2048


def committed_routers(sparsity: float) -> Path | None:
    """The trained SmolLM2-135M routers shipped with the package, if any, for this sparsity."""
    d = ASSETS / f"smollm2-135m-{round(sparsity * 100)}"
    return d if (d / "routers.safetensors").exists() else None


def _timed_generate(model, tok, prompt_ids, max_new_tokens):
    model.generate(input_ids=prompt_ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=prompt_ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=tok.pad_token_id,
    )
    return out[0, prompt_ids.shape[1] :], time.perf_counter() - t0


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
    routers = args.routers or (committed_routers(args.sparsity) if args.model in (None, models.DEFAULT_MODEL) else None)
    held_out = token_stream("shakespeare", "test", tok, args.ppl_tokens)
    chat_held_out = token_stream("chat", "test", tok, args.ppl_tokens)

    with torch.no_grad():
        dense_tokens, dense_s = _timed_generate(model, tok, prompt_ids, args.max_new_tokens)
        dense_ppl = perplexity(model, held_out, window=256, progress=False)
        dense_chat_ppl = perplexity(model, chat_held_out, window=256, progress=False)
        dense_rep = chat.chat_eval(model, tok)

        if routers:
            # The saved config (calibrated threshold included) and, for a finetune-lora folder,
            # its LoRA adapter, merged: the skipping modes read plain nn.Linear weights.
            model, _ = load_skipgpt(model, routers)
            set_mode(model, "auto")
            lora = " with their LoRA adapter (merged)" if (Path(routers) / "adapter_config.json").exists() else ""
            origin = f"trained routers from {routers}{lora}"
        else:
            calib = data.pack_tokens(data.load_texts("shakespeare", "validation"), tok, 256, max_blocks=4)
            apply(model, SkipConfig(mode="auto"))
            calibrate_bias(model, calib, args.sparsity)
            origin = f"UNTRAINED routers, biases calibrated to skip {args.sparsity:.2f} (expect degraded text)"
        mode = state(model).resolve_mode(False, torch.device("cpu"))

        reset_stats(model)
        skip_tokens, skip_s = _timed_generate(model, tok, prompt_ids, args.max_new_tokens)
        gen_stats = stats(model, cumulative=True)
        skip_ppl = perplexity(model, held_out, window=256, progress=False)
        skip_chat_ppl = perplexity(model, chat_held_out, window=256, progress=False)
        skip_rep = chat.chat_eval(model, tok)

        check = held_out[: 2 * 256].view(2, 256)
        skip_logits = model(input_ids=check).logits
        set_mode(model, "masked")
        oracle_logits = model(input_ids=check).logits
        set_mode(model, "auto")
    max_diff = float((skip_logits - oracle_logits).abs().max())

    n = args.max_new_tokens
    print()
    print(f"routers: {origin}; backend: {mode}")
    print(f"prompt: {args.prompt!r}")
    print(f"dense HF        : {tok.decode(dense_tokens, skip_special_tokens=True)!r}")
    print(f"SkipGPT {mode:<9}: {tok.decode(skip_tokens, skip_special_tokens=True)!r}")
    print()
    print(f"realised sparsity, generation    : {gen_stats['param_sparsity']:.3f} params, "
          f"{gen_stats['module_sparsity']:.3f} modules (attention {gen_stats['attn_skip']:.3f}, "
          f"MLP {gen_stats['mlp_skip']:.3f} skipped; {gen_stats['tokens']} tokens)")
    print(f"realised sparsity, held-out text : {skip_ppl['param_sparsity']:.3f} params, "
          f"{skip_ppl['module_sparsity']:.3f} modules")
    print(f"decode speed, batch 1            : dense HF {n / dense_s:.1f} tok/s, SkipGPT {n / skip_s:.1f} tok/s "
          f"({dense_s / skip_s:.2f}x dense)")
    print(f"perplexity, {skip_ppl['tokens']} held-out tokens (Shakespeare test split, window 256): "
          f"dense {dense_ppl['ppl']:.2f}, SkipGPT {skip_ppl['ppl']:.2f}")
    print(f"perplexity, {skip_chat_ppl['tokens']} held-out chat tokens (the chat corpus's test split)     : "
          f"dense {dense_chat_ppl['ppl']:.2f}, SkipGPT {skip_chat_ppl['ppl']:.2f} (sparsity {skip_chat_ppl['param_sparsity']:.3f})")
    print(f"repeated 4-grams in greedy answers to {len(chat.EVAL_PROMPTS)} chat prompts (64 tokens): "
          f"dense {dense_rep['rep4']:.3f}, SkipGPT {skip_rep['rep4']:.3f}")
    print(f"max |logit diff| {mode} vs masked oracle on 2x256 held-out tokens: {max_diff:.2e}")
    return {
        "mode": mode, "routers": str(routers) if routers else None,
        "dense_tok_s": n / dense_s, "skip_tok_s": n / skip_s,
        "gen_param_sparsity": gen_stats["param_sparsity"], "heldout_param_sparsity": skip_ppl["param_sparsity"],
        "dense_ppl": dense_ppl["ppl"], "skip_ppl": skip_ppl["ppl"], "max_logit_diff_vs_masked": max_diff,
        "dense_chat_ppl": dense_chat_ppl["ppl"], "skip_chat_ppl": skip_chat_ppl["ppl"],
        "dense_rep4": dense_rep["rep4"], "skip_rep4": skip_rep["rep4"],
    }
