"""Reproducible perplexity over a dataset split, with the realised sparsity beside it."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from . import data
from .patch import reset_stats, stats
from .skip_state import is_patched


def token_stream(source: str, split: str, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The split's documents as one token stream (eos between documents)."""
    stream = data.pack_tokens(data.load_texts(source, split), tokenizer, 1, max_blocks=max_tokens, progress=False)
    return stream.reshape(-1)


@torch.no_grad()
def perplexity(
    model,
    tokens: torch.Tensor,
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Sliding-window perplexity of a token stream.

    Windows of ``window`` tokens start every ``stride`` tokens (default: ``window``, no
    overlap). Each token is scored once: in a window, only the tokens after the previous
    window's end are scored, with the rest as context. Sums are float64, so the result does
    not depend on batching. Returns the perplexity, the token count and, for a SkipGPT model,
    the realised sparsity over all scored windows (both metrics).
    """
    stride = window if stride is None else stride
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    n = tokens.numel()
    if n < 2:
        raise ValueError("need at least 2 tokens")
    starts = list(range(0, max(n - window, 0) + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window if n > window else 0)
    device = next(model.parameters()).device
    if is_patched(model):
        reset_stats(model)
    nll, count, scored_until = 0.0, 0, 0
    jobs = []
    for s in starts:
        e = min(s + window, n)
        first = max(scored_until, s + 1)  # first target position scored in this window
        if first < e:
            jobs.append((s, e, first))
            scored_until = e
    for i in tqdm(range(0, len(jobs), batch_size), desc="perplexity", disable=not progress):
        chunk = jobs[i : i + batch_size]
        L = max(e - s for s, e, _ in chunk)
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        for b, (s, e, _) in enumerate(chunk):
            ids[b, : e - s] = tokens[s:e]
            mask[b, : e - s] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(device)
        tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
        for b, (s, e, first) in enumerate(chunk):
            # logits at position j predict token j+1; score targets first..e-1
            nll -= float(tok_lp[b, first - s - 1 : e - s - 1].sum())
            count += e - first
    out: dict[str, Any] = {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count,
                           "window": window, "stride": stride}
    if is_patched(model):
        s = stats(model, cumulative=True)
        out.update(param_sparsity=s["param_sparsity"], module_sparsity=s["module_sparsity"],
                   attn_skip=s["attn_skip"], mlp_skip=s["mlp_skip"])
    return out
