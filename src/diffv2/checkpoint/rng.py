"""``rng.pt``: the Python, NumPy, torch and CUDA generator states, so a resumed run draws the same numbers."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError


def get_rng() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    # torch.load(weights_only=True) refuses numpy arrays, so the MT19937 keys travel as a tensor.
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    rng = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def parse_rng(file: Path, rng: Any) -> Callable[[], None]:
    """Parse a loaded ``rng.pt`` now (so bad content fails before anything changes); the returned call applies it."""
    try:
        version, internal, gauss = rng["python"]
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np_state = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
        torch_state, cuda_states = rng["torch"], list(rng.get("cuda", []))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{file}: corrupted (not a diffv2 RNG state)") from None

    def apply() -> None:
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if torch.cuda.is_available():
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)

    return apply
