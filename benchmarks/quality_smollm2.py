"""Quality at matched sparsity on a real model: SmolLM2-135M-Instruct on held-out text.

Compares, at 25% and 40% parameter-weighted sparsity, by perplexity on the Shakespeare test
split, the chat corpus's test split (modern English in the chat format) and the Python-docs
test split (modern technical English), and by the repeated-4-gram fraction of greedy answers
to hand-written chat prompts:
dense; SkipGPT-RT (router tuning) and SkipGPT-RT-L (+LoRA); ShortGPT, static module drop
(LLM-Drop), MoD-D (top-k capacity, routers tuned the same way) and random skipping, each also
with the same LoRA budget. Dense+LoRA is the LoRA reference. Everything is measured by the
same perplexity code, with the realised sparsity (both metrics) beside each number.

    python benchmarks/quality_smollm2.py                # defaults
    python benchmarks/quality_smollm2.py --quick        # a smoke run (minutes)
    python benchmarks/quality_smollm2.py --seeds 0 1 2 --rt-from 'runs/abl300/default-{tag}-s{seed}'

SkipGPT-RT is tuned with the recipe's defaults (`skipgpt train-routers`), one run per seed;
`--rt-from PATTERN` takes finished runs instead (`{tag}` is 25 or 40, `{seed}` the seed; for
example benchmarks/router_ablation.py's), so the seeds can be trained side by side in other
processes. `--lora-from PATTERN` likewise takes the first seed's finished `finetune-lora` runs,
which must have the table's LoRA budget.

Writes runs/quality/results.json and results.md. With --save-routers, the first seed's model
becomes the package's committed one (python/skipgpt/assets/routers/, used by `make demo`): its
SkipGPT-RT routers after stage 1, then its SkipGPT-RT-L folder (routers and LoRA adapter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

import skipgpt
from skipgpt import chat, data, models
from skipgpt.baselines import baseline
from skipgpt.perplexity import perplexity, token_stream
from skipgpt.train import LoraArgs, RouterArgs, finetune_lora, load_skipgpt, train_routers

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "python" / "skipgpt" / "assets" / "routers"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.40])
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rt-steps", type=int, default=600)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="SkipGPT-RT seeds (the first gets LoRA)")
    p.add_argument("--rt-from", default=None, help="reuse finished RT runs: a folder pattern with {tag} and {seed}")
    p.add_argument("--lora-from", default=None, help="reuse the first seed's finished RT-L runs: a pattern with {tag}")
    p.add_argument("--chat-tokens", type=int, default=4096)
    p.add_argument("--lora-steps", type=int, default=20)
    p.add_argument("--lora-lr", type=float, default=None, help="LoRA learning rate (default: finetune-lora's)")
    p.add_argument("--lora-loss", choices=("lm", "kd", "kd+lm"), default=LoraArgs.loss,
                   help="LoRA training loss (default: finetune-lora's)")
    p.add_argument("--lora-kd-weight", type=float, default=LoraArgs.kd_weight,
                   help="weight of the KL term of --lora-loss kd+lm (default: finetune-lora's)")
    p.add_argument("--no-lora", action="store_true",
                   help="stop before the LoRA phase (a later run with the same --out reuses every finished row)")
    p.add_argument("--eval-window", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny budgets, to check the pipeline")
    p.add_argument("--save-routers", action="store_true",
                   help="make the first seed's RT, then RT-L, folder the package's committed model")
    ns = p.parse_args()
    if ns.quick:  # shrink the budgets left at their defaults
        for name, small in (("rt_steps", 4), ("lora_steps", 2), ("eval_tokens", 2048)):
            if getattr(ns, name) == p.get_default(name):
                setattr(ns, name, small)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    model, tok = models.load_model(ns.model)
    test_tokens = token_stream("shakespeare", "test", tok, ns.eval_tokens)
    chat_tokens = token_stream("chat", "test", tok, ns.chat_tokens)
    doc_tokens = token_stream("pydoc", "test", tok, ns.chat_tokens)
    calib = data.pack_tokens(data.load_texts("shakespeare", "validation"), tok, ns.block_size, max_blocks=16, progress=False)
    del model
    common = dict(model=ns.model, block_size=ns.block_size, batch_size=ns.batch_size, save_every=10_000, log_every=10)

    rows: list[dict] = []
    # Re-running after a crash or kill reuses finished trainings and evaluations.
    cache_path = out / "rows.jsonl"
    cached = {}
    if cache_path.exists():
        for line in cache_path.read_text().splitlines():
            r = json.loads(line)
            cached[(r["method"], r["target"])] = r

    def evaluate(name: str, sparsity: float | None, artefact: Path | None = None, model=None, seconds=None):
        if (name, sparsity) in cached:
            rows.append(cached[(name, sparsity)])
            return rows[-1]
        if model is None:
            model, _ = load_skipgpt(ns.model, artefact, merge=True)
        if skipgpt.is_patched(model):
            skipgpt.set_mode(model, "masked")  # the oracle path; identical numbers to reference
        t0 = time.perf_counter()
        r = perplexity(model, test_tokens, window=ns.eval_window, batch_size=4, progress=False)
        c = perplexity(model, chat_tokens, window=ns.eval_window, batch_size=4, progress=False)
        dc = perplexity(model, doc_tokens, window=ns.eval_window, batch_size=4, progress=False)
        answers = chat.chat_eval(model, tok)
        row = {"method": name, "target": sparsity, "ppl": r["ppl"], "tokens": r["tokens"],
               "param_sparsity": r.get("param_sparsity", 0.0), "module_sparsity": r.get("module_sparsity", 0.0),
               "attn_skip": r.get("attn_skip", 0.0), "mlp_skip": r.get("mlp_skip", 0.0),
               "chat_ppl": c["ppl"], "chat_tokens": c["tokens"], "chat_param_sparsity": c.get("param_sparsity", 0.0),
               "pydoc_ppl": dc["ppl"], "pydoc_tokens": dc["tokens"], "pydoc_param_sparsity": dc.get("param_sparsity", 0.0),
               "rep4": answers["rep4"], "answers": answers["answers"],
               "train_s": seconds, "eval_s": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(cache_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def trained(d: Path) -> bool:
        return (d / "train_args.json").exists()

    def run(train, args) -> float | None:
        """Train unless finished. A run killed part-way (checkpoints, no artefact) continues
        where it stopped; its time is then only the last part, so none is reported."""
        if trained(Path(args.out)):
            return None
        args = dataclasses.replace(args, resume=(Path(args.out) / "checkpoints").is_dir())
        seconds = train(args)["seconds"]
        return None if args.resume else seconds

    def lora(name: str, routers: Path, sparsity: float | None, label: str, done: Path | None = None):
        if done is not None:  # a finished run from elsewhere: it must have this table's budget
            ran = json.loads((done / "train_args.json").read_text())
            steps, lr, loss, w = ran["steps"], ran["lr"], ran.get("loss", "lm"), ran.get("kd_weight", 1.0)
            if (steps != ns.lora_steps or (ns.lora_lr is not None and lr != ns.lora_lr) or loss != ns.lora_loss
                    or (loss == "kd+lm" and w != ns.lora_kd_weight)):
                raise SystemExit(f"--lora-from: {done} ran {steps} LoRA steps at lr {lr} with the {loss} loss "
                                 f"(KL weight {w:g}); this table gives every method {ns.lora_steps} steps"
                                 + (f" at lr {ns.lora_lr}" if ns.lora_lr else "")
                                 + f" with the {ns.lora_loss} loss (KL weight {ns.lora_kd_weight:g})")
            return evaluate(f"{label} + LoRA", sparsity, done)
        lr = {} if ns.lora_lr is None else {"lr": ns.lora_lr}
        args = LoraArgs(out=str(out / f"{name}-lora"), routers=str(routers), steps=ns.lora_steps, loss=ns.lora_loss,
                        kd_weight=ns.lora_kd_weight, **common, **lr)
        seconds = run(finetune_lora, args)
        return evaluate(f"{label} + LoRA", sparsity, Path(args.out), seconds=seconds)

    def routers(d: Path, sparsity: float, **kw):
        return run(train_routers, RouterArgs(out=str(d), sparsity=sparsity, steps=ns.rt_steps, **common, **kw))

    # Phases in priority order, so a time-boxed run has the key comparisons first.
    dense, _ = models.load_model(ns.model)
    evaluate("dense", None, model=dense)
    labels = {"shortgpt": "ShortGPT", "module_drop": "Static module drop", "random": "Random"}
    tags = {s: f"{round(s * 100)}" for s in ns.sparsities}
    def rt_dir(s: float, seed: int) -> Path:
        if ns.rt_from:
            return Path(ns.rt_from.format(tag=tags[s], seed=seed))
        return out / f"skipgpt-rt-{tags[s]}-s{seed}"

    def save_asset(src: Path, tag: str, routers_dir: Path | None = None) -> None:
        """Make the package's committed folder for `tag` a copy of the run folder `src`: a router
        folder, or (with routers_dir, the router run it started from) a finetune-lora folder."""
        dest = ASSETS / f"smollm2-135m-{tag}"
        dest.mkdir(parents=True, exist_ok=True)
        for f in dest.iterdir():  # nothing stale: an adapter left beside new routers would be loaded
            f.unlink()
        files = ["routers.safetensors", "skip_config.json", "train_args.json"]
        if routers_dir is not None:
            files += ["adapter_config.json", "adapter_model.safetensors"]
            shutil.copy(routers_dir / "train_args.json", dest / "routers_train_args.json")
        for f in files:
            shutil.copy(src / f, dest / f)

    for s in ns.sparsities:  # 1: SkipGPT-RT and the training-free baselines
        for seed in ns.seeds:
            d = rt_dir(s, seed)
            seconds = None if ns.rt_from else routers(d, s, seed=seed)
            evaluate(f"SkipGPT-RT (seed {seed})", s, d, seconds=seconds)
        rt = rt_dir(s, ns.seeds[0])
        if ns.save_routers:
            save_asset(rt, tags[s])
        for name in labels:
            m, _ = models.load_model(ns.model)
            info = baseline(m, name, s, calib_ids=calib)
            d = out / f"{name}-{tags[s]}"
            skipgpt.save_routers(m, d)
            if "plan" in info:
                (d / "plan.json").write_text(json.dumps(info["plan"]))
            evaluate(labels[name], s, model=m)
    for s in ns.sparsities:  # 2: MoD-D, routers tuned the same way
        mod = out / f"mod-d-{tags[s]}"
        evaluate("MoD-D", s, mod, seconds=routers(mod, s, policy="topk"))
    if ns.no_lora:
        print(f"--no-lora: {len(rows)} rows in {cache_path}; run again without it for the LoRA phase")
        return
    # 3: the same LoRA budget for everyone (dense routers always execute: same code path).
    skipgpt.apply(dense, skipgpt.SkipConfig(threshold=0.0))
    skipgpt.save_routers(dense, out / "dense-routers")
    lora("dense", out / "dense-routers", None, "dense")
    for s in ns.sparsities:
        done = Path(ns.lora_from.format(tag=tags[s])) if ns.lora_from else None
        name = f"skipgpt-rt-{tags[s]}-s{ns.seeds[0]}"
        lora(name, rt_dir(s, ns.seeds[0]), s, f"SkipGPT-RT (seed {ns.seeds[0]})", done)
        if ns.save_routers:  # the committed model is RT-L: routers and adapter
            save_asset(done or out / f"{name}-lora", tags[s], routers_dir=rt_dir(s, ns.seeds[0]))
        lora(f"mod-d-{tags[s]}", out / f"mod-d-{tags[s]}", s, "MoD-D")
        for name in labels:
            lora(f"{name}-{tags[s]}", out / f"{name}-{tags[s]}", s, labels[name])

    total = time.perf_counter() - t_start
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "wall_s": total, "args": vars(ns)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    order = {"dense": 0, "dense + LoRA": 1}
    rows.sort(key=lambda r: (r["target"] or 0, order.get(r["method"], 2), r["method"].endswith("LoRA"), r["method"]))
    lines = [
        f"SmolLM2-135M-Instruct (de-quantised Q4_1), Shakespeare test split, {rows[0]['tokens']} scored tokens, "
        f"window {ns.eval_window}; RT {ns.rt_steps} steps, LoRA {ns.lora_steps} steps ({ns.lora_loss} loss), "
        f"batch {ns.batch_size}x{ns.block_size}.",
        "",
        "| method | target | Shakespeare PPL | param sparsity | module sparsity | attn skip | MLP skip "
        "| chat PPL | chat param sparsity | Python-docs PPL | Python-docs param sparsity | chat repeated 4-grams |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tgt = "-" if r["target"] is None else f"{r['target']:.2f}"
        lines.append(f"| {r['method']} | {tgt} | {r['ppl']:.2f} | {r['param_sparsity']:.3f} | "
                     f"{r['module_sparsity']:.3f} | {r['attn_skip']:.3f} | {r['mlp_skip']:.3f} | "
                     f"{r['chat_ppl']:.2f} | {r['chat_param_sparsity']:.3f} | {r['pydoc_ppl']:.2f} | "
                     f"{r['pydoc_param_sparsity']:.3f} | {r['rep4']:.3f} |")
    lines += ["", f"Wall time {total / 60:.1f} min on {meta['machine']}, {meta['date']}."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
