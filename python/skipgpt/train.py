"""Two-stage training on accelerate: router tuning (SkipGPT-RT) and LoRA recovery (SkipGPT-RT-L).

Both stages share one loop (:func:`_train`): deterministic data order, periodic checkpoints
written atomically, exact resume after a kill, and data-parallel training through
``accelerate launch --num_processes N`` with no code change. The loop keeps its own small
checkpoints (trainable weights, optimiser, scheduler, RNG) instead of saving the frozen model.

Stage 1: the LLM is frozen; only the routers train, with hard straight-through Gumbel gates,
temperature annealed linearly from ``tau_start`` to ``tau_end``, and the loss
``L_LM + alpha * |target - s|``, ``s`` the realised sparsity of the batch (padding excluded).
Stage 2: routers frozen and deciding deterministically (the model trains under exactly the
skipping it will have at inference); peft LoRA on q_proj, v_proj, gate_proj; LM loss only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import data, models
from .adapters import unwrap
from .argcheck import check_fields
from .checkpoint import load_routers, read_config, save_routers
from .config import SkipConfig
from .patch import apply, calibrate_input_scale, calibrate_threshold, router_parameters, state

CKPT_DIR = "checkpoints"
LORA_TARGETS = ("q_proj", "v_proj", "gate_proj")


@dataclasses.dataclass
class TrainArgs:
    """Arguments shared by both stages (CLI flags of the same names)."""

    out: str
    model: str | None = None
    data: str = "shakespeare"
    split: str = "train"
    block_size: int = 256
    max_blocks: int | None = None
    steps: int = 200
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 50
    log_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = False
    max_steps_this_run: int | None = None  # stop early (time-boxed jobs); --resume continues
    dtype: str = "float32"


@dataclasses.dataclass
class RouterArgs(TrainArgs):
    sparsity: float = 0.25
    sparsity_metric: str = "params"
    alpha: float = 8.0
    tau_start: float = 5.0
    tau_end: float = 1.0
    router_type: str = "linear"
    # Start near-dense (p_exec = sigmoid(3) = 0.95) and let the penalty pull skipping in where it
    # costs least; 0 (p_exec = 0.5) starts from a wrecked model. Measured on SmolLM2, BENCHMARKS.md.
    init_execute_bias: float = 3.0
    normalize_input: bool = True  # routers see unit-RMS inputs (see skipgpt.Router); False = paper's raw h
    calibrate_threshold: bool = True  # after tuning, move the inference threshold onto the target rate
    policy: str = "router"  # "topk" tunes MoD-D routers the same way (capacity = 1 - sparsity)


@dataclasses.dataclass
class LoraArgs(TrainArgs):
    routers: str = ""
    lr: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    warmup_ratio: float = 0.1
    target_modules: tuple[str, ...] = LORA_TARGETS


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# -- the shared loop ------------------------------------------------------------------------------
def _batches(n: int, batch_size: int, seed: int, step: int, rank: int, world: int) -> torch.Tensor:
    """Block indices of global step ``step``: a per-epoch seeded permutation, sharded by rank."""
    per_epoch = max(n // (batch_size * world), 1)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = (i * world + rank) * batch_size
    return perm[start : start + batch_size]


def _checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints under ``out``, oldest first (temp dirs and stray names ignored)."""
    ckpts = [p for p in (out / CKPT_DIR).glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(ckpts, key=lambda p: int(p.name[5:]))


def _latest_checkpoint(out: Path) -> Path | None:
    ckpts = _checkpoints(out)
    return ckpts[-1] if ckpts else None


# Arguments a resumed run may change: they do not change what the run computes.
RESUME_MAY_DIFFER = frozenset({"out", "resume", "max_steps_this_run", "save_every", "log_every", "keep_checkpoints"})


def check_resume_args(saved: dict | None, args: TrainArgs, where: Path) -> None:
    """Refuse to resume a run with arguments that change its result (naming each difference)."""
    if saved is None:
        return  # a checkpoint written before the arguments were recorded
    now = json.loads(json.dumps(dataclasses.asdict(args), default=list))
    diff = [
        f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}"
        for k in sorted(now)
        if k in saved and k not in RESUME_MAY_DIFFER and saved[k] != now[k]
    ]
    if diff:
        raise ValueError(
            f"--resume: {where} was written by a run with other arguments ({'; '.join(diff)}). Resume with "
            "the same arguments, or train into another --out."
        )


def _resume(out: Path, args, raw, optimizer, scheduler, load_weights, accelerator) -> int:
    """Load the newest readable checkpoint and return its step (0 when there is none). An
    unreadable one is reported and the one before it tried; arguments that differ from the
    checkpointed run's are refused."""
    ckpts = _checkpoints(out)
    if not ckpts:
        accelerator.print(f"--resume: no checkpoint under {out / CKPT_DIR}; starting at step 0")
        return 0
    failed: list[str] = []
    for ckpt in reversed(ckpts):
        try:  # everything is read (and checked) before anything is loaded
            meta = json.loads((ckpt / "trainer_state.json").read_text())
            step = int(meta["step"])
            opt_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
            sched_state = torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True)
            rng = load_file(str(ckpt / f"rng-{accelerator.process_index}.safetensors"))["torch"]
        except Exception as e:  # noqa: BLE001 - any damage makes the checkpoint unusable
            failed.append(f"{ckpt.name} ({_why(e)})")
            accelerator.print(f"checkpoint {ckpt} is unreadable ({_why(e)}); trying the previous one")
            continue
        check_resume_args(meta.get("args"), args, ckpt)
        try:
            load_weights(raw, ckpt)
            optimizer.load_state_dict(opt_state)
            scheduler.load_state_dict(sched_state)
        except Exception as e:  # noqa: BLE001 - the next checkpoint overwrites whatever was loaded
            failed.append(f"{ckpt.name} ({_why(e)})")
            accelerator.print(f"checkpoint {ckpt} does not load ({_why(e)}); trying the previous one")
            continue
        torch.set_rng_state(rng)
        accelerator.print(f"resumed from {ckpt} at step {step}" + (f" (skipped unreadable {', '.join(failed)})" if failed else ""))
        return step
    raise RuntimeError(f"--resume: no checkpoint under {out / CKPT_DIR} is readable: {'; '.join(failed)}")


def _why(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (a resumed run writes the later ones again;
    a line cut by a kill is dropped)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
            keep.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _train(
    args: TrainArgs,
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    blocks: torch.Tensor,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]],
    save_weights: Callable[[torch.nn.Module, Path], None],
    load_weights: Callable[[torch.nn.Module, Path], None],
    make_scheduler: Callable[[torch.optim.Optimizer], Any],
    accelerator,
) -> dict[str, Any]:
    check_fields(args)  # the CLI checked these at parse time; Python callers get the same checks
    out = Path(args.out)
    if not args.resume and _checkpoints(out):
        raise ValueError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it, or use another --out")
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    step = _resume(out, args, raw, optimizer, scheduler, load_weights, accelerator) if args.resume else 0
    log_path = out / "log.jsonl"
    if accelerator.is_main_process:
        _truncate_log(log_path, step)
    last_logs: dict[str, float] = {}
    stop_at = args.steps if args.max_steps_this_run is None else min(args.steps, step + args.max_steps_this_run)
    bar = tqdm(total=args.steps, initial=step, desc=type(args).__name__.replace("Args", ""), disable=not accelerator.is_main_process)
    t0 = time.perf_counter()
    model.train()
    while step < stop_at:
        idx = _batches(len(blocks), args.batch_size, args.seed, step, accelerator.process_index, accelerator.num_processes)
        batch = blocks[idx].to(accelerator.device)
        loss, logs = loss_fn(model, batch, step)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        last_logs = {"step": step, "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0], **logs}
        if step % args.log_every == 0 or step == stop_at:
            bar.set_postfix({k: round(v, 4) for k, v in last_logs.items() if k not in ("step", "lr")})
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(last_logs) + "\n")
        if step % args.save_every == 0 or step == stop_at:
            _save_checkpoint(out, step, raw, optimizer, scheduler, save_weights, accelerator, args.keep_checkpoints, args)
    bar.close()
    return {"step": step, "done": step >= args.steps, "seconds": time.perf_counter() - t0, **last_logs}


def _save_checkpoint(out, step, raw, optimizer, scheduler, save_weights, accelerator, keep, args=None) -> None:
    """Write checkpoints/step-N atomically: a temp dir renamed into place once complete. The
    run's arguments go with it (``--resume`` refuses other ones)."""
    root = out / CKPT_DIR
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Every rank has its own RNG stream (Gumbel noise, dropout).
    save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng-{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process:
        save_weights(raw, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"step": step, "args": dataclasses.asdict(args) if args is not None else None}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, default=list))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _setup(args: TrainArgs):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(args.seed + accelerator.process_index)
    model, tok = models.load_model(args.model, dtype=_dtype(args.dtype), device=accelerator.device)
    blocks = data.pack_tokens(data.load_texts(args.data, args.split), tok, args.block_size, max_blocks=args.max_blocks)
    if len(blocks) < args.batch_size * accelerator.num_processes:
        raise ValueError(
            f"{len(blocks)} blocks of {args.block_size} tokens are too few for batch size "
            f"{args.batch_size} x {accelerator.num_processes} processes"
        )
    return accelerator, model, tok, blocks


def _lm_loss(model, batch) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


# -- stage 1 --------------------------------------------------------------------------------------
def router_config(args: RouterArgs) -> SkipConfig:
    return SkipConfig(
        router_type=args.router_type,
        init_execute_bias=args.init_execute_bias,
        mode="masked",
        gate="auto",
        tau=args.tau_start,
        sparsity_target=args.sparsity,
        alpha=args.alpha,
        sparsity_metric=args.sparsity_metric,
        policy=args.policy,
        capacity=1.0 - args.sparsity,
    )


def train_routers(args: RouterArgs, model=None, blocks=None, accelerator=None) -> dict[str, Any]:
    """Stage 1. Writes the routers to ``args.out`` (see :func:`skipgpt.save_routers`)."""
    check_fields(args)
    if model is None:
        accelerator, model, _, blocks = _setup(args)
    cfg = router_config(args)
    if not hasattr(unwrap(model), "skipgpt_state"):
        apply(model, cfg)
        if args.normalize_input:
            calibrate_input_scale(model, blocks[: min(len(blocks), 8)].to(next(model.parameters()).device))
    model.requires_grad_(False)
    params = router_parameters(model)
    for p in params:
        p.requires_grad_(True)
    st = state(model)

    def loss_fn(m, batch, step):
        st.config.tau = args.tau_start + (args.tau_end - args.tau_start) * step / max(args.steps - 1, 1)
        lm = _lm_loss(m, batch)
        s = st.sparsity(args.sparsity_metric)
        loss = lm + args.alpha * (args.sparsity - s).abs() if args.policy == "router" else lm
        with torch.no_grad():
            ea = torch.stack([c[0] for c in st.exec_counts]).float().mean() / st.n_valid
            em = torch.stack([c[1] for c in st.exec_counts]).float().mean() / st.n_valid
            other = st.sparsity("modules" if args.sparsity_metric == "params" else "params")
        return loss, {
            "lm_loss": float(lm.detach()),
            "sparsity": float(s),
            "sparsity_" + ("modules" if args.sparsity_metric == "params" else "params"): float(other),
            "attn_skip": 1 - float(ea),
            "mlp_skip": 1 - float(em),
            "tau": st.config.tau,
        }

    result = _train(
        args, model, params, blocks, loss_fn,
        save_weights=save_routers,
        load_weights=lambda m, d: load_routers(m, d),
        make_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),  # constant
        accelerator=accelerator,
    )
    if result["done"] and accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        st.config.tau = args.tau_end
        st.config.gate, st.config.mode = "auto", "auto"  # inference defaults in the saved config
        if args.calibrate_threshold and args.policy == "router":
            raw.eval()
            with torch.no_grad():
                result["threshold"] = calibrate_threshold(raw, blocks[-8:].to(accelerator.device), args.sparsity, args.sparsity_metric)
        save_routers(raw, args.out)
        (Path(args.out) / "train_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    accelerator.wait_for_everyone()
    return result


# -- stage 2 --------------------------------------------------------------------------------------
def add_lora(model, args: LoraArgs):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=list(args.target_modules), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def _save_adapter(model, directory: Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)


def _load_adapter(model, directory: Path) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))


def finetune_lora(args: LoraArgs, model=None, blocks=None, accelerator=None) -> dict[str, Any]:
    """Stage 2. Writes routers + LoRA adapter to ``args.out`` as one artefact."""
    check_fields(args)
    if not args.routers:
        raise ValueError("finetune_lora needs --routers DIR (the output of train-routers)")
    if model is None:
        accelerator, model, _, blocks = _setup(args)
    base = unwrap(model)
    if not hasattr(base, "skipgpt_state"):
        apply(model, from_dir=args.routers)
    st = state(model)
    st.config.mode, st.config.gate = "masked", "deterministic"  # train under inference skipping
    for p in router_parameters(model):
        p.requires_grad_(False)
    model = add_lora(model, args)

    def loss_fn(m, batch, step):
        loss = _lm_loss(m, batch)
        return loss, {"lm_loss": float(loss.detach()), "sparsity": float(st.sparsity())}

    def make_scheduler(opt):
        from transformers import get_cosine_schedule_with_warmup

        return get_cosine_schedule_with_warmup(opt, math.ceil(args.warmup_ratio * args.steps), args.steps)

    params = [p for p in model.parameters() if p.requires_grad]
    result = _train(
        args, model, params, blocks, loss_fn,
        save_weights=_save_adapter, load_weights=_load_adapter,
        make_scheduler=make_scheduler, accelerator=accelerator,
    )
    if result["done"] and accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        st.config.gate, st.config.mode = "auto", "auto"
        save_routers(raw, args.out)
        _save_adapter(raw, Path(args.out))
        (Path(args.out) / "train_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2, default=list))
    accelerator.wait_for_everyone()
    return result


def load_skipgpt(model_or_path=None, artefact: str | os.PathLike | None = None, merge: bool = True, dtype=torch.float32):
    """Load a model with SkipGPT routers (and a LoRA adapter, if the artefact has one).

    With ``merge=True`` the LoRA weights are merged, so the skipping modes (which read plain
    ``nn.Linear`` weights) work at inference.
    """
    if isinstance(model_or_path, torch.nn.Module):
        model, tok = model_or_path, None
    else:
        model, tok = models.load_model(model_or_path, dtype=dtype)
    if artefact is None:
        return model, tok
    artefact = Path(artefact)
    apply(model, read_config(artefact), from_dir=artefact)
    if (artefact / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(artefact))
        if merge:
            model = model.merge_and_unload()
    model.eval()
    return model, tok
