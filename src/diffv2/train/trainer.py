"""The training loop: AdamW + warmup/decay, accumulation, clipping, eval, diagnostics, checkpoints, exact resume."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..data import EvalBatches, Tokenizer, TokenLoader, load_manifest, prepare_dataset
from ..errors import CheckpointError, DiffV2Error
from ..generate import generate
from ..model import Transformer
from .checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint_meta, save_checkpoint
from .config import TrainConfig
from .monitor import MetricsLogger, SpikeDetector, environment
from .schedule import lr_at

# dense bf16 peak FLOP/s by device name, for MFU (vendor datasheets)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


class TrainingError(DiffV2Error):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


@dataclass
class Run:
    """Everything one training run holds; built by :func:`setup`, driven by :func:`train`."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    run_dir: Path
    data_dir: Path
    tokenizer: Tokenizer
    model: Transformer
    step_fn: Any  # the (optionally compiled) model used for training steps
    optimizer: torch.optim.Optimizer
    loader: TokenLoader
    device: torch.device
    autocast_dtype: torch.dtype | None


def resolve_data(cfg: TrainConfig, run_dir: Path, progress: bool) -> Path:
    """A prepared data dir as given, or the text source prepared (once) into ``<out_dir>/data``."""
    given = Path(cfg.data)
    if (given / "manifest.json").is_file():
        return given
    data_dir = run_dir / "data"
    if not (data_dir / "manifest.json").is_file():
        print(f"preparing {cfg.data!r} with a {cfg.tokenizer} tokenizer into {data_dir} ...")
        prepare_dataset(cfg.data, data_dir, tokenizer=cfg.tokenizer, vocab_size=cfg.tokenizer_vocab,
                        seed=cfg.seed, progress=progress)  # fmt: skip
    return data_dir


def setup(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> tuple[Run, dict[str, Any]]:
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise CheckpointError(
            f"{run_dir}: holds checkpoints already (latest {existing.name}); pass --resume to continue that run "
            "or choose another --out_dir"
        )
    if resume and existing is None:
        raise CheckpointError(f"{run_dir}: --resume given but there is no checkpoint to resume from")
    data_dir = resolve_data(cfg, run_dir, progress)
    manifest = load_manifest(data_dir)
    tokenizer = Tokenizer.from_file(data_dir / "tokenizer.json")
    model_cfg = cfg.model_config(tokenizer.vocab_size)

    device = torch.device(
        "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device='cuda' but no CUDA device is available; use --device cpu")
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=device.type == "cuda",
    )  # fmt: skip
    loader = TokenLoader(data_dir, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    run = Run(cfg, model_cfg, run_dir, data_dir, tokenizer, model, torch.compile(model) if cfg.compile else model,
              optimizer, loader, device, torch.bfloat16 if use_bf16 else None)  # fmt: skip
    state: dict[str, Any] = {"step": 0}
    if resume:
        state = _resume(run, existing)
    _write_json(run_dir / "config.json", {"train": cfg.to_dict(), "model": model_cfg.to_dict(),
                                          "data": {"dir": str(data_dir), "manifest": manifest}})  # fmt: skip
    _write_json(run_dir / "environment.json", environment())
    return run, state


def _resume(run: Run, ckpt: Path) -> dict[str, Any]:
    saved_state, saved_cfg = read_checkpoint_meta(ckpt)
    saved_model = saved_cfg.get("model", {})
    if saved_model != run.model_cfg.to_dict():
        diff = sorted(k for k in set(saved_model) | set(run.model_cfg.to_dict())
                      if saved_model.get(k) != run.model_cfg.to_dict().get(k))  # fmt: skip
        raise CheckpointError(f"{ckpt}: model config differs from this run's in {diff}; resume with the same model")
    if saved_state.get("tokenizer_sha256") != run.tokenizer.sha256():
        raise CheckpointError(f"{ckpt}: was trained with another tokenizer than {run.data_dir / 'tokenizer.json'}")
    for name in ("batch_size", "seq_len", "seed"):
        if saved_cfg["train"].get(name) != getattr(run.cfg, name):
            raise CheckpointError(f"{ckpt}: {name}={saved_cfg['train'].get(name)} there but "
                                  f"{getattr(run.cfg, name)} now; an exact resume needs the same value")  # fmt: skip
    state = load_checkpoint(ckpt, model=run.model, optimizer=run.optimizer, map_location=run.device)
    run.loader.load_state_dict(state["loader"])
    return state


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _autocast(run: Run):
    return torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None)


@torch.no_grad()
def evaluate(run: Run, batches: EvalBatches) -> float:
    run.model.eval()
    losses = []
    for x, y in batches:
        with _autocast(run):
            losses.append(run.step_fn(x.to(run.device), y.to(run.device))[1].item())
    run.model.train()
    return sum(losses) / len(losses)


def summarize_diagnostics(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer lists of the diagnostics recorded by ``Transformer.diagnose``."""
    out: dict[str, Any] = {}
    for key in ("hidden_max", "max_logit", "lambda_mean", "lambda_std"):
        if all(key in s for s in stats):
            out[key] = [s[key] for s in stats]
    out["hidden_topk"] = [s["hidden_topk"] for s in stats]
    out["context_rms"] = [sum(s["context_rms"]) / len(s["context_rms"]) for s in stats]
    out["context_rms_per_head"] = [s["context_rms"] for s in stats]
    out["sink_mass"] = [sum(s["sink_mass"]) / len(s["sink_mass"]) for s in stats]
    return out


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None


class Trainer:
    """Drives one run: ``Trainer(cfg).fit()``. Each step: accumulate, clip, skip if non-finite, update, log;
    every N steps: diagnostics, evaluation, checkpoint."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.run, state = setup(cfg, resume=resume, progress=progress)
        self.logger = MetricsLogger(self.run.run_dir, tensorboard=cfg.tensorboard)
        self.step = state["step"]
        if resume:
            self.logger.truncate_after(self.step)
        self.loss_spikes = SpikeDetector(cfg.spike_k, cfg.spike_window)
        self.grad_spikes = SpikeDetector(cfg.spike_k, cfg.spike_window)
        if "loss_spikes" in state:
            self.loss_spikes.load_state_dict(state["loss_spikes"])
            self.grad_spikes.load_state_dict(state["grad_spikes"])
        self.nonfinite, self.in_a_row = state.get("nonfinite", 0), 0
        self.evals = EvalBatches(self.run.data_dir, "val", batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                 max_batches=cfg.eval_batches)  # fmt: skip
        self.diag_tokens = next(iter(self.evals))[0][: cfg.diag_batch].to(self.run.device)
        self.flops_per_token = self.run.model.flops_per_token(cfg.seq_len)
        self.peak = peak_flops(cfg, self.run.device)
        self.diag_time = self.train_time = self.window_time = 0.0
        self.window_tokens = 0
        self.loss: float | None = None
        self.val_loss: float | None = None

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``cfg.steps`` (or stop after ``stop_after``, with a checkpoint); returns a summary."""
        cfg, run = self.cfg, self.run
        end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
        run.model.train()
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc=run.run_dir.name,
                   dynamic_ncols=True)  # fmt: skip
        while self.step < end:
            record = self.train_step()
            done = self.step
            if done % cfg.log_every == 0 or done == end:
                record.update(self.throughput())
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")  # fmt: skip
            self.logger.log("train", done, **record)
            if cfg.diag_every and (done % cfg.diag_every == 0 or done == 1):
                self.diagnose()
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                self.val_loss = evaluate(run, self.evals)
                self.logger.log("eval", done, val_loss=self.val_loss, val_ppl=math.exp(min(self.val_loss, 50)))
                bar.write(f"step {done}: train loss {record['loss']:.4f}  val loss {self.val_loss:.4f}")
            if (cfg.save_every and done % cfg.save_every == 0) or done == end:
                self.save()
            bar.update(1)
        bar.close()
        summary: dict[str, Any] = {
            "step": self.step,
            "finished": self.step >= cfg.steps,
            "train_loss": self.loss,
            "val_loss": self.val_loss,
            "loss_spikes": self.loss_spikes.count,
            "grad_spikes": self.grad_spikes.count,
            "nonfinite": self.nonfinite,
            "checkpoint": str(latest_checkpoint(run.run_dir)),
            "diag_overhead": self.diag_time / max(1e-9, self.train_time),
        }
        if summary["finished"] and cfg.sample_tokens:
            summary["sample"] = sample_text(run, cfg.sample_prompt, cfg.sample_tokens)
        self.logger.close()
        if summary["finished"]:
            _write_json(run.run_dir / "summary.json", summary)
        return summary

    def train_step(self) -> dict[str, Any]:
        cfg, run = self.cfg, self.run
        t0 = time.perf_counter()
        lr = lr_at(self.step, lr=cfg.lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                   min_lr_ratio=cfg.min_lr_ratio, wsd_decay_frac=cfg.wsd_decay_frac)  # fmt: skip
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=run.device)
        for _ in range(cfg.grad_accum):
            x, y = (t.to(run.device, non_blocking=True) for t in next(run.loader))
            with _autocast(run):
                _, loss = run.step_fn(x, y)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip).item()  # syncs
        loss_value = loss_sum.item() / cfg.grad_accum
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            run.optimizer.step()
            self.in_a_row = 0
        else:  # skip the update, count it, give up after max_nonfinite in a row
            self.nonfinite, self.in_a_row = self.nonfinite + 1, self.in_a_row + 1
            if self.in_a_row >= cfg.max_nonfinite:
                raise TrainingError(f"{self.in_a_row} non-finite steps in a row (step {self.step}, loss "
                                    f"{loss_value}, grad norm {grad_norm}); lower --lr or check the data")  # fmt: skip
        run.optimizer.zero_grad(set_to_none=True)
        record: dict[str, Any] = {"loss": loss_value, "grad_norm": grad_norm, "lr": lr, "skipped": not finite}
        if finite:
            self.loss = loss_value
            record["loss_spike"] = self.loss_spikes.update(loss_value)
            record["grad_spike"] = self.grad_spikes.update(grad_norm)
        self.step += 1
        step_time = time.perf_counter() - t0  # training work only: eval/diagnostics/saves excluded
        self.window_time += step_time
        self.train_time += step_time
        self.window_tokens += cfg.batch_size * cfg.seq_len * cfg.grad_accum
        return record

    def throughput(self) -> dict[str, Any]:
        """Speed since the last call, plus running counters."""
        out: dict[str, Any] = {"tokens_per_s": self.window_tokens / self.window_time}
        if self.peak:
            out["mfu"] = out["tokens_per_s"] * self.flops_per_token / self.peak
        if self.run.device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.run.device) / 2**30
        out.update(loss_spikes=self.loss_spikes.count, grad_spikes=self.grad_spikes.count, nonfinite=self.nonfinite)
        self.window_tokens, self.window_time = 0, 0.0
        return out

    def diagnose(self) -> None:
        t0 = time.perf_counter()
        model = self.run.model
        model.eval()
        stats = summarize_diagnostics(model.diagnose(self.diag_tokens))
        model.train()
        self.diag_time += time.perf_counter() - t0
        self.logger.log("diag", self.step, **stats, overhead=self.diag_time / self.train_time)

    def save(self) -> Path:
        run = self.run
        state = {
            "step": self.step,
            "loader": run.loader.state_dict(),
            "loss_spikes": self.loss_spikes.state_dict(),
            "grad_spikes": self.grad_spikes.state_dict(),
            "nonfinite": self.nonfinite,
            "tokenizer_sha256": run.tokenizer.sha256(),
        }
        return save_checkpoint(run.run_dir, self.step, model=run.model, optimizer=run.optimizer, state=state,
                               config={"train": self.cfg.to_dict(), "model": run.model_cfg.to_dict()},
                               tokenizer_json=run.tokenizer.to_json_str(), keep_last=self.cfg.keep_last)  # fmt: skip


def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train (or resume) a run; returns a summary. ``stop_after`` stops (with a checkpoint) after that step."""
    return Trainer(cfg, resume=resume, progress=progress).fit(stop_after)


def sample_text(run: Run, prompt: str, n_tokens: int, seed: int = 0) -> str:
    """A short sample from the trained model (temperature 0.8, top-k 50) to eyeball what it learned."""
    run.model.eval()
    ids = run.tokenizer.encode(prompt)
    n_tokens = min(n_tokens, run.model_cfg.max_seq_len - len(ids))
    out = list(generate(run.model, ids, n_tokens, temperature=0.8, top_k=50, eos_id=run.tokenizer.eot_id, seed=seed))
    return prompt + run.tokenizer.decode([t for t in out if t != run.tokenizer.eot_id])
