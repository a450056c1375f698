"""Where does a SkipGPT model skip? Per-layer, per-position and per-token views of its gates.

    from skipgpt.analysis import analyze
    blocks = skipgpt.data.pack_tokens(skipgpt.data.load_texts("shakespeare", "test"), tok, 512, 64)
    report = analyze(model, blocks, out_dir="analysis/")

The model runs in ``masked`` mode with the deterministic inference rule (``p_exec > threshold``),
so the gates are exactly the decisions the skipping modes make, and every gate of every token
is visible in ``skipgpt.state(model).gates``. Written to ``out_dir``:

- ``layer_skip_rates.png``: attention and MLP skip rate of every layer (grouped bars);
- ``skip_vs_position.png``: skip rate against token position, bucketed and smoothed;
- ``modules_per_token.png``: histogram of the number of modules (0..2L) a token executes;
- ``skip_table.md``: per-layer rates, the means, module and parameter sparsity.

The paper (METHOD.md section 3) reports that attention is skipped more than the MLP, and that
later positions run attention more and the MLP less; these plots show that for any model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .skip_state import is_patched, overrides, state

__all__ = ["analyze", "POSITION_BUCKETS", "SMOOTH_WINDOW"]

POSITION_BUCKETS = 64  # at most this many position buckets in the position plot
SMOOTH_WINDOW = 5  # centred moving average over this many buckets
FILES = {
    "layer_rates": "layer_skip_rates.png",
    "position": "skip_vs_position.png",
    "modules_hist": "modules_per_token.png",
    "table": "skip_table.md",
}
ATTN_COLOR, MLP_COLOR = "#1f77b4", "#ff7f0e"


class _GateTotals:
    """Running sums over all valid tokens of all batches (float64: exact for integer counts)."""

    def __init__(self, num_layers: int, seq_len: int) -> None:
        self.tokens = 0
        self.exec_layer = np.zeros((num_layers, 2))  # [layer, (attn, mlp)] executed tokens
        self.exec_pos = np.zeros((2, seq_len))  # [(attn, mlp), position] executed (token, layer) pairs
        self.valid_pos = np.zeros(seq_len)  # valid tokens at each position
        self.modules_hist = np.zeros(2 * num_layers + 1, dtype=np.int64)

    def add(self, gates: list[tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor, positions: torch.Tensor) -> None:
        g = torch.stack([torch.stack(pair) for pair in gates]).double().cpu()  # [L, 2, B, S]
        valid, positions = valid.cpu(), positions.cpu()
        self.tokens += int(valid.sum())
        self.exec_layer += g.sum(dim=(2, 3)).numpy()
        pos = positions[valid]
        per_token = g.permute(1, 2, 3, 0)[:, valid].sum(-1)  # [2, n_valid]: layers executed, per module type
        for k in range(2):
            np.add.at(self.exec_pos[k], pos.numpy(), per_token[k].numpy())
        np.add.at(self.valid_pos, pos.numpy(), 1)
        executed = per_token.sum(0).round().long().numpy()
        self.modules_hist += np.bincount(executed, minlength=len(self.modules_hist))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; near the edges the window shrinks to the values that exist."""
    half = window // 2
    out = np.empty_like(values)
    for i in range(len(values)):
        out[i] = values[max(0, i - half):i + half + 1].mean()
    return out


def _position_curves(totals: _GateTotals, num_layers: int, buckets: int, window: int) -> dict[str, list]:
    """Skip rate per position bucket (ratio of sums over tokens and layers), raw and smoothed."""
    seen = np.nonzero(totals.valid_pos)[0]
    n_pos = int(seen[-1]) + 1
    edges = np.unique(np.linspace(0, n_pos, min(buckets, n_pos) + 1).round().astype(int))
    starts, ends = edges[:-1], edges[1:]
    valid = np.add.reduceat(totals.valid_pos[:n_pos], starts)
    keep = valid > 0  # a bucket no valid token reached (left padding only) has no rate
    starts, ends, valid = starts[keep], ends[keep], valid[keep]
    curves: dict[str, list] = {"bucket_start": starts.tolist(), "bucket_end": ends.tolist(),
                               "tokens": valid.astype(int).tolist()}
    for k, name in enumerate(("attn_skip", "mlp_skip")):
        executed = np.add.reduceat(totals.exec_pos[k][:n_pos], edges[:-1])[keep]
        rate = 1.0 - executed / (valid * num_layers)
        curves[name] = rate.tolist()
        curves[f"{name}_smoothed"] = _smooth(rate, window).tolist()
    return curves


# --------------------------------------------------------------------------- plots


def _new_figure(size=(8.0, 4.5)):
    from matplotlib.figure import Figure  # no pyplot: no global state, and the Agg canvas is used

    fig = Figure(figsize=size, dpi=120, layout="constrained")
    return fig, fig.add_subplot()


def _plot_layer_rates(result: dict[str, Any], path: Path) -> None:
    fig, ax = _new_figure()
    L = len(result["layers"])
    x = np.arange(L)
    width = 0.4
    attn = [r["attn_skip"] for r in result["layers"]]
    mlp = [r["mlp_skip"] for r in result["layers"]]
    ax.bar(x - width / 2, attn, width, label=f"attention (mean {result['attn_skip']:.1%})", color=ATTN_COLOR)
    ax.bar(x + width / 2, mlp, width, label=f"MLP (mean {result['mlp_skip']:.1%})", color=MLP_COLOR)
    ax.axhline(result["attn_skip"], color=ATTN_COLOR, ls="--", lw=1)
    ax.axhline(result["mlp_skip"], color=MLP_COLOR, ls="--", lw=1)
    ax.set_xticks(x, [str(i) for i in x] if L <= 40 else None)
    ax.set_xlabel("layer")
    ax.set_ylabel("skip rate")
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(_percent())
    ax.set_title(
        f"Skip rate per layer ({result['tokens']:,} tokens; module sparsity {result['module_sparsity']:.1%}, "
        f"parameter sparsity {result['param_sparsity']:.1%})", fontsize=10,
    )
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def _plot_position(result: dict[str, Any], window: int, path: Path) -> None:
    fig, ax = _new_figure()
    curves = result["position"]
    centers = (np.array(curves["bucket_start"]) + np.array(curves["bucket_end"]) - 1) / 2
    for name, label, color in (("attn_skip", "attention", ATTN_COLOR), ("mlp_skip", "MLP", MLP_COLOR)):
        ax.plot(centers, curves[name], "o", ms=3, alpha=0.35, color=color)
        ax.plot(centers, curves[f"{name}_smoothed"], "-", lw=2, color=color, label=label)
    ax.set_xlabel("token position (bucket centre)")
    ax.set_ylabel("skip rate (mean over layers)")
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(_percent())
    width = int(curves["bucket_end"][0] - curves["bucket_start"][0])
    ax.set_title(f"Skip rate against position (buckets of ~{width} positions, dots raw, "
                 f"lines a {window}-bucket moving average)", fontsize=10)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.savefig(path)


def _plot_modules_hist(result: dict[str, Any], path: Path) -> None:
    fig, ax = _new_figure()
    hist = np.array(result["modules_executed_hist"])
    n_modules = len(hist) - 1
    share = hist / max(hist.sum(), 1)
    ax.bar(np.arange(len(hist)), share, color="#2ca02c")
    mean = float((np.arange(len(hist)) * share).sum())
    ax.axvline(mean, color="black", ls="--", lw=1, label=f"mean {mean:.2f} of {n_modules}")
    step = max(1, len(hist) // 25)
    ax.set_xticks(np.arange(0, len(hist), step))
    ax.set_xlabel(f"modules executed per token (attention + MLP, 0..{n_modules})")
    ax.set_ylabel("share of tokens")
    ax.yaxis.set_major_formatter(_percent())
    ax.set_title(f"Modules executed per token ({result['tokens']:,} tokens)", fontsize=10)
    ax.legend(loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def _percent():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)


def _write_table(result: dict[str, Any], path: Path) -> None:
    rows = ["| layer | attention skip | MLP skip |", "|---:|---:|---:|"]
    rows += [f"| {i} | {r['attn_skip']:.2%} | {r['mlp_skip']:.2%} |" for i, r in enumerate(result["layers"])]
    rows += [
        f"| **mean** | **{result['attn_skip']:.2%}** | **{result['mlp_skip']:.2%}** |",
        "",
        "| overall | value |",
        "|---|---:|",
        f"| tokens | {result['tokens']:,} |",
        f"| module sparsity (every module counts 1) | {result['module_sparsity']:.2%} |",
        f"| parameter sparsity (modules weighted by size) | {result['param_sparsity']:.2%} |",
    ]
    path.write_text("# SkipGPT skip rates\n\n" + "\n".join(rows) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- entry point


@torch.no_grad()
def analyze(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    out_dir: str | os.PathLike = "skipgpt_analysis",
    *,
    batch_size: int = 8,
    position_buckets: int = POSITION_BUCKETS,
    smooth_window: int = SMOOTH_WINDOW,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a SkipGPT model over token blocks, record every gate, and plot where it skips.

    Args:
        model: a model patched with :func:`skipgpt.apply`. Its mode, gate setting, train/eval
            mode and cumulative statistics are restored afterwards.
        input_ids: ``[N, S]`` token blocks (e.g. from :func:`skipgpt.data.pack_tokens`).
        attention_mask: ``[N, S]``, 1 for real tokens, 0 for padding (left or right); padding
            never counts. Positions are counted from each row's first real token.
        out_dir: where the PNGs and the markdown table go (created if needed).
        batch_size: blocks per forward.
        position_buckets / smooth_window: the position plot's resolution and smoothing.

    Returns:
        The numbers behind the plots: ``tokens``; ``layers`` (per-layer ``attn_skip`` and
        ``mlp_skip``); the means ``attn_skip`` and ``mlp_skip``; ``module_sparsity`` and
        ``param_sparsity`` (defined as in :func:`skipgpt.stats`); ``position`` (bucket bounds,
        token counts, raw and smoothed skip rates); ``modules_executed_hist`` (number of tokens
        that executed 0, 1, ..., 2L modules); and ``files`` (paths of what was written).
    """
    if not is_patched(model):
        raise ValueError("analyze needs a SkipGPT model; call skipgpt.apply(model, SkipConfig()) first")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [blocks, seq_len] tensor, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if batch_size <= 0 or position_buckets <= 0 or smooth_window <= 0:
        raise ValueError("batch_size, position_buckets and smooth_window must be positive")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if not mask.any():
        raise ValueError("attention_mask marks no token as real")

    st = state(model)
    device = next(model.parameters()).device
    saved = (model.training, st.cum_exec.clone(), st.cum_tokens.clone())
    model.eval()
    totals = _GateTotals(st.num_layers, input_ids.shape[1])
    try:
        # The gates the skipping modes would use.
        with overrides(model, mode="masked", gate="deterministic"):
            starts = range(0, input_ids.shape[0], batch_size)
            for start in tqdm(starts, desc="Analysing gates", unit="batch", disable=not progress or len(starts) < 2):
                ids = input_ids[start:start + batch_size].to(device)
                valid = mask[start:start + batch_size].to(device)
                model(input_ids=ids, attention_mask=valid.long() if attention_mask is not None else None)
                positions = valid.long().cumsum(-1) - 1  # true positions, also under left padding
                totals.add(st.gates, valid, positions)
    finally:
        model.train(saved[0])
        st.cum_exec, st.cum_tokens = saved[1], saved[2]  # analysis must not disturb the user's counters

    result: dict[str, Any] = {
        **st.summary_of_counts(torch.from_numpy(totals.exec_layer), float(totals.tokens)),
        "position": _position_curves(totals, st.num_layers, position_buckets, smooth_window),
        "modules_executed_hist": totals.modules_hist.tolist(),
    }

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files = {key: out / name for key, name in FILES.items()}
    _plot_layer_rates(result, files["layer_rates"])
    _plot_position(result, smooth_window, files["position"])
    _plot_modules_hist(result, files["modules_hist"])
    _write_table(result, files["table"])
    result["files"] = {key: str(path) for key, path in files.items()}
    return result
