"""One folder that holds a model and its routers: the format that serving engines load.

``export`` writes, from a ``train-routers`` or ``finetune-lora`` output (LoRA merged):

- ``model.safetensors``: the base weights under their Hugging Face names, plus the routers
  (``model.layers.{i}.router_{attention,mlp}.weight_predictor.*`` and ``.input_scale``);
- ``config.json``: the base config with ``model_type`` ``skipgpt_<base>`` and
  ``architectures`` ``["SkipGPT<Base>ForCausalLM"]``, and a ``skipgpt`` section holding the
  :class:`SkipConfig` (threshold included) and what the routers were made for;
- the tokenizer and generation config, and ``modeling_skipgpt.py``: three lines that let
  ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` load the folder
  through the installed package.

No engine that does not know SkipGPT loads the folder as the plain base model: its model type
is unknown to transformers and its architecture to vLLM, until ``skipgpt`` (or its vLLM
plugin) registers them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapters import FAMILIES, adapter_for, unwrap
from .checkpoint import CheckpointError, CheckpointMismatchError, LoadedRouters, _check_routers, _router_state
from .checkpoint import assign_routers, model_fit
from .config import SkipConfig
from .skip_state import state

WEIGHTS_FILE = "model.safetensors"
REMOTE_FILE = "modeling_skipgpt.py"
SECTION = "skipgpt"
FORMAT_VERSION = 1
MODEL_TYPE_PREFIX = "skipgpt_"
_ROUTER_KEY = re.compile(r"(?:^|\.)layers\.\d+\.router_(?:attention|mlp)\.")
# Keys of a config that describe where it was loaded from, not the model.
_VOLATILE = ("_name_or_path", "_commit_hash", "transformers_version", "auto_map", "quantization_config")

__all__ = ["export", "export_model", "from_pretrained", "is_export", "read_export_config", "skipgpt_architecture", "config_class"]


def skipgpt_architecture(base_architecture: str) -> str:
    """``LlamaForCausalLM`` -> ``SkipGPTLlamaForCausalLM``."""
    return "SkipGPT" + base_architecture


def _base_model_types() -> dict[str, str]:
    """transformers' ``model_type`` of every supported family, by architecture class name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return {arch: t for t, arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if arch in FAMILIES}


def _tensors_for_export(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights (one copy of tied embeddings) and the routers, as contiguous CPU tensors."""
    base = unwrap(model)
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    for name, t in base.state_dict().items():
        if _ROUTER_KEY.search(name) or (tied and name == "lm_head.weight"):
            continue
        out[name] = t.detach().to("cpu").contiguous()  # no copy: only tied weights share storage, and those are skipped
    out.update(_router_state(model))
    return out


def export(
    routers: str | os.PathLike,
    out: str | os.PathLike,
    model: str | None = None,
    threshold: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``out``: the model with its routers (and merged LoRA) as one loadable folder.

    Args:
        routers: a ``train-routers`` or ``finetune-lora`` output folder.
        out: the folder to write; refused if it exists and is not empty.
        model: the base model (folder or hub id); default: the one the routers were trained on
            (their ``train_args.json``), else the embedded SmolLM2-135M.
        threshold: the inference threshold to save (default: the routers' calibrated one).
        dtype: the dtype of the saved weights.
    """
    from .patch import load_skipgpt, set_threshold

    routers, out = Path(routers), Path(out)
    if not routers.is_dir():
        raise FileNotFoundError(f"export: no router folder at {routers}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export: {out} exists and is not an empty folder; choose a new --out")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"export: threshold must be in [0, 1], got {threshold}")
    if model is None:
        args_file = routers / "train_args.json"
        if args_file.exists():
            model = json.loads(args_file.read_text()).get("model")
    net, tok = load_skipgpt(model, routers, merge=True, dtype=dtype)
    if threshold is not None:
        set_threshold(net, float(threshold))
    return export_model(net, out, tok)


def export_model(model: nn.Module, out: str | os.PathLike, tokenizer=None) -> Path:
    """Write a patched model (LoRA merged, if any) and its routers as an export folder ``out``
    (refused if it exists and is not empty); ``tokenizer`` is saved beside it when given."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export: {out} exists and is not an empty folder; choose a new --out")
    base = unwrap(model)
    if hasattr(model, "peft_config"):
        raise ValueError("export: merge the LoRA adapter first (model.merge_and_unload()): the export holds plain weights")
    adapter = adapter_for(base)
    st = state(model)
    arch = type(base).__name__
    base_type = base.config.model_type
    cfg = {k: v for k, v in base.config.to_dict().items() if k not in _VOLATILE}
    cfg.update(
        model_type=MODEL_TYPE_PREFIX + base_type,
        architectures=[skipgpt_architecture(arch)],
        auto_map={"AutoConfig": "modeling_skipgpt.SkipGPTConfig", "AutoModelForCausalLM": "modeling_skipgpt.SkipGPTForCausalLM"},
    )
    cfg[SECTION] = {
        **dataclasses.replace(st.config, mode="auto").to_dict(),
        **model_fit(adapter, st.num_layers, base.config.hidden_size),
        "base_architecture": arch,
        "base_model_type": base_type,
        "format_version": FORMAT_VERSION,
    }
    tensors = _tensors_for_export(model)
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"export: tensor {key} holds NaN or inf; refusing to export it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = getattr(base, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REMOTE_FILE).write_text(
            '"""Loads this SkipGPT folder through the installed package (pip install skipgpt)."""\n'
            "from skipgpt.export import remote_classes\n\n"
            f"SkipGPTConfig, SkipGPTForCausalLM = remote_classes({base_type!r})\n"
        )
        umask = os.umask(0)
        os.umask(umask)
        for p in tmp.rglob("*"):
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_export_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an exported folder, checked to be one (its ``skipgpt`` section)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a SkipGPT export: no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    section = cfg.get(SECTION) if isinstance(cfg, dict) else None
    if not isinstance(section, dict):
        raise CheckpointError(
            f"{path} is not a SkipGPT export (its config.json has no '{SECTION}' section). A router folder "
            "from train-routers loads with skipgpt.load_skipgpt(model, folder); `skipgpt export` makes an export."
        )
    if section.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: export format version {section.get('format_version')!r}; this skipgpt reads version {FORMAT_VERSION}"
        )
    for key in ("base_architecture", "base_model_type", "family", "num_layers", "hidden_size"):
        if key not in section:
            raise CheckpointError(f"{cfg_file}: the '{SECTION}' section lacks {key!r}")
    return cfg


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`export`."""
    try:
        read_export_config(path)
        return True
    except (OSError, CheckpointError):
        return False


def skip_config_of(section: dict[str, Any]) -> SkipConfig:
    """The :class:`SkipConfig` in an export's ``skipgpt`` section."""
    known = {f.name for f in dataclasses.fields(SkipConfig)}
    try:
        return SkipConfig.from_dict({k: v for k, v in section.items() if k in known})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the '{SECTION}' section: {e}") from None


def base_config(cfg: dict[str, Any]):
    """The plain transformers config of an export's base model."""
    from transformers import AutoConfig

    section = cfg[SECTION]
    d = {k: v for k, v in cfg.items() if k not in (SECTION, "model_type", *_VOLATILE)}
    d["architectures"] = [section["base_architecture"]]
    return AutoConfig.for_model(section["base_model_type"], **d)


def read_export_routers(path: str | os.PathLike, section: dict[str, Any]) -> LoadedRouters:
    """Only the router tensors of an export's weights, checked against its ``skipgpt`` section."""
    f = Path(path) / WEIGHTS_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a complete SkipGPT export: no {WEIGHTS_FILE}")
    try:
        with safe_open(str(f), framework="pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys() if _ROUTER_KEY.search(k)}
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
    fit = {k: section[k] for k in ("family", "num_layers", "hidden_size")}
    return LoadedRouters(str(f), _check_routers(tensors, fit, section.get("router_type", "linear"), str(f)), None)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers reports the router weights as unexpected keys of the base model: expected."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Load an exported folder into transformers: the base model, patched, routers loaded, in
    eval mode, with the saved threshold. Every check runs before the weights are read."""
    from transformers import AutoModelForCausalLM

    from .patch import apply

    cfg = read_export_config(path)
    section = cfg[SECTION]
    skip_cfg = skip_config_of(section)
    if section["base_architecture"] not in FAMILIES:
        raise CheckpointMismatchError(
            f"{path} holds a {section['base_architecture']}; this skipgpt supports {sorted(FAMILIES)}"
        )
    loaded = read_export_routers(path, section)
    # This process now knows the folder's model type: AutoTokenizer / AutoConfig on it work
    # without trust_remote_code.
    register_auto_classes([section["base_model_type"]], models=False)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(path), config=base_config(cfg), dtype=dtype)
    adapter = adapter_for(model)
    fit = model_fit(adapter, len(adapter.layers(model)), model.config.hidden_size)
    for key, value in fit.items():
        if section[key] != value:
            raise CheckpointMismatchError(f"{path}: the routers were made for {key}={section[key]!r}, the weights have {value!r}")
    apply(model, skip_cfg)
    assign_routers(model, loaded, restore_threshold=False)
    return model.to(device).eval()


_CLASSES: dict[str, tuple[type, type]] = {}


def config_class(base_model_type: str) -> type:
    """The transformers config class of ``skipgpt_<base_model_type>`` (the base's, renamed)."""
    return remote_classes(base_model_type, model=False)[0]


def remote_classes(base_model_type: str, model: bool = True):
    """``(config class, model class)`` for an export of ``base_model_type``; the model class's
    ``from_pretrained`` is :func:`from_pretrained`. Used by the folder's ``modeling_skipgpt.py``
    and by :func:`register_auto_classes`."""
    from transformers import CONFIG_MAPPING

    if base_model_type not in _CLASSES:
        base_cfg = CONFIG_MAPPING[base_model_type]
        cfg_cls = type(f"SkipGPT{base_cfg.__name__}", (base_cfg,), {"model_type": MODEL_TYPE_PREFIX + base_model_type})
        _CLASSES[base_model_type] = (cfg_cls, None)
    cfg_cls, model_cls = _CLASSES[base_model_type]
    if model and model_cls is None:
        from transformers import AutoModelForCausalLM

        arch = {t: a for a, t in _base_model_types().items()}.get(base_model_type)
        if arch is None:
            raise CheckpointMismatchError(
                f"SkipGPT does not support model type {base_model_type!r}; supported: {sorted(_base_model_types().values())}"
            )
        base_cls = AutoModelForCausalLM._model_mapping[CONFIG_MAPPING[base_model_type]]

        def _load(cls, pretrained_model_name_or_path, *args, dtype=None, torch_dtype=None, device_map=None, **kwargs):
            return from_pretrained(pretrained_model_name_or_path, dtype=_dtype(dtype or torch_dtype))

        model_cls = type(skipgpt_architecture(arch), (base_cls,), {"config_class": cfg_cls, "from_pretrained": classmethod(_load)})
        _CLASSES[base_model_type] = (cfg_cls, model_cls)
    return cfg_cls, model_cls


def _dtype(value) -> torch.dtype:
    if value is None or value == "auto":
        return torch.float32
    return getattr(torch, value) if isinstance(value, str) else value


def register_auto_classes(base_model_types=None, models: bool = True) -> None:
    """Make ``AutoConfig`` (and ``AutoModelForCausalLM``) know the ``skipgpt_*`` model types.
    Idempotent. ``base_model_types`` defaults to every supported family's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for t in base_model_types or sorted(set(_base_model_types().values())):
        cfg_cls, model_cls = remote_classes(t, model=models)
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        if models:
            AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
