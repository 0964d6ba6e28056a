"""torch.distributed for the trainer: the process group from torchrun's environment, DDP / FSDP2 wrapping, and
the few collectives the loop needs. The model code knows nothing of it; ``parallel="none"`` never touches it.

Launch: ``torchrun --nproc_per_node=N -m diffv2 train --parallel ddp|fsdp ...``. torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; each process drives one device: ``cuda:LOCAL_RANK`` with NCCL, or the
CPU with gloo. As in torchtitan: activation checkpointing, then ``torch.compile`` per transformer block (FSDP2,
and DDP by default; ``compile_scope="model"`` compiles DDP's model as one graph), then for FSDP2 ``fully_shard``
per block and on the root, with
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` when training in bf16.
"""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..errors import ConfigError

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# What gloo / NCCL / c10d say when a peer died, hung or the process-group timeout hit; they raise plain
# RuntimeErrors, so the message is all there is to tell a broken job from a bug in this process.
_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|c10d|timed out|connection (reset|closed|refused)|by peer", re.I)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; the single-process default has no process group."""

    parallel: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = 600.0
    owns_group: bool = False  # created by init_distributed, so close() may destroy it

    @property
    def active(self) -> bool:
        """True when a process group is in use (parallel "ddp" or "fsdp", even with one rank)."""
        return self.parallel != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes files and prints."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over all ranks (``op``: "sum", "mean" or "max"); the tensor itself without a group."""
        if self.active:
            if op == "mean":  # gloo has no ReduceOp.AVG
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                tensor /= self.world_size
            else:
                dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this job created it (a caller's own group is left alone)."""
        if self.owns_group:
            destroy()

    def failure_message(self, err: BaseException) -> str | None:
        """A one-line explanation when ``err`` is a failed collective (a peer died or hung), else None."""
        if not self.active or not isinstance(err, RuntimeError):
            return None
        if not (isinstance(err, dist.DistError) or _COLLECTIVE_FAILURE.search(str(err))):
            return None
        first = (str(err).strip().splitlines() or [""])[0][:300]
        return (
            f"rank {self.rank} of {self.world_size}: a collective operation failed ({type(err).__name__}: "
            f"{first}); another rank most likely died or hung (check its log); collectives give up after "
            f"dist_timeout_s={self.timeout_s:g} s"
        )


def init_distributed(parallel: str, device_type: str, timeout_s: float) -> tuple[DistEnv, torch.device]:
    """Join the job torchrun started (``parallel`` "ddp"/"fsdp") or stay single-process ("none").

    ``device_type`` ("cuda" or "cpu") picks NCCL on ``cuda:LOCAL_RANK`` or gloo on the CPU. The process group
    is destroyed at exit (or by :func:`destroy`); one created by the caller beforehand is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if world > 1:
            raise ConfigError(
                f"parallel='none' but torchrun started {world} processes; pass --parallel ddp or "
                "--parallel fsdp (or launch without torchrun)"
            )
        return DistEnv(), torch.device(device_type)
    if missing := [k for k in _TORCHRUN_ENV if k not in os.environ]:
        raise ConfigError(
            f"parallel={parallel!r} needs the environment torchrun sets up ({', '.join(missing)} missing); launch "
            f"with: torchrun --nproc_per_node=N -m diffv2 train --parallel {parallel} ..."
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu")
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} visible GPUs; "
                "use at most one process per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        atexit.register(destroy)
    elif dist.get_world_size() != world:
        raise ConfigError(f"a process group of {dist.get_world_size()} ranks exists, but WORLD_SIZE={world}")
    return DistEnv(parallel, rank, world, local_rank, timeout_s, owns_group), device


def destroy() -> None:
    """Tear down the process group if one is up (registered to run at exit by :func:`init_distributed`)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Parallel:
    """The model as the training loop drives it."""

    model: nn.Module  # owns the parameters (plain, or sharded in place by FSDP2): optimizer, checkpoints, diagnostics
    train_fn: Callable[..., Any]  # the training forward: DDP wrapper and/or compiled
    eval_fn: Callable[..., Any]  # forward for evaluation: never DDP (ranks may run different batch counts)
    ddp: nn.parallel.DistributedDataParallel | None = None

    def grad_sync(self, enabled: bool) -> AbstractContextManager[None]:
        """Around a micro-step's forward and backward: reduce gradients across ranks only when ``enabled``
        (the last micro-step of an optimizer step); earlier ones accumulate locally."""
        if self.ddp is not None and not enabled:
            return self.ddp.no_sync()
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(enabled)
            # between micro-steps keep the gathered parameters: the next forward need not all-gather them again
            self.model.set_reshard_after_backward(enabled)
        return nullcontext()


def parallelize(
    model: nn.Module,
    env: DistEnv,
    device: torch.device,
    *,
    compile: bool,
    compile_scope: str = "auto",
    activation_checkpointing: bool,
    bf16: bool,
    reshard_after_forward: str = "default",
) -> Parallel:
    """Wrap a freshly built model (identical on every rank) for ``env.parallel``; build the optimizer after
    this, since FSDP2 replaces the parameters by sharded DTensors. Under fsdp, ``bf16`` means bf16 parameters
    in compute with fp32 gradient reduction (no autocast needed); otherwise the caller autocasts.
    ``compile_scope`` (with ``compile``): "model" = one graph, "block" = each transformer block, "auto" = model
    in one process, block under ddp / fsdp. ``reshard_after_forward`` (fsdp): "default", "always" or "never",
    as ``TrainConfig.fsdp_reshard_after_forward``."""
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        # The wrapper's state-dict hooks keep the parameter names, so checkpoints stay interchangeable.
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    scope = compile_scope if compile_scope != "auto" else ("model" if env.parallel == "none" else "block")
    if env.parallel == "fsdp" and scope != "block":
        raise ConfigError("FSDP2 compiles each transformer block: compile_scope must be 'block' or 'auto'")
    if compile and scope == "block":
        # as torchtitan does: one graph serves every layer, the data-parallel hooks (FSDP's gathers, DDP's
        # bucketed all-reduce as each block's gradients become ready) stay outside the graphs
        for i, block in enumerate(model.layers):
            model.layers[i] = torch.compile(block)
    whole = torch.compile(model) if compile and scope == "model" else model
    if env.parallel == "fsdp":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        last = len(model.layers) - 1
        for i, block in enumerate(model.layers):
            # default, as torchtitan: the last block is not resharded after forward, backward needs it at once
            reshard = {"always": True, "never": False}.get(reshard_after_forward, i < last)
            fully_shard(block, mp_policy=mp, reshard_after_forward=reshard)
        # the root group: embedding, final norm and LM head (tied or not)
        fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward != "never")
        return Parallel(model, model, model)
    if env.parallel == "ddp":
        # gradients as views of the all-reduce buckets: no copy into the buckets and back, one gradient-sized
        # buffer less. Around a whole-model graph the buckets reduce after the backward, not during it: one
        # fast burst on NVLink, against the Python cost of per-block graphs at small micro-batches.
        ddp = nn.parallel.DistributedDataParallel(
            whole, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )
        return Parallel(model, ddp, whole, ddp)
    return Parallel(model, whole, whole)


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` and return the total gradient norm as a plain tensor, the same on every rank
    (the norm of FSDP's sharded gradients is a DTensor; ``full_tensor()`` reduces it over the ranks)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
