"""diffv2: Differential Transformer V2, DIFF V1 and baseline decoder LMs."""

from .config import PRESETS, ModelConfig
from .errors import CheckpointError, ConfigError, DataError, DiffV2Error
from .model import Transformer
from .sizing import (
    attention_params,
    baseline_1p5h,
    baseline_2h_matched,
    baseline_ffn_matched,
    ffn_matched,
    gated_ffn_matched,
    total_params,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # diffv2.hf needs transformers (optional, slow to import): load it on first use only
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'diffv2' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiffV2Error",
    "ModelConfig",
    "Transformer",
    "__version__",
    "attention_params",
    "baseline_1p5h",
    "baseline_2h_matched",
    "baseline_ffn_matched",
    "ffn_matched",
    "gated_ffn_matched",
    "total_params",
]
