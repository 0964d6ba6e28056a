"""What a seed fixes across variants: measured by building the models, not assumed.

Every run of a grid seeds its batch order with its seed, so two variants at the same seed see the same batches in
the same order. Whether they also start from the same weights where their shapes agree depends on how the model
draws its initial weights from the seeded generator; :func:`shared_init` builds two variants from one seed and
reports, per component, which same-named, same-shaped weights came out equal.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import Transformer

COMPONENTS = ("embedding", "attention", "mlp", "norm", "lm_head")


def _component(name: str) -> str:
    if name.startswith("tok_embeddings"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "norm"


def _init(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    # the same steps as training's setup: seed the global generator, then build the model
    torch.manual_seed(seed)
    return Transformer(cfg).state_dict()


def shared_init(a: dict, b: dict, seed: int = 0) -> dict[str, str]:
    """Per component of two model configs (ModelConfig dicts): "same", "different", "partly" (some tensors equal)
    or "shapes differ", for the weights present in both under one name.

    The global generator's state is restored afterwards, so calling this does not disturb anything seeded."""
    state = torch.random.get_rng_state()
    try:
        wa, wb = _init(ModelConfig.from_dict(a), seed), _init(ModelConfig.from_dict(b), seed)
    finally:
        torch.random.set_rng_state(state)
    equal: dict[str, list[bool]] = {c: [] for c in COMPONENTS}
    shaped: dict[str, bool] = {c: False for c in COMPONENTS}
    for name, tensor in wa.items():
        other = wb.get(name)
        if other is None:
            continue
        comp = _component(name)
        if other.shape != tensor.shape:
            shaped[comp] = True
            continue
        equal[comp].append(torch.equal(tensor, other))
    out = {}
    for comp in COMPONENTS:
        flags = equal[comp]
        if not flags:
            out[comp] = "shapes differ" if shaped[comp] else "absent"
        else:
            out[comp] = "same" if all(flags) else "different" if not any(flags) else "partly"
    return out
