"""SkipGPT: per-token dynamic skipping of attention and MLP modules in Hugging Face LLMs.

    import skipgpt
    model = skipgpt.apply(model, skipgpt.SkipConfig(threshold=0.5))
    model.generate(...)
    print(skipgpt.stats(model)["param_sparsity"])
"""

from .adapters import FAMILIES, UnsupportedModelError
from .calibration import calibrate_bias, calibrate_input_scale, calibrate_threshold
from .checkpoint import CheckpointError, CheckpointMismatchError, load_routers, read_config, save_routers
from .config import SkipConfig
from .export import export, export_model, from_pretrained
from .patch import (
    apply,
    load_skipgpt,
    remove,
    reset_stats,
    router_parameters,
    routers,
    set_mode,
    set_threshold,
    stats,
)
from .router import Router
from .skip_state import is_patched, overrides, state

__version__ = "0.1.0"

__all__ = [
    "SkipConfig",
    "export",
    "export_model",
    "from_pretrained",
    "Router",
    "apply",
    "load_skipgpt",
    "remove",
    "is_patched",
    "state",
    "stats",
    "reset_stats",
    "set_mode",
    "set_threshold",
    "overrides",
    "calibrate_bias",
    "calibrate_input_scale",
    "calibrate_threshold",
    "routers",
    "router_parameters",
    "save_routers",
    "load_routers",
    "read_config",
    "FAMILIES",
    "UnsupportedModelError",
    "CheckpointError",
    "CheckpointMismatchError",
]
