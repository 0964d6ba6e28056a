"""Inference-time fusion of the linear layers that read the same input into one matmul.

At decode batch 1 a step is a chain of GEMVs, and each costs a launch and a ramp-up whatever its size: on the
H200 (2026-11-30) DIFF V2's 16 ``lambda_proj`` GEMVs of a 1b step came to ~2.7 µs each for 64 kB each
(inferred from the GEMV floors ``bench/decode.py`` measured), 4% of the step's GEMV time for 0.05% of its
bytes. Fused, a layer runs one GEMV for q/k/v(/λ) and one for SwiGLU's gate/up, as gpt-fast's ``wqkv`` and
``w1``/``w3`` do, and DIFF V2 launches exactly what the baseline launches.

The parameters keep their names and shapes (checkpoints and HF export see no change): fusing rebinds
each weight as a view into one concatenated tensor, so in-place updates (optimizer steps, ``load_state_dict``)
reach the fused tensor too. The fused matmul only runs without autograd, since it would bypass the
parameters' gradients; a dtype/device conversion (``.to``) drops the fusion, since it replaces the weights;
a hooked or wrapped linear (an adapter, a probe) is left unfused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def plain_linear(module: nn.Module) -> bool:
    """A bias-free ``nn.Linear`` with no hooks: one whose output is exactly ``x @ weight.T``, so it can be
    computed inside another matmul (a wrapped or hooked one, e.g. an adapter or a probe, must see its input)."""
    hooked = module._forward_hooks or module._forward_pre_hooks
    return type(module) is nn.Linear and module.bias is None and not hooked


class FusableInputs(nn.Module):
    """A module whose ``input_linears()`` all read the same input; ``fuse_inputs()`` makes them one matmul."""

    fused_weight: torch.Tensor | None = None

    def input_linears(self) -> list[nn.Linear]:
        raise NotImplementedError

    def fuse_inputs(self) -> bool:
        """Concatenate the input linears' weights and rebind each as a view of the result. False (and nothing
        changed) where a linear is not plain or the weights differ in dtype or device."""
        linears = self.input_linears()
        weights = [m.weight for m in linears]
        plain = all(plain_linear(m) for m in linears) and all(type(w.detach()) is torch.Tensor for w in weights)
        if not plain or len({(w.dtype, w.device) for w in weights}) != 1:  # (sharded DTensors are not plain)
            return False
        fused = _shared_rows(weights)
        if fused is None:
            fused = torch.cat([w.detach() for w in weights])
            offset = 0
            for m, w in zip(linears, weights, strict=True):
                m.weight = nn.Parameter(fused[offset : offset + w.shape[0]], requires_grad=w.requires_grad)
                offset += w.shape[0]
        self.fused_weight, self.fused_sizes = fused, [w.shape[0] for w in weights]
        return True

    def unfuse_inputs(self) -> None:
        """Back to one matmul per linear (the weights stay views of the fused storage: no copy, no change)."""
        self.fused_weight = None

    def project_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each input linear applied to ``x``, in ``input_linears()`` order."""
        if self.fused_weight is None or torch.is_grad_enabled():
            return [m(x) for m in self.input_linears()]
        return list(F.linear(x, self.fused_weight).split(self.fused_sizes, dim=-1))

    def _apply(self, fn, recurse=True):
        self.fused_weight = None  # the converted weights no longer live in the fused tensor
        return super()._apply(fn, recurse)


def _shared_rows(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor the weights already are consecutive row blocks of (fused before), else None. Fusing again
    reuses that storage rather than moving the weights, which a CUDA graph captured earlier may still read."""
    first = weights[0]
    if any(not w.is_contiguous() for w in weights):
        return None
    storage, offset = first.untyped_storage(), first.storage_offset()
    for w in weights:
        if w.untyped_storage().data_ptr() != storage.data_ptr() or w.storage_offset() != offset:
            return None
        offset += w.numel()
    rows = sum(w.shape[0] for w in weights)
    return first.detach().new_empty(0).set_(storage, first.storage_offset(), (rows, first.shape[1]))
