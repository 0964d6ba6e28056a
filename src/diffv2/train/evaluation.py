"""What the training loop measures besides its own loss: the validation loss (by half and source of the split)
and the per-layer summary of a diagnostic pass."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..data import EvalBatches, SplitDocuments
from .setup import Run


def autocast(run: Run):
    return torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None)


@torch.no_grad()
def evaluate(run: Run, batches: EvalBatches, documents: SplitDocuments | None = None) -> dict[str, Any]:
    """Mean loss per token over all ranks' eval batches (each rank runs its share; a sharded model runs them in
    step). With the split's ``documents`` it is also broken down by half (select/test) and source."""
    run.model.eval()
    n_groups = documents.n_groups if documents is not None else 1
    totals = torch.zeros(2, n_groups, dtype=torch.float64, device=run.device)  # loss sums, token counts
    for index, real in batches.rounds():
        x, y = (t.to(run.device) for t in batches.batch(index))
        with autocast(run):
            logits = run.par.eval_fn(x, y)[0]
        if not real:
            continue
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").double()
        if documents is None:
            groups = torch.zeros_like(y.flatten())
        else:
            groups = torch.from_numpy(documents.groups_of(batches.target_positions(index))).to(run.device).flatten()
        onehot = F.one_hot(groups, n_groups).double()  # a matmul, not an atomic scatter: the same sums every time
        totals[0] += losses @ onehot
        totals[1] += onehot.sum(0)
    run.model.train()
    run.env.all_reduce(totals)
    sums, counts = totals.cpu().numpy()
    if documents is None:
        return {"val_loss": float(sums[0] / counts[0]), "val_tokens": int(counts[0])}
    return documents.summarize(sums, counts)


def summarize_diagnostics(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer lists of the diagnostics :func:`diffv2.diagnostics.diagnose` records: every number or list that
    each layer recorded, with ``context_rms`` and ``sink_mass`` (per head) reduced to the layer mean (the per-head
    context RMS is kept as ``context_rms_per_head``)."""
    out: dict[str, Any] = {}
    for key in stats[0]:
        values = [s.get(key) for s in stats]
        if all(isinstance(v, int | float | list) for v in values):  # leaves out maps and other tensors
            out[key] = values
    if "context_rms" in out:
        out["context_rms_per_head"] = out["context_rms"]
        out["context_rms"] = [sum(v) / len(v) for v in out["context_rms"]]
    if "sink_mass" in out:
        out["sink_mass"] = [sum(v) / len(v) for v in out["sink_mass"]]
    return out
