"""Two memory-lean training implementations of DIFF V2's combine (``DiffV2Attention.combine``), registered in
:mod:`.dispatch`: ``PairSubtract`` (o₁ − w·o₂ with a backward that keeps no fp32 copy of o₂) and
``pair_subtract_project`` ((o₁ − w·o₂) W_Oᵀ whose backward recomputes the difference instead of keeping it).

The difference is computed in fp32 (both terms can be tiny for diffuse heads) and cast back. Pairs are heads
(2i, 2i+1) (``interleaved``) or (i, i+h) (the ``split`` ablation).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from .common import split_pairs, upcast


def pair_difference(o1: torch.Tensor, o2: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """o1 − s·o2 in fp32, back in o1's dtype; (B, h, T, d) with s (B, h, T, 1)."""
    return (upcast(o1) - s * upcast(o2)).to(o1.dtype)


class PairSubtract(torch.autograd.Function):
    """``pair_difference`` with a hand-written backward: autograd would keep an fp32 copy of o2 (as large as the
    whole 2h-head output in bf16); this keeps only o2, a view of the attention output SDPA's backward holds."""

    @staticmethod
    def forward(ctx, o1: torch.Tensor, o2: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(o2, s)
        return pair_difference(o1, o2, s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        o2, s = ctx.saved_tensors
        g = upcast(grad)
        grad_s = -(g * upcast(o2)).sum(-1, keepdim=True) if ctx.needs_input_grad[2] else None
        return grad, (-s * g).to(o2.dtype), grad_s


# ---------------------------------------------------------------------- fused with o_proj, for training
def _context(out: torch.Tensor, s: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The h·d context o_proj reads, (B, T, h·d), from the attention output (B, 2h, T, d)."""
    return pair_difference(*split_pairs(out, interleaved), s).transpose(1, 2).flatten(2)


def _input_grads(grad_ctx: torch.Tensor, out: torch.Tensor, s: torch.Tensor, interleaved: bool):
    """d(out) (B, 2h, T, d) in one tensor and d(s) (B, h, T, 1) fp32, from d(context) (B, T, h·d).

    d(out) is laid out as SDPA lays out its output, (B, T, 2h, d) in memory: with cuDNN older than 9.5.1,
    PyTorch's cuDNN backward copies a gradient whose strides differ from its output's (one more pass over the
    2h-head output per layer); newer cuDNN takes either layout."""
    b, hq, t, d = out.shape
    g = upcast(grad_ctx.view(b, t, hq // 2, d))  # (B, T, h, d)
    o2 = split_pairs(out, interleaved)[1].transpose(1, 2)
    grad_s = -(g * upcast(o2)).sum(-1, keepdim=True).transpose(1, 2)
    pair = (g.to(out.dtype), (-s.transpose(1, 2) * g).to(out.dtype))
    grad_out = torch.stack(pair, 3).flatten(2, 3) if interleaved else torch.cat(pair, 2)  # (B, T, 2h, d)
    return grad_out.transpose(1, 2), grad_s


_FUSED: dict = {}


def _fused(fn, x: torch.Tensor):
    """On CUDA ``fn`` through torch.compile (dynamic shapes), so its casts, products and layout change are one
    kernel, as they were when inductor saw them inline; elsewhere, or once compiling it has failed, ``fn``
    itself (the same values, more kernels) after one warning."""
    if not _on_gpu(x) or _FUSED.get("failed") or _tracing(x):
        return fn
    if fn not in _FUSED:
        _FUSED[fn] = _compiled_or_eager(fn)
    return _FUSED[fn]


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def _tracing(x: torch.Tensor) -> bool:
    """Inside an outer torch.compile: dynamo, or AOTAutograd tracing this op's backward with fake tensors. The
    helpers are then traced inline and inductor fuses them with the rest; a compiled function cannot be traced
    there ("FX to symbolically trace a dynamo-optimized function")."""
    return torch.compiler.is_compiling() or is_fake(x)


def _compiled_or_eager(fn):
    compiled = torch.compile(fn, dynamic=True)

    def call(*args):
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # a compiler failure must not stop training: it only costs speed
            reason = f"{type(err).__name__}: {str(err)[:200]}"
            warnings.warn(
                f"diffv2: torch.compile of {fn.__name__} failed ({reason}); the pair subtraction runs "
                "uncompiled from now on",
                stacklevel=2,
            )
            _FUSED["failed"] = True
            return fn(*args)

    return call


# torch.compile's caches know a custom op by its name, not by its backward (pytorch/pytorch#144344): a changed
# backward under an old name is served stale from the cache of a user who ran the old one. Bump on every change.
_REVISION = 2


@torch.library.custom_op(f"diffv2::pair_subtract_project_r{_REVISION}", mutates_args=())
def pair_subtract_project(out: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """(o1 − s·o2) W_Oᵀ from the attention output ``out`` (B, 2h, T, d) and s (B, h, T, 1); returns (B, T, D).

    A linear layer keeps its input for the weight gradient: here that input would be the h·d difference, an
    activation the baseline does not have. The backward recomputes it from ``out``, which SDPA's backward keeps
    anyway. A custom op, opaque to torch.compile's partitioner: as an inlined autograd.Function the partitioner
    chose to keep the difference after all (docs/design.md#training-memory).
    Its elementwise parts go through their own small compiled kernels on CUDA (``_fused``), and the gradient of
    ``out`` comes back as one tensor, not as two slices autograd would scatter into zeros."""
    return F.linear(_fused(_context, out)(out, s, interleaved), weight.to(out.dtype))


@pair_subtract_project.register_fake
def _(out: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, interleaved: bool) -> torch.Tensor:
    b, _, t, _ = out.shape
    return out.new_empty(b, t, weight.shape[0])


def _setup(ctx, inputs, output) -> None:
    out, s, weight, ctx.interleaved = inputs
    ctx.save_for_backward(out, s, weight)


def _backward(ctx, grad: torch.Tensor):
    out, s, weight = ctx.saved_tensors
    grad = grad.to(out.dtype)
    grad_weight = None
    if ctx.needs_input_grad[2]:
        context = _fused(_context, out)(out, s, ctx.interleaved)
        grad_weight = (grad.flatten(0, 1).T @ context.flatten(0, 1)).to(weight.dtype)
    grad_out, grad_s = _fused(_input_grads, out)(grad @ weight.to(out.dtype), out, s, ctx.interleaved)
    return grad_out, grad_s.to(s.dtype) if ctx.needs_input_grad[1] else None, grad_weight, None


pair_subtract_project.register_autograd(_backward, setup_context=_setup)
