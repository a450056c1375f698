"""SkipGPT: per-token dynamic skipping of attention and MLP modules in Hugging Face LLMs.

    import skipgpt
    model = skipgpt.apply(model, skipgpt.SkipConfig(threshold=0.5))
    model.generate(...)
    print(skipgpt.stats(model)["param_sparsity"])
"""

from .adapters import FAMILIES, UnsupportedModelError
from .checkpoint import CheckpointError, CheckpointMismatchError, load_routers, read_config, save_routers
from .config import SkipConfig
from .patch import (
    apply,
    calibrate_bias,
    calibrate_input_scale,
    calibrate_threshold,
    is_patched,
    remove,
    reset_stats,
    router_parameters,
    routers,
    set_mode,
    set_threshold,
    state,
    stats,
)
from .router import Router

__version__ = "0.1.0"

__all__ = [
    "SkipConfig",
    "Router",
    "apply",
    "remove",
    "is_patched",
    "state",
    "stats",
    "reset_stats",
    "set_mode",
    "set_threshold",
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
