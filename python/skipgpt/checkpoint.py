"""Router checkpoints: our safetensors + JSON format, and the authors' released format.

Our directory holds ``routers.safetensors`` (keys ``model.layers.{i}.router_{attention,mlp}.
weight_predictor.*``, the same names the authors' checkpoints use) and ``skip_config.json``
(the :class:`SkipConfig` plus the model family, layer count and hidden size it fits).
Nothing is ever unpickled except through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import unwrap
from .config import SkipConfig
from .patch import state

ROUTERS_FILE = "routers.safetensors"
CONFIG_FILE = "skip_config.json"
_FIT_KEYS = ("family", "num_layers", "hidden_size")
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(router_attention|router_mlp)\.(weight_predictor\..+|input_scale)$")
_OPTIONAL = {"input_scale"}  # absent from the authors' checkpoints: defaults to 1


class CheckpointMismatchError(ValueError):
    """The router checkpoint does not fit this model."""


def _router_state(model: nn.Module) -> dict[str, torch.Tensor]:
    st = state(model)
    out = {}
    for i, layer in enumerate(st.adapter.layers(unwrap(model))):
        for kind in ("router_attention", "router_mlp"):
            for name, t in getattr(layer, kind).state_dict().items():
                out[f"model.layers.{i}.{kind}.{name}"] = t.detach().to("cpu").contiguous()
    return out


def _fit(model: nn.Module) -> dict:
    base, st = unwrap(model), state(model)
    return {"family": st.adapter.name, "num_layers": st.num_layers, "hidden_size": base.config.hidden_size}


def save_routers(model: nn.Module, directory: str | Path) -> Path:
    """Write the routers (safetensors) and the SkipConfig (JSON); atomic per file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fit = _fit(model)
    tensors = _router_state(model)
    _atomic(directory / ROUTERS_FILE, lambda p: save_file(tensors, p, metadata={k: str(v) for k, v in fit.items()}))
    cfg = state(model).config
    _atomic(directory / CONFIG_FILE, lambda p: cfg.save(p, **fit))
    return directory


def read_config(directory: str | Path) -> SkipConfig:
    data = json.loads((Path(directory) / CONFIG_FILE).read_text())
    return SkipConfig.from_dict({k: v for k, v in data.items() if k not in _FIT_KEYS})


def load_routers(
    model: nn.Module, source: str | Path, strict_config: bool = True, restore_threshold: bool = True
) -> nn.Module:
    """Load routers saved by :func:`save_routers`, or an authors' checkpoint file.

    ``source`` may be our directory, a ``.safetensors`` file, or a ``.pth``/``.bin`` file in
    the authors' format (read with ``weights_only=True``). Raises
    :class:`CheckpointMismatchError` when the family, layer count, hidden size or router type
    does not fit the patched model. From a directory, the saved inference threshold (e.g. the
    one ``calibrate_threshold`` put on target) comes with the routers unless
    ``restore_threshold=False``; :func:`skipgpt.set_threshold` changes it afterwards.
    """
    source = Path(source)
    fit = _fit(model)
    saved: dict = {}
    if source.is_dir():
        cfg_path = source / CONFIG_FILE
        if cfg_path.exists():
            saved = json.loads(cfg_path.read_text())
            for key in _FIT_KEYS:
                if key in saved and saved[key] != fit[key]:
                    raise CheckpointMismatchError(
                        f"router checkpoint {source} was made for {key}={saved[key]!r}, "
                        f"but this model has {key}={fit[key]!r}"
                    )
            if strict_config and saved.get("router_type", "linear") != state(model).config.router_type:
                raise CheckpointMismatchError(
                    f"router checkpoint {source} holds {saved.get('router_type')!r} routers, "
                    f"but the model was patched with {state(model).config.router_type!r} routers"
                )
        files = [source / ROUTERS_FILE]
        if not files[0].exists():
            files = sorted(source.glob("*.safetensors")) or sorted(source.glob("*.pth")) + sorted(source.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"no router weights in {source} (expected {ROUTERS_FILE})")
        tensors = {}
        for f in files:
            tensors.update(_read(f))
    else:
        tensors = _read(source)
    _assign(model, tensors, str(source))
    if restore_threshold and "threshold" in saved:
        from .patch import set_threshold

        set_threshold(model, saved["threshold"])
    return model


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    # The authors released .pth files; never unpickle arbitrary objects.
    obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointMismatchError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj


@torch.no_grad()
def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    st = state(model)
    layers = st.adapter.layers(unwrap(model))
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if m:
            found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    if not found:
        raise CheckpointMismatchError(f"{where} holds no router weights (keys like 'model.layers.0.router_attention.weight_predictor.weight')")
    n_layers = max(i for i, _ in found) + 1
    if n_layers != len(layers) or len(found) != 2 * len(layers):
        raise CheckpointMismatchError(
            f"{where} has routers for {n_layers} layers ({len(found)} routers); this model has "
            f"{len(layers)} layers ({2 * len(layers)} routers)"
        )
    # Validate everything before touching any weight, so a bad file loads nothing.
    for (i, kind), params in sorted(found.items()):
        router = getattr(layers[i], kind)
        own = router.state_dict()
        if set(params) - _OPTIONAL != set(own) - _OPTIONAL:
            raise CheckpointMismatchError(
                f"{where}: layer {i} {kind} has parameters {sorted(params)}, the model's "
                f"{router.router_type} router has {sorted(own)}"
            )
        for name, t in params.items():
            if t.shape != own[name].shape:
                raise CheckpointMismatchError(
                    f"{where}: layer {i} {kind}.{name} has shape {tuple(t.shape)}, expected "
                    f"{tuple(own[name].shape)} (hidden size mismatch?)"
                )
    for (i, kind), params in found.items():
        router = getattr(layers[i], kind)
        full = {"input_scale": torch.ones(()), **params}
        router.load_state_dict({k: v.to(torch.float32) for k, v in full.items()})


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
