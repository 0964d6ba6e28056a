"""``DiffV2Config``: the transformers configuration of a diffv2 decoder LM (DIFF V2, DIFF V1 or baseline).

Self-contained on purpose: it imports only transformers, because ``save_pretrained`` copies this file (and
``modeling_diffv2.py``) next to the weights, so a saved folder loads with ``trust_remote_code=True`` on a
machine without the diffv2 package.

Fields use the Hugging Face names so generic tooling (caches, lm-eval, device maps) finds them; our native
``ModelConfig`` names work as aliases (``config.d_model`` is ``config.hidden_size``):

    d_model -> hidden_size          n_layers -> num_hidden_layers    n_heads -> num_attention_heads
    n_kv_heads -> num_key_value_heads  ffn_hidden -> intermediate_size  max_seq_len -> max_position_embeddings
    norm_eps -> rms_norm_eps        tie_embeddings -> tie_word_embeddings  init_std -> initializer_range
    rope_theta -> rope_parameters["rope_theta"]   backend -> attn_implementation (a runtime choice, not saved)

``num_attention_heads`` is h, the number of *output* heads (a baseline's head count); DIFF V2 runs 2h query
heads internally and DIFF V1 h/2 differential heads, exactly as in the native model.
"""

from typing import Any, ClassVar

from transformers import PretrainedConfig

ATTENTION_KINDS = ("baseline", "diff_v1", "diff_v2")
PAIRINGS = ("interleaved", "split")
LAMBDA_MODES = ("sigmoid", "none", "linear")


class DiffV2Config(PretrainedConfig):
    model_type = "diffv2"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values", "cache"]
    attribute_map: ClassVar[dict[str, str]] = {
        "d_model": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "ffn_hidden": "intermediate_size",
        "max_seq_len": "max_position_embeddings",
        "norm_eps": "rms_norm_eps",
        "tie_embeddings": "tie_word_embeddings",
        "init_std": "initializer_range",
    }

    vocab_size: int = 32768
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    rope_parameters: dict | None = None
    attention: str = "diff_v2"
    pairing: str = "interleaved"
    lambda_mode: str = "sigmoid"
    o_proj_init_scale: float = 1.0  # init only
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # Native field names given as keywords (DiffV2Config(d_model=...)) must land before sizes are derived.
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                setattr(self, name, kwargs.pop(alias))
        if "rope_theta" in kwargs and self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": float(kwargs.pop("rope_theta"))}
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:  # the Llama rule, as in ModelConfig: 8/3·D rounded up to 64
            self.intermediate_size = -(-(8 * self.hidden_size // 3) // 64) * 64
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)
        self.check()

    @property
    def rope_theta(self) -> float:  # a config.json that names no theta gets the default, as everywhere else
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        self.rope_parameters = {**(self.rope_parameters or {"rope_type": "default"}), "rope_theta": float(value)}

    @property
    def n_query_heads(self) -> int:
        """Query heads fed to the attention kernel: 2h for DIFF V2, h otherwise."""
        return 2 * self.num_attention_heads if self.attention == "diff_v2" else self.num_attention_heads

    def check(self) -> None:
        """Raise ``ValueError`` naming the first field that breaks a rule (the native ModelConfig's rules)."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        choices = {"attention": ATTENTION_KINDS, "pairing": PAIRINGS, "lambda_mode": LAMBDA_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be one of {', '.join(map(repr, allowed))}")
        rope_type = self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default"))
        if rope_type != "default" or self.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"rope_parameters={self.rope_parameters!r}: only plain RoPE (rope_type 'default') is supported"
            )
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"rope_theta={self.rope_theta!r}, rms_norm_eps={self.rms_norm_eps!r}: must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads}, num_key_value_heads={self.num_key_value_heads}: "
                "must be divisible (each KV head serves a whole group of heads)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}: must be even (RoPE rotates pairs of channels)")
        if self.attention == "diff_v1" and (self.num_attention_heads % 2 or self.num_key_value_heads % 2):
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads}, num_key_value_heads={self.num_key_value_heads}: "
                "attention='diff_v1' needs both even"
            )
        if self.attention != "diff_v2" and (self.pairing != "interleaved" or self.lambda_mode != "sigmoid"):
            raise ValueError(
                f"pairing={self.pairing!r}, lambda_mode={self.lambda_mode!r}: these ablations apply only to "
                f"attention='diff_v2' (got attention={self.attention!r})"
            )


__all__ = ["DiffV2Config"]
