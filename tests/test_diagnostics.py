"""Diagnostics from outside the forward (``diffv2.diagnostics``): statistics and maps that see what they claim,
logit transforms, and a model left as it was."""

from __future__ import annotations

import pytest
import torch

from diffv2 import Transformer
from diffv2.diagnostics import attention_logit_transform, attention_maps, diagnose, subtraction_weights

from .models import VARIANT_PARAMS, randomize, tiny


@pytest.mark.parametrize("kw", VARIANT_PARAMS)
def test_maps_are_normalised_causal_and_give_the_forward_its_context(kw):
    torch.manual_seed(0)
    model = randomize(Transformer(tiny(**kw)), seed=1).double()
    tokens = torch.randint(0, 97, (2, 11))
    expected = model(tokens)
    maps = attention_maps(model, tokens)
    assert len(maps) == model.cfg.n_layers
    future = torch.ones(11, 11, dtype=torch.bool).triu(1)
    for layer in maps:
        assert layer.kind == model.cfg.attention
        for a in (layer.a1, layer.a2):
            if a is not None:
                torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1], dtype=a.dtype))
                assert (a[..., future] == 0).all()
        assert layer.logits[..., future].isinf().all()
        if layer.a2 is not None:  # the effective map sums to 1 − weight per query
            torch.testing.assert_close(layer.effective.sum(-1), 1 - layer.weight)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(tokens), expected)


def test_diagnose_reports_per_layer_stats_that_match_the_maps():
    torch.manual_seed(1)
    model = Transformer(tiny())
    tokens = torch.randint(0, 97, (2, 16))
    stats = diagnose(model, tokens, keep_maps=True)
    assert len(stats) == 2
    for layer in stats:
        assert set(layer) >= {"max_logit", "context_rms", "sink_mass", "lambda_mean", "hidden_max", "hidden_topk"}
        maps = layer["maps"]
        assert 0 < layer["lambda_mean"] < 1 and len(layer["context_rms"]) == 4
        assert layer["hidden_topk"][0] == layer["hidden_max"]
        sink = maps.effective[..., 1:, 0].mean(dim=(0, 2))
        torch.testing.assert_close(torch.tensor(layer["sink_mass"]), sink.float(), rtol=1e-5, atol=1e-6)
        finite = maps.logits[maps.logits.isfinite()]
        assert layer["max_logit"] == pytest.approx(finite.abs().max().item(), rel=1e-6)


@pytest.mark.parametrize("kw", VARIANT_PARAMS)
def test_diagnose_records_the_scale_free_metrics_of_each_softmax_map(kw):
    torch.manual_seed(2)
    model = Transformer(tiny(**kw))
    randomize(model, 2)
    tokens = torch.randint(0, 97, (2, 16))
    for layer in diagnose(model, tokens, keep_maps=True):
        maps = layer["maps"]
        # key-0 mass of each softmax map (every map sums to 1), queries t >= 1
        torch.testing.assert_close(
            torch.tensor(layer["key0_a1"], dtype=torch.float64), maps.a1[..., 1:, 0].double().mean((0, 2))
        )
        assert ("key0_a2" in layer) == (maps.a2 is not None)
        assert 0.0 <= layer["sink_share"] <= 1.0 and layer["key0_uniform"] == pytest.approx(
            sum(1 / (t + 1) for t in range(1, 16)) / 15
        )
        assert layer["logit_top1"] >= layer["logit_median"]
        assert layer["hidden_outlier_ratio"] >= 1.0 and layer["hidden_kurtosis"] > 0


def test_context_rms_is_the_rms_of_what_o_proj_reads():
    torch.manual_seed(2)
    model = randomize(Transformer(tiny()), seed=2)
    tokens = torch.randint(0, 97, (1, 9))
    seen = []
    model.layers[0].attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    stats = diagnose(model, tokens)
    ctx = seen[0].view(1, 9, 4, -1)
    torch.testing.assert_close(torch.tensor(stats[0]["context_rms"]), ctx.pow(2).mean(dim=(0, 1, 3)).sqrt())


def test_subtraction_weights_are_sigma_lambda_and_the_ablations_constants():
    torch.manual_seed(3)
    tokens = torch.randint(0, 97, (2, 7))
    model = Transformer(tiny())
    w = subtraction_weights(model, tokens)
    x = model.layers[0].attn_norm(model.tok_embeddings(tokens))
    torch.testing.assert_close(w[0], torch.sigmoid(model.layers[0].attn.lambda_proj(x)).transpose(1, 2))
    for mode, value in (("none", 1.0), ("const", 0.5)):
        assert all((w == value).all() for w in subtraction_weights(Transformer(tiny(lambda_mode=mode)), tokens))
    assert subtraction_weights(Transformer(tiny(attention="baseline")), tokens) == []


@pytest.mark.parametrize("kw", VARIANT_PARAMS)
def test_identity_logit_transform_changes_nothing_and_a_coarse_one_changes_the_logits(kw):
    torch.manual_seed(4)
    model = randomize(Transformer(tiny(**kw)), seed=4)
    tokens = torch.randint(0, 97, (2, 10))
    expected = model(tokens)
    with attention_logit_transform(model, lambda logits: logits):
        torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)
    with attention_logit_transform(model, lambda logits: logits.round()):
        assert (model(tokens) - expected).abs().max() > 1e-3
    assert all(layer.attn.backend == "sdpa" and layer.attn.logit_transform is None for layer in model.layers)
