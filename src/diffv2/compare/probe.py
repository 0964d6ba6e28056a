"""Per-token σ(λ) of a trained DIFF V2 run: the distribution the logged mean ± std only summarises.

The trainer logs σ(λ)'s mean and std per layer; whether σ(λ) is bimodal, saturates at 0/1 or stays near its
init value of 0.5 needs the values themselves. :func:`probe_run` loads the run's final checkpoint, feeds it a
few validation batches and keeps per-layer quantiles plus a histogram pooled over layers, heads and tokens. The
result is cached in ``<run>/lambda_probe.json``, redone only when the checkpoint changes and kept when the
checkpoint is gone (a run copied back without its weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_pretrained
from ..data import EvalBatches
from ..diagnostics import subtraction_weights
from .loading import checkpoint_dir

PROBE_FILE = "lambda_probe.json"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
BINS = 50


def probe_run(run_dir: str | Path, *, batches: int = 4, batch_size: int = 4) -> dict[str, Any] | None:
    """σ(λ) statistics of a finished DIFF V2 run (None for a variant without σ(λ) or a run without checkpoint)."""
    run_dir = Path(run_dir)
    cache = run_dir / PROBE_FILE
    cached = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else None
    try:
        ckpt = checkpoint_dir(run_dir)
    except ValueError:
        # a run copied without its weights (e.g. back from a GPU machine) keeps the probe made where it trained
        return cached if cached is not None and cached.get("batches") == batches else None
    if cached is not None and cached.get("checkpoint") == ckpt.name and cached.get("batches") == batches:
        return cached
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    if config["model"]["attention"] != "diff_v2":
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trained = load_pretrained(ckpt, backend="sdpa", device=device)
    evals = EvalBatches(
        config["data"]["dir"], "val", batch_size=batch_size, seq_len=config["train"]["seq_len"], max_batches=batches
    )
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(trained.model.cfg.n_layers)]
    for x, _ in evals:
        for i, weight in enumerate(subtraction_weights(trained.model, x.to(device))):
            per_layer[i].append(weight.flatten().cpu())
    values = [torch.cat(v) for v in per_layer]
    result = {
        "checkpoint": ckpt.name,
        "batches": batches,
        "lambda_mode": config["model"]["lambda_mode"],
        **summarize_values(values),
    }
    cache.write_text(json.dumps(result), encoding="utf-8")
    return result


def summarize_values(per_layer: list[torch.Tensor]) -> dict[str, Any]:
    """Per-layer mean/std/quantiles and one histogram over all layers (fixed [0, 1] bins when values fit)."""
    pooled = torch.cat(per_layer).double()
    lo, hi = pooled.min().item(), pooled.max().item()
    # σ(λ) lies in (0, 1): fixed bins make runs directly comparable; the "linear" ablation can leave that range
    lo, hi = (0.0, 1.0) if lo >= 0 and hi <= 1 else (lo, hi if hi > lo else lo + 1)
    counts = torch.histc(pooled, bins=BINS, min=lo, max=hi)
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    layers = [
        {
            "mean": v.double().mean().item(),
            "std": v.double().std().item() if v.numel() > 1 else 0.0,
            "quantiles": dict(zip(map(str, QUANTILES), torch.quantile(v.double(), q).tolist(), strict=True)),
        }
        for v in per_layer
    ]
    edges = torch.linspace(lo, hi, BINS + 1).tolist()
    return {"n_values": pooled.numel(), "layers": layers, "hist": {"edges": edges, "counts": counts.tolist()}}
