"""Tiny random models of every supported family, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    tie_word_embeddings=False,
)

FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3")
# Qwen2/Qwen3 with per-layer sliding windows: layer 0 full attention, layers 1-2 a 4-token
# window (shorter than the test sequences, so it matters).
WINDOWED_NAMES = ("qwen2-sw", "qwen3-sw")


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, attn: str = "sdpa", **overrides):
    torch.manual_seed(seed)
    kw = {**COMMON, **overrides}
    if family in WINDOWED_NAMES:
        family = family.removesuffix("-sw")
        kw.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif family == "mistral":
        kw.setdefault("sliding_window", 5)  # shorter than the test sequences, so it matters
        model = MistralForCausalLM(MistralConfig(**kw))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))  # q/k/v biases
    elif family == "qwen3":
        kw.setdefault("head_dim", 16)
        model = Qwen3ForCausalLM(Qwen3Config(**kw))  # q/k RMSNorm per head
    else:
        raise ValueError(family)
    model.config._attn_implementation = attn
    # Random init leaves biases and norms at trivial values: perturb them so they are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def left_padded_batch(lengths=(9, 5, 12), vocab=128, seed=1):
    """input_ids/attention_mask for prompts of different lengths, padded on the left."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, S - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, S - n :] = 1
    return ids, mask
