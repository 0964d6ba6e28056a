"""Config validation, presets, parameter accounting and parameter matching
(docs/design.md#parameter-matching)."""

from __future__ import annotations

import pytest
import torch

from diffv2 import (
    PRESETS,
    ConfigError,
    ModelConfig,
    Transformer,
    attention_params,
    baseline_1p5h,
    baseline_ffn_matched,
)
from diffv2.attention import build_attention

# docs/design.md#parameter-matching: D=2048, h=16, d=128 → (base-h, DIFF V2, base-2h, base-1.5h) attention
# parameters per layer, from the shapes' formulas
SPEC_TABLE = {
    1: (8_912_896, 13_139_968, 17_301_504, 13_107_200),
    2: (9_437_184, 13_664_256, 17_825_792, 13_631_488),
    4: (10_485_760, 14_712_832, 18_874_368, 14_680_064),
    8: (12_582_912, 16_809_984, 20_971_520, 16_777_216),
    16: (16_777_216, 21_004_288, 25_165_824, 20_971_520),
}


def _module_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_attention(cfg, 0).parameters())


@pytest.mark.parametrize("n_kv_heads", sorted(SPEC_TABLE))
def test_attention_parameter_counts_match_spec_table(n_kv_heads):
    cfg = ModelConfig(d_model=2048, n_heads=16, n_kv_heads=n_kv_heads, head_dim=128, attention="diff_v2")
    base = cfg.replace(attention="baseline")
    base_2h = base.replace(n_heads=32)
    got = tuple(_module_params(c) for c in (base, cfg, base_2h))
    assert got == SPEC_TABLE[n_kv_heads][:3]
    assert tuple(attention_params(c) for c in (base, cfg, base_2h)) == got
    if 24 % n_kv_heads == 0:
        assert _module_params(baseline_1p5h(cfg)) == SPEC_TABLE[n_kv_heads][3]
    else:  # MHA: 24 query heads cannot share 16 KV heads; the table's figure is the formula alone
        assert 2048 * 24 * 128 * 2 + 2 * 2048 * n_kv_heads * 128 == SPEC_TABLE[n_kv_heads][3]
        with pytest.raises(ConfigError, match="n_kv_heads"):
            baseline_1p5h(cfg)
    # the blog's "~25% saved" is against the 2h-head baseline: exactly half of its W_O minus W_λ
    assert SPEC_TABLE[n_kv_heads][2] - got[1] == 16 * 128 * 2048 - 16 * 2048


def test_v1_and_ablation_param_accounting_matches_modules():
    for kw in (dict(attention="diff_v1"), dict(lambda_mode="none"), dict(pairing="split")):
        cfg = ModelConfig(d_model=256, n_heads=8, n_kv_heads=4, head_dim=32, **kw)
        assert attention_params(cfg) == _module_params(cfg)


def test_baseline_ffn_matched_equals_diff_v2_total_params():
    cfg = ModelConfig.preset("125m", vocab_size=1000)
    with torch.device("meta"):
        v2 = Transformer(cfg).num_params()["total"]
        matched_cfg = baseline_ffn_matched(cfg)
        matched = Transformer(matched_cfg).num_params()["total"]
        plain = Transformer(cfg.replace(attention="baseline")).num_params()["total"]
    assert matched_cfg.attention == "baseline" and matched_cfg.n_heads == cfg.n_heads
    assert matched_cfg.ffn_hidden > cfg.ffn_hidden
    assert abs(matched - v2) <= 3 * cfg.d_model * cfg.n_layers / 2  # rounding of the FFN width only
    assert abs(matched - v2) < (v2 - plain) / 100


def test_baseline_1p5h_equals_diff_v2_minus_lambda():
    cfg = ModelConfig(d_model=512, n_heads=8, n_kv_heads=4, head_dim=64, ffn_hidden=1024)
    b = baseline_1p5h(cfg)
    assert (b.attention, b.n_heads) == ("baseline", 12)
    assert attention_params(cfg) - attention_params(b) == cfg.n_heads * cfg.d_model
    with pytest.raises(ConfigError, match="n_kv_heads"):
        baseline_1p5h(cfg.replace(n_heads=4, n_kv_heads=4))


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("attention", ["baseline", "diff_v1", "diff_v2"])
def test_presets_build(name, attention):
    cfg = ModelConfig.preset(name, attention=attention, vocab_size=32000)
    with torch.device("meta"):
        counts = Transformer(cfg).num_params()
    assert counts["total"] == sum(counts[k] for k in ("embedding", "attention", "mlp", "norm", "lm_head"))


def test_preset_sizes_are_what_their_names_say():
    with torch.device("meta"):
        for name, lo, hi in (("125m", 100e6, 160e6), ("350m", 300e6, 420e6), ("1b", 0.9e9, 1.4e9)):
            total = Transformer(ModelConfig.preset(name, vocab_size=32000)).num_params()["total"]
            assert lo < total < hi, (name, total)


def test_flops_count_two_h_query_heads():
    base = ModelConfig.preset("tiny", attention="baseline", vocab_size=100)
    v2 = base.replace(attention="diff_v2")
    t = 256
    with torch.device("meta"):
        fb, f2 = Transformer(base).flops_per_token(t), Transformer(v2).flops_per_token(t)
        nb = Transformer(base).num_params()
    matmul = nb["attention"] + nb["mlp"] + nb["lm_head"]
    attn = 3 * 2 * t * (2 * base.n_heads * base.head_dim) * base.n_layers
    assert fb == 6 * matmul + attn
    # DIFF V2 doubles the query heads: twice the score/value work, plus its extra q and λ weights
    extra_w = base.n_layers * (base.n_heads * base.head_dim + base.n_heads) * base.d_model
    assert f2 - fb == 6 * extra_w + attn


def test_derived_fields():
    cfg = ModelConfig(d_model=512, n_heads=8)
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.ffn_hidden) == (64, 8, 1408)
    assert cfg.n_query_heads == 16 and cfg.replace(attention="baseline").n_query_heads == 8


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(n_heads=8, n_kv_heads=3), "n_kv_heads"),
        (dict(head_dim=31), "head_dim"),
        (dict(attention="diff_v3"), "attention"),
        (dict(pairing="chunk"), "pairing"),
        (dict(lambda_mode="tanh"), "lambda_mode"),
        (dict(backend="flash"), "backend"),
        (dict(recompute_pair_difference="no"), "recompute_pair_difference"),
        (dict(d_model=0), "d_model"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(n_layers=2.5), "n_layers"),
        (dict(attention="diff_v1", n_heads=6, n_kv_heads=3), "diff_v1"),
        (dict(attention="baseline", pairing="split"), "pairing"),
    ],
)
def test_bad_configs_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        ModelConfig(**{"d_model": 256, "n_heads": 8, **kwargs})
    assert isinstance(info.value, ConfigError)


def test_from_dict_rejects_unknown_fields_and_round_trips():
    cfg = ModelConfig.preset("tiny", attention="diff_v1")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="n_head"):
        ModelConfig.from_dict({"n_head": 4})
    with pytest.raises(ConfigError, match="preset"):
        ModelConfig.preset("7b")


def test_init_from_takes_the_checkpoints_architecture_and_only_runtime_fields():
    from diffv2.train.config import TrainConfig

    saved = ModelConfig.preset("tiny", attention="diff_v2")
    runtime = TrainConfig.from_dict(
        {"init_from": "runs/first", "model": {"recompute_pair_difference": False, "backend": "eager"}}
    )
    assert runtime.init_model_config(saved) == saved.replace(recompute_pair_difference=False, backend="eager")
    architecture = TrainConfig.from_dict({"init_from": "runs/first", "model": {"n_layers": 3}})
    with pytest.raises(ValueError, match=r"\['n_layers'\].*only backend, recompute_pair_difference"):
        architecture.init_model_config(saved)
