"""diffv2: Differential Transformer V2, DIFF V1 and baseline decoder LMs."""

from .config import PRESETS, ModelConfig, attention_params, baseline_1p5h, baseline_ffn_matched
from .errors import CheckpointError, ConfigError, DataError, DiffV2Error
from .model import Transformer

__version__ = "0.1.0"

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
    "baseline_ffn_matched",
]
