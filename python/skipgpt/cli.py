"""The ``skipgpt`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(ns: argparse.Namespace) -> int:
    from .demo import DemoArgs, run

    run(DemoArgs(model=ns.model, sparsity=ns.sparsity, prompt=ns.prompt, max_new_tokens=ns.max_new_tokens, threads=ns.threads))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skipgpt", description="SkipGPT: per-token module skipping for HF LLMs")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="generate with skipping on the default model and compare with dense")
    d.add_argument("--model", default=None, help="HF model folder or id (default: the embedded SmolLM2-135M)")
    d.add_argument("--sparsity", type=float, default=0.25, help="target skip rate per router (default 0.25)")
    d.add_argument("--prompt", default="Write one sentence about the sea.")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--threads", type=int, default=None)
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
