"""Two-stage training on accelerate: router tuning (SkipGPT-RT) and LoRA recovery (SkipGPT-RT-L).

Both stages share one loop (:func:`_train`): deterministic data order, periodic checkpoints
written atomically, exact resume after a kill, and data-parallel training through
``accelerate launch --num_processes N`` with no code change. The loop keeps its own small
checkpoints (trainable weights, optimiser, scheduler, RNG) instead of saving the frozen model.

Stage 1 (router tuning): the LLM is frozen; only the routers train, through hard
straight-through gates (temperature annealed from ``tau_start`` to ``tau_end``), on
``L + alpha * |target_t - s|`` with ``s`` the realised sparsity of each sequence (padding
excluded; the penalty averaged over the batch's sequences), or of the whole batch, the paper's.
The recipe (docs/training.md; every lever a flag):

- ``loss``: ``lm`` (default) the paper's next-token loss; ``kd`` the KL divergence from the
  dense model's next-token distribution (the same frozen model, every module executing, a
  no-grad forward in the same step) to the skipping model's; ``kd+lm`` their sum,
  ``lm + kd_weight * kd``.
- ``gate_noise`` -> ``gate_noise_end`` over the first ``noise_anneal`` of the steps: the scale of
  the Gumbel noise in the gate (default 1 throughout, the paper's sample). Ending at 0 trains
  the deterministic rule used at inference.
- ``target_ramp``: the target rises linearly from 0 to ``sparsity`` over that fraction of steps.
- The importance prior (:mod:`skipgpt.importance`): modules whose ablation costs at least
  ``pin_cost`` nats never skip; ``prior_bias_scale`` raises the other routers' initial margins
  with their cost; ``bias_lr`` gives the router biases their own learning rate.
- ``eval_every``: every so many steps the routers are scored on validation blocks with
  deterministic gates, at a threshold calibrated to the target; ``select="best"`` keeps the
  best-scoring routers.

Stage 2: routers frozen and deciding deterministically (the model trains under exactly the
skipping it will have at inference); peft LoRA on q_proj, v_proj, gate_proj; KD from the dense
model without LoRA plus the LM loss (the default), KD alone, or the LM loss alone (the paper's).
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

from . import data, importance, models
from .adapters import unwrap
from .argcheck import check_fields
from .checkpoint import load_routers, read_config, save_routers
from .config import SkipConfig
from .calibration import calibrate_input_scale, calibrate_threshold
from .patch import apply, load_skipgpt, router_parameters, stats  # load_skipgpt: re-exported for callers of train
from .skip_state import overrides, state

CKPT_DIR = "checkpoints"
LORA_TARGETS = ("q_proj", "v_proj", "gate_proj")


def _flag(default: Any, help: str) -> Any:
    """A field that is also a CLI flag (``--name-with-dashes``): its default, and its ``--help`` line."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainArgs:
    """Arguments shared by both stages (CLI flags of the same names)."""

    out: str = _flag(dataclasses.MISSING, "output folder: the trained artefact, checkpoints/ and log.jsonl (required)")
    model: str | None = _flag(None, "HF model folder or hub id (default: the embedded SmolLM2-135M)")
    data: str = _flag("chat:0.5+shakespeare:0.3+pydoc:0.2",
                      "training text: a built-in corpus (chat, shakespeare, milton, pydoc, all), local files, a HF "
                      "dataset, or a mixture SOURCE:WEIGHT+SOURCE:WEIGHT")
    split: str = _flag("train", "split of --data to train on: train, validation or test (a HF dataset: its split name)")
    block_size: int = _flag(256, "tokens per training block")
    max_blocks: int | None = _flag(None, "use at most this many training blocks (default: all)")
    steps: int = _flag(200, "optimiser steps of the whole run")
    batch_size: int = _flag(4, "blocks per step and process")
    lr: float = _flag(2e-3, "learning rate (AdamW, constant)")
    weight_decay: float = _flag(0.0, "AdamW weight decay")
    seed: int = _flag(0, "seed of the data order, the router initialisation and the gate noise")
    save_every: int = _flag(50, "write a checkpoint every N steps (and at the last step)")
    log_every: int = _flag(10, "append a line to log.jsonl every N steps")
    keep_checkpoints: int = _flag(2, "how many of the newest checkpoints to keep")
    resume: bool = _flag(False, "continue the run in --out from its newest readable checkpoint (same arguments)")
    max_steps_this_run: int | None = _flag(
        None, "stop after this many steps of this invocation (time-boxed jobs); --resume continues")
    dtype: str = _flag("float32", "dtype of the model's weights")
    loss: str = _flag("lm", "training loss: lm (next-token loss, the paper's), kd (KL from the dense model's "
                            "next-token distribution) or kd+lm (their sum)")
    kd_weight: float = _flag(1.0, "weight w of the KL term of --loss kd+lm: the loss is lm + w * kd")
    calibration: str = _flag(
        "balanced", "how the threshold is calibrated when --data is a mixture: balanced (on each source's validation "
                    "blocks, so that the source furthest from the target is as close as one threshold allows) or "
                    "pooled (on the mixture's validation blocks together)")
    calib_blocks: int = _flag(32, "validation blocks the threshold is calibrated on (balanced: of each source)")


@dataclasses.dataclass
class RouterArgs(TrainArgs):
    sparsity: float = _flag(0.25, "target sparsity, measured as --sparsity-metric, in [0, 1)")
    sparsity_metric: str = _flag("params", "what the sparsity counts: params (parameter-weighted) or modules")
    alpha: float = _flag(8.0, "weight of the sparsity penalty alpha * |target - sparsity| in the loss")
    penalty: str = _flag("sequence", "what the penalty's sparsity is taken over: sequence (each sequence's, the "
                                     "penalty averaged over sequences: every text is pulled onto the target, not only "
                                     "the mixture) or batch (the batch's, the paper's)")
    tau_start: float = _flag(5.0, "temperature of the straight-through gradient at the first step")
    tau_end: float = _flag(1.0, "... annealed linearly to this at the last step")
    router_type: str = _flag("linear", "linear: Linear(d, 2), the paper's; mlp: d -> d/4 -> ReLU -> 2")
    gate_noise: float = _flag(1.0, "Gumbel noise scale of the training gate at step 0 (1 = the paper's sample)")
    gate_noise_end: float = _flag(1.0, "... annealed linearly to this (0 = deterministic straight-through)")
    noise_anneal: float = _flag(0.5, "fraction of the steps over which the noise anneals")
    target_ramp: float = _flag(0.0, "fraction of the steps over which the target rises from 0 to --sparsity")
    pin_cost: float = _flag(1.0, "modules whose ablation costs >= this many nats never skip (inf: pin none)")
    prior_bias_scale: float = _flag(
        0.0, "raise the initial execute margins of the other routers by scale * log10(cost / median cost); 0: off")
    prior_blocks: int = _flag(4, "calibration blocks for the ablation costs of --pin-cost and --prior-bias-scale")
    bias_lr: float | None = _flag(None, "learning rate of the router biases (default: --lr)")
    eval_every: int = _flag(0, "score the routers on validation blocks every N steps (0: never)")
    val_blocks: int = _flag(8, "validation blocks (for --select)")
    select: str = _flag("last", "which routers the run ends with: best (lowest validation loss) or last")
    # Start near-dense (p_exec = sigmoid(3) = 0.95) and let the penalty pull skipping in where it
    # costs least; 0 (p_exec = 0.5) starts from a wrecked model. Measured on SmolLM2, BENCHMARKS.md.
    init_execute_bias: float = _flag(3.0, "initial execute margin of fresh routers (3: p_exec = 0.95, near dense; "
                                          "0: the paper's p_exec = 0.5)")
    normalize_input: bool = _flag(True, "routers see unit-RMS inputs (see skipgpt.Router); off: the paper's raw h")
    calibrate_threshold: bool = _flag(True, "after tuning, move the inference threshold onto the target rate")
    policy: str = _flag("router", "router: SkipGPT; topk: MoD-D routers tuned the same way (capacity = 1 - "
                                  "sparsity); random: random skipping at that capacity (a control)")


@dataclasses.dataclass
class LoraArgs(TrainArgs):
    routers: str = _flag("", "the train-routers output folder; its routers stay frozen (required)")
    lr: float = _flag(2e-4, "learning rate (AdamW, cosine schedule after the warm-up)")
    loss: str = _flag("kd+lm", "training loss: lm (next-token loss, the paper's), kd (KL from the dense base model "
                               "without LoRA) or kd+lm (lm + --kd-weight x kd)")
    lora_r: int = _flag(16, "LoRA rank")
    lora_alpha: int = _flag(32, "LoRA scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = _flag(0.1, "dropout on the LoRA input")
    warmup_ratio: float = _flag(0.1, "fraction of the steps of linear learning-rate warm-up")
    target_modules: tuple[str, ...] = _flag(LORA_TARGETS, "the projections that get LoRA adapters")
    calibrate_threshold: bool = _flag(True, "after LoRA, move the inference threshold back onto the routers' target "
                                            "rate (LoRA changes the hidden states the routers read); a threshold "
                                            "of 0 or 1 (all execute, or none) is kept")


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


def _resume(out: Path, args, raw, optimizer, scheduler, load_weights, accelerator, extra_state=None) -> int:
    """Load the newest readable checkpoint and return its step (0 when there is none). An
    unreadable one is reported and the one before it tried; arguments that differ from the
    checkpointed run's are refused. ``extra_state`` is refilled from the checkpoint."""
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
        if extra_state is not None:
            extra_state.clear()
            extra_state.update(meta.get("extra", {}))
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
    after_step: Callable[[torch.nn.Module, int], dict[str, float] | None] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The loop. ``params`` is a parameter list or AdamW parameter groups. ``after_step(model,
    step)`` runs after every optimiser step (validation); the metrics it returns go into that
    step's log line. ``extra_state`` is the caller's own JSON state (e.g. the best validation
    score so far): saved with every checkpoint and restored, in place, on resume."""
    extra_state = {} if extra_state is None else extra_state
    check_fields(args)  # the CLI checked these at parse time; Python callers get the same checks
    out = Path(args.out)
    if not args.resume and _checkpoints(out):
        raise ValueError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it, or use another --out")
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    step = _resume(out, args, raw, optimizer, scheduler, load_weights, accelerator, extra_state) if args.resume else 0

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
        evaluated = after_step(raw, step) if after_step is not None else None
        if evaluated:
            last_logs.update(evaluated)
        if step % args.log_every == 0 or step == stop_at or evaluated:
            bar.set_postfix({k: round(v, 4) for k, v in last_logs.items() if k not in ("step", "lr")})
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(last_logs) + "\n")
        if step % args.save_every == 0 or step == stop_at:
            _save_checkpoint(out, step, raw, optimizer, scheduler, save_weights, accelerator, args.keep_checkpoints, args, extra_state)
    bar.close()
    return {"step": step, "done": step >= args.steps, "seconds": time.perf_counter() - t0, **last_logs}


def _save_checkpoint(out, step, raw, optimizer, scheduler, save_weights, accelerator, keep, args=None, extra_state=None) -> None:
    """Write checkpoints/step-N atomically: a temp dir renamed into place once complete. The
    run's arguments go with it (``--resume`` refuses other ones), and the caller's ``extra_state``."""
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
        meta = {"step": step, "args": dataclasses.asdict(args) if args is not None else None,
                "extra": extra_state or {}}
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
    blocks = data.load_blocks(args.data, args.split, tok, args.block_size, max_blocks=args.max_blocks, seed=args.seed)
    if len(blocks) < args.batch_size * accelerator.num_processes:
        raise ValueError(
            f"{len(blocks)} blocks of {args.block_size} tokens are too few for batch size "
            f"{args.batch_size} x {accelerator.num_processes} processes"
        )
    n_val = getattr(args, "val_blocks", 8)
    val = data.load_blocks(args.data, "validation", tok, args.block_size, max_blocks=n_val, seed=0, progress=False)
    if len(val) == 0:
        val = blocks[-n_val:]
    val = val.to(accelerator.device)
    return accelerator, model, tok, blocks, val, _calibration_sets(args, tok, val.device)


def _calibration_sets(args: TrainArgs, tok, device):
    """What ``args`` calibrate the threshold on (:func:`calibration_sets`)."""
    return calibration_sets(args.data, args.calibration, args.calib_blocks, args.block_size, tok, device)


def calibration_sets(spec: str, calibration: str, n_blocks: int, block_size: int, tok, device=None):
    """The validation text a threshold is calibrated on: with ``calibration="balanced"`` and a
    mixture, a list of each source's blocks (``n_blocks`` of each; see
    :func:`calibrate_threshold`), else ``n_blocks`` blocks of ``spec`` (a mixture in its
    weights); None where ``spec`` has no validation text."""
    if calibration == "balanced" and len(data.parse_mix(spec)) > 1:
        sets = source_blocks(spec, "validation", tok, block_size, n_blocks)
        if len(sets) > 1:
            return [b.to(device) for b in sets]
    val = data.load_blocks(spec, "validation", tok, block_size, max_blocks=n_blocks, seed=0, progress=False, spread=True)
    return val.to(device) if len(val) else None


def source_blocks(spec: str, split: str, tok, block_size: int, max_blocks: int) -> list[torch.Tensor]:
    """Up to ``max_blocks`` blocks of each source of ``spec`` (a mixture or one source), in the
    order of the spec, each a seeded sample spread over all of that source's documents in
    ``split``; sources without text in ``split`` are left out."""
    sets = [data.load_blocks(name, split, tok, block_size, max_blocks=max_blocks, progress=False, spread=True)
            for name, _ in data.parse_mix(spec)]
    return [b for b in sets if len(b)]


def recalibrate(
    routers: str | Path, out: str | Path, sparsity: float | None = None, data_spec: str | None = None,
    calibration: str = "balanced", calib_blocks: int = 32, model: str | None = None,
) -> dict[str, Any]:
    """Copy a ``train-routers`` or ``finetune-lora`` artefact to ``out`` with its inference
    threshold calibrated anew: onto ``sparsity`` (default: the routers' target), on the
    validation split of ``data_spec`` (default: the text it was trained on), each source
    balanced or all pooled (:func:`calibrate_threshold`). Nothing but the threshold changes.
    Returns the old and new threshold."""
    from .argcheck import RULES, flag

    routers, out = Path(routers), Path(out)
    cfg = read_config(routers)  # refuses a folder that is not an artefact
    if cfg.policy != "router":
        raise ValueError(f"recalibrate: {routers} holds {cfg.policy!r} routers, which have no threshold to calibrate")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"recalibrate: {out} exists and is not an empty folder")
    saved = json.loads((routers / "train_args.json").read_text()) if (routers / "train_args.json").exists() else {}
    target = cfg.sparsity_target if sparsity is None else sparsity
    for name, value in (("sparsity", target), ("calibration", calibration), ("calib_blocks", calib_blocks)):
        why = RULES[name].check(value)
        if why:
            raise ValueError(f"recalibrate: {flag(name)} {why}")
    spec = data_spec or saved.get("data") or TrainArgs.data
    block_size = int(saved.get("block_size", 128))
    net, tok = load_skipgpt(model if model is not None else saved.get("model"), routers, merge=True)
    ids = calibration_sets(spec, calibration, calib_blocks, block_size, tok)
    if ids is None:
        raise ValueError(f"recalibrate: {spec!r} has no validation text to calibrate on")
    before = state(net).config.threshold
    with torch.no_grad(), overrides(net, mode="masked"):
        after = calibrate_threshold(net, ids, target, cfg.sparsity_metric)
    state(net).config.sparsity_target = target
    out.mkdir(parents=True, exist_ok=True)
    for f in routers.iterdir():  # the adapter, train_args.json, README: everything but the run's history
        if f.is_file() and f.name not in ("log.jsonl", "wall.jsonl"):
            shutil.copy2(f, out / f.name)
    save_routers(net, out)
    return {"out": str(out), "threshold_before": before, "threshold": after, "sparsity": target,
            "data": spec, "calibration": calibration}


def _lm_loss(model, batch) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


LOSSES = ("lm", "kd", "kd+lm")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions, in nats:
    ``sum_v p_t(v) (log p_t(v) - log p_s(v))``, computed in fp32."""
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def check_loss_args(args: TrainArgs) -> None:
    """Refuse a KD weight that the loss would ignore (nothing is written before this check)."""
    if args.kd_weight != 1.0 and args.loss != "kd+lm":
        raise ValueError(f"--kd-weight {args.kd_weight:g} weighs the KL term of --loss kd+lm; "
                         f"with --loss {args.loss} it would be ignored")


def _distill_loss(kind: str, model, batch, teacher: Callable[[], torch.Tensor],
                  kd_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss ``kind`` (:data:`LOSSES`) of ``model`` on ``batch``; ``teacher()`` gives
    the dense model's logits (called first, without gradients, so that the state the student's
    forward leaves behind is the student's). ``kd+lm`` is ``lm + kd_weight * kd``."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {kind!r}")
    if kind == "lm":
        lm = _lm_loss(model, batch)
        return lm, {"lm_loss": float(lm.detach())}
    with torch.no_grad():
        t_logits = teacher()
    out = model(input_ids=batch, labels=batch)
    kd = kd_loss(out.logits, t_logits)
    logs = {"kd_loss": float(kd.detach()), "lm_loss": float(out.loss.detach())}
    return (kd_weight * kd + out.loss if kind == "kd+lm" else kd), logs


# -- stage 1 --------------------------------------------------------------------------------------
def router_config(args: RouterArgs) -> SkipConfig:
    return SkipConfig(
        router_type=args.router_type,
        init_execute_bias=args.init_execute_bias,
        mode="masked",
        gate="auto",
        tau=args.tau_start,
        gate_noise=args.gate_noise,
        sparsity_target=args.sparsity,
        alpha=args.alpha,
        sparsity_metric=args.sparsity_metric,
        policy=args.policy,
        capacity=1.0 - args.sparsity,
    )


def target_at(args: RouterArgs, step: int) -> float:
    """The sparsity target of step ``step`` (0-based): ramps linearly to ``args.sparsity`` over
    the first ``target_ramp`` of the steps, reaching it at the ramp's last step."""
    ramp = args.target_ramp * args.steps
    return args.sparsity if ramp <= 0 else args.sparsity * min(1.0, (step + 1) / ramp)


def noise_at(args: RouterArgs, step: int) -> float:
    """The gate-noise scale of step ``step``: ``gate_noise`` annealed linearly to
    ``gate_noise_end`` over the first ``noise_anneal`` of the steps."""
    span = args.noise_anneal * args.steps
    frac = 1.0 if span <= 0 else min(1.0, step / span)
    return args.gate_noise + (args.gate_noise_end - args.gate_noise) * frac


def sparsity_penalty(st, kind: str, target: float, metric: str) -> torch.Tensor:
    """``|target - s|`` for the last forward: ``s`` the batch's realised sparsity (``batch``), or
    the mean over sequences of each sequence's own ``|target - s_b|`` (``sequence``; sequences
    without a valid token do not count)."""
    if kind == "batch":
        return (target - st.sparsity(metric)).abs()
    if kind == "sequence":
        per_seq = (target - st.sequence_sparsity(metric)).abs()
        fwd = st.forward_state()
        if fwd.valid is None:
            return per_seq.mean()
        has_tokens = fwd.valid.any(-1).to(per_seq)
        return (per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1)
    raise ValueError(f"penalty must be 'batch' or 'sequence', got {kind!r}")


def _dense_logits(model, raw, batch) -> torch.Tensor:
    """The teacher: the same frozen model with every module executing."""
    with overrides(raw, policy="router", threshold=0.0, gate="deterministic"):
        return model(input_ids=batch).logits


def _importance(args: RouterArgs, model, blocks: torch.Tensor, out: Path, accelerator) -> dict | None:
    """Module ablation costs for the prior, measured once per run directory (on the dense,
    unpatched model) and kept in ``importance.json``."""
    if args.pin_cost == math.inf and args.prior_bias_scale == 0:
        return None
    path = out / "importance.json"
    if path.exists():
        return json.loads(path.read_text())
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))[: args.prior_blocks]
    prior = importance.module_costs(model, blocks[pick].to(accelerator.device))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(prior, indent=1))
    return prior


@torch.no_grad()
def validate(raw, val: torch.Tensor, target: float, metric: str) -> dict[str, float]:
    """Deterministic gates at a threshold calibrated to ``target`` on ``val``: the LM loss there,
    the realised sparsity and the threshold. Leaves the model's config as it was."""
    was_training = raw.training
    raw.eval()
    try:
        with overrides(raw, mode="masked", gate="deterministic", threshold=state(raw).config.threshold):
            thr = calibrate_threshold(raw, val, target, metric, iters=12)
            nll = float(raw(input_ids=val, labels=val).loss)
            s = stats(raw)["param_sparsity" if metric == "params" else "module_sparsity"]
    finally:
        raw.train(was_training)
    return {"val_nll": nll, "val_sparsity": s, "val_threshold": thr}


def train_routers(args: RouterArgs, model=None, blocks=None, accelerator=None, val_blocks=None) -> dict[str, Any]:
    """Stage 1. Writes the routers to ``args.out`` (see :func:`skipgpt.save_routers`).

    A caller that passes ``model`` and ``blocks`` may pass ``val_blocks`` (a token tensor, or a
    list of them, one per source: what the threshold is calibrated on); else the last blocks."""
    check_fields(args)
    check_loss_args(args)
    calib = val_blocks
    if model is None:
        accelerator, model, _, blocks, val_blocks, calib = _setup(args)
    if val_blocks is None:
        val_blocks = blocks[-min(len(blocks), args.val_blocks):].to(accelerator.device)
    if not isinstance(val_blocks, torch.Tensor):  # one set per source: validate on them together
        val_blocks = torch.cat(list(val_blocks))
    if calib is None:
        calib = val_blocks
    out = Path(args.out)
    cfg = router_config(args)
    pinned: list[tuple[int, str]] = []
    if not hasattr(unwrap(model), "skipgpt_state"):
        prior = _importance(args, model, blocks, out, accelerator)
        apply(model, cfg)
        if args.normalize_input:
            calibrate_input_scale(model, blocks[: min(len(blocks), 8)].to(next(model.parameters()).device))
        if prior is not None:
            pinned = importance.apply_prior(model, prior["costs"], args.pin_cost, args.prior_bias_scale)
    model.requires_grad_(False)
    frozen = {id(p) for r in importance.pinned_routers(model, pinned) for p in r.parameters()}
    params = [p for p in router_parameters(model) if id(p) not in frozen]
    for p in params:
        p.requires_grad_(True)
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    biases = [p for p in params if names[id(p)].endswith("bias")]
    groups = [{"params": [p for p in params if not names[id(p)].endswith("bias")]},
              {"params": biases, "lr": args.bias_lr if args.bias_lr is not None else args.lr}]
    st = state(model)
    raw = unwrap(model)
    metric = args.sparsity_metric
    other_metric = "modules" if metric == "params" else "params"

    def loss_fn(m, batch, step):
        st.config.tau = args.tau_start + (args.tau_end - args.tau_start) * step / max(args.steps - 1, 1)
        st.config.gate_noise = noise_at(args, step)
        task, logs = _distill_loss(args.loss, m, batch, lambda: _dense_logits(m, raw, batch), args.kd_weight)
        s = st.sparsity(metric)
        target = target_at(args, step)
        loss = task + args.alpha * sparsity_penalty(st, args.penalty, target, metric) if args.policy == "router" else task
        with torch.no_grad():
            ea = torch.stack([c[0] for c in st.exec_counts]).float().mean() / st.n_valid
            em = torch.stack([c[1] for c in st.exec_counts]).float().mean() / st.n_valid
            other = st.sparsity(other_metric)
        return loss, {
            **logs,
            "sparsity": float(s.detach()),
            "sparsity_" + other_metric: float(other),
            "target": target,
            "attn_skip": 1 - float(ea),
            "mlp_skip": 1 - float(em),
            "tau": st.config.tau,
            "gate_noise": st.config.gate_noise,
        }

    extra: dict[str, Any] = {}
    can_select = args.policy == "router" and args.eval_every > 0

    def after_step(raw_model, step):
        if not can_select or (step % args.eval_every and step != args.steps) or not accelerator.is_main_process:
            return None
        v = validate(raw_model, val_blocks, args.sparsity, metric)
        best = extra.get("best")
        if best is None or v["val_nll"] < best["val_nll"]:
            with overrides(raw_model, threshold=v["val_threshold"]):
                save_routers(raw_model, out / "best")
            extra["best"] = {"step": step, **v}
        return v

    result = _train(
        args, model, groups, blocks, loss_fn,
        save_weights=save_routers,
        load_weights=lambda m, d: load_routers(m, d),
        make_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),  # constant
        accelerator=accelerator,
        after_step=after_step,
        extra_state=extra,
    )
    result["pinned"] = [f"{i}.{kind}" for i, kind in pinned]
    if result["done"] and accelerator.is_main_process:
        st.config.tau, st.config.gate_noise = args.tau_end, args.gate_noise_end
        if args.select == "best" and extra.get("best"):
            load_routers(raw, out / "best", restore_threshold=False)
            result["best"] = extra["best"]
        st.config.gate, st.config.mode = "auto", "auto"  # inference defaults in the saved config
        if args.calibrate_threshold and args.policy == "router":
            raw.eval()
            with torch.no_grad():
                result["threshold"] = calibrate_threshold(raw, calib, args.sparsity, metric)
        save_routers(raw, args.out)
        (Path(args.out) / "train_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    accelerator.wait_for_everyone()
    return result


# -- stage 2 --------------------------------------------------------------------------------------
def add_lora(model, args: LoraArgs):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=lora_targets(model, args.target_modules), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def lora_targets(model, names) -> list[str]:
    """The model's own names for the projections ``names``: a family with fused projections
    (Phi-3) has ``qkv_proj`` for q/k/v and ``gate_up_proj`` for gate/up."""
    from .adapters import adapter_for

    ad = adapter_for(model)
    fused = {}
    if ad.fused_qkv:
        fused.update(dict.fromkeys(("q_proj", "k_proj", "v_proj"), ad.fused_qkv))
    if ad.fused_gate_up:
        fused.update(dict.fromkeys(("gate_proj", "up_proj"), ad.fused_gate_up))
    return list(dict.fromkeys(fused.get(n, n) for n in names))


def lora_teacher_logits(peft_model, batch: torch.Tensor, forward=None) -> torch.Tensor:
    """RT-L's distillation teacher: the dense base model, with the LoRA adapter of
    ``peft_model`` disabled and every module executing. ``forward`` is the module to call (the
    accelerator's wrapper of ``peft_model``; default ``peft_model`` itself). Nothing of the
    model's state outlives the call."""
    with peft_model.disable_adapter():
        return _dense_logits(forward if forward is not None else peft_model, unwrap(peft_model), batch)


def _save_adapter(model, directory: Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)


def _load_adapter(model, directory: Path) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))


def finetune_lora(args: LoraArgs, model=None, blocks=None, accelerator=None) -> dict[str, Any]:
    """Stage 2. Writes routers + LoRA adapter to ``args.out`` as one artefact."""
    check_fields(args)
    check_loss_args(args)
    if not args.routers:
        raise ValueError("finetune_lora needs --routers DIR (the output of train-routers)")
    calib = None
    if model is None:
        accelerator, model, _, blocks, _, calib = _setup(args)
    base = unwrap(model)
    if not hasattr(base, "skipgpt_state"):
        apply(model, from_dir=args.routers)
    st = state(model)
    st.config.mode, st.config.gate = "masked", "deterministic"  # train under inference skipping
    # Routers with all-zero weights decide from their biases alone (static plans such as
    # ShortGPT's): LoRA cannot move their rate, so there is no threshold to recalibrate.
    input_free = all(not p.any() for p in router_parameters(model) if p.dim() > 1)
    for p in router_parameters(model):
        p.requires_grad_(False)
    model = add_lora(model, args)
    peft_model = model

    def loss_fn(m, batch, step):
        loss, logs = _distill_loss(args.loss, m, batch, lambda: lora_teacher_logits(peft_model, batch, m),
                                   args.kd_weight)
        return loss, {**logs, "sparsity": float(st.sparsity())}

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
        # Routers at threshold 0 or 1 (every module executes, or none) keep it: there is no
        # rate to restore. So do input-free routers (above).
        if (args.calibrate_threshold and st.config.policy == "router" and 0.0 < st.config.threshold < 1.0
                and not input_free):
            val = calib if calib is not None else blocks[-8:].to(next(raw.parameters()).device)
            raw.eval()
            with torch.no_grad(), overrides(raw, mode="masked"):  # LoRA-wrapped projections: masked
                result["threshold"] = calibrate_threshold(raw, val, st.config.sparsity_target, st.config.sparsity_metric)
        save_routers(raw, args.out)
        _save_adapter(raw, Path(args.out))
        (Path(args.out) / "train_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2, default=list))
    accelerator.wait_for_everyone()
    return result

