"""Diagnostic metrics on constructed tensors, and the paired statistics with Holm's correction."""

from __future__ import annotations

import math
import random

import pytest
import torch

from diffv2 import metrics as m
from diffv2.compare.stats import holm, paired, sign_test, t_ppf, t_sf


def causal_softmax(logits: torch.Tensor) -> torch.Tensor:
    t = logits.shape[-1]
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    return logits.masked_fill(future, float("-inf")).softmax(-1)


def random_maps(b: int = 2, h: int = 3, t: int = 9) -> torch.Tensor:
    return causal_softmax(torch.randn(b, h, t, t))


# ---------------------------------------------------------------------- sinks
def test_a_uniform_map_gives_the_uniform_reference():
    t = random.randint(3, 40)
    probs = causal_softmax(torch.zeros(2, 4, t, t))
    assert torch.allclose(m.key0_mass(probs), torch.full((4,), m.uniform_key0_reference(t), dtype=torch.float64))
    assert m.uniform_key0_reference(2) == 0.5 and m.uniform_key0_reference(3) == pytest.approx((1 / 2 + 1 / 3) / 2)
    with pytest.raises(ValueError):
        m.key0_mass(torch.rand(2, 4, 5, 6))


def test_a_sink_head_is_flagged():
    logits = torch.randn(3, 4, 32, 32)
    sink = random.randrange(4)
    logits[:, sink, :, 0] += 8.0  # this head dumps its attention on key 0
    out = m.attention_layer_metrics(causal_softmax(logits))
    assert out[m.KEY0_A1][sink] > 0.9 and max(v for i, v in enumerate(out[m.KEY0_A1]) if i != sink) < 0.3
    assert out[m.SINK_SHARE] == 0.25 and out[m.KEY0_EFFECTIVE] == out[m.KEY0_A1]
    assert out[m.KEY0_UNIFORM] == pytest.approx(m.uniform_key0_reference(32))


def test_the_effective_diff_map_renormalised_sums_to_one():
    a1, a2 = random_maps(), random_maps()
    w = torch.rand(2, 3, 9) * 0.6 + 0.2  # σ(λ) per query
    norm = m.normalized_difference(a1, a2, w)
    assert torch.allclose(norm.sum(-1), torch.ones(2, 3, 9, dtype=torch.float64))
    assert torch.allclose(m.normalized_difference(a1, a1, w), a1.double())  # a map minus a scaled copy of itself
    lam = torch.tensor(0.3)  # DIFF V1: one λ per layer
    assert torch.allclose(m.normalized_difference(a1, a2, lam), (a1 - 0.3 * a2).double() / 0.7)
    out = m.attention_layer_metrics(a1, a2, w)
    assert out[m.KEY0_EFFECTIVE] == pytest.approx(m.key0_mass(norm).tolist())
    assert out[m.KEY0_A2] == pytest.approx(m.key0_mass(a2).tolist())
    # the raw effective map sums to 1 − σ: its key-0 mass shrinks by construction, which the renormalised one undoes
    raw = (a1 - w[..., None] * a2).double()
    assert torch.allclose(raw.sum(-1), 1 - w.double())


def test_sink_share_counts_every_softmax_map_of_a_diff_pair():
    logits1, logits2 = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    logits2[:, 1, :, 0] += 9.0  # a sink in the second map of pair 1 only
    out = m.attention_layer_metrics(causal_softmax(logits1), causal_softmax(logits2), torch.full((2, 4, 16), 0.5))
    assert out[m.SINK_SHARE] == 1 / 8
    with pytest.raises(ValueError, match="weight"):
        m.attention_layer_metrics(causal_softmax(logits1), causal_softmax(logits2))


# ---------------------------------------------------------------------- outliers and logits
def test_outlier_scores_are_scale_free():
    h = torch.randn(2, 16, 64)
    h[0, 3, 7] = 40.0
    scale = random.uniform(0.01, 100.0)
    for fn in (m.outlier_ratio, m.kurtosis):
        assert fn(h * scale) == pytest.approx(fn(h), rel=1e-6)  # up to float32 rounding of the scaled copy
    assert m.outlier_ratio(h) > 20 and m.kurtosis(h) > 50
    gaussian = torch.randn(8, 256, 64)
    assert m.kurtosis(gaussian) == pytest.approx(3.0, abs=0.15)
    assert m.outlier_ratio(gaussian) < 6.5
    out = m.hidden_metrics(h)
    assert set(out) == {m.HIDDEN_OUTLIER_RATIO, m.HIDDEN_KURTOSIS}


def test_logit_summary_ignores_masked_entries():
    logits = torch.randn(2, 3, 8, 8)
    masked = logits.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    top, median = m.logit_summary(masked)
    valid = logits[:, :, torch.ones(8, 8, dtype=torch.bool).tril()]
    assert top == pytest.approx(valid.max().item()) and median == pytest.approx(valid.median().item())
    out = m.attention_layer_metrics(causal_softmax(logits), logits=masked)
    assert out[m.LOGIT_TOP1] == pytest.approx(top)


def test_key0_of_the_normalized_map_from_its_column_equals_the_whole_maps():
    a1, a2 = causal_softmax(torch.randn(2, 3, 9, 9)), causal_softmax(torch.randn(2, 3, 9, 9))
    for w in (torch.rand(2, 3, 9), 0.4):
        expect = m.key0_mass(m.normalized_difference(a1, a2, w))
        assert torch.allclose(m.key0_mass_normalized(a1, a2, w), expect, rtol=1e-12, atol=0)


def test_the_median_of_many_logits_is_estimated_from_a_sample_close_to_the_exact_one():
    logits = torch.randn(4, 6, 512, 512) * 3 + 1  # 6.3M entries, half of them masked
    masked = logits.masked_fill(torch.ones(512, 512, dtype=torch.bool).triu(1), float("-inf"))
    top, median = m.logit_summary(masked)
    valid = logits[:, :, torch.ones(512, 512, dtype=torch.bool).tril()]
    assert top == valid.max().item()  # the maximum is always exact
    assert abs(median - valid.median().item()) < 0.02  # the sample's standard error here is about 0.004
    assert m.logit_summary(masked) == (top, median)  # seeded: the same estimate every time


# ---------------------------------------------------------------------- statistics
def test_paired_t_interval_and_p_against_known_values():
    # diffs 1, 2, 3: mean 2, sd 1, t = 2·√3 on 2 df; two-sided p = 1 − t/√(t² + 2) for 2 df
    result = paired({0: 4.0, 1: 5.0, 2: 6.0, 3: 1.0}, {0: 3.0, 1: 3.0, 2: 3.0, 5: 0.0})
    assert result.n == 3 and result.seeds == [0, 1, 2] and result.mean == 2.0 and result.sd == 1.0
    t = 2 * math.sqrt(3)
    assert result.t == pytest.approx(t) and result.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 df)
    assert result.ci == pytest.approx((2 - half, 2 + half), rel=1e-9)
    assert result.range == (1.0, 3.0) and result.same_sign(negative=False) and result.sign_p == 0.25
    assert t_ppf(0.975, 1) == pytest.approx(12.706204736174707, rel=1e-9)
    assert t_sf(2.7764451051977987, 4) == pytest.approx(0.025, rel=1e-9)


def test_paired_p_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy gives an independent check where installed")
    a, b = [random.gauss(3, 0.1) for _ in range(5)], [random.gauss(3.1, 0.1) for _ in range(5)]
    ref = scipy_stats.ttest_rel(a, b)
    assert paired(dict(enumerate(a)), dict(enumerate(b))).p == pytest.approx(ref.pvalue, rel=1e-9)


def test_paired_without_enough_data_says_why():
    assert paired({}, {0: 1.0}).note == "no data"
    one = paired({0: 1.0}, {0: 2.0})
    assert one.note == "n too small" and one.p is None and one.mean == -1.0
    flat = paired({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
    assert flat.note == "zero variance" and flat.p is None and flat.same_sign(negative=False)
    assert paired({0: float("nan"), 1: 1.0}, {0: 1.0, 1: 1.5}).n == 1


def test_holm_on_known_p_values():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1, and never below a smaller p's adjusted value


def test_sign_test():
    assert sign_test([1.0, 2.0, 3.0]) == 0.25 and sign_test([-1.0] * 5) == pytest.approx(2 / 32)
    assert sign_test([1.0, -1.0]) == 1.0 and sign_test([0.0]) is None
