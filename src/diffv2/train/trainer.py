"""The training loop: AdamW + warmup/decay, accumulation, clipping, eval, diagnostics, checkpoints, exact resume.

Single-process or data-parallel (DDP / FSDP2 under torchrun, see :mod:`.distributed`): the loss trajectory does
not depend on the number of ranks, because every optimizer step sees the same ``batch_size x grad_accum``
sequences (each rank runs grad_accum / world_size micro-steps on its own slice of one global stream). Loss, grad
norm and the skip decision are reduced across ranks, so all ranks take the same path; rank 0 logs and writes.
"""

from __future__ import annotations

import gc
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpoint import gather_weights, latest_checkpoint, save_checkpoint
from ..config import check_int
from ..data import EvalBatches, split_documents, spread_windows
from ..diagnostics import diagnose
from ..generate import generate
from ..model import Transformer
from .config import MAX_STEPS, TrainConfig
from .console import StopRequests, log_line, stop_message
from .distributed import clip_grad_norm_
from .evaluation import autocast, evaluate, summarize_diagnostics
from .monitor import MetricsLogger, SpikeDetector, StepProfiler, last_results
from .schedule import lr_at
from .setup import Run, TrainingError, check_stop_after, read_summary, setup, write_json

VAL_SPLIT_FILE = "val_split.json"  # how the validation split was halved and how much of it each eval scores

__all__ = ["PEAK_FLOPS", "VAL_SPLIT_FILE", "Trainer", "TrainingError", "evaluate", "sample_text", "setup", "train"]

# dense bf16 peak FLOP/s by device name, for MFU (vendor datasheets)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None


class Trainer:
    """Drives one run: ``Trainer(cfg).fit()``. Each step: accumulate, clip, skip if non-finite, update, log;
    every N steps: diagnostics, evaluation, checkpoint. Under torch.distributed every rank runs it."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        progress: bool = True,
        quiet: bool = False,
        stop_after: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.run, state = setup(cfg, resume=resume, progress=progress, stop_after=stop_after)
        self.env = self.run.env
        self.progress = progress and self.env.is_main  # a progress bar; without it, plain log lines (rank 0)
        self.console = self.env.is_main and not quiet  # quiet: neither (a caller running many runs)
        self.stops = StopRequests()
        self.stop_signal = 0  # set when any rank was asked to stop (SIGINT / SIGTERM)
        self.logger = None
        if self.env.is_main:
            self.logger = MetricsLogger(self.run.run_dir, tensorboard=cfg.tensorboard, fresh=not resume)
        self.step = state["step"]
        self.loss: float | None = None
        self.eval_result: dict[str, Any] = {}
        if resume and self.logger is not None:  # a summary after no further step reports the records' results
            self.loss, self.eval_result = last_results(self.logger.truncate_after(self.step))
        self.val_loss: float | None = self.eval_result.get("val_loss")
        self.loss_spikes = SpikeDetector(cfg.spike_k, cfg.spike_window)
        self.grad_spikes = SpikeDetector(cfg.spike_k, cfg.spike_window)
        if "loss_spikes" in state:
            self.loss_spikes.load_state_dict(state["loss_spikes"])
            self.grad_spikes.load_state_dict(state["grad_spikes"])
        self.nonfinite, self.in_a_row = state.get("nonfinite", 0), 0
        self.evals = EvalBatches(
            self.run.data_dir,
            "val",
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            max_batches=cfg.eval_batches or None,
            whole=cfg.eval_batches == 0,
            rank=self.env.rank,
            world_size=self.env.world_size,
            vocab_size=self.run.model_cfg.vocab_size,
        )
        self.val_documents = split_documents(self.run.data_dir, "val")
        if self.env.is_main and self.val_documents is not None:
            scored = {
                "eval_batches": cfg.eval_batches,
                "scored_windows": self.evals.n_windows,
                "scored_target_tokens": self.evals.n_windows * cfg.seq_len,
            }
            write_json(self.run.run_dir / VAL_SPLIT_FILE, {**self.val_documents.describe(), **scored})
        # the same diagnostic windows on every rank and for every world size, spread over the whole split
        self.diag_tokens = spread_windows(self.run.data_dir, "val", cfg.seq_len, cfg.diag_batch).to(self.run.device)
        self.params = list(self.run.model.parameters())
        self.flops_per_token = self.run.model.flops_per_token(cfg.seq_len)
        self.peak = peak_flops(cfg, self.run.device)
        self.diag_time = self.train_time = self.window_time = 0.0
        self.window_tokens = 0

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``cfg.steps`` (or stop after ``stop_after``, with a checkpoint); returns a summary.

        SIGINT or SIGTERM stops it after the current step, with a checkpoint of that step and a line saying how
        to resume; the summary's ``signal`` is then the signal's number."""
        try:
            with self.stops:
                return self._fit(stop_after)
        except RuntimeError as err:  # a peer that died or hung surfaces here as a failed collective
            if (message := self.env.failure_message(err)) is None:
                raise
            raise TrainingError(message) from err

    def _fit(self, stop_after: int | None) -> dict[str, Any]:
        cfg, run = self.cfg, self.run
        check_stop_after(stop_after, self.step)
        if self.step >= cfg.steps and (finished := read_summary(run.run_dir)) is not None:
            if self.logger is not None:
                self.logger.close()
            if self.console:
                print(f"{run.run_dir}: finished at step {self.step} already; its summary.json stands")
            return finished
        end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
        run.model.train()
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not self.progress, desc=run.run_dir.name, dynamic_ncols=True
        )
        profiler = StepProfiler(run.run_dir / "profile", self.env.rank, cfg.profile_start, cfg.profile_steps)
        started, first = time.perf_counter(), self.step
        while self.step < end:
            profiler.before(self.step)
            record = self.train_step()
            profiler.after(self.step)
            done = self.step
            if done % cfg.log_every == 0 or done == end:
                record.update(self.throughput())
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
                )
                if self.console and not self.progress:
                    eta = (time.perf_counter() - started) / (done - first) * (end - done)
                    print(log_line(done, cfg.steps, record, self.val_loss, eta), flush=True)
            self.log("train", done, **record)
            if (cfg.diag_every and (done % cfg.diag_every == 0 or done == 1)) or done <= cfg.diag_dense_until:
                self.diagnose()
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                self.eval_result = evaluate(run, self.evals, self.val_documents)
                self.val_loss = self.eval_result["val_loss"]
                self.log("eval", done, **self.eval_result, val_ppl=math.exp(min(self.val_loss, 50)))
                if self.console:  # above the bar, or a plain line
                    bar.write(f"step {done}: train loss {record['loss']:.4f}  val loss {self.val_loss:.4f}")
                    sys.stdout.flush()
            saved = (cfg.save_every and done % cfg.save_every == 0) or done == end
            if saved:
                self.save()
            bar.update(1)
            if self.stop_signal and done < cfg.steps:  # on the last step, the run is done: nothing to resume
                checkpoint = latest_checkpoint(run.run_dir) if saved else self.save()
                bar.close()
                if self.env.is_main:
                    line = stop_message(self.stop_signal, done, checkpoint, run.run_dir, self.env.world_size)
                    print(line, file=sys.stderr, flush=True)
                break
        bar.close()
        profiler.close()
        summary: dict[str, Any] = {
            "step": self.step,
            "finished": self.step >= cfg.steps,
            "train_loss": self.loss,
            "val_loss": self.val_loss,
            # the select/test halves, when the data records documents (a bare folder of shards does not)
            **{k: v for k, v in self.eval_result.items() if k in ("val_loss_select", "val_loss_test")},
            "loss_spikes": self.loss_spikes.count,
            "grad_spikes": self.grad_spikes.count,
            "nonfinite": self.nonfinite,
            "checkpoint": str(latest_checkpoint(run.run_dir)),
            "diag_overhead": self.diag_time / self.train_time if self.train_time else None,
            "world_size": self.env.world_size,
        }
        if self.stop_signal:
            summary["signal"] = self.stop_signal
        if summary["finished"] and cfg.sample_tokens:
            model = self.inference_model()
            if model is not None:
                summary["sample"] = sample_text(run, model, cfg.sample_prompt, cfg.sample_tokens)
        if self.logger is not None:
            self.logger.close()
            if summary["finished"]:
                write_json(run.run_dir / "summary.json", summary)
        return summary

    def train_step(self) -> dict[str, Any]:
        cfg, run = self.cfg, self.run
        t0 = time.perf_counter()
        lr = lr_at(
            self.step,
            lr=cfg.lr,
            steps=cfg.steps,
            warmup_steps=cfg.warmup_steps,
            schedule=cfg.schedule,
            min_lr_ratio=cfg.min_lr_ratio,
            wsd_decay_frac=cfg.wsd_decay_frac,
        )
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=run.device)
        for i in range(run.micro_steps):
            x, y = (t.to(run.device, non_blocking=True) for t in next(run.loader))
            with run.par.grad_sync(i == run.micro_steps - 1):  # reduce gradients once, on the last micro-step
                with autocast(run):
                    _, loss = run.par.train_fn(x, y)
                (loss / run.micro_steps).backward()  # ranks average their gradients: the mean over grad_accum
            loss_sum += loss.detach()
        grad_norm = clip_grad_norm_(self.params, cfg.grad_clip).item()  # syncs; the same on every rank
        # A stop request travels with the loss (no collective of its own), so every rank stops after one step.
        asked = torch.tensor(float(self.stops.signum), device=run.device)
        loss_total, stop = run.env.all_reduce(torch.stack([loss_sum, asked])).tolist()
        loss_value = loss_total / cfg.grad_accum
        if stop:
            self.stop_signal = self.stops.signum or int(signal.SIGTERM)  # a peer's request: SIGTERM's status
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)  # so every rank skips or steps alike
        if finite:
            run.optimizer.step()
            self.in_a_row = 0
        else:  # skip the update, count it, give up after max_nonfinite in a row
            self.nonfinite, self.in_a_row = self.nonfinite + 1, self.in_a_row + 1
            if self.in_a_row >= cfg.max_nonfinite:
                raise TrainingError(
                    f"{self.in_a_row} non-finite steps in a row (step {self.step}, loss "
                    f"{loss_value}, grad norm {grad_norm}); lower --lr or check the data"
                )
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
        self.window_tokens += cfg.batch_size * cfg.seq_len * cfg.grad_accum  # all ranks together
        return record

    def throughput(self) -> dict[str, Any]:
        """Speed since the last call (all ranks' tokens, and per device), plus running counters."""
        per_second = self.window_tokens / self.window_time
        out: dict[str, Any] = {"tokens_per_s": per_second, "tokens_per_s_per_device": per_second / self.env.world_size}
        if self.peak:
            out["mfu"] = out["tokens_per_s_per_device"] * self.flops_per_token / self.peak
        if self.run.device.type == "cuda":  # the largest of any rank
            peak = torch.tensor(float(torch.cuda.max_memory_allocated(self.run.device)), device=self.run.device)
            out["peak_mem_gb"] = self.env.all_reduce(peak, op="max").item() / 2**30
        out.update(loss_spikes=self.loss_spikes.count, grad_spikes=self.grad_spikes.count, nonfinite=self.nonfinite)
        self.window_tokens, self.window_time = 0, 0.0
        return out

    def diagnose(self) -> None:
        t0 = time.perf_counter()
        model = self.run.model
        model.eval()
        # Every rank takes part (a sharded forward needs them all). Eagerly: compiled blocks (fsdp + compile)
        # would break their graphs at each recorded statistic.
        with torch.compiler.set_stance("force_eager"):
            stats = summarize_diagnostics(diagnose(model, self.diag_tokens))
        model.train()
        self.diag_time += time.perf_counter() - t0
        self.log("diag", self.step, **stats, overhead=self.diag_time / self.train_time)

    def log(self, kind: str, step: int, **values: Any) -> None:
        if self.logger is not None:
            self.logger.log(kind, step, **values)

    def save(self) -> Path:
        """A checkpoint of this step (every rank takes part; rank 0 writes, the others wait until it has)."""
        run = self.run
        state = {
            "step": self.step,
            "loader": run.loader.state_dict(),
            "loader_origin": run.loader_origin,
            "loss_spikes": self.loss_spikes.state_dict(),
            "grad_spikes": self.grad_spikes.state_dict(),
            "nonfinite": self.nonfinite,
            "tokenizer_sha256": run.tokenizer.sha256(),
            "world_size": self.env.world_size,
        }
        path = save_checkpoint(
            run.run_dir,
            self.step,
            model=run.model,
            optimizer=run.optimizer,
            state=state,
            config={"train": self.cfg.to_dict(), "model": run.model_cfg.to_dict()},
            tokenizer_json=run.tokenizer.to_json_str(),
            keep_last=self.cfg.keep_last,
        )
        self.env.barrier()
        return path

    def inference_model(self) -> torch.nn.Module | None:
        """An unsharded model for generation on rank 0 (None elsewhere); under FSDP all ranks gather it."""
        run = self.run
        if run.cfg.parallel != "fsdp":
            return run.model if self.env.is_main else None
        weights = gather_weights(run.model)
        if not self.env.is_main:
            return None
        model = Transformer(run.model_cfg).to(run.device)
        model.load_state_dict(weights)
        return model


def train(
    cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None, progress: bool = True, quiet: bool = False
) -> dict[str, Any]:
    """Train (or resume) a run; returns a summary. ``stop_after`` stops (with a checkpoint) after that step.
    ``progress``: a progress bar, else a plain log line every ``log_every`` steps; ``quiet``: neither.

    Under torchrun (``parallel`` "ddp"/"fsdp") every rank calls this; the process group it creates is
    destroyed when training ends.
    """
    if stop_after is not None:  # before setup: a bad value must not cost a data check or a model build
        check_int("stop_after", stop_after, minimum=1, maximum=MAX_STEPS)
    trainer = Trainer(cfg, resume=resume, progress=progress, quiet=quiet, stop_after=stop_after)
    summary = trainer.fit(stop_after)
    env = trainer.env
    # DDP's reducer holds a reference to the process group: freed after the group is destroyed, on a rank whose
    # peers have already left, its gloo destructor could wait forever (seen on the CPU under load). So every rank
    # frees the model while all are still there, then the group goes.
    env.barrier()
    del trainer
    gc.collect()
    env.barrier()
    env.close()
    return summary


def sample_text(run: Run, model: torch.nn.Module, prompt: str, n_tokens: int, seed: int = 0) -> str:
    """A short sample from the trained model (temperature 0.8, top-k 50) to eyeball what it learned."""
    model.eval()
    # an empty prompt starts after an end-of-text token, as a document does; a long one keeps its end, so that
    # at least one new token fits in the context
    encoded = run.tokenizer.encode(prompt)
    ids = (encoded or [run.tokenizer.eot_id])[-(run.model_cfg.max_seq_len - 1) :]
    n_tokens = min(n_tokens, run.model_cfg.max_seq_len - len(ids))
    out = list(generate(model, ids, n_tokens, temperature=0.8, top_k=50, eos_id=run.tokenizer.eot_id, seed=seed))
    shown = prompt if ids == encoded or not encoded else run.tokenizer.decode(ids)
    return shown + run.tokenizer.decode([t for t in out if t != run.tokenizer.eot_id])
