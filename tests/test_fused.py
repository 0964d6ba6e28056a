"""Inference-time projection fusion (``Transformer.fused_projections``): same logits with fewer matmuls, the
parameters untouched, and nothing stale after an in-place update or a conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffv2 import Transformer
from diffv2.fused import FusableInputs
from diffv2.generate import generate_batch

from .test_model import IDS, VARIANTS, randomize, tiny


def build(seed: int, **kw) -> Transformer:
    torch.manual_seed(seed)
    return randomize(Transformer(tiny(**kw)).double().eval(), seed)


def count_linear_calls(monkeypatch) -> list[int]:
    calls, real = [0], nn.Linear.forward

    def counted(self, x):
        calls[0] += 1
        return real(self, x)

    monkeypatch.setattr(nn.Linear, "forward", counted)
    return calls


@pytest.mark.parametrize("kw", VARIANTS, ids=IDS)
def test_fused_logits_equal_unfused_with_one_matmul_per_input_group(kw, monkeypatch):
    model = build(3, **kw)
    tokens = torch.randint(0, 97, (2, 9))
    names = {k: v.shape for k, v in model.state_dict().items()}
    calls = count_linear_calls(monkeypatch)
    with torch.no_grad():
        expected = model(tokens)
        unfused_calls, calls[0] = calls[0], 0
        with model.fused_projections():
            got = model(tokens)
    # every projection of the layer input (q/k/v/λ, gate/up) is gone from the nn.Linear calls: they ran inside
    # the one fused matmul per group
    inputs = sum(len(m.input_linears()) for m in model.modules() if isinstance(m, FusableInputs))
    has_lambda = kw["attention"] == "diff_v2" and kw.get("lambda_mode", "sigmoid") != "none"
    assert unfused_calls - calls[0] == inputs == model.cfg.n_layers * (5 + has_lambda)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert {k: v.shape for k, v in model.state_dict().items()} == names


def test_fusion_shares_storage_so_in_place_updates_are_seen():
    model = build(4, attention="diff_v2")
    attn = model.layers[0].attn
    tokens = torch.randint(0, 97, (2, 7))
    with torch.no_grad(), model.fused_projections():
        first = attn.fused_weight
        attn.lambda_proj.weight.add_(0.5)  # as an optimizer step or load_state_dict would
        model.layers[1].mlp.up_proj.weight.mul_(-1.0)
        fused = model(tokens)
    with torch.no_grad():
        unfused = model(tokens)
    torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=1e-12)
    with model.fused_projections():  # fusing again reuses the storage that captured graphs may still read
        assert attn.fused_weight.data_ptr() == first.data_ptr()
    assert attn.fused_weight is None


def test_fused_path_is_not_used_with_autograd():
    """The fused matmul would bypass the parameters: with grad enabled the layers keep their own matmuls and
    the gradients are the unfused ones."""
    model = build(5, attention="diff_v2")
    tokens = torch.randint(0, 97, (2, 8))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with model.fused_projections():
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-12, atol=1e-12, msg=n)


def test_conversion_drops_the_fusion_and_hooks_prevent_it():
    model = build(6, attention="diff_v2")
    tokens = torch.randint(0, 97, (1, 6))
    with torch.no_grad(), model.fused_projections():
        model.float()  # replaces the weights: a fused tensor would now be stale
        assert all(getattr(m, "fused_weight", None) is None for m in model.modules())
        torch.testing.assert_close(model(tokens), model.double()(tokens).float(), rtol=1e-5, atol=1e-5)
    seen = []
    model.layers[0].attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad(), model.fused_projections():
        assert model.layers[0].attn.fused_weight is None and model.layers[0].mlp.fused_weight is not None
        model(tokens)
    assert len(seen) == 1


def test_generation_fuses_for_its_duration_and_matches_the_unfused_model(monkeypatch):
    model = build(7, attention="diff_v2")
    prompts = [[3, 4, 5, 6], [10, 11]]
    fused_during = []
    real = Transformer.forward

    def spy(self, *args, **kwargs):
        fused_during.append(self.layers[0].attn.fused_weight is not None)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", spy)
    out = generate_batch(model, prompts, 5, temperature=0)
    assert fused_during and all(fused_during) and model.layers[0].attn.fused_weight is None
    with torch.no_grad():  # greedy continuation of each prompt alone, from full forwards without fusion
        for prompt, new in zip(prompts, out, strict=True):
            seq = list(prompt)
            for _ in range(5):
                seq.append(int(real(model, torch.tensor([seq]))[0, -1].argmax()))
            assert new == seq[len(prompt) :]
