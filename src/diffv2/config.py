"""Model configuration: one validated dataclass and named presets.

``n_heads`` is always h, the number of *output* heads = a baseline Transformer's head count
(docs/design.md#what-h-means). Each attention variant derives its query heads from it (2h for DIFF V2) and checks
the fields it cares about: the rules live with the variant's class in :mod:`diffv2.attention`, which registers itself in
:data:`ATTENTION_VARIANTS`.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

from .errors import ConfigError, DiffV2Error

Pairing = Literal["interleaved", "split"]
LambdaMode = Literal["sigmoid", "none", "linear", "const"]
Backend = Literal["sdpa", "eager", "triton"]

PAIRINGS = ("interleaved", "split")
LAMBDA_MODES = ("sigmoid", "none", "linear", "const")
BACKENDS = ("sdpa", "eager", "triton")
# fields that choose how the model runs, not what it is: they may differ from a checkpoint's
RUNTIME_FIELDS = ("backend", "recompute_pair_difference", "max_seq_len")
# generous bounds that catch a typo (10**9 layers) before it allocates anything
MAX_SIZE = 1 << 20  # vocabulary
MAX_WIDTH = 1 << 16  # d_model, head_dim, heads
MAX_FFN = 1 << 18
MAX_LAYERS = 4096
MAX_CONTEXT = 1 << 24
MAX_SEED = 2**63 - 1


SIZE_LIMITS = {
    "vocab_size": MAX_SIZE,
    "d_model": MAX_WIDTH,
    "n_heads": MAX_WIDTH,
    "n_kv_heads": MAX_WIDTH,
    "head_dim": MAX_WIDTH,
    "ffn_hidden": MAX_FFN,
    "max_seq_len": MAX_CONTEXT,
    "n_layers": MAX_LAYERS,
}


def described(
    default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING, **meta: Any
) -> Any:
    """A dataclass field carrying its one-line description (``help``) and e.g. its ``choices`` in its metadata:
    the command line's help text is built from it, so a field and its documentation live in one place."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, **meta})


class VariantRules(Protocol):
    """What a registered attention variant tells the config (see :mod:`diffv2.attention`)."""

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None: ...

    @classmethod
    def query_heads(cls, cfg: ModelConfig) -> int: ...


# name -> the variant's class; filled by diffv2.attention as it is imported (importing diffv2 does that)
ATTENTION_VARIANTS: dict[str, VariantRules] = {}


@dataclass
class ModelConfig:
    """Architecture of a decoder-only LM (pre-RMSNorm, SwiGLU, RoPE, GQA) with a choice of attention.

    Fields left as ``None`` are derived: ``head_dim = d_model // n_heads``, ``n_kv_heads = n_heads`` and
    ``ffn_hidden`` = 8/3·d_model rounded up to a multiple of 64 (the Llama rule).
    """

    vocab_size: int = described(32768, "tokens in the vocabulary (in training it follows the tokenizer)")
    d_model: int = described(768, "width D of the residual stream")
    n_layers: int = described(12, "transformer blocks")
    n_heads: int = described(12, "h: output heads, a baseline's head count (DIFF V2 runs 2h query heads)")
    n_kv_heads: int | None = described(None, "key/value heads h_kv (GQA); must divide n_heads; unset = n_heads")
    head_dim: int | None = described(None, "channels per head d; unset = d_model // n_heads")
    ffn_hidden: int | None = described(None, "SwiGLU hidden units; unset = 8/3·d_model rounded up to 64")
    rope_theta: float = described(10000.0, "RoPE base frequency")
    max_seq_len: int = described(2048, "longest sequence (RoPE table, generation); grows to seq_len in training")
    norm_eps: float = described(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = described(False, "share the embedding matrix with the LM head")
    attention: str = described(
        "diff_v2", "attention variant (registered in diffv2.attention)", choices=ATTENTION_VARIANTS
    )
    # DIFF V2 ablations; the defaults are the real method
    pairing: Pairing = described(
        "interleaved",
        "DIFF V2 pairs heads (2i, 2i+1); split = head i minus head i+h (blog ablation 1)",
        choices=PAIRINGS,
    )
    lambda_mode: LambdaMode = described(
        "sigmoid",
        "DIFF V2 pair weight: sigmoid = σ(λ); none = 1; linear = λ, no sigmoid; const = 0.5",
        choices=LAMBDA_MODES,
    )
    # "triton" applies where it can (CUDA, causal, interleaved pairing), else runs as sdpa
    backend: Backend = described(
        "sdpa",
        "attention kernels: sdpa = torch's fused; eager = explicit softmax; triton = fused DIFF V2 kernel",
        choices=BACKENDS,
    )
    # True keeps what a 2h-head baseline keeps; False saves one (B, T, h·d) activation per layer for the backward
    recompute_pair_difference: bool = described(
        True, "DIFF V2 training: recompute the pair difference in o_proj's backward (less memory)"
    )
    init_std: float = described(0.02, "std of the normal init of embeddings and linear layers")
    o_proj_init_scale: float = described(1.0, "o_proj's init std relative to the residual-output rule (0 = silent)")

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and is_int(self.n_heads) and self.n_heads > 0 and is_int(self.d_model):
            self.head_dim = self.d_model // self.n_heads
        if self.ffn_hidden is None and is_int(self.d_model):
            self.ffn_hidden = -(-(8 * self.d_model // 3) // 64) * 64
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ``ValueError``) naming the first field that breaks a rule."""
        for name, maximum in SIZE_LIMITS.items():
            check_positive_int(name, getattr(self, name), maximum)
        for name, maximum in (("rope_theta", 1e12), ("norm_eps", 1.0), ("init_std", 10.0)):
            check_number(name, getattr(self, name), positive=True, maximum=maximum)
        check_number("o_proj_init_scale", self.o_proj_init_scale, positive=False, maximum=1e3)
        check_bool("tie_embeddings", self.tie_embeddings)
        check_bool("recompute_pair_difference", self.recompute_pair_difference)
        check_choice("attention", self.attention, tuple(ATTENTION_VARIANTS))
        check_choice("pairing", self.pairing, PAIRINGS)
        check_choice("lambda_mode", self.lambda_mode, LAMBDA_MODES)
        check_choice("backend", self.backend, BACKENDS)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}: n_heads must be divisible by n_kv_heads "
                "(each KV head serves a whole group of heads)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim}: must be even (RoPE rotates pairs of channels)")
        self.variant.check_config(self)

    @property
    def variant(self) -> VariantRules:
        """The attention variant's class, which owns its rules (query heads, checks, init, FLOPs)."""
        return ATTENTION_VARIANTS[self.attention]

    @property
    def n_query_heads(self) -> int:
        """Query heads fed to the attention kernel: 2h for DIFF V2, h otherwise."""
        return self.variant.query_heads(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        check_table("model", data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see :data:`PRESETS`) with any field overridden."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"preset={show(name)}: unknown preset; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (True is an int to Python, never a count to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


# what a message shows of a value: short and on one line however large or nested the value is
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong, _SHOW.maxlist, _SHOW.maxdict = 2, 60, 60, 40, 4, 4


def show(value: object) -> str:
    """``repr(value)`` cut to a short single line, for error messages."""
    return _SHOW.repr(value)


def check_int(
    name: str,
    value: object,
    *,
    minimum: int = 0,
    maximum: int | None = None,
    error: type[DiffV2Error] = ConfigError,
    zero: str = "",
) -> int:
    """An int (not a bool) in [minimum, maximum]; ``zero`` says what 0 means when it is allowed."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if not is_int(value) or value < minimum:
        raise error(f"{name}={show(value)}: must be {what}" + (f" (0 = {zero})" if zero else ""))
    if maximum is not None and value > maximum:
        raise error(f"{name}={show(value)}: must be at most {maximum}")
    return value


def check_positive_int(
    name: str, value: object, maximum: int | None = None, error: type[DiffV2Error] = ConfigError
) -> int:
    return check_int(name, value, minimum=1, maximum=maximum, error=error)


def check_seed(name: str, value: object, error: type[DiffV2Error] = ConfigError) -> int:
    """A seed: an integer in [0, 2**63 - 1], what every generator here (torch, NumPy) accepts."""
    return check_int(name, value, maximum=MAX_SEED, error=error)


def check_number(
    name: str,
    value: object,
    *,
    positive: bool,
    maximum: float | None = None,
    error: type[DiffV2Error] = ConfigError,
) -> float:
    """A finite int or float; > 0 when ``positive``, else >= 0; at most ``maximum`` when given."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise error(f"{name}={show(value)}: must be a finite number")
    if value < 0 or (positive and value == 0):
        raise error(f"{name}={show(value)}: must be {'positive' if positive else 'zero or positive'}")
    if maximum is not None and value > maximum:
        raise error(f"{name}={show(value)}: must be at most {maximum:g}")
    return float(value)


def check_fraction(
    name: str, value: object, *, below_one: bool = False, error: type[DiffV2Error] = ConfigError
) -> float:
    """A finite number in [0, 1] (or [0, 1) with ``below_one``)."""
    check_number(name, value, positive=False, error=error)
    if value > 1 or (below_one and value == 1):
        raise error(f"{name}={show(value)}: must lie in [0, {'1)' if below_one else '1]'}")
    return float(value)


def check_bool(name: str, value: object, error: type[DiffV2Error] = ConfigError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{name}={show(value)}: must be true or false")
    return value


def check_choice(name: str, value: object, allowed: tuple[str, ...], error: type[DiffV2Error] = ConfigError) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise error(f"{name}={show(value)}: must be one of {', '.join(map(repr, allowed))}")
    return value


def check_str(name: str, value: object, *, empty: bool = True, error: type[DiffV2Error] = ConfigError) -> str:
    """A string (non-empty unless ``empty``) without NUL characters, which no path or text field may hold."""
    if not isinstance(value, str):
        raise error(f"{name}={show(value)}: must be a string")
    if not value and not empty:
        raise error(f"{name}='': must not be empty")
    if "\x00" in value:
        raise error(f"{name}={show(value)}: holds a NUL character")
    return value


def check_text(name: str, value: object, error: type[DiffV2Error] = ConfigError) -> str:
    """Text to tokenize: a string of valid Unicode. Python keeps bytes of a command line that are not UTF-8 as
    lone surrogates, which no tokenizer can encode."""
    check_str(name, value, error=error)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise error(f"{name}: not valid UTF-8 text (at character {err.start}); pass UTF-8 text") from None
    return value


def read_text_file(name: str, path: object, max_bytes: int = 1 << 30, error: type[DiffV2Error] = ConfigError) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes`` (a FIFO would block the read, a device such as
    /dev/zero would never end it)."""
    from pathlib import Path

    file = Path(check_str(name, path, empty=False, error=error) if isinstance(path, str) else path)
    if not file.is_file():
        why = "no such file" if not file.exists() else "not a regular file (a folder, FIFO or device)"
        raise error(f"{name} {file}: {why}; give a text file")
    if (size := file.stat().st_size) > max_bytes:
        raise error(f"{name} {file}: {size:,} bytes, more than the {max_bytes:,} read here; give a smaller file")
    try:
        return file.read_bytes().decode("utf-8")
    except OSError as err:
        raise error(f"{name} {file}: cannot read it ({err.strerror or type(err).__name__})") from None
    except UnicodeDecodeError as err:
        raise error(f"{name} {file}: not UTF-8 text (at byte {err.start}); give UTF-8 text") from None


def read_json_file(file: Any, error: type[DiffV2Error] = ConfigError) -> dict[str, Any]:
    """A JSON object from ``file``; anything else (missing, binary, not JSON, a list) is a one-line error."""
    import json
    from pathlib import Path

    file = Path(file)
    if file.exists() and not file.is_file():  # a FIFO would block the read
        raise error(f"{file}: not a regular file")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as e:
        raise error(f"{file}: unreadable ({e.strerror or type(e).__name__})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{file}: not a JSON file ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise error(f"{file}: must hold a JSON object, not a {type(data).__name__}")
    return data


def check_output_path(name: str, value: object, *, folder: bool, error: type[DiffV2Error] = ConfigError) -> Any:
    """Where a command will write a file (``folder=False``) or a folder: named, and not already the other kind,
    checked before any work so a long job does not fail at its end."""
    import os
    from pathlib import Path

    if value is None or not str(value).strip() or str(value) != os.fspath(value):
        raise error(f"{name}={show(str(value) if value is not None else value)}: give a path")
    path = Path(value)
    if str(value) in ("", ".") and not folder:
        raise error(f"{name}={show(str(value))}: give a file name")
    if folder and path.exists() and not path.is_dir():
        raise error(f"{name} {path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise error(f"{name} {path}: is a folder; give a file name")
    _check_writable(name, path, error)
    return value


def _check_writable(name: str, path: Any, error: type[DiffV2Error]) -> None:
    """A file can be created in the folder ``path`` goes in (or in its nearest existing ancestor, which the writer
    would create it under): a probe file, removed at once, so a read-only place fails before the work, not after."""
    import os
    import tempfile

    absolute = path.absolute()
    existing = next((p for p in (absolute, *absolute.parents) if p.exists()), None)
    if existing is None:
        return
    if existing != absolute and not existing.is_dir():
        raise error(f"{name} {path}: {existing} is not a folder")
    where = existing if existing.is_dir() else existing.parent
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".diffv2-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise error(f"{name} {path}: cannot write in {where} ({err.strerror or type(err).__name__})") from None


def check_table(name: str, value: object, error: type[DiffV2Error] = ConfigError) -> dict[str, Any]:
    """A table (dict) whose keys are all strings."""
    if not isinstance(value, dict):
        raise error(f"{name}={show(value)}: must be a table (mapping of fields), not a {type(value).__name__}")
    if bad := [k for k in value if not isinstance(k, str)]:
        raise error(f"{name}: field names must be strings, got {show(bad[0])}")
    return value


def check_file_name(name: str, value: object, error: type[DiffV2Error] = ConfigError) -> str:
    """A plain file name: no folder part, so the file it names stays inside the folder that lists it."""
    check_str(name, value, empty=False, error=error)
    if value in (".", "..") or "/" in value or "\\" in value:
        raise error(f"{name}={show(value)}: must be a plain file name inside its folder (no '/', '..')")
    return value


# Shapes follow common open models (GPT-2/Llama families); all use GQA so DIFF V2's pairing matters.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden=384, max_seq_len=256),
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, ffn_hidden=1408, max_seq_len=1024),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64, ffn_hidden=2048, max_seq_len=2048),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=4, head_dim=64, ffn_hidden=2816, max_seq_len=2048),
    "1b": dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=4, head_dim=128, ffn_hidden=8192, max_seq_len=4096),
}
