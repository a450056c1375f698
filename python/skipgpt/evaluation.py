"""Zero/few-shot evaluation of a loaded (optionally SkipGPT-patched) model with lm-evaluation-harness.

    from skipgpt.evaluation import evaluate_lm
    results = evaluate_lm(model, tokenizer, ["skipgpt_nextline"], limit=200)
    results["skipgpt_nextline"]["acc"], results["sparsity"]["param_sparsity"]

The model object is handed to lm-eval's ``HFLM`` directly (no save and reload), so the routers,
their threshold and the SkipGPT mode are exactly the ones being evaluated. Tasks shipped in
:mod:`skipgpt.lm_eval_tasks` (e.g. ``skipgpt_nextline``) build their data in memory and never
touch the hub; lm-eval's own tasks (``arc_easy``, ``hellaswag``, ...) need a reachable Hugging
Face hub for their data (``datasets`` raises a ``ConnectionError`` otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .patch import reset_stats, stats
from .skip_state import is_patched
from .lm_eval_tasks import TASK_DIR

__all__ = ["SAMPLES_KEY", "SPARSITY_KEY", "evaluate_lm", "local_task_names"]

# The entry of the result that holds the realised sparsity (only for patched models).
SPARSITY_KEY = "sparsity"
SAMPLES_KEY = "samples"
LM_EVAL_HINT = "pip install lm-eval==0.4.13"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models import huggingface as lm_eval_hf
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RuntimeError(f"evaluate_lm needs lm-evaluation-harness:\n    {LM_EVAL_HINT}") from e
    return lm_eval, lm_eval_hf, TaskManager


def _include_paths(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    paths = [TASK_DIR] + [Path(p).expanduser() for p in extra]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"lm-eval include_path {str(p)!r} does not exist")
    return paths


def local_task_names(include_path=None) -> list[str]:
    """Tasks (and groups) found in :mod:`skipgpt.lm_eval_tasks` and ``include_path``."""
    _, _, TaskManager = _import_lm_eval()
    return TaskManager(include_path=_include_paths(include_path), include_defaults=False).all_tasks


def _skip_aware_hflm_class(lm_eval_hf):
    """``HFLM`` that tells a SkipGPT model which positions are padding in log-likelihood batches.

    Stock ``HFLM`` right-pads a batch of (context, continuation) rows with zeros and calls the
    model without an attention mask. That is harmless for the scores (the model is causal and
    only real positions are read), but a SkipGPT model would count the padding tokens in its
    skip statistics. So this subclass records the true row lengths when the batch is padded (by
    wrapping lm-eval's ``pad_and_concat`` for the duration of the call) and passes the matching
    2D attention mask, which makes SkipGPT ignore (and skip) the padding.
    The scores of real positions do not change.
    """

    class SkipAwareHFLM(lm_eval_hf.HFLM):
        _row_lengths: list[int] | None = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            original = getattr(lm_eval_hf, "pad_and_concat", None)
            if original is None:  # another lm-eval layout: score as stock HFLM does (padding counted)
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

            def recording_pad_and_concat(max_length, tensors, padding_side="right"):
                # Read the lengths first: pad_and_concat pads the list in place.
                self._row_lengths = [t.shape[-1] for t in tensors] if padding_side == "right" else None
                return original(max_length, tensors, padding_side=padding_side)

            lm_eval_hf.pad_and_concat = recording_pad_and_concat
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                lm_eval_hf.pad_and_concat = original
                self._row_lengths = None

        def _model_call(self, inps, attn_mask=None, labels=None):
            lengths, self._row_lengths = self._row_lengths, None
            usable = (
                attn_mask is None and labels is None and lengths is not None and self.backend == "causal"
                and is_patched(self.model) and len(lengths) == inps.shape[0] and max(lengths) == inps.shape[1]
            )
            if not usable:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            positions = torch.arange(inps.shape[1], device=inps.device)
            mask = (positions[None, :] < torch.tensor(lengths, device=inps.device)[:, None]).long()
            with torch.no_grad():
                return self.model(input_ids=inps, attention_mask=mask).logits

    return SkipAwareHFLM


def _flatten_metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "alias": ...}`` -> ``{"acc": 0.5}`` (a non-default filter stays in the name)."""
    out = {}
    for key, value in task_results.items():
        # "alias" is a display name and "sample_len" lm-eval's sample count: neither is a metric.
        if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else key] = float(value)
    return out


def _sample_record(sample: dict[str, Any]) -> dict[str, Any]:
    """One lm-eval sample as plain values: ``loglikelihoods`` (one per request: per choice for
    loglikelihood / multiple-choice tasks, plus the unconditional ones where a task asks for
    them; the document's total for loglikelihood_rolling), or ``responses`` (generate_until:
    the text, or the list of texts a filter keeps), after the sample's filter."""
    out: dict[str, Any] = {"doc_id": int(sample["doc_id"]), "filter": str(sample.get("filter", "none")),
                           "target": sample["target"]}
    resps = list(sample["filtered_resps"])
    if resps and all(isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], (int, float)) for r in resps):
        out["loglikelihoods"] = [float(r[0]) for r in resps]
        out["is_greedy"] = [bool(r[1]) for r in resps]
    elif resps and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in resps):
        out["loglikelihoods"] = [float(r) for r in resps]
    else:  # a string per request, or a list of them (filters that keep several generations)
        out["responses"] = [
            r if isinstance(r, str) else [str(x) for x in r] if isinstance(r, (list, tuple)) else repr(r) for r in resps
        ]
    return out


def evaluate_lm(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = 0,
    device: str | torch.device | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate an already-loaded causal LM on lm-eval tasks; returns ``{task: {metric: value}}``.

    Args:
        model: a Hugging Face ``*ForCausalLM``, optionally patched with :func:`skipgpt.apply`.
            It is evaluated as it is (routers, threshold, mode); lm-eval puts it in eval mode,
            and its train/eval mode is restored afterwards.
        tokenizer: its tokenizer.
        tasks: lm-eval task or group names. Tasks of :mod:`skipgpt.lm_eval_tasks`
            (``skipgpt_nextline``) and of ``include_path`` run offline; other names are looked up
            in lm-eval's own task index (their data needs a reachable hub).
        batch_size: a fixed positive batch size (``"auto"`` is refused: its probing forwards
            would count in the sparsity statistics).
        limit: at most this many examples per task (a float < 1: a fraction).
        num_fewshot: few-shot examples per prompt; ``None`` keeps each task's default.
        device: move the model there first; ``None`` evaluates it where it is.
        include_path: further directories of task YAMLs.
        bootstrap_iters: bootstrap iterations for the stderr of non-mean metrics.
        log_samples: also return each example's scores, as ``result["samples"][task]``: a list
            of ``{"doc_id", "filter", "target"}`` plus ``loglikelihoods`` (one per request: per
            choice for multiple-choice / loglikelihood tasks, with ``is_greedy``; the document's
            total for loglikelihood_rolling) or ``responses`` (generate_until), ordered by
            filter and document.

    Returns:
        ``{task_or_group: {metric: value}}`` with lm-eval's metric names (``acc``, ``acc_norm``,
        ``acc_stderr``, ...; the filter suffix ``,none`` dropped). For a SkipGPT model there is
        also ``result["sparsity"]``: the skip rates realised over every token the evaluation ran
        (``tokens``, ``attn_skip``, ``mlp_skip``, ``module_sparsity``, ``param_sparsity``), from
        ``skipgpt.stats(model, cumulative=True)``; padding tokens are not counted.

    Deterministic: lm-eval's seeds are fixed and the gates are the deterministic inference rule.
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    for key in (SPARSITY_KEY, SAMPLES_KEY):
        if key in tasks:
            raise ValueError(f"a task named {key!r} would clash with the {key} entry of the result")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    lm_eval, lm_eval_hf, TaskManager = _import_lm_eval()

    paths = _include_paths(include_path)
    local_manager = TaskManager(include_path=paths, include_defaults=False)
    all_local = all(local_manager.match_tasks([t]) for t in tasks)
    # Indexing lm-eval's thousands of built-in YAMLs takes ~15 s: only do it when needed.
    task_manager = local_manager if all_local else TaskManager(include_path=paths)
    unknown = [t for t in tasks if not task_manager.match_tasks([t])]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; local tasks: {sorted(local_manager.all_tasks)}"
            + ("" if all_local else " (plus lm-eval's built-in tasks: `lm-eval ls tasks`)")
        )

    if device is not None:
        model.to(device)
    was_training = model.training
    patched = is_patched(model)
    if patched:
        reset_stats(model)
    try:
        lm = _skip_aware_hflm_class(lm_eval_hf)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
        )
    finally:
        model.train(was_training)
    if output is None:  # lm-eval returns results on rank 0 only
        raise RuntimeError("lm-eval returned no results (not the rank-0 process?)")
    results: dict[str, Any] = {name: _flatten_metrics(metrics) for name, metrics in output["results"].items()}
    if log_samples:
        results[SAMPLES_KEY] = {
            task: [_sample_record(x) for x in sorted(samples, key=lambda x: (str(x.get("filter", "none")), x["doc_id"]))]
            for task, samples in output["samples"].items()
        }
    if patched:
        s = stats(model, cumulative=True)
        results[SPARSITY_KEY] = {k: float(s[k]) for k in ("attn_skip", "mlp_skip", "module_sparsity", "param_sparsity")}
        results[SPARSITY_KEY]["tokens"] = float(s["tokens"])
    return results
