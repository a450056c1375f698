"""The ``skipgpt`` command line.

    skipgpt demo
    skipgpt train-routers --sparsity 0.25 --steps 200 --out runs/rt25
    skipgpt finetune-lora --routers runs/rt25 --steps 100 --out runs/rt25-lora
    skipgpt eval-ppl --routers runs/rt25-lora            # or --baseline shortgpt --sparsity 0.25
    skipgpt eval-lm --routers runs/rt25 --tasks skipgpt_nextline
    skipgpt analyze --routers runs/rt25 --out runs/rt25/analysis

Multi-process data parallel: ``accelerate launch --num_processes 2 -m skipgpt.cli train-routers ...``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

BASELINES = ("shortgpt", "module_drop", "random", "mod_d")


def _add_dataclass_args(p: argparse.ArgumentParser, cls, skip=()) -> None:
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "target_modules":
            p.add_argument(flag, nargs="+", default=list(default))
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float, "str | None": str}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=default, required=f.name == "out")


def _args(cls, ns: argparse.Namespace):
    kw = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    if "target_modules" in kw:
        kw["target_modules"] = tuple(kw["target_modules"])
    return cls(**kw)


def _print(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2, default=str))


def _demo(ns):
    from .demo import DemoArgs, run

    run(DemoArgs(model=ns.model, sparsity=ns.sparsity, prompt=ns.prompt, max_new_tokens=ns.max_new_tokens,
                 threads=ns.threads, routers=ns.routers))
    return 0


def _train_routers(ns):
    from .train import RouterArgs, train_routers

    _print(train_routers(_args(RouterArgs, ns)))
    return 0


def _finetune_lora(ns):
    from .train import LoraArgs, finetune_lora

    _print(finetune_lora(_args(LoraArgs, ns)))
    return 0


def load_for_eval(ns):
    """The model under evaluation: dense, SkipGPT routers (+LoRA), or a baseline."""
    import torch

    from . import data
    from .baselines import baseline
    from .patch import load_skipgpt, set_mode, set_threshold

    model, tok = load_skipgpt(ns.model, ns.routers)
    info: dict[str, Any] = {"model": ns.model or "smollm2-135m", "routers": ns.routers}
    if ns.baseline:
        if ns.routers:
            raise SystemExit("--routers and --baseline are exclusive")
        calib = data.pack_tokens(data.load_texts(ns.data, "validation"), tok, 256, max_blocks=8, progress=False)
        info["baseline"] = ns.baseline
        info.update(baseline(model, ns.baseline, ns.sparsity, calib))
    if ns.routers or ns.baseline:
        if ns.mode:
            set_mode(model, ns.mode)
        if ns.threshold is not None:
            set_threshold(model, ns.threshold)
    torch.manual_seed(0)
    return model, tok, info


def _add_eval_model_args(p):
    p.add_argument("--model", default=None, help="HF folder or id (default: the embedded SmolLM2-135M)")
    p.add_argument("--routers", default=None, help="a train-routers / finetune-lora output directory")
    p.add_argument("--baseline", choices=BASELINES, default=None)
    p.add_argument("--sparsity", type=float, default=0.25, help="baseline sparsity (parameter-weighted)")
    p.add_argument("--mode", choices=("masked", "reference", "native", "auto"), default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--data", default="shakespeare", help="offline corpus name, local files, or HF dataset")


def _eval_ppl(ns):
    from .perplexity import perplexity, token_stream

    model, tok, info = load_for_eval(ns)
    tokens = token_stream(ns.data, ns.split, tok, ns.max_tokens)
    print(f"perplexity on {ns.data}:{ns.split}, {tokens.numel()} tokens, window {ns.window}, stride {ns.stride or ns.window}")
    res = perplexity(model, tokens, window=ns.window, stride=ns.stride, batch_size=ns.batch_size)
    _print({**{k: v for k, v in info.items() if k != "similarity"}, "data": ns.data, "split": ns.split, **res})
    return 0


def _eval_lm(ns):
    from .evaluation import evaluate_lm

    model, tok, info = load_for_eval(ns)
    res = evaluate_lm(model, tok, ns.tasks, batch_size=ns.batch_size, limit=ns.limit, num_fewshot=ns.num_fewshot)
    _print({**{k: v for k, v in info.items() if k != "similarity"}, **res})
    return 0


def _analyze(ns):
    from . import data
    from .analysis import analyze

    model, tok, info = load_for_eval(ns)
    blocks = data.pack_tokens(data.load_texts(ns.data, ns.split), tok, ns.block_size, max_blocks=ns.max_blocks)
    _print(analyze(model, blocks, out_dir=ns.out))
    return 0


def _gen_chat(ns):
    import torch

    from . import chat, models

    if ns.threads:
        torch.set_num_threads(ns.threads)
    model, tok = models.load_model(ns.model)
    partial = ns.out + ".partial.jsonl"
    records = chat.generate_corpus(model, tok, chat.prompts(ns.num_prompts), max_new_tokens=ns.max_new_tokens,
                                   batch_size=ns.batch_size, seed=ns.seed, partial=partial)
    chat.save_corpus(records, ns.out)
    Path(partial).unlink(missing_ok=True)
    _print({"out": ns.out, "records": len(records),
            **{s: sum(r["split"] == s for r in records) for s in ("train", "validation", "test")}})
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .argcheck import CheckedParser
    from .train import LoraArgs, RouterArgs

    # Every flag is range-checked at parse time by its rule in skipgpt.argcheck.RULES.
    p = CheckedParser(prog="skipgpt", description="SkipGPT: per-token module skipping for HF LLMs")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="generate with skipping on the default model and compare with dense")
    d.add_argument("--model", default=None, help="HF model folder or id (default: the embedded SmolLM2-135M)")
    d.add_argument("--routers", default=None, help="router directory (default: the committed SmolLM2 routers)")
    d.add_argument("--sparsity", type=float, default=0.25,
                   help="0.25 or 0.40: which committed routers (default 0.25); without trained routers, "
                        "the skip rate the untrained routers are calibrated to")
    d.add_argument("--prompt", default="Write one sentence about the sea.")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--threads", type=int, default=None)
    d.set_defaults(func=_demo)

    t = sub.add_parser("train-routers", help="stage 1: router tuning (frozen LLM)")
    _add_dataclass_args(t, RouterArgs)
    t.set_defaults(func=_train_routers)

    lo = sub.add_parser("finetune-lora", help="stage 2: LoRA recovery with frozen routers")
    _add_dataclass_args(lo, LoraArgs)
    lo.set_defaults(func=_finetune_lora)

    e = sub.add_parser("eval-ppl", help="perplexity over a dataset split, with realised sparsity")
    _add_eval_model_args(e)
    e.add_argument("--split", default="test")
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--stride", type=int, default=None, help="default: the window (no overlap)")
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=4)
    e.set_defaults(func=_eval_ppl)

    lm = sub.add_parser("eval-lm", help="zero-shot tasks with lm-evaluation-harness")
    _add_eval_model_args(lm)
    lm.add_argument("--tasks", nargs="+", default=["skipgpt_nextline"])
    lm.add_argument("--limit", type=int, default=None)
    lm.add_argument("--num-fewshot", type=int, default=0)
    lm.add_argument("--batch-size", type=int, default=8)
    lm.set_defaults(func=_eval_lm)

    g = sub.add_parser("gen-chat", help="the model's own answers to built-in prompts, as tuning data (--data PATH)")
    g.add_argument("--model", default=None, help="HF folder or id (default: the embedded SmolLM2-135M)")
    g.add_argument("--out", required=True, help="output file, .jsonl.gz (a rerun resumes from OUT.partial.jsonl)")
    g.add_argument("--num-prompts", type=int, default=320, help="how many of the built-in prompts (by hash)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None)
    g.set_defaults(func=_gen_chat)

    a = sub.add_parser("analyze", help="routing plots (PNG) and a markdown table")
    _add_eval_model_args(a)
    a.add_argument("--out", required=True)
    a.add_argument("--split", default="test")
    a.add_argument("--block-size", type=int, default=256)
    a.add_argument("--max-blocks", type=int, default=16)
    a.set_defaults(func=_analyze)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "stride", None) is not None and ns.stride > ns.window:
        parser.error(f"argument --stride: must be <= --window ({ns.window}), got {ns.stride}")
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
