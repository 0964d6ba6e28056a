"""Generation's fused input projections: per layer one matmul for q/k/v(/λ) and one for SwiGLU's gate/up.

At decode batch 1 a step is a chain of GEMVs, each costing a launch and a ramp-up whatever its size, so DIFF
V2's small ``lambda_proj`` GEMV costs far more than its bytes (docs/benchmarks.md, "Batch-1 decode"). Fused, DIFF
V2 launches exactly what the baseline launches, as gpt-fast's ``wqkv`` does.

A transform applied from outside for the duration of a ``with`` block: each module that declares
``input_projections`` (linears reading its input) gets its linears' weights concatenated into one tensor, and the
original weights become views of it, so nothing is copied and in-place updates (``load_state_dict``) reach it.
A forward pre-hook on the module computes the one matmul, and each linear's forward returns its slice of it.
Only without autograd; a hooked or wrapped linear (an adapter, a probe) or a dtype/device mix is left unfused,
and a conversion (``.to``) inside the block falls back to one matmul per linear.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.common import plain_linear


class _Group:
    """The fused weight of one module's input linears and, during that module's forward, their one product."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        weights = [m.weight for m in linears]
        self.weight = _shared_rows(weights)
        if self.weight is None:
            self.weight = torch.cat([w.detach() for w in weights])
        self.first = linears[0]
        self.product: torch.Tensor | None = None

    def before(self, module: nn.Module, args: tuple) -> None:
        self.product = None if torch.is_grad_enabled() or self._stale() else F.linear(args[0], self.weight)

    def after(self, module: nn.Module, args: tuple, output) -> None:
        self.product = None

    def _stale(self) -> bool:
        """A conversion (``.to``) replaced the weights since fusing: the fused tensor no longer holds them."""
        return not torch.compiler.is_compiling() and self.first.weight.data_ptr() != self.weight.data_ptr()


class _Slice:
    """One input linear's forward while fused: its rows of the group's product (its own matmul when there is none)."""

    def __init__(self, group: _Group, linear: nn.Linear, start: int) -> None:
        self.group, self.weight_of, self.start, self.rows = group, linear, start, linear.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        product = self.group.product
        if product is None:
            return F.linear(x, self.weight_of.weight)
        return product[..., self.start : self.start + self.rows]


@contextmanager
def fused_projections(model: nn.Module) -> Iterator[None]:
    """Within the block, without autograd, every fusable module of ``model`` runs its input linears as one matmul.
    Same results, fewer launches; the modules, parameters and names stay as they are."""
    fused = []
    for module in list(model.modules()):
        linears = [getattr(module, n) for n in getattr(module, "input_projections", ()) if getattr(module, n, None)]
        weights = [m.weight for m in linears]
        plain = all(plain_linear(m) and type(m.weight.detach()) is torch.Tensor for m in linears)
        if len(linears) < 2 or not plain or len({(w.dtype, w.device) for w in weights}) != 1:
            continue  # (a sharded DTensor weight is not a plain tensor)
        group = _Group(linears)
        start = 0
        for linear in linears:
            view = group.weight[start : start + linear.out_features]
            if view.data_ptr() != linear.weight.data_ptr():  # the same Parameter, now a view of the fused tensor
                linear.weight.data = view
            linear.forward = _Slice(group, linear, start)
            start += linear.out_features
        hooks = (module.register_forward_pre_hook(group.before), module.register_forward_hook(group.after))
        fused.append((linears, hooks))
    try:
        yield
    finally:
        for linears, hooks in fused:
            for hook in hooks:
                hook.remove()
            for linear in linears:
                del linear.forward


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
