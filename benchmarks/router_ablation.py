"""Router-tuning ablation: each lever of the recipe alone and together, over seeds, same budget.

Every arm is a set of `skipgpt train-routers` flags on top of the defaults; every run is scored
by perplexity relative to dense on held-out text of three kinds (Shakespeare test split as in
`quality_smollm2.py`, the chat corpus's test split, the Python-docs test split), with deterministic
gates at the routers' calibrated threshold, and the realised parameter sparsity on each.

    python benchmarks/router_ablation.py --arms recipe old --seeds 0 1 2 --steps 150 --out runs/ablation
    python benchmarks/router_ablation.py --report --out runs/ablation     # the markdown table

Runs are resumable (a killed run continues from its last checkpoint; finished runs and
evaluations are reused), so long ablations can span sessions: add `--max-steps-this-run N`.
Run two one-thread jobs side by side with disjoint `--arms` (or `--seeds`) and `--threads 1`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

# Each arm: flag overrides of RouterArgs. "default" is whatever the defaults are; every other arm
# spells out all of its levers, so a later change of the defaults does not change what it names.
OLD = dict(loss="lm", gate_noise=1.0, gate_noise_end=1.0, target_ramp=0.0, pin_cost=float("inf"),
           prior_bias_scale=0.0, eval_every=0, select="last", penalty="batch")
# All levers, as first proposed: KD, noise annealed to 0 over half the steps, ramp, pinning, selection.
RECIPE = dict(loss="kd", gate_noise=1.0, gate_noise_end=0.0, noise_anneal=0.5, target_ramp=0.2, pin_cost=1.0,
              prior_bias_scale=0.0, eval_every=50, select="best", penalty="batch")
ARMS: dict[str, dict] = {
    "default": {},
    "recipe": RECIPE,
    "old": OLD,
    "old+kd": {**OLD, "loss": "kd"},
    "old+pin": {**OLD, "pin_cost": 1.0},
    "old+anneal": {**OLD, "gate_noise_end": 0.0},
    "old+det": {**OLD, "gate_noise": 0.0, "gate_noise_end": 0.0},
    "old+ramp": {**OLD, "target_ramp": 0.2},
    "old+select": {**OLD, "eval_every": 50, "select": "best"},
    "old+pin+kd": {**OLD, "pin_cost": 1.0, "loss": "kd"},
    # The per-sequence penalty (the default since): each sequence pulled onto the target, not
    # only the batch mean. The runs named "default" in BENCHMARKS.md's 300-step tables predate it
    # (they are old+pin, with the batch penalty).
    "default+seqpen": {"penalty": "sequence"},
    "old+pin+seqpen": {**OLD, "pin_cost": 1.0, "penalty": "sequence"},
    "recipe-kd": {**RECIPE, "loss": "lm"},
    "recipe+kdlm": {**RECIPE, "loss": "kd+lm"},
    "recipe-pin": {**RECIPE, "pin_cost": float("inf")},
    "recipe-anneal": {**RECIPE, "gate_noise_end": 1.0},
    # The defaults since: LM loss, pinning, ramp, selection, noise 1 throughout.
    "recipe-anneal-kd": {**RECIPE, "gate_noise_end": 1.0, "loss": "lm"},
    "recipe-anneal+pin0.5": {**RECIPE, "gate_noise_end": 1.0, "pin_cost": 0.5},
    "recipe+det": {**RECIPE, "gate_noise": 0.0},
    "recipe-ramp": {**RECIPE, "target_ramp": 0.0},
    "recipe-select": {**RECIPE, "select": "last"},
    "recipe+prior": {**RECIPE, "prior_bias_scale": 2.0},
    "recipe+pin0.5": {**RECIPE, "pin_cost": 0.5},
    "recipe+bias_lr": {**RECIPE, "bias_lr": 2e-2},
}
EVAL_SETS = ("shakespeare", "chat", "pydoc")


def run_dir(out: Path, arm: str, target: float, seed: int) -> Path:
    return out / f"{arm}-{round(target * 100)}-s{seed}"


def train(ns, arm: str, target: float, seed: int) -> Path:
    from skipgpt.train import RouterArgs, train_routers

    d = run_dir(Path(ns.out), arm, target, seed)
    if (d / "train_args.json").exists():
        return d
    kw = dict(out=str(d), sparsity=target, steps=ns.steps, seed=seed, block_size=ns.block_size,
              batch_size=ns.batch_size, save_every=ns.save_every, log_every=10, resume=(d / "checkpoints").exists(),
              max_steps_this_run=ns.max_steps_this_run, **ARMS[arm])
    if ns.data:
        kw["data"] = ns.data
    t0 = time.perf_counter()
    res = train_routers(RouterArgs(**kw))
    with open(d / "wall.jsonl", "a") as f:
        f.write(json.dumps({"seconds": time.perf_counter() - t0, "steps_to": res["step"]}) + "\n")
    return d


def evaluate(ns, d: Path | str | None, cache: dict) -> dict:
    """Perplexity (and realised sparsity) of run ``d`` on each of ``ns.eval_sets``, and the
    repeated-4-gram fraction of greedy chat answers (``rep4``). ``d`` is a router folder, None
    (dense) or ``"shortgpt-<target>"`` (the ShortGPT baseline, calibrated as in
    quality_smollm2.py). Each (run, metric) is computed once and kept in evals.jsonl."""
    import skipgpt
    from skipgpt import chat, data
    from skipgpt.baselines import baseline
    from skipgpt.perplexity import perplexity, token_stream
    from skipgpt.train import load_skipgpt

    key = str(d) if d else "dense"
    row = cache.setdefault(key, {"run": key})
    todo = [n for n in (*ns.eval_sets, "rep4") if n not in row]
    if not todo:
        return row
    if isinstance(d, str) and d.startswith("shortgpt-"):
        model, tok = load_skipgpt(None, None)
        calib = data.pack_tokens(data.load_texts("shakespeare", "validation"), tok, 128, max_blocks=16, progress=False)
        baseline(model, "shortgpt", float(d.split("-")[1]) / 100, calib)
    else:
        model, tok = load_skipgpt(None, d)
    if skipgpt.is_patched(model):
        skipgpt.set_mode(model, "masked")
    for name in todo:
        if name == "rep4":
            part = {"run": key, "rep4": chat.chat_eval(model, tok)["rep4"]}
        else:
            tokens = token_stream(name, "test", tok, ns.eval_tokens)
            r = perplexity(model, tokens, window=256, batch_size=4, progress=False)
            part = {"run": key, name: r["ppl"], name + "_sparsity": r.get("param_sparsity", 0.0), name + "_tokens": r["tokens"]}
        row.update(part)
        with open(Path(ns.out) / "evals.jsonl", "a") as f:
            f.write(json.dumps(part) + "\n")
    return row


def load_cache(out: Path) -> dict:
    cache: dict = {}
    p = out / "evals.jsonl"
    for r in map(json.loads, p.read_text().splitlines() if p.exists() else []):
        cache.setdefault(r["run"], {}).update(r)
    return cache


def report(ns) -> str:
    out = Path(ns.out)
    cache = load_cache(out)
    dense = cache.get("dense")
    if dense is None:
        return "no dense evaluation yet"
    sets = [n for n in EVAL_SETS if n in dense]
    lines = ["| arm | target | seeds | " + " | ".join(f"{n}: PPL / dense, median (min-max)" for n in sets)
             + " | param sparsity (" + " / ".join(sets) + ") | best step |", "|---" * (5 + len(sets)) + "|"]
    by_arm: dict[tuple[str, str], list] = {}
    for key, row in cache.items():
        name = Path(key).name
        if key == "dense" or name.count("-") < 2 or not name.rsplit("-", 1)[1].startswith("s"):
            continue
        arm, tgt, seed = name.rsplit("-", 2)
        by_arm.setdefault((arm, tgt), []).append((seed, row, Path(key)))
    for (arm, tgt), rows in sorted(by_arm.items()):
        cells = []
        for n in sets:
            rel = sorted(r[n] / dense[n] for _, r, _ in rows if n in r)
            cells.append(f"{statistics.median(rel):.2f}x ({rel[0]:.2f}-{rel[-1]:.2f})" if rel else "-")
        sp = " / ".join(f"{statistics.median(r[n + '_sparsity'] for _, r, _ in rows if n in r):.3f}"
                        if any(n in r for _, r, _ in rows) else "-" for n in sets)
        best = []
        for _, _, d in rows:
            log = [json.loads(l) for l in (d / "log.jsonl").read_text().splitlines()] if (d / "log.jsonl").exists() else []
            evals = [l for l in log if "val_nll" in l]
            best.append(str(min(evals, key=lambda l: l["val_nll"])["step"]) if evals and ARMS.get(arm, {}).get("select", "best") == "best" else "last")
        lines.append(f"| {arm} | {tgt}% | {','.join(s for s, _, _ in rows)} | " + " | ".join(cells) + f" | {sp} | {','.join(best)} |")
    dense_cells = ", ".join(f"{n} {dense[n]:.2f}" for n in sets)
    others = ["", "| model | " + " | ".join(f"{n} PPL (param sparsity)" for n in sets) + " | chat repeated 4-grams |",
              "|---" * (2 + len(sets)) + "|"]
    for key, row in cache.items():
        if not any(n in row for n in sets):
            continue
        cells = " | ".join(f"{row[n]:.2f} ({row.get(n + '_sparsity', 0):.3f})" if n in row else "-" for n in sets)
        others.append(f"| {key} | {cells} | " + (f"{row['rep4']:.3f} |" if "rep4" in row else "- |"))
    return f"Dense perplexity: {dense_cells}\n\n" + "\n".join(lines + others)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--arms", nargs="+", default=["recipe", "old"], choices=sorted(ARMS))
    p.add_argument("--targets", type=float, nargs="+", default=[0.25])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--data", default=None, help="training data (default: the recipe's mixture)")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-sets", nargs="+", default=list(EVAL_SETS), choices=EVAL_SETS)
    p.add_argument("--max-steps-this-run", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compare", nargs="*", default=[], help="also evaluate these router folders, or shortgpt-25 / shortgpt-40")
    p.add_argument("--report", action="store_true", help="print the table of what is finished")
    ns = p.parse_args()
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    if ns.report:
        print(report(ns))
        return
    if ns.threads:
        torch.set_num_threads(ns.threads)
    cache = load_cache(Path(ns.out))
    evaluate(ns, None, cache)
    for extra in ns.compare:  # router folders or shortgpt-<target>, evaluated beside the runs
        print(json.dumps(evaluate(ns, extra if extra.startswith("shortgpt-") else Path(extra), cache)), flush=True)
    for seed in ns.seeds:
        for target in ns.targets:
            for arm in ns.arms:
                d = train(ns, arm, target, seed)
                if (d / "train_args.json").exists():
                    print(json.dumps(evaluate(ns, d, cache)), flush=True)
    print(report(ns))


if __name__ == "__main__":
    main()
