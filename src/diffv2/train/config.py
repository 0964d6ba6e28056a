"""Training configuration: one validated dataclass; the same field names in Python, config files and flags.

A config file (TOML or YAML) holds the training fields at the top level and the model under ``model``:

    steps = 2000
    lr = 1e-3
    [model]
    preset = "125m"
    attention = "diff_v2"

Flags override the file (``--steps 100``, ``--attention baseline``); model fields are flags too.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import PRESETS, RUNTIME_FIELDS, ModelConfig, check_choice, check_positive_int
from ..errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL = ("none", "ddp", "fsdp")
COMPILE_SCOPES = ("auto", "model", "block")
RESHARD_POLICIES = ("default", "always", "never")


@dataclass
class TrainConfig:
    # data: a prepared data dir (holding manifest.json) or a text source (file/dir/"default") to prepare
    data: str = "default"
    tokenizer: str = "bpe"  # for preparing a text source: "bpe", "byte" or a tokenizer.json path
    tokenizer_vocab: int = 4096
    val_fraction: float = 0.01  # for preparing a text source: share of documents held out for validation
    out_dir: str = "runs/default"
    # start from a trained or converted model (run dir or checkpoint dir; e.g. `diffv2 convert --from-llama
    # ... --to native`): its architecture and tokenizer, fresh optimizer and schedule
    init_from: str = ""
    # model: a preset plus field overrides (vocab_size always follows the tokenizer)
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)
    # optimisation; one optimizer step sees batch_size x grad_accum sequences whatever the number of ranks
    steps: int = 600
    batch_size: int = 16  # rows per micro-step (one forward) on each rank
    grad_accum: int = 1  # micro-steps per optimizer step in total across ranks; each rank runs grad_accum / world
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    schedule: str = "cosine"
    wsd_decay_frac: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # runtime
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False  # torch.compile, over compile_scope
    # "model": one graph (no overlap of DDP's all-reduce with the backward, the least Python per step);
    # "block": each transformer block (DDP's buckets reduce as blocks finish; FSDP2 needs it); "auto": model in
    # one process, block under ddp / fsdp
    compile_scope: str = "auto"
    seed: int = 0
    # parallelism: "ddp" / "fsdp" (FSDP2) need torchrun (torchrun --nproc_per_node=N -m diffv2 train ...)
    parallel: str = "none"
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    # fsdp in bf16: True = bf16 parameters and activations, fp32 gradient reduction (torchtitan; half the
    # all-gather bytes); False = fp32 parameters under bf16 autocast, the numerics of one GPU and of ddp
    fsdp_bf16_params: bool = True
    # fsdp: when a block's gathered parameters are freed after its forward. "always": every block (ZeRO-3, the
    # least memory); "default": all but the last, which backward needs at once (torchtitan); "never": they stay
    # gathered until the step's last backward (ZeRO-2: one all-gather per block per optimizer step, however many
    # micro-steps, for one unsharded copy of the bf16 parameters per GPU)
    fsdp_reshard_after_forward: str = "default"
    dist_timeout_s: float = 600.0  # a collective waiting this long fails the job (a rank died or hangs)
    # evaluation, logging, diagnostics, checkpoints
    eval_every: int = 100
    eval_batches: int = 8  # 0 = every window of the validation split
    log_every: int = 10
    diag_every: int = 100
    diag_dense_until: int = 0  # > 0: diagnostics after every step up to this one (how early differences open)
    diag_batch: int = 4  # validation windows the diagnostics run on, spread evenly over the split
    spike_k: float = 3.0
    spike_window: int = 50
    save_every: int = 200
    keep_last: int = 3
    max_nonfinite: int = 5
    tensorboard: bool = True
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 = look up (known GPUs) or skip
    profile_steps: int = 0  # > 0: torch.profiler over that many steps from profile_start, into RUN/profile/
    profile_start: int = 5  # steps done before the trace starts (compilation and warm-up stay out of it)
    sample_tokens: int = 120
    sample_prompt: str = "And God said"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "diag_batch",
                     "spike_window", "keep_last", "max_nonfinite", "tokenizer_vocab"):  # fmt: skip
            check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "diag_every", "save_every", "sample_tokens", "seed",
                     "profile_steps", "profile_start"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r}: must be an integer >= 0 (0 disables)")
        for name, zero in (("eval_batches", "the whole split"), ("diag_dense_until", "off")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r}: must be an integer >= 0 (0 = {zero})")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction!r}: must lie in [0, 1)")
        for name in ("lr", "grad_clip", "spike_k", "adam_eps", "dist_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name}={value!r}: must be a positive number")
        for name in ("weight_decay", "peak_flops"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        for name in ("min_lr_ratio", "beta1", "beta2", "wsd_decay_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must lie in [0, 1]")
        for f in dataclasses.fields(self):
            if f.type in (bool, "bool") and not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r}: must be true or false")
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)
        check_choice("parallel", self.parallel, PARALLEL)
        check_choice("compile_scope", self.compile_scope, COMPILE_SCOPES)
        check_choice("fsdp_reshard_after_forward", self.fsdp_reshard_after_forward, RESHARD_POLICIES)
        if self.parallel == "fsdp" and self.compile_scope == "model":
            raise ConfigError("compile_scope='model' with parallel='fsdp': FSDP2 compiles each transformer block "
                              "(its gathers sit between them); use compile_scope='block' or 'auto'")  # fmt: skip
        if self.preset not in PRESETS:
            raise ConfigError(f"preset={self.preset!r}: unknown preset; choose one of {sorted(PRESETS)}")
        if not isinstance(self.model, dict):
            raise ConfigError(f"model={self.model!r}: must be a table of ModelConfig fields")
        self.model_config(vocab_size=2)  # validates the model fields early

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model: preset + overrides, with the tokenizer's vocabulary and room for ``seq_len``."""
        overrides = {k: v for k, v in self.model.items() if k != "preset"}
        cfg = ModelConfig.preset(self.preset, **{**overrides, "vocab_size": vocab_size})
        if cfg.max_seq_len < self.seq_len:
            cfg = cfg.replace(max_seq_len=self.seq_len)
        return cfg

    def init_model_config(self, saved: ModelConfig) -> ModelConfig:
        """With ``init_from`` the architecture is the checkpoint's; only the fields that choose how it runs may
        change (``RUNTIME_FIELDS``), and ``max_seq_len`` grows to ``seq_len`` (RoPE extends; say so rather than
        refuse)."""
        fixed = sorted(k for k in self.model if k not in (*RUNTIME_FIELDS, "preset"))
        if fixed:
            raise ConfigError(f"init_from={self.init_from!r}: the model comes from that checkpoint; drop the model "
                              f"field(s) {fixed} (only {', '.join(RUNTIME_FIELDS)} may be set)")  # fmt: skip
        cfg = saved.replace(**{k: v for k, v in self.model.items() if k in RUNTIME_FIELDS})
        return cfg if cfg.max_seq_len >= self.seq_len else cfg.replace(max_seq_len=self.seq_len)

    def micro_steps_per_rank(self, world_size: int) -> int:
        """Micro-steps each of ``world_size`` ranks runs per optimizer step (``grad_accum`` is the total)."""
        if self.grad_accum % world_size:
            raise ConfigError(
                f"grad_accum={self.grad_accum} is not divisible by the world size {world_size}: grad_accum counts "
                f"micro-steps (of batch_size={self.batch_size} rows) per optimizer step across all ranks, and each "
                f"rank runs grad_accum / world_size of them; use a multiple of {world_size}"
            )
        return self.grad_accum // world_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        model = dict(data.pop("model", None) or {})
        if "preset" in model:
            data.setdefault("preset", model.pop("preset"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training config field(s) {unknown}; valid fields: {sorted(known)}")
        model_known = {f.name for f in fields(ModelConfig)}
        bad = sorted(set(model) - model_known)
        if bad:
            raise ConfigError(f"unknown model config field(s) {bad}; valid fields: {sorted(model_known)}")
        return cls(**data, model=model)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path}: use a .toml, .yaml/.yml or .json file")
    import yaml

    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path}: cannot parse: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a table/mapping of fields")
    return data
