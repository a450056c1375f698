"""Range checks of the command-line flags and training arguments, declared once by name.

``RULES`` maps an argument's name (a dataclass field of :mod:`skipgpt.train`, or a CLI flag's
destination) to what it accepts. The CLI checks every flag at parse time, so a bad value is
refused with the flag's name; :func:`check_fields` runs the same checks on a dataclass of
arguments built in Python. A new numeric argument is checked by adding one line here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Rule:
    """``kind`` ``int``/``float``/``str``; numbers lie in ``[lo, hi]`` (open at an end marked
    ``lo_open``/``hi_open``; floats are always finite); ``choices`` lists the allowed strings;
    ``path`` is ``"dir"`` (an existing folder), ``"model"`` (a local folder or a hub id) or
    ``"out"`` (anything but an existing file)."""

    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] | None = None
    path: str | None = None
    inf_ok: bool = False  # +inf is a meaningful value (e.g. "no limit")

    def check(self, value: Any) -> str | None:
        """Why ``value`` is refused, or None."""
        if value is None:
            return None
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and not isinstance(value, int)):
                return f"must be {'an integer' if self.kind is int else 'a number'}, got {value!r}"
            if not math.isfinite(value) and not (self.inf_ok and value == math.inf):
                return f"must be finite, got {value}"
            if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
                return f"must be {'>' if self.lo_open else '>='} {self.lo:g}{self._range()}, got {value}"
            if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
                return f"must be {'<' if self.hi_open else '<='} {self.hi:g}{self._range()}, got {value}"
            return None
        if not isinstance(value, str):
            return f"must be a string, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {list(self.choices)}, got {value!r}"
        if self.path == "dir" and value:
            p = Path(value).expanduser()
            if not p.is_dir():
                return f"{value} is a file, not a folder" if p.exists() else f"no such folder: {value}"
        if self.path == "model" and value:
            from .models import model_path_problem

            return model_path_problem(value)
        if self.path == "out" and Path(value).expanduser().is_file():
            return f"{value} is a file; the output must be a folder"
        return None

    def _range(self) -> str:
        if self.lo is None or self.hi is None:
            return ""
        return f" (the range is {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'})"


_POSITIVE_INT = Rule(int, 1)
# The linear projections of a decoder layer of every supported family: what LoRA can target
# (q/k/v and gate/up name the fused qkv_proj and gate_up_proj of Phi-3).
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FRACTION = Rule(float, 0.0, 1.0, hi_open=True)  # a sparsity: 0 <= s < 1

RULES: dict[str, Rule] = {
    # Both training stages (skipgpt.train.TrainArgs).
    "out": Rule(str, path="out"),
    "model": Rule(str, path="model"),
    "block_size": Rule(int, 2),
    "max_blocks": _POSITIVE_INT,
    "steps": _POSITIVE_INT,
    "batch_size": _POSITIVE_INT,
    "lr": Rule(float, 0.0, lo_open=True),
    "weight_decay": Rule(float, 0.0),
    "seed": Rule(int, 0),
    "save_every": _POSITIVE_INT,
    "log_every": _POSITIVE_INT,
    "keep_checkpoints": _POSITIVE_INT,
    "max_steps_this_run": _POSITIVE_INT,
    "dtype": Rule(str, choices=("float32", "bfloat16", "float16")),
    # Router tuning (RouterArgs).
    "sparsity": _FRACTION,
    "sparsity_metric": Rule(str, choices=("params", "modules")),
    "alpha": Rule(float, 0.0),
    "tau_start": Rule(float, 0.0, lo_open=True),
    "tau_end": Rule(float, 0.0, lo_open=True),
    "router_type": Rule(str, choices=("linear", "mlp")),
    "init_execute_bias": Rule(float),
    "policy": Rule(str, choices=("router", "topk", "random")),
    "loss": Rule(str, choices=("lm", "kd", "kd+lm")),
    "kd_weight": Rule(float, 0.0, lo_open=True),
    "calibration": Rule(str, choices=("balanced", "pooled")),
    "penalty": Rule(str, choices=("batch", "sequence")),
    "calib_blocks": _POSITIVE_INT,
    "gate_noise": Rule(float, 0.0),
    "gate_noise_end": Rule(float, 0.0),
    "noise_anneal": Rule(float, 0.0, 1.0),
    "target_ramp": Rule(float, 0.0, 1.0),
    "pin_cost": Rule(float, inf_ok=True),  # inf: pin nothing
    "prior_bias_scale": Rule(float, 0.0),
    "prior_blocks": _POSITIVE_INT,
    "bias_lr": Rule(float, 0.0, lo_open=True),
    "eval_every": Rule(int, 0),
    "val_blocks": _POSITIVE_INT,
    "select": Rule(str, choices=("best", "last")),
    # LoRA (LoraArgs).
    "routers": Rule(str, path="dir"),
    "target_modules": Rule(str, choices=LORA_MODULES),  # each of the listed modules
    "lora_r": _POSITIVE_INT,
    "lora_alpha": _POSITIVE_INT,
    "lora_dropout": Rule(float, 0.0, 1.0, hi_open=True),
    "warmup_ratio": Rule(float, 0.0, 1.0),
    # Evaluation and the demo.
    "threshold": Rule(float, 0.0, 1.0),
    "window": Rule(int, 2),
    "stride": _POSITIVE_INT,
    "max_tokens": Rule(int, 2),
    "limit": _POSITIVE_INT,
    "num_fewshot": Rule(int, 0),
    "max_new_tokens": _POSITIVE_INT,
    "threads": _POSITIVE_INT,
    # gen-chat.
    "num_prompts": _POSITIVE_INT,
    # serve.
    "port": Rule(int, 1, 65535),
}


# The string flags whose values are open-ended (paths, hub ids, corpus specs, split names of HF
# datasets, task names, a prompt). Every other flag that takes a string has a fixed set of values
# (choices, from its rule): a test holds the parser to that.
OPEN_ENDED = frozenset({"out", "model", "routers", "data", "split", "prompt", "prompts", "tasks", "host", "folder"})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_fields(args: Any) -> None:
    """Refuse a dataclass of arguments (e.g. :class:`skipgpt.train.RouterArgs`) whose fields break
    their rules, naming the flag."""
    for f in dataclasses.fields(args):
        rule = RULES.get(f.name)
        value = getattr(args, f.name)
        for item in value if isinstance(value, (list, tuple)) else (value,):  # a list flag: each item
            why = rule.check(item) if rule is not None else None
            if why:
                raise ValueError(f"{flag(f.name)} {why}")


def parser_type(rule: Rule, explicit: bool = True) -> Callable[[str], Any]:
    """An argparse ``type=``: converts the string and applies the rule (argparse then names the
    flag in its error)."""

    def convert(text: str) -> Any:
        if rule.kind in (int, float):
            try:
                value = rule.kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not {'an integer' if rule.kind is int else 'a number'}"
                ) from None
        else:
            value = text
        why = rule.check(value)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value

    convert.__name__ = rule.kind.__name__  # argparse says "invalid int value" on a bare TypeError
    convert.rule, convert.explicit = rule, explicit  # type: ignore[attr-defined]
    return convert


class CheckedParser(argparse.ArgumentParser):
    """An ArgumentParser whose options are checked by their rule in ``RULES`` (found by the
    option's destination), and whose subcommand parsers are too. A numeric option without a
    rule is at least required to be finite."""

    def add_argument(self, *names: str, **kw: Any):
        dest = kw.get("dest") or next((n[2:].replace("-", "_") for n in names if n.startswith("--")), None)
        rule = RULES.get(dest) if dest else None
        if rule is not None and rule.choices is not None and kw.get("nargs") in ("+", "*"):
            kw.setdefault("choices", rule.choices)  # checked item by item
        elif kw.get("action", "store") == "store" and kw.get("nargs") is None:
            if rule is not None:
                if rule.choices is not None:
                    kw.setdefault("choices", rule.choices)
                else:
                    kw["type"] = parser_type(rule)
            elif kw.get("type") in (int, float):
                kw["type"] = parser_type(Rule(kw["type"]), explicit=False)
        return super().add_argument(*names, **kw)
