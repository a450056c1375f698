"""Router checkpoints: our safetensors + JSON format, and the authors' released format.

Our directory holds ``routers.safetensors`` (keys ``model.layers.{i}.router_{attention,mlp}.
weight_predictor.*``, the same names the authors' checkpoints use) and ``skip_config.json``
(the :class:`SkipConfig` plus the model family, layer count and hidden size it fits).
Nothing is ever unpickled except through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import nn

from .adapters import unwrap
from .config import SkipConfig
from .router import Router
from .skip_state import state

ROUTERS_FILE = "routers.safetensors"
CONFIG_FILE = "skip_config.json"
_FIT_KEYS = ("family", "num_layers", "hidden_size")
# Written into both files of a pair by one save_routers call: a folder whose two files carry
# different ids holds a torn pair (a save interrupted between its two renames), and is refused.
_SAVE_ID = "save_id"
_META_KEYS = (*_FIT_KEYS, _SAVE_ID)
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(router_attention|router_mlp)\.(weight_predictor\..+|input_scale)$")
_OPTIONAL = {"input_scale"}  # absent from the authors' checkpoints: defaults to 1


class CheckpointError(ValueError):
    """A router checkpoint cannot be loaded: unreadable, invalid or not fitting the model."""


class CheckpointMismatchError(CheckpointError):
    """The router checkpoint does not fit this model."""


@dataclasses.dataclass
class LoadedRouters:
    """A router checkpoint read and checked against a model, not yet assigned to it."""

    where: str
    routers: dict[tuple[int, str], dict[str, torch.Tensor]]
    threshold: float | None  # the saved inference threshold (directories only)


def _router_state(model: nn.Module) -> dict[str, torch.Tensor]:
    st = state(model)
    out = {}
    for i, layer in enumerate(st.adapter.layers(unwrap(model))):
        for kind in ("router_attention", "router_mlp"):
            for name, t in getattr(layer, kind).state_dict().items():
                out[f"model.layers.{i}.{kind}.{name}"] = t.detach().to("cpu").contiguous()
    return out


def model_fit(adapter, num_layers: int, hidden_size: int) -> dict:
    """What a router checkpoint must match: the family, layer count and hidden size."""
    return {"family": adapter.name, "num_layers": num_layers, "hidden_size": hidden_size}


def _fit(model: nn.Module) -> dict:
    base, st = unwrap(model), state(model)
    return model_fit(st.adapter, st.num_layers, base.config.hidden_size)


def save_routers(model: nn.Module, directory: str | Path) -> Path:
    """Write the routers (safetensors) and the SkipConfig (JSON) as one matching pair.

    Everything is checked and serialised before the disk is touched (an unpatched model, a
    config that does not serialise or a non-finite router weight writes nothing). A new folder
    is written under a temporary name and renamed into place whole; into an existing folder the
    two files are renamed over the old ones, and both carry one save id, so a pair torn by a
    crash between those renames is refused by :func:`load_routers`, never mixed.
    """
    directory = Path(directory)
    st = state(model)  # refuses an unpatched model
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_routers: {directory} exists and is not a directory")
    cfg = dataclasses.replace(st.config)  # validated (numbers normalised) on a copy
    fit = _fit(model)
    tensors = _router_state(model)
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"save_routers: router tensor {key} holds NaN or inf; refusing to save it")
    save_id = uuid.uuid4().hex
    config_bytes = json.dumps({**cfg.to_dict(), **fit, _SAVE_ID: save_id}, indent=2, sort_keys=True).encode()
    routers_bytes = save_bytes(tensors, metadata={**{k: str(v) for k, v in fit.items()}, _SAVE_ID: save_id})
    _write_pair(directory, {ROUTERS_FILE: routers_bytes, CONFIG_FILE: config_bytes})
    return directory


def read_config(directory: str | Path) -> SkipConfig:
    """The :class:`SkipConfig` saved in a router directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise (NotADirectoryError if directory.exists() else FileNotFoundError)(
            f"{directory} is not a router directory (one written by save_routers or train-routers, holding "
            f"{ROUTERS_FILE} and {CONFIG_FILE})"
        )
    return _parse_config(directory / CONFIG_FILE)[0]


def _parse_config(path: Path) -> tuple[SkipConfig, dict]:
    """The SkipConfig in ``path`` and the raw JSON; every field checked, errors name the file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    try:
        cfg = SkipConfig.from_dict({k: v for k, v in data.items() if k not in _META_KEYS})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, data


def load_routers(
    model: nn.Module,
    source: str | Path,
    check_router_type: bool = True,
    restore_threshold: bool = True,
    *,
    strict_config: bool | None = None,
) -> nn.Module:
    """Load routers saved by :func:`save_routers`, or an authors' checkpoint file.

    ``source`` may be our directory, a ``.safetensors`` file, or a ``.pth``/``.bin`` file in
    the authors' format (read with ``weights_only=True``). Raises
    :class:`CheckpointMismatchError` when the family, layer count, hidden size or router type
    does not fit the patched model, and :class:`CheckpointError` when a file is unreadable or
    holds an invalid value (a config field, a non-finite weight); either way before any weight
    or setting of the model changes. From a directory, the saved inference threshold (e.g. the
    one ``calibrate_threshold`` put on target) comes with the routers unless
    ``restore_threshold=False``; :func:`skipgpt.set_threshold` changes it afterwards.
    ``check_router_type=False`` loads a directory whose config names another router type (the
    weights must still have this model's router shapes); ``strict_config`` is its old name.
    """
    if strict_config is not None:
        check_router_type = strict_config
    loaded = read_checkpoint(source, _fit(model), state(model).config.router_type, check_router_type)
    assign_routers(model, loaded, restore_threshold)
    return model


def read_checkpoint(source: str | Path, fit: dict, router_type: str, check_router_type: bool = True) -> LoadedRouters:
    """Read and check a router checkpoint against a model's ``fit`` (see :func:`model_fit`) and
    router type, without touching any model: every check :func:`load_routers` makes."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no router checkpoint at {source}")
    threshold = None
    if source.is_dir():
        cfg_path = source / CONFIG_FILE
        saved: dict = {}
        if cfg_path.exists():
            cfg, saved = _parse_config(cfg_path)
            for key in _FIT_KEYS:
                if key in saved and saved[key] != fit[key]:
                    raise CheckpointMismatchError(
                        f"router checkpoint {source} was made for {key}={saved[key]!r}, "
                        f"but this model has {key}={fit[key]!r}"
                    )
            if check_router_type and cfg.router_type != router_type:
                raise CheckpointMismatchError(
                    f"router checkpoint {source} holds {cfg.router_type!r} routers, "
                    f"but the model was patched with {router_type!r} routers"
                )
            threshold = cfg.threshold if "threshold" in saved else None
        files = [source / ROUTERS_FILE]
        if not files[0].exists():
            files = sorted(source.glob("*.safetensors")) or sorted(source.glob("*.pth")) + sorted(source.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"no router weights in {source} (expected {ROUTERS_FILE})")
        tensors = {}
        for f in files:
            tensors.update(_read(f))
        if _SAVE_ID in saved and files == [source / ROUTERS_FILE]:
            weights_id = _safetensors_metadata(files[0]).get(_SAVE_ID)
            if weights_id != saved[_SAVE_ID]:
                raise CheckpointError(
                    f"{source}: {ROUTERS_FILE} and {CONFIG_FILE} come from different saves (save ids "
                    f"{weights_id} and {saved[_SAVE_ID]}; an interrupted save_routers?). Save the routers again."
                )
    else:
        tensors = _read(source)
    return LoadedRouters(str(source), _check_routers(tensors, fit, router_type, str(source)), threshold)


def _safetensors_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    # The authors released .pth files; never unpickle arbitrary objects.
    obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointMismatchError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj


def _check_routers(
    tensors: dict[str, torch.Tensor], fit: dict, router_type: str, where: str
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Group the router tensors by (layer, kind) and check names, shapes and values."""
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if m:
            found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    if not found:
        raise CheckpointMismatchError(f"{where} holds no router weights (keys like 'model.layers.0.router_attention.weight_predictor.weight')")
    n_layers, want = max(i for i, _ in found) + 1, fit["num_layers"]
    if n_layers != want or len(found) != 2 * want:
        raise CheckpointMismatchError(
            f"{where} has routers for {n_layers} layers ({len(found)} routers); this model has "
            f"{want} layers ({2 * want} routers)"
        )
    # The shapes a router of this model has (built on the meta device: no memory, no RNG).
    own = {k: v.shape for k, v in Router(fit["hidden_size"], router_type, device="meta").state_dict().items()}
    for (i, kind), params in sorted(found.items()):
        if set(params) - _OPTIONAL != set(own) - _OPTIONAL:
            raise CheckpointMismatchError(
                f"{where}: layer {i} {kind} has parameters {sorted(params)}, the model's "
                f"{router_type} router has {sorted(own)}"
            )
        for name, t in params.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise CheckpointError(f"{where}: layer {i} {kind}.{name} must be a floating-point tensor")
            if t.shape != own[name]:
                raise CheckpointMismatchError(
                    f"{where}: layer {i} {kind}.{name} has shape {tuple(t.shape)}, expected "
                    f"{tuple(own[name])} (hidden size mismatch?)"
                )
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{where}: layer {i} {kind}.{name} holds NaN or inf")
    return found


@torch.no_grad()
def assign_routers(model: nn.Module, loaded: LoadedRouters, restore_threshold: bool = True) -> None:
    """Copy checked router weights (from :func:`read_checkpoint`) into a patched model."""
    layers = state(model).adapter.layers(unwrap(model))
    for (i, kind), params in loaded.routers.items():
        router = getattr(layers[i], kind)
        full = {"input_scale": torch.ones(()), **params}
        router.load_state_dict({k: v.to(torch.float32) for k, v in full.items()})
    if restore_threshold and loaded.threshold is not None:
        state(model).set_config(threshold=loaded.threshold)


def _write_pair(directory: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into ``directory``: a new folder appears whole (a temporary folder renamed
    into place); in an existing one each file is renamed over the old one."""
    umask = os.umask(0)
    os.umask(umask)
    fresh = not directory.exists()
    if fresh:
        directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent if fresh else directory, prefix=f".{directory.name}.tmp-"))
    try:
        for name, blob in files.items():
            with open(tmp / name, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp / name, 0o666 & ~umask)  # normal permissions (mkdtemp's folder is 0700)
        if fresh:
            os.chmod(tmp, 0o777 & ~umask)
            try:
                os.rename(tmp, directory)
                return
            except OSError:
                if not directory.is_dir():  # created meanwhile by someone else: write into it
                    raise
        for name in files:
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
