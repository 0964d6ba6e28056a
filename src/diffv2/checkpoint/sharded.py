"""The state of a sharded (FSDP2 / DTensor) model, gathered from and spread back onto its shards through
``torch.distributed.checkpoint.state_dict``. Every call is collective: all ranks make it.

:mod:`.state` imports this module only once a model actually holds DTensors, so that reading or writing a
plain model's checkpoint never loads ``torch.distributed.checkpoint`` or ``torch.distributed.fsdp``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0 only, in host memory


def gather_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=_GATHER)


def apply_weights(model: nn.Module, weights: dict[str, torch.Tensor], strict: bool) -> None:
    set_model_state_dict(model, dict(weights), options=StateDictOptions(full_state_dict=True, strict=strict))


def gather_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def apply_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
