"""Model configuration: one validated dataclass, named presets and parameter-matching helpers.

``n_heads`` is always h, the number of *output* heads = a baseline Transformer's head count (spec §6 Q13).
DIFF V2 derives 2h query heads from it; DIFF V1 derives h/2 differential heads with 2·head_dim values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Literal

from .errors import ConfigError

Attention = Literal["baseline", "diff_v1", "diff_v2"]
Pairing = Literal["interleaved", "split"]
LambdaMode = Literal["sigmoid", "none", "linear"]
Backend = Literal["sdpa", "eager", "triton"]

ATTENTION_KINDS = ("baseline", "diff_v1", "diff_v2")
# fields that choose how the model runs, not what it is: they may differ from a checkpoint's
RUNTIME_FIELDS = ("backend", "recompute_pair_difference", "max_seq_len")
PAIRINGS = ("interleaved", "split")
LAMBDA_MODES = ("sigmoid", "none", "linear")
BACKENDS = ("sdpa", "eager", "triton")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only LM (pre-RMSNorm, SwiGLU, RoPE, GQA) with a choice of attention.

    Fields left as ``None`` are derived: ``head_dim = d_model // n_heads``, ``n_kv_heads = n_heads`` and
    ``ffn_hidden`` = 8/3·d_model rounded up to a multiple of 64 (the Llama rule).
    """

    vocab_size: int = 32768
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_hidden: int | None = None
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention: Attention = "diff_v2"
    # DIFF V2 ablations (blog ablations 1-3); the defaults are the real method.
    pairing: Pairing = "interleaved"
    lambda_mode: LambdaMode = "sigmoid"
    # "sdpa": torch's fused kernels (cuDNN/flash on GPU); "eager": explicit softmax, can return probabilities;
    # "triton": DIFF V2's fused training/prefill kernel where it applies (CUDA, causal, interleaved), else sdpa.
    backend: Backend = "sdpa"
    # DIFF V2 training: o_proj's backward recomputes the h·d pair difference from the attention output, so DIFF
    # V2 keeps what a 2h-head baseline keeps; False keeps the difference instead (more memory, fewer passes).
    recompute_pair_difference: bool = True
    init_std: float = 0.02
    # o_proj's init std relative to the residual-output rule (init only; the compare grid's small-output baseline)
    o_proj_init_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and isinstance(self.n_heads, int) and self.n_heads > 0:
            self.head_dim = self.d_model // self.n_heads
        if self.ffn_hidden is None and isinstance(self.d_model, int):
            self.ffn_hidden = -(-(8 * self.d_model // 3) // 64) * 64
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ``ValueError``) naming the first field that breaks a rule."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("max_seq_len", self.max_seq_len)
        for name in ("rope_theta", "norm_eps", "init_std", "o_proj_init_scale"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name}={value!r}: must be a positive number")
        check_choice("attention", self.attention, ATTENTION_KINDS)
        check_choice("pairing", self.pairing, PAIRINGS)
        check_choice("lambda_mode", self.lambda_mode, LAMBDA_MODES)
        check_choice("backend", self.backend, BACKENDS)
        if not isinstance(self.recompute_pair_difference, bool):
            raise ConfigError(f"recompute_pair_difference={self.recompute_pair_difference!r}: must be true or false")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}: n_heads must be divisible by n_kv_heads "
                "(each KV head serves a whole group of heads)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim}: must be even (RoPE rotates pairs of channels)")
        if self.attention == "diff_v1" and (self.n_heads % 2 or self.n_kv_heads % 2):
            raise ConfigError(
                f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}: attention='diff_v1' needs both even "
                "(V1 runs n_heads/2 differential heads on n_kv_heads/2 KV groups with 2·head_dim values)"
            )
        if self.attention != "diff_v2" and (self.pairing != "interleaved" or self.lambda_mode != "sigmoid"):
            raise ConfigError(
                f"pairing={self.pairing!r}, lambda_mode={self.lambda_mode!r}: these ablations apply only to "
                f"attention='diff_v2' (got attention={self.attention!r}); leave them at their defaults"
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_query_heads(self) -> int:
        """Query heads fed to the attention kernel: 2h for DIFF V2, h otherwise."""
        return 2 * self.n_heads if self.attention == "diff_v2" else self.n_heads

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see :data:`PRESETS`) with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r}: unknown preset; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r}: must be a positive integer")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(map(repr, allowed))}")


# Shapes follow common open models (GPT-2/Llama families); all use GQA so DIFF V2's pairing matters.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden=384, max_seq_len=256),
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, ffn_hidden=1408, max_seq_len=1024),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64, ffn_hidden=2048, max_seq_len=2048),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=4, head_dim=64, ffn_hidden=2816, max_seq_len=2048),
    "1b": dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=4, head_dim=128, ffn_hidden=8192, max_seq_len=4096),
}


# ---------------------------------------------------------------------- parameter matching (spec §6 Q1)
def attention_params(cfg: ModelConfig) -> int:
    """Weights of one attention layer, excluding norms (spec §1.9)."""
    d_model, d = cfg.d_model, cfg.head_dim
    q = cfg.n_query_heads * d * d_model
    kv = 2 * cfg.n_kv_heads * d * d_model
    o = cfg.n_heads * d * d_model
    if cfg.attention == "diff_v2":
        lam = cfg.n_heads * d_model if cfg.lambda_mode != "none" else 0
    elif cfg.attention == "diff_v1":
        lam = 4 * d + 2 * d  # four λ vectors + the shared per-head RMSNorm gain (2·head_dim)
    else:
        lam = 0
    return q + kv + o + lam


def baseline_1p5h(cfg: ModelConfig) -> ModelConfig:
    """Blog ablation 4: a baseline with 1.5h heads; equals DIFF V2's parameters minus ``lambda_proj``."""
    if (3 * cfg.n_heads) % 2:
        raise ConfigError(f"n_heads={cfg.n_heads}: must be even to build a 1.5h-head baseline")
    heads = 3 * cfg.n_heads // 2
    if heads % cfg.n_kv_heads:
        raise ConfigError(
            f"n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}: 1.5·n_heads={heads} is not divisible by "
            "n_kv_heads; pick n_kv_heads dividing 1.5·n_heads"
        )
    return cfg.replace(attention="baseline", n_heads=heads, pairing="interleaved", lambda_mode="sigmoid")


def baseline_ffn_matched(cfg: ModelConfig) -> ModelConfig:
    """A same-h baseline whose SwiGLU is widened so its total parameters match DIFF V2's.

    DIFF V2 adds h·d·D (the second query half) + h·D (``lambda_proj``) per layer; SwiGLU has 3·D weights per
    hidden unit, so the FFN grows by round((h·d + h)/3) units. The mismatch is below 3·D per layer.
    """
    v2 = cfg.replace(attention="diff_v2", pairing="interleaved", lambda_mode="sigmoid")
    base = cfg.replace(attention="baseline", pairing="interleaved", lambda_mode="sigmoid")
    extra = attention_params(v2) - attention_params(base)
    return base.replace(ffn_hidden=base.ffn_hidden + round(extra / (3 * cfg.d_model)))
