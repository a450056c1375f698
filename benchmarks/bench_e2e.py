"""End-to-end SmolLM2-135M throughput: dense HF vs the masked, reference and native modes.

Prefill tokens/s: one forward over B x L prompt tokens (logits of the last position only, as
generate() does). Decode tokens/s: greedy generate() of N new tokens minus a 1-token generate,
over B * (N - 1) tokens. Routers are bias-calibrated to the requested skip rate (untrained
routers: the figures are about speed, not quality). Dense HF is an unpatched copy of the model,
and the modes are timed interleaved, one round each per repetition. Example:
  python benchmarks/bench_e2e.py --batch 1 4 --prompt 128 1024 --rate 0.4

``--family gemma2`` (or another family name of ``FAMILY_CONFIGS``) times a random model of that
family at SmolLM2-135M's proportions instead (576 wide, 30 layers, 9 query and 3 KV heads,
49152-token vocabulary) on random token ids: the speed of the family's skipping path, not a
pretrained model's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import skipgpt
from skipgpt import SkipConfig, data, models


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# SmolLM2-135M's proportions, and each family's own features at its published values.
BASE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, max_position_embeddings=4096, pad_token_id=0, tie_word_embeddings=True)
FAMILY_CONFIGS = {
    # Gemma 2: soft-cap 50, a 4096-token window on alternate layers, GeLU-tanh, sandwich norms.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(query_pre_attn_scalar=64, sliding_window=4096), "eager"),
    # Qwen3-MoE: 8 experts of 768, 2 per token (the same active MLP width as the dense 1536).
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=768, norm_topk_prob=True), "sdpa"),
}


def random_family_model(family: str):
    import transformers

    cfg_name, cls_name, extra, attn = FAMILY_CONFIGS[family]
    config = getattr(transformers, cfg_name)(**{**BASE, **extra})
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():  # a MoE router starts at zero: give it preferences, as a trained one has
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.02)
    model.config._attn_implementation = attn
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--prompt", nargs="+", type=int, default=[128, 1024])
    ap.add_argument("--rate", type=float, default=0.4, help="per-router skip rate to calibrate to")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["dense", "masked", "reference", "native"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the routers' random init (the sparsity pattern)")
    ap.add_argument("--family", choices=sorted(FAMILY_CONFIGS), default=None,
                    help="a random model of this family at SmolLM2-135M's proportions (default: SmolLM2-135M itself)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.family:
        model, pad = random_family_model(args.family), 0
        text = torch.randint(3, BASE["vocab_size"], (max(args.batch), max(args.prompt)))
    else:
        model, tok = models.load_model()
        pad = tok.pad_token_id
        text = data.pack_tokens(data.load_texts("shakespeare", "test"), tok, max(args.prompt), max_blocks=max(args.batch))
    calib = text[:1, :128]
    # Dense HF is an unpatched copy, so every mode is timed in the same process, interleaved
    # rep by rep: slow drift of the machine (a shared VM) hits all modes alike.
    dense = copy.deepcopy(model) if "dense" in args.modes else None
    if any(m != "dense" for m in args.modes):
        skipgpt.apply(model, SkipConfig(mode="masked"))
        skipgpt.calibrate_bias(model, calib, args.rate)
    print(f"model {args.family or 'smollm2-135m'}, torch {torch.__version__}, threads {torch.get_num_threads()}, rate {args.rate}, new tokens {args.new_tokens}, "
          f"reps {args.reps} (interleaved, after one warm-up round)")
    print("mode       B     L   prefill_tok/s  decode_tok/s  param_sparsity(prefill)  param_sparsity(decode)")
    results = {}
    for B in args.batch:
        for L in args.prompt:
            ids = text[:B, :L].contiguous()
            mask = torch.ones_like(ids)
            gen = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad)
            times = {m: ([], [], []) for m in args.modes}
            sparsity = {}
            for rep in range(args.reps + 1):  # round 0 warms up
                for mode in args.modes:
                    m = dense if mode == "dense" else model
                    if mode != "dense":
                        skipgpt.set_mode(model, mode)
                    with torch.no_grad():
                        t_pre = _timed(lambda: m(input_ids=ids, attention_mask=mask, logits_to_keep=1))
                    sp_pre = skipgpt.stats(model)["param_sparsity"] if mode != "dense" else 0.0
                    t1 = _timed(lambda: m.generate(**gen, max_new_tokens=1))
                    if mode != "dense":
                        skipgpt.reset_stats(model)
                    tn = _timed(lambda: m.generate(**gen, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens))
                    sp_dec = skipgpt.stats(model, cumulative=True)["param_sparsity"] if mode != "dense" else 0.0
                    sparsity[mode] = (sp_pre, sp_dec)
                    if rep:
                        for lst, t in zip(times[mode], (t_pre, t1, tn)):
                            lst.append(t)
            for mode in args.modes:
                t_pre, t1, tn = (statistics.median(x) for x in times[mode])
                pre, dec = B * L / t_pre, B * (args.new_tokens - 1) / max(tn - t1, 1e-9)
                results[(mode, B, L)] = (pre, dec)
                sp_pre, sp_dec = sparsity[mode]
                print(f"{mode:9s} {B:2d} {L:5d}  {pre:13.1f}  {dec:12.2f}  {sp_pre:23.3f}  {sp_dec:22.3f}", flush=True)
    if "dense" in args.modes:
        print("\nspeedup vs dense HF (prefill, decode)")
        for (mode, B, L), (pre, dec) in results.items():
            if mode != "dense":
                dp, dd = results[("dense", B, L)]
                print(f"{mode:9s} {B:2d} {L:5d}  {pre / dp:5.2f}x  {dec / dd:5.2f}x")


if __name__ == "__main__":
    main()
