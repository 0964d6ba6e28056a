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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config import (
    MAX_CONTEXT,
    PRESETS,
    RUNTIME_FIELDS,
    ModelConfig,
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_number,
    check_seed,
    check_str,
    check_table,
    described,
    show,
)
from ..errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL = ("none", "ddp", "fsdp")
COMPILE_SCOPES = ("auto", "model", "block")
RESHARD_POLICIES = ("default", "always", "never")
MAX_STEPS = 10**9
MAX_BATCH_TOKENS = 2**31  # tokens per micro-step on a rank: beyond that, int32 indexing in kernels breaks
# integer fields: (minimum, maximum, what 0 means when 0 is allowed)
INT_FIELDS: dict[str, tuple[int, int, str]] = {
    "steps": (1, MAX_STEPS, ""),
    "batch_size": (1, 1 << 20, ""),
    "grad_accum": (1, 1 << 20, ""),
    "seq_len": (1, MAX_CONTEXT, ""),
    "tokenizer_vocab": (1, 1 << 20, ""),
    "log_every": (1, MAX_STEPS, ""),
    "diag_batch": (1, 1 << 16, ""),
    "spike_window": (1, 1 << 20, ""),
    "keep_last": (1, 1 << 20, ""),
    "max_nonfinite": (1, MAX_STEPS, ""),
    "warmup_steps": (0, MAX_STEPS, "no warmup"),
    "eval_every": (0, MAX_STEPS, "no evaluation"),
    "eval_batches": (0, MAX_STEPS, "the whole split"),
    "diag_every": (0, MAX_STEPS, "no diagnostics"),
    "diag_dense_until": (0, MAX_STEPS, "off"),
    "save_every": (0, MAX_STEPS, "only at the end"),
    "sample_tokens": (0, MAX_CONTEXT, "no sample"),
    "profile_steps": (0, MAX_STEPS, "no profile"),
    "profile_start": (0, MAX_STEPS, "at once"),
}
# float fields: (must be > 0, maximum)
NUMBER_FIELDS: dict[str, tuple[bool, float | None]] = {
    "lr": (True, 1e3),
    "grad_clip": (True, None),
    "spike_k": (True, None),
    "adam_eps": (True, 1.0),
    "dist_timeout_s": (True, 1e7),  # beyond ~4 months timedelta overflows
    "weight_decay": (False, None),
    "peak_flops": (False, None),
}
_MODEL_FIELDS = sorted(f.name for f in fields(ModelConfig))


@dataclass
class TrainConfig:
    # data: a prepared data dir (holding manifest.json), or a text source prepared once into <out_dir>/data
    data: str = described(
        "default", "prepared data dir, or a text file/folder to prepare ('default': embedded)", trajectory=True
    )
    tokenizer: str = described(
        "bpe", "preparing a text source: 'bpe', 'byte' or a tokenizer.json path", trajectory=True
    )
    tokenizer_vocab: int = described(4096, "preparing a text source: BPE vocabulary size", trajectory=True)
    val_fraction: float = described(
        0.01, "preparing a text source: share of documents held out for validation", trajectory=True
    )
    out_dir: str = described("runs/default", "run folder: config, metrics, checkpoints")
    # e.g. a model from `diffv2 convert --from-llama ... --to native`
    init_from: str = described(
        "",
        "start from a trained model (run or checkpoint dir): its architecture and "
        "tokenizer, a fresh optimizer and schedule",
        trajectory=True,
    )
    # model: a preset plus field overrides (vocab_size always follows the tokenizer)
    preset: str = described(
        "tiny", "model size preset the model fields override", choices=tuple(PRESETS), trajectory=True
    )
    model: dict[str, Any] = described(
        factory=dict,
        help="ModelConfig fields overriding the preset (a [model] table in a config file; flags in the model group)",
        trajectory=True,
    )
    # optimisation; one optimizer step sees batch_size x grad_accum sequences whatever the number of ranks
    steps: int = described(600, "optimizer steps; the lr schedule spans them", trajectory=True)
    batch_size: int = described(16, "rows per micro-step (one forward) on each rank", trajectory=True)
    grad_accum: int = described(1, "micro-steps per optimizer step, in total across ranks", trajectory=True)
    seq_len: int = described(128, "tokens per training row", trajectory=True)
    lr: float = described(3e-3, "peak AdamW learning rate", trajectory=True)
    min_lr_ratio: float = described(0.1, "final lr as a share of lr (cosine and wsd)", trajectory=True)
    warmup_steps: int = described(60, "linear lr warmup steps", trajectory=True)
    schedule: str = described("cosine", "lr decay after warmup", choices=SCHEDULES, trajectory=True)
    wsd_decay_frac: float = described(0.2, "wsd: share of steps spent decaying at the end", trajectory=True)
    weight_decay: float = described(0.1, "AdamW weight decay of matrices (vectors get none)", trajectory=True)
    beta1: float = described(0.9, "AdamW beta1", trajectory=True)
    beta2: float = described(0.95, "AdamW beta2", trajectory=True)
    adam_eps: float = described(1e-8, "AdamW epsilon", trajectory=True)
    grad_clip: float = described(1.0, "clip the global gradient norm to this", trajectory=True)
    # runtime
    device: str = described("auto", "auto = cuda when available, else cpu", choices=DEVICES)
    dtype: str = described("auto", "auto = bfloat16 autocast on cuda, float32 on cpu", choices=DTYPES, trajectory=True)
    compile: bool = described(False, "torch.compile, over compile_scope")
    # "model": no overlap of DDP's all-reduce with the backward, the least Python per step; "block": DDP's
    # buckets reduce as blocks finish, and FSDP2 needs it
    compile_scope: str = described(
        "auto",
        "what one compiled graph covers; auto = model in one process, block under ddp/fsdp",
        choices=COMPILE_SCOPES,
    )
    seed: int = described(0, "seed of the init, the batch order and the train/val split", trajectory=True)
    # "ddp" / "fsdp" (FSDP2) need torchrun (torchrun --nproc_per_node=N -m diffv2 train ...)
    parallel: str = described("none", "data parallelism under torchrun", choices=PARALLEL)
    activation_checkpointing: bool = described(False, "recompute each block's activations in the backward pass")
    # True: half the all-gather bytes (torchtitan); False: the numerics of one GPU and of ddp
    fsdp_bf16_params: bool = described(
        True, "fsdp in bf16: bf16 parameters, fp32 gradient reduction (False: fp32 parameters under autocast)"
    )
    # "always": ZeRO-3, the least memory; "default": all blocks but the last, which backward needs at once
    # (torchtitan); "never": gathered until the step's last backward (ZeRO-2: one all-gather per block per
    # optimizer step, however many micro-steps, for one unsharded copy of the bf16 parameters per GPU)
    fsdp_reshard_after_forward: str = described(
        "default", "fsdp: when a block's gathered parameters are freed after its forward", choices=RESHARD_POLICIES
    )
    dist_timeout_s: float = described(600.0, "a collective waiting this long fails the job (a rank died or hangs)")
    # evaluation, logging, diagnostics, checkpoints: they change what is recorded, not the training itself
    eval_every: int = described(100, "steps between validation evaluations, and at the end (0 = never)")
    eval_batches: int = described(8, "validation batches per evaluation (0 = every window of the split)")
    log_every: int = described(10, "steps between throughput records and plain log lines")
    diag_every: int = described(100, "steps between per-layer diagnostics (0 = never)")
    diag_dense_until: int = described(0, "> 0: diagnostics after every step up to this one")
    diag_batch: int = described(4, "validation windows the diagnostics run on")
    spike_k: float = described(3.0, "a spike: a loss or grad norm above spike_k x their running median")
    spike_window: int = described(50, "steps in the spike detector's running median")
    save_every: int = described(200, "steps between checkpoints (0 = only at the end)")
    keep_last: int = described(3, "checkpoints kept")
    max_nonfinite: int = described(5, "non-finite steps in a row (skipped) before training stops")
    tensorboard: bool = described(True, "also write TensorBoard event files (when tensorboard is installed)")
    peak_flops: float = described(0.0, "device peak FLOP/s for MFU; 0 = look up (known GPUs) or skip")
    profile_steps: int = described(0, "> 0: torch.profiler over this many steps into RUN/profile/")
    profile_start: int = described(5, "steps done before the profiler starts (compilation stays out)")
    sample_tokens: int = described(120, "tokens of the text sample printed at the end (0 = none)")
    sample_prompt: str = described("And God said", "prompt of the text sample printed at the end")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that breaks a rule: every value's type is checked
        before it is compared, numbers must be finite, and sizes and counts have generous upper bounds."""
        for name, (minimum, maximum, zero) in INT_FIELDS.items():
            check_int(name, getattr(self, name), minimum=minimum, maximum=maximum, zero=zero)
        check_seed("seed", self.seed)
        if self.batch_size * self.seq_len > MAX_BATCH_TOKENS:
            raise ConfigError(
                f"batch_size={self.batch_size} x seq_len={self.seq_len}: more than {MAX_BATCH_TOKENS} tokens per "
                "micro-step; use grad_accum for larger batches"
            )
        if self.tokenizer == "bpe" and self.tokenizer_vocab < 257:
            raise ConfigError(
                f"tokenizer_vocab={self.tokenizer_vocab}: a BPE vocabulary needs at least 257 entries (256 bytes + "
                "end-of-text)"
            )
        for name, (positive, maximum) in NUMBER_FIELDS.items():
            check_number(name, getattr(self, name), positive=positive, maximum=maximum)
        for name in ("min_lr_ratio", "wsd_decay_frac"):
            check_fraction(name, getattr(self, name))
        for name in ("val_fraction", "beta1", "beta2"):  # AdamW needs betas below 1
            check_fraction(name, getattr(self, name), below_one=True)
        for f in dataclasses.fields(self):
            if f.type in (bool, "bool"):
                check_bool(f.name, getattr(self, f.name))
        for name in ("data", "tokenizer", "out_dir"):  # '' would mean the working directory
            check_str(name, getattr(self, name), empty=False)
        for name in ("init_from", "sample_prompt"):
            check_str(name, getattr(self, name))
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)
        check_choice("parallel", self.parallel, PARALLEL)
        check_choice("compile_scope", self.compile_scope, COMPILE_SCOPES)
        check_choice("fsdp_reshard_after_forward", self.fsdp_reshard_after_forward, RESHARD_POLICIES)
        if self.parallel == "fsdp" and self.compile_scope == "model":
            raise ConfigError(
                "compile_scope='model' with parallel='fsdp': FSDP2 compiles each transformer block "
                "(its gathers sit between them); use compile_scope='block' or 'auto'"
            )
        check_choice("preset", self.preset, tuple(PRESETS))
        check_table("model", self.model)
        if unknown := sorted(set(self.model) - {f.name for f in fields(ModelConfig)} - {"preset"}):
            raise ConfigError(f"unknown model config field(s) {unknown}; valid fields: {_MODEL_FIELDS}")
        if "vocab_size" in self.model:  # it would be ignored: a silent surprise
            raise ConfigError(
                f"model.vocab_size={show(self.model['vocab_size'])}: the vocabulary follows the tokenizer; drop it "
                "(tokenizer_vocab sizes a BPE tokenizer)"
            )
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
            raise ConfigError(
                f"init_from={self.init_from!r}: the model comes from that checkpoint; drop the model "
                f"field(s) {fixed} (only {', '.join(RUNTIME_FIELDS)} may be set)"
            )
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
        """A config from a dict (a config file's contents): ``model`` is a table of ModelConfig fields, which
        may name the ``preset``; a ``null`` model means no overrides."""
        data = dict(check_table("config", data))
        model = cls.model_table(data.pop("model", None))
        if "preset" in model:
            data.setdefault("preset", model.pop("preset"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data, model=model)

    @staticmethod
    def model_table(value: Any) -> dict[str, Any]:
        """A copy of a config file's ``model`` table (None, a missing or empty table, gives {})."""
        return dict(check_table("model", value)) if value is not None else {}

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) config file into a dict of fields."""
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path}: use a .toml, .yaml/.yml or .json file")
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found (or not a regular file)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {err.start}); is it a binary file?") from None
    import yaml

    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
            data = {} if data is None else data
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"config file {path}: cannot parse YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: nested too deeply to be a config") from None
    except ValueError as err:  # TOMLDecodeError, JSONDecodeError, and integers too long to convert
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"config file {path}: cannot parse: {first[:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a table/mapping of fields")
    return check_table(f"config file {path}", data)
