"""mqar: multi-query associative recall (Zoology, Arora et al. 2023), trained from scratch per attention variant.

A sequence lists n key-value pairs, then asks for every key again in a random order, each followed by its value:
the model is scored on predicting each value from its key. In the noisy variant random distractor tokens (from
their own range, never keys or values) sit between the pairs. Small models of each variant, at matched total
parameters, are trained over a grid of learning rates and seeds on freshly drawn sequences, then scored on one
held-out set that every run shares. Needs no checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..model import Transformer
from ..sizing import ffn_matched
from ..train.schedule import lr_at
from .context import EvalContext
from .registry import Result, Task, register

VARIANTS = ("baseline", "diff_v1", "diff_v2")


@dataclass
class MQARConfig:
    vocab_size: int = 512  # 0 = padding; keys, values and noise take a third of the rest each
    seq_len: int = 256
    n_pairs: int = 24
    noise: int = 3  # distractor tokens between two pairs in the noisy variant
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    steps: int = 1000
    batch_size: int = 64
    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    eval_size: int = 512

    def __post_init__(self) -> None:
        if self.vocab_size < 16 or self.n_pairs < 1 or self.noise < 0:
            raise ConfigError("mqar: vocab_size ≥ 16, n_pairs ≥ 1 and noise ≥ 0 are needed")
        if self.n_pairs > self.vocab_size // 3 - 1:
            raise ConfigError(f"mqar: n_pairs={self.n_pairs} needs more keys than vocab_size={self.vocab_size} gives")
        if (4 + self.noise) * self.n_pairs > self.seq_len:
            raise ConfigError(
                f"mqar: {self.n_pairs} pairs with noise {self.noise} need seq_len ≥ "
                f"{(4 + self.noise) * self.n_pairs}, got {self.seq_len}"
            )

    @classmethod
    def quick(cls) -> MQARConfig:
        return cls(steps=300, lrs=[1e-3, 3e-3], seeds=[0], eval_size=256)


def token_ranges(vocab_size: int) -> tuple[range, range, range]:
    third = (vocab_size - 1) // 3
    return range(1, 1 + third), range(1 + third, 1 + 2 * third), range(1 + 2 * third, vocab_size)


def generate(cfg: MQARConfig, n: int, noise: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences (n, seq_len) and their targets (next token at each value position of the query section,
    -100 elsewhere). Layout: k₁ v₁ [noise] k₂ v₂ [noise] ... then every key again, shuffled, each with its value."""
    keys, values, noise_ids = token_ranges(cfg.vocab_size)
    p = cfg.n_pairs
    k = torch.stack([torch.randperm(len(keys), generator=gen)[:p] for _ in range(n)]) + keys.start
    v = torch.randint(values.start, values.stop, (n, p), generator=gen)
    block = 2 + noise
    context = torch.empty(n, p, block, dtype=torch.long)
    context[:, :, 0], context[:, :, 1] = k, v
    if noise:
        context[:, :, 2:] = torch.randint(noise_ids.start, noise_ids.stop, (n, p, noise), generator=gen)
    order = torch.stack([torch.randperm(p, generator=gen) for _ in range(n)])
    query = torch.stack((k.gather(1, order), v.gather(1, order)), -1)  # (n, p, 2)
    body = torch.cat((context.flatten(1), query.flatten(1)), 1)
    inputs = torch.zeros(n, cfg.seq_len, dtype=torch.long)
    inputs[:, : body.shape[1]] = body
    targets = torch.full_like(inputs, -100)
    key_at = p * block + 2 * torch.arange(p)  # the query keys' positions: predict the value that follows
    targets[:, key_at] = inputs[:, key_at + 1]
    return inputs, targets


@torch.no_grad()
def accuracy(model, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 256) -> float:
    """Share of value positions whose right token has the top logit (tie-aware: a uniform model gets 1/V)."""
    total, n = 0.0, 0
    for i in range(0, len(inputs), batch):
        x, y = inputs[i : i + batch], targets[i : i + batch]
        logits = model(x).float()
        mask = y != -100
        sel, right = logits[mask], y[mask]
        best = sel.max(-1).values
        ties = (sel == best[:, None]).sum(-1)
        total += float(((sel.gather(-1, right[:, None]).squeeze(-1) == best) / ties).sum())
        n += int(mask.sum())
    return total / max(1, n)


def variant_configs(cfg: MQARConfig, names: list[str]) -> dict[str, ModelConfig]:
    """Each variant at DIFF V2's total parameters: baselines and DIFF V1 get a wider SwiGLU, as the comparison
    grid's matched variants do."""
    v2 = ModelConfig(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_heads,
        max_seq_len=cfg.seq_len,
        attention="diff_v2",
    )
    every = {
        "baseline": ffn_matched(v2.replace(attention="baseline"), v2),
        "diff_v1": ffn_matched(v2.replace(attention="diff_v1"), v2),
        "diff_v2": v2,
    }
    unknown = [n for n in names if n not in every]
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return {n: every[n] for n in names}


def train_one(model_cfg: ModelConfig, cfg: MQARConfig, noise: int, lr: float, seed: int, device: torch.device):
    """Train a fresh model on freshly drawn sequences; returns it and its last training loss."""
    torch.manual_seed(seed)
    model = Transformer(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(1_000_003 * seed + noise)
    loss = torch.zeros(())
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(
                step, lr=lr, steps=cfg.steps, warmup_steps=cfg.steps // 10, schedule="cosine", min_lr_ratio=0.1
            )
        x, y = (t.to(device) for t in generate(cfg, cfg.batch_size, noise, gen))
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval(), float(loss.detach())


def run_grid(cfg: MQARConfig, variants: list[str], device: torch.device, seed: int = 0, bar=None) -> dict[str, Any]:
    configs = variant_configs(cfg, variants)
    out: dict[str, Any] = {
        "config": cfg.__dict__,
        "params": {n: Transformer(c).num_params()["total"] for n, c in configs.items()},
        "modes": {},
    }
    for mode, noise in (("clean", 0), ("noisy", cfg.noise)):
        inputs, targets = generate(cfg, cfg.eval_size, noise, torch.Generator().manual_seed(10_007 + seed))
        runs = []
        for name, model_cfg in configs.items():
            for lr in cfg.lrs:
                for s in cfg.seeds:
                    start = time.perf_counter()
                    model, loss = train_one(model_cfg, cfg, noise, lr, seed * 1000 + s, device)
                    acc = accuracy(model, inputs.to(device), targets.to(device))
                    runs.append(
                        {
                            "variant": name,
                            "lr": lr,
                            "seed": s,
                            "accuracy": acc,
                            "train_loss": loss,
                            "seconds": time.perf_counter() - start,
                        }
                    )
                    if bar is not None:
                        bar.update()
        out["modes"][mode] = {"noise": noise, "runs": runs, "best": best_lr(runs)}
    return out


def best_lr(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: the learning rate with the highest mean accuracy over seeds, and that mean and its spread."""
    best: dict[str, Any] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        by_lr: dict[float, list[float]] = {}
        for r in runs:
            if r["variant"] == name:
                by_lr.setdefault(r["lr"], []).append(r["accuracy"])
        lr = max(by_lr, key=lambda x: np.mean(by_lr[x]))
        accs = by_lr[lr]
        best[name] = {"lr": lr, "mean": float(np.mean(accs)), "min": min(accs), "max": max(accs), "seeds": len(accs)}
    return best


def run(ctx: EvalContext) -> Result:
    cfg = ctx.options.get("mqar_config") or (MQARConfig.quick() if ctx.quick else MQARConfig())
    variants = list(ctx.options.get("variants") or VARIANTS)
    total = 2 * len(variants) * len(cfg.lrs) * len(cfg.seeds)
    with ctx.bar(total, "mqar") as bar:
        result = run_grid(cfg, variants, ctx.device, ctx.seed, bar)
    return {"task": "mqar", "device": str(ctx.device), **result}


def markdown(result: Result) -> str:
    c = result["config"]
    lines = [
        f"{c['n_pairs']} pairs, vocab {c['vocab_size']}, {c['n_layers']} layers of width {c['d_model']}, "
        f"{c['steps']} steps of {c['batch_size']} sequences; lrs {c['lrs']}, seeds {c['seeds']}; accuracy on "
        f"{c['eval_size']} held-out sequences (chance ≈ 1/{c['vocab_size']}).",
        "",
        "| task | variant | params | best lr | mean accuracy | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, m in result["modes"].items():
        for name, b in m["best"].items():
            lines.append(
                f"| {mode} (noise {m['noise']}) | {name} | {result['params'][name]:,} | {b['lr']:g} | "
                f"{b['mean']:.3f} | {b['min']:.3f} | {b['max']:.3f} |"
            )
    return "\n".join(lines)


register(
    Task(
        "mqar",
        "multi-query associative recall, clean and noisy, small models trained per variant",
        run,
        markdown,
        needs_model=False,
    )
)
