"""Tiny random models of every supported family, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
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
# The families whose layers differ from Llama's in more than the attention details, each with
# its peculiarity switched on and set so that it matters on these tiny models:
# - gemma2: sandwich norms (1 + w), GeLU-tanh MLP, an active logit soft-cap, a 3-token window
#   on alternating layers, query_pre_attn_scalar;
# - gemma3: Gemma 2's structure without the soft-cap, plus per-head q/k norms and a RoPE base
#   per layer type;
# - phi3: fused qkv and gate_up projections, partial RoPE, a 5-token window;
# - olmo2: post-norms only, q/k norms over the whole projection;
# - smollm3: a layer without RoPE (NoPE);
# - granite: residual and attention multipliers different from 1;
# - qwen3_moe: a mixture-of-experts MLP (4 experts, 2 per token) on layers 0 and 2, dense on 1.
NEW_FAMILY_NAMES = ("gemma2", "gemma3", "phi3", "olmo2", "smollm3", "granite", "qwen3_moe")


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
    elif family == "gemma2":
        kw.update(head_dim=16, query_pre_attn_scalar=24, sliding_window=3, attn_logit_softcapping=0.5,
                  final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        model = Gemma2ForCausalLM(Gemma2Config(**kw))
    elif family == "gemma3":
        kw.update(head_dim=16, query_pre_attn_scalar=24, sliding_window=3,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        model = Gemma3ForCausalLM(Gemma3TextConfig(**kw))
    elif family == "phi3":
        kw.update(sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
        model = Phi3ForCausalLM(Phi3Config(**kw))
    elif family == "olmo2":
        model = Olmo2ForCausalLM(Olmo2Config(**kw))
    elif family == "smollm3":
        kw.update(no_rope_layers=[1, 0, 1])
        model = SmolLM3ForCausalLM(SmolLM3Config(**kw))
    elif family == "granite":
        kw.update(residual_multiplier=0.6, attention_multiplier=0.2, embedding_multiplier=3.0, logits_scaling=2.0)
        model = GraniteForCausalLM(GraniteConfig(**kw))
    elif family == "qwen3_moe":
        kw.update(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1])
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw))
    else:
        raise ValueError(family)
    # sdpa has no logit soft-capping: Gemma runs eager attention, as transformers recommends.
    model.config._attn_implementation = "eager" if family == "gemma2" else attn
    # Random init leaves biases and norms at trivial values: perturb them so they are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("mlp.gate.weight"):  # a MoE router starts at zero: give it preferences
                p.normal_(0.0, 1.0)
            elif family == "gemma2" and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)  # scores of order 1, so that the 0.5 soft-cap changes them
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
