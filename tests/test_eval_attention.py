"""attention_split, lowbit and kv_int8: the split sums to 1 per softmax map and sees constructed answers; fake
quantisation at 16 bits changes nothing and at 4 bits changes the logits; the int8 KV cache's round trip changes
the loss a little, and its headline scores come from the int8 row."""

from __future__ import annotations

import pytest
import torch

from diffv2 import ModelConfig, Transformer
from diffv2.diagnostics import attention_logit_transform
from diffv2.eval import attention_split, kv_int8, lowbit
from diffv2.eval.registry import headline_scores

from .test_eval import V, context


def tiny(attention: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", attention=attention, vocab_size=V, max_seq_len=512)).eval()


def test_split_at_query_on_constructed_rows() -> None:
    rows = torch.zeros(3, 10, dtype=torch.float64)
    rows[0, 4] = 1.0  # all on the answer
    rows[1] = 0.1  # uniform: the answer's share of the keys
    rows[2, 0] = 1.0  # all on a sink outside it
    answer, rest = attention_split.split_at_query(rows, (3, 6))
    assert answer.tolist() == pytest.approx([1.0, 0.3, 0.0]) and rest.tolist() == pytest.approx([0.0, 0.7, 1.0])


@pytest.mark.parametrize("attention", ["baseline", "diff_v1", "diff_v2"])
def test_attention_split_sums_to_one_per_map(attention: str) -> None:
    result = attention_split.run(context(tiny(attention), train_len=400, attention_split_samples=1))
    maps = ["a1"] if attention == "baseline" else ["a1", "a2", "effective"]
    assert result["samples"] == 5 and [m for m in ("a1", "a2", "effective") if m in result] == maps
    for name in maps:
        assert result[name]["max_sum_error"] < 1e-6
        assert result[name]["answer"] + result[name]["rest"] == pytest.approx(1.0, abs=1e-6)
        layers, heads = len(result[name]["answer_per_head"]), len(result[name]["answer_per_head"][0])
        assert (layers, heads) == (4, 2 if attention == "diff_v1" else 4)
    best = result["best_head"]
    assert best["answer"] == max(max(h) for h in result[best["map"]]["answer_per_head"])


def test_fake_quantize_rounds_rows_and_keeps_masks() -> None:
    logits = torch.randn(2, 3, 5, 7) * 4
    logits[..., -2:] = float("-inf")
    q4 = lowbit.fake_quantize(logits, 4)
    assert torch.equal(q4.isinf(), logits.isinf())
    finite = logits[..., :-2]
    step = finite.abs().amax(-1, keepdim=True) / 7
    assert ((q4[..., :-2] - finite).abs() <= step / 2 + 1e-6).all()
    assert (torch.round(q4[..., :-2] / step) - q4[..., :-2] / step).abs().max() < 1e-4  # on the grid
    assert (q4[..., :-2] != finite).any()


@pytest.mark.parametrize("attention", ["baseline", "diff_v1", "diff_v2"])
def test_logit_quantisation_16_bits_changes_nothing_4_bits_changes_logits(attention: str) -> None:
    model = tiny(attention)
    tokens = torch.randint(0, V, (2, 48))
    with torch.no_grad():
        with attention_logit_transform(model, lowbit.identity):
            full = model(tokens)
        with attention_logit_transform(model, lambda x: lowbit.fake_quantize(x, 16)):
            q16 = model(tokens)
        with attention_logit_transform(model, lambda x: lowbit.fake_quantize(x, 4)):
            q4 = model(tokens)
    torch.testing.assert_close(q16, full, atol=1e-4, rtol=1e-4)
    assert (q4 - full).abs().max() > 1e-3


def test_lowbit_task_reports_every_width() -> None:
    ctx = context(tiny("diff_v2"), train_len=256, lowbit_needle_samples=1)
    ctx.quick = True
    result = lowbit.run(ctx)
    assert list(result["widths"]) == ["full", "8-bit", "6-bit", "4-bit"]
    assert result["widths"]["full"]["loss_increase"] == 0.0
    assert all(0.0 <= w["needle_ll"] <= 1.0 for w in result["widths"].values())


@pytest.mark.parametrize("attention", ["baseline", "diff_v2"])
def test_kv_int8_task_compares_the_int8_cache_with_the_model_dtype(attention) -> None:
    model = tiny(attention)
    ctx = context(model, train_len=256, kv_int8_needle_samples=1, kv_int8_windows=3)
    result = kv_int8.run(ctx)
    assert list(result["widths"]) == ["model dtype", "int8"] and result["windows"] == 3
    full, int8 = result["widths"]["model dtype"], result["widths"]["int8"]
    assert full["loss_increase"] == 0.0 and int8["loss_increase"] != 0.0  # the round trip rounds something
    assert abs(int8["loss_increase"]) < 0.05 * full["loss"]  # and not much: 8 bits per value
    assert all(layer.attn.kv_transform is None for layer in model.layers)  # the hooks are gone afterwards
    scores = headline_scores({"kv_int8": result})
    assert scores["kv_int8_loss_increase"].value == int8["loss_increase"]
    assert scores["kv_int8_needle_rank"].value == int8["needle_ll"]
