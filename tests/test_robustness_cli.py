"""Hostile and edge inputs at the CLI and the training loop (issue 14, points 11-12): every
numeric flag is range-checked at parse time naming the flag, paths are checked for what they
must be, and --resume refuses what would silently corrupt a run (other arguments, a missing or
damaged checkpoint, repeated log steps). Oracles: an uninterrupted run's routers and log, and
the bytes on disk before a refused call."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import skipgpt
from skipgpt import cli, load_skipgpt, models
from skipgpt.argcheck import OPEN_ENDED, RULES
from skipgpt.perplexity import perplexity
from skipgpt.train import RouterArgs, train_routers
from tiny_models import tiny_model


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 11. every numeric flag is range-checked at parse time, naming the flag -----------------------
@pytest.mark.parametrize(
    "argv,message",
    [
        (["train-routers", "--steps", "-5"], "argument --steps: must be >= 1, got -5"),
        (["train-routers", "--sparsity", "1.5"], "argument --sparsity: must be < 1"),
        (["train-routers", "--save-every", "0"], "argument --save-every: must be >= 1"),
        (["train-routers", "--log-every", "0"], "argument --log-every: must be >= 1"),
        (["train-routers", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
        (["train-routers", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["train-routers", "--lr", "nan"], "argument --lr: must be finite"),
        (["train-routers", "--alpha", "-1"], "argument --alpha: must be >= 0"),
        (["train-routers", "--tau-end", "0"], "argument --tau-end: must be > 0"),
        (["train-routers", "--block-size", "x"], "argument --block-size: 'x' is not an integer"),
        (["train-routers", "--model", "/nonexistent/model"], "argument --model: no such model folder: /nonexistent/model"),
        (["finetune-lora", "--lora-dropout", "1"], "argument --lora-dropout: must be < 1"),
        (["finetune-lora", "--routers", "/nonexistent"], "argument --routers: no such folder: /nonexistent"),
        (["finetune-lora"], "the following arguments are required: --routers"),
        (["finetune-lora", "--routers", ".", "--target-modules", "q_proj", "lm_head"],
         "argument --target-modules: invalid choice: 'lm_head'"),
        (["eval-ppl", "--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
        (["eval-ppl", "--stride", "0"], "argument --stride: must be >= 1, got 0"),
        (["eval-ppl", "--window", "64", "--stride", "65"], "argument --stride: must be <= --window (64), got 65"),
        (["eval-ppl", "--model", "/nonexistent"], "argument --model: no such model folder: /nonexistent"),
        (["eval-ppl", "--threshold", "1.2"], "argument --threshold: must be <= 1"),
        (["eval-ppl", "--sparsity", "-0.1"], "argument --sparsity: must be >= 0"),
        (["eval-lm", "--limit", "0"], "argument --limit: must be >= 1"),
        (["analyze", "--out", "x", "--max-blocks", "0"], "argument --max-blocks: must be >= 1"),
        (["demo", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
        (["demo", "--threads", "0"], "argument --threads: must be >= 1"),
    ],
)
def test_cli_refuses_bad_values_naming_the_flag(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    if argv[0] in ("train-routers", "finetune-lora"):
        argv = [*argv, "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "capacity" not in err  # no internal names
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_names_a_file_given_for_a_folder(tmp_path, capsys):
    file = tmp_path / "routers.safetensors"
    file.write_bytes(b"x")
    for argv in (["eval-ppl", "--routers", str(file)], ["train-routers", "--out", str(file)],
                 ["eval-ppl", "--model", str(file)]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        err = capsys.readouterr().err
        assert f"argument {argv[1]}: {file} is a file" in err, err
    assert file.read_bytes() == b"x"


def test_every_numeric_flag_has_a_declared_rule():
    """A new int/float flag (or dataclass field) is checked once it has a line in RULES."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    missing, checked = [], 0
    for name, p in sub.choices.items():
        for action in p._actions:
            typ = action.type
            numeric = typ in (int, float) or getattr(getattr(typ, "rule", None), "kind", None) in (int, float)
            if not numeric:
                continue
            checked += 1
            if not getattr(typ, "explicit", False) or action.dest not in RULES:
                missing.append(f"{name} --{action.dest}")
    assert checked > 30 and not missing, f"add these to skipgpt.argcheck.RULES: {missing}"


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_flag_has_help_and_fixed_valued_flags_have_choices():
    """Every flag of every command says what it does; a flag that takes a string takes one of a
    fixed set (argparse checks it at parse time) unless it is declared open-ended (a path, a
    corpus, a prompt: argcheck.OPEN_ENDED)."""
    no_help, no_choices, open_used = [], [], set()
    for name, p in _commands().items():
        p.format_help()  # every help string formats (a stray % would raise here)
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {(action.option_strings or [action.dest])[0]}"
            if not (action.help or "").strip():
                no_help.append(where)
            if isinstance(action, argparse.BooleanOptionalAction):
                continue
            rule = RULES.get(action.dest)
            takes_text = action.type in (None, str) and (rule is None or rule.kind is str)
            if action.dest in OPEN_ENDED:
                open_used.add(action.dest)
                assert action.choices is None, f"{where} is open-ended but has choices"
            elif takes_text and not action.choices:
                no_choices.append(where)
            if rule is not None and rule.choices is not None:
                assert tuple(action.choices) == rule.choices, where  # the rule's set, not a copy of it
    assert not no_help, f"flags without help: {no_help}"
    assert not no_choices, f"string flags without choices (add them, or to argcheck.OPEN_ENDED): {no_choices}"
    assert open_used == OPEN_ENDED  # no stale name there


def test_every_training_field_declares_its_help():
    """The training flags' help sits beside each dataclass field, so a new field needs one."""
    from skipgpt.train import LoraArgs, RouterArgs

    for cls in (RouterArgs, LoraArgs):
        missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help", "").strip()]
        assert not missing, f"{cls.__name__} fields without help: {missing}"


def test_help_lists_every_command_with_a_line(capsys):
    commands = _commands()
    assert set(commands) == {"demo", "train-routers", "finetune-lora", "calibrate", "eval-ppl", "eval-lm", "eval-chat", "gen-chat", "analyze",
                             "export", "serve"}
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, p in commands.items():
        assert p.description and f"{name} {p.description}" in text, name


def test_lora_api_checks_each_target_module_before_writing(tmp_path):
    from skipgpt.train import LoraArgs, finetune_lora

    args = LoraArgs(out=str(tmp_path / "run"), routers=str(tmp_path), target_modules=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match=r"--target-modules must be one of \[.*\], got 'lm_head'"):
        finetune_lora(args)
    assert not (tmp_path / "run").exists()


def test_models_and_router_paths_are_named_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder: /nonexistent"):
        models.resolve_model_path("/nonexistent")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        models.resolve_model_path("./relative/missing")
    file = tmp_path / "f.bin"
    file.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file, not a model folder"):
        models.resolve_model_path(str(file))
    assert models.resolve_model_path("org/model") == "org/model"  # a hub id passes through
    with pytest.raises(NotADirectoryError, match="is not a router directory"):
        skipgpt.read_config(file)
    with pytest.raises(NotADirectoryError, match="is not a router directory"):
        load_skipgpt(tiny_model("llama"), file)


def test_perplexity_refuses_stride_zero():
    model = tiny_model("llama")
    tokens = torch.randint(3, 128, (100,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="stride=0"):
        perplexity(model, tokens, window=32, stride=0, progress=False)


# -- 12. resume ----------------------------------------------------------------------------------
BLOCKS = torch.randint(3, 128, (16, 12), generator=torch.Generator().manual_seed(0))


def _run(out: Path, **kw):
    """Router tuning of the tiny Llama on fixed blocks (the same model and RNG every call)."""
    from accelerate import Accelerator

    args = RouterArgs(**{**dict(out=str(out), steps=6, batch_size=2, lr=0.05, sparsity=0.4, save_every=2, log_every=1,
                                calibrate_threshold=False), **kw})
    return train_routers(args, model=tiny_model("llama"), blocks=BLOCKS, accelerator=Accelerator(cpu=True))


def _log_steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    assert _run(out)["done"]
    return out


def _same_routers(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a / "routers.safetensors")), load_file(str(b / "routers.safetensors"))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _same_log(a: Path, b: Path) -> bool:
    la, lb = _log_steps(a), _log_steps(b)
    return [x["step"] for x in la] == [x["step"] for x in lb] and [x["loss"] for x in la] == [x["loss"] for x in lb]


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys, full_run):
    out = tmp_path / "run"
    res = _run(out, resume=True)
    assert "--resume: no checkpoint under" in capsys.readouterr().out
    assert res["done"] and res["step"] == 6
    assert _same_routers(out, full_run) and _same_log(out, full_run)


@pytest.mark.parametrize("change,message", [
    (dict(sparsity=0.3), "--sparsity 0.4 -> 0.3"),
    (dict(batch_size=4), "--batch-size 2 -> 4"),
    (dict(steps=8), "--steps 6 -> 8"),
])
def test_resume_with_other_arguments_is_refused(tmp_path, change, message):
    out = tmp_path / "run"
    assert not _run(out, max_steps_this_run=3)["done"]
    disk = _files(out)
    with pytest.raises(ValueError, match=re.escape(message)):
        _run(out, resume=True, **change)
    assert _files(out) == disk  # no checkpoint, log line or train_args.json written


def test_resume_after_a_kill_repeats_no_log_step(tmp_path, capsys, full_run):
    out = tmp_path / "run"
    _run(out, max_steps_this_run=5)  # checkpoints at steps 4 and 5
    # Killed after step 5 was logged but before its checkpoint was written, mid-way through the
    # next log line.
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-5")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    res = _run(out, resume=True, save_every=3)  # save_every may change on resume
    assert "resumed from" in capsys.readouterr().out and res["step"] == 6
    assert [x["step"] for x in _log_steps(out)] == [1, 2, 3, 4, 5, 6]
    assert _same_log(out, full_run) and _same_routers(out, full_run)


@pytest.mark.parametrize("damage", ["optimizer.pt", "routers.safetensors", "trainer_state.json", "rng-0.safetensors"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, full_run, damage):
    out = tmp_path / "run"
    _run(out, max_steps_this_run=5)
    victim = out / "checkpoints" / "step-5" / damage
    if damage == "rng-0.safetensors":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:20])
    res = _run(out, resume=True)
    printed = capsys.readouterr().out
    assert f"checkpoint {out / 'checkpoints' / 'step-5'}" in printed and "trying the previous one" in printed
    assert "resumed from" in printed and "step-4" in printed
    assert res["step"] == 6 and _same_routers(out, full_run) and _same_log(out, full_run)


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    _run(out, max_steps_this_run=5)
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "optimizer.pt").write_bytes(b"garbage")
    disk = _files(out)
    with pytest.raises(RuntimeError, match="no checkpoint under .* is readable: step-5 .*; step-4"):
        _run(out, resume=True)
    assert _files(out) == disk


def test_a_fresh_run_does_not_mix_with_an_earlier_one(tmp_path):
    out = tmp_path / "run"
    _run(out, max_steps_this_run=3)
    disk = _files(out)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run; pass --resume"):
        _run(out)
    assert _files(out) == disk


def test_train_routers_api_checks_its_arguments_before_writing(tmp_path):
    out = tmp_path / "run"
    for kw, flag in ((dict(steps=-5), "--steps"), (dict(save_every=0), "--save-every"), (dict(sparsity=1.5), "--sparsity")):
        with pytest.raises(ValueError, match=flag):
            _run(out, **kw)
        assert not out.exists()


def test_resume_keeps_arguments_that_do_not_change_the_result(tmp_path, full_run):
    out = tmp_path / "run"
    _run(out, max_steps_this_run=3)
    res = _run(out, resume=True, log_every=1, keep_checkpoints=3, save_every=1)
    assert res["done"] and _same_routers(out, full_run) and _same_log(out, full_run)
    saved = json.loads((out / "train_args.json").read_text())
    assert saved["keep_checkpoints"] == 3 and saved["resume"] is True
    state = json.loads((out / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["args"]["sparsity"] == 0.4
    assert dataclasses.asdict(RouterArgs(out="x")).keys() >= state["args"].keys()
