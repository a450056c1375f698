"""SkipGPT in vLLM against vLLM dense, and the same rows for transformers' generate().

SmolLM2-135M with the committed routers, exported (``skipgpt.export``) at their calibrated
threshold, and at threshold 0 (every module runs: the plugin's overhead). Rows:

- decode throughput at 1, 8 and 32 concurrent requests: greedy, 16-token prompts, --new-tokens
  new tokens each (EOS ignored); generated tokens / wall time of the whole batch;
- prefill throughput of one 1024-token prompt: tokens / wall time of a 1-token generation.

vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) in eager mode, float32, on
--threads threads; each model gets a fresh engine per round, and the rounds alternate the
models, so drift hits them alike. The ratios are of medians over rounds. The HF rows are the
same requests through ``model.generate`` (left-padded batches) on the dense model and on
``skipgpt.from_pretrained(export)`` (native kernels). Run in the vLLM venv (make test-vllm
makes it):

    .venv-vllm/bin/python benchmarks/bench_vllm.py --rounds 2 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(200, 40000, (length,), generator=g).tolist() for _ in range(n)]


def vllm_rows(path: str, args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import skipgpt.vllm as sv

    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=2048, enable_prefix_caching=False,
              kv_cache_memory_bytes=1 << 30, seed=0, max_num_seqs=64)
    out = {}
    try:
        decode = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in _prompts(2, 16, 99)], decode, use_tqdm=False)  # warm-up
        is_skip = "SkipGPT" in json.loads((Path(path) / "config.json").read_text())["architectures"][0]
        if is_skip:
            sv.stats(llm, reset=True)
        for n in args.concurrency:
            reqs = [TokensPrompt(prompt_token_ids=p) for p in _prompts(n, 16, n)]
            t0 = time.perf_counter()
            res = llm.generate(reqs, decode, use_tqdm=False)
            dt = time.perf_counter() - t0
            out[f"decode@{n}"] = sum(len(r.outputs[0].token_ids) for r in res) / dt
        prefill = SamplingParams(temperature=0.0, max_tokens=1)
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=_prompts(1, args.prefill, 7)[0])], prefill, use_tqdm=False)
        out["prefill@1x%d" % args.prefill] = args.prefill / (time.perf_counter() - t0)
        if is_skip:
            out["param_sparsity"] = sv.stats(llm)["param_sparsity"]
    finally:
        del llm
        gc.collect()
    return out


def hf_rows(model, args) -> dict:
    import torch

    import skipgpt

    out = {}
    patched = skipgpt.is_patched(model)
    if patched:
        skipgpt.reset_stats(model)
    with torch.no_grad():
        model.generate(torch.tensor(_prompts(1, 16, 99)), max_new_tokens=4, do_sample=False)  # warm-up
        for n in args.concurrency:
            ids = torch.tensor(_prompts(n, 16, n))
            t0 = time.perf_counter()
            res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=0)
            out[f"decode@{n}"] = (res.shape[1] - ids.shape[1]) * n / (time.perf_counter() - t0)
        ids = torch.tensor(_prompts(1, args.prefill, 7))
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1)
        out["prefill@1x%d" % args.prefill] = args.prefill / (time.perf_counter() - t0)
    if patched:
        out["param_sparsity"] = skipgpt.stats(model)["param_sparsity"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.25], help="which committed routers")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    import skipgpt
    from skipgpt import models
    from skipgpt.demo import committed_routers

    base = str(models.resolve_model_path(None))
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    exports = {}
    for s in args.sparsity:
        exports[f"skipgpt-{round(s * 100)}"] = str(skipgpt.export(committed_routers(s), work / f"s{round(s * 100)}"))
    exports["skipgpt-exec-all"] = str(skipgpt.export(committed_routers(args.sparsity[0]), work / "all", threshold=0.0))
    names = ["vllm-dense", *exports]
    results: dict[str, list[dict]] = {n: [] for n in names}
    hf: dict[str, list[dict]] = {"hf-dense": [], **{f"hf-{k}": [] for k in exports if k != "skipgpt-exec-all"}}
    for r in range(args.rounds):
        for n in names:
            results[n].append(vllm_rows(base if n == "vllm-dense" else exports[n], args))
            print(f"round {r} {n}: {json.dumps(results[n][-1])}", flush=True)
        if not args.no_hf:
            for n in hf:
                model = models.load_model()[0] if n == "hf-dense" else skipgpt.from_pretrained(exports[n[3:]])
                hf[n].append(hf_rows(model, args))
                print(f"round {r} {n}: {json.dumps(hf[n][-1])}", flush=True)
                del model
                gc.collect()

    def med(rows, key):
        return statistics.median(row[key] for row in rows)

    keys = [k for k in results["vllm-dense"][0]]
    print(f"\nSmolLM2-135M, float32, {args.threads} threads, {args.rounds} rounds, medians (tokens/s; ratio to the dense row of the same engine)")
    print("| engine / model | sparsity | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    table = {}
    for group, dense in ((results, "vllm-dense"), (hf, "hf-dense")):
        for n, rows in group.items():
            if not rows:
                continue
            sp = med(rows, "param_sparsity") if "param_sparsity" in rows[0] else 0.0
            cells = []
            for k in keys:
                v, d = med(rows, k), med(group[dense], k)
                cells.append(f"{v:.1f}" + ("" if n == dense else f" ({v / d:.2f}x)"))
                table.setdefault(n, {})[k] = v
            table[n]["param_sparsity"] = sp
            print(f"| {n} | {sp:.3f} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "medians": table, "rounds": {**results, **hf}}, indent=2))


if __name__ == "__main__":
    main()
