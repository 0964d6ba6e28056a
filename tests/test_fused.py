"""Generation's projection fusion (``diffv2.generate.fused_projections``): same logits with fewer matmuls, the
parameters untouched, nothing stale after an in-place update or a conversion, and it compiles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffv2 import Transformer
from diffv2.generate import fused_projections, generate_batch

from .models import VARIANT_PARAMS, randomize, tiny


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


def fused_now(model: Transformer) -> bool:
    return "forward" in vars(model.layers[0].attn.q_proj)


@pytest.mark.parametrize("kw", VARIANT_PARAMS)
def test_fused_logits_equal_unfused_with_one_matmul_per_input_group(kw, monkeypatch):
    model = build(3, **kw)
    tokens = torch.randint(0, 97, (2, 9))
    names = {k: (v.shape, v.data_ptr()) for k, v in model.state_dict().items()}
    calls = count_linear_calls(monkeypatch)
    with torch.no_grad():
        expected = model(tokens)
        unfused_calls, calls[0] = calls[0], 0
        with fused_projections(model):
            assert {k: v.shape for k, v in model.state_dict().items()} == {k: s for k, (s, _) in names.items()}
            got = model(tokens)
    # every projection of the layer input (q/k/v/λ or gate, SwiGLU's gate/up) ran inside one matmul per group
    attn = model.layers[0].attn
    inputs = sum(getattr(attn, name, None) is not None for name in attn.input_projections)
    assert unfused_calls - calls[0] == model.cfg.n_layers * (inputs + 2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not fused_now(model)


def test_fusion_shares_storage_so_in_place_updates_are_seen():
    model = build(4, attention="diff_v2")
    attn = model.layers[0].attn
    tokens = torch.randint(0, 97, (2, 7))
    with torch.no_grad(), fused_projections(model):
        first = attn.q_proj.weight.data_ptr()
        assert attn.lambda_proj.weight.data_ptr() == first + attn.q_proj.weight.nbytes * 3 // 2  # one tensor
        attn.lambda_proj.weight.add_(0.5)  # as an optimizer step or load_state_dict would
        model.layers[1].mlp.up_proj.weight.mul_(-1.0)
        fused = model(tokens)
    with torch.no_grad():
        unfused = model(tokens)
    torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=1e-12)
    with fused_projections(model):  # fusing again reuses the storage that captured graphs may still read
        assert attn.q_proj.weight.data_ptr() == first


def test_fused_path_is_not_used_with_autograd():
    """The fused matmul would bypass the parameters: with grad enabled the layers keep their own matmuls and
    the gradients are the unfused ones."""
    model = build(5, attention="diff_v2")
    tokens = torch.randint(0, 97, (2, 8))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with fused_projections(model):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-12, atol=1e-12, msg=n)


def test_conversion_inside_falls_back_and_hooks_prevent_fusion(monkeypatch):
    model = build(6, attention="diff_v2")
    tokens = torch.randint(0, 97, (1, 6))
    with torch.no_grad(), fused_projections(model):
        model.float()  # replaces the weights: the fused tensor is stale, so each linear runs its own matmul
        torch.testing.assert_close(model(tokens), model.double()(tokens).float(), rtol=1e-5, atol=1e-5)
    seen = []
    model.layers[0].attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad(), fused_projections(model):
        assert not fused_now(model) and "forward" in vars(model.layers[0].mlp.up_proj)
        model(tokens)
    assert len(seen) == 1


def test_generation_fuses_for_its_duration_and_matches_the_unfused_model(monkeypatch):
    model = build(7, attention="diff_v2")
    prompts = [[3, 4, 5, 6], [10, 11]]
    fused_during = []
    real = Transformer.forward

    def spy(self, *args, **kwargs):
        fused_during.append(fused_now(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", spy)
    out = generate_batch(model, prompts, 5, temperature=0)
    assert fused_during and all(fused_during) and not fused_now(model)
    with torch.no_grad():  # greedy continuation of each prompt alone, from full forwards without fusion
        for prompt, new in zip(prompts, out, strict=True):
            seq = list(prompt)
            for _ in range(5):
                seq.append(int(real(model, torch.tensor([seq]))[0, -1].argmax()))
            assert new == seq[len(prompt) :]


@pytest.mark.slow
def test_fused_model_compiles_in_one_graph():
    model = build(8, attention="diff_v2").float()
    tokens = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        expected = model(tokens)
        with fused_projections(model):
            compiled = torch.compile(model, fullgraph=True, dynamic=False)
            torch.testing.assert_close(compiled(tokens), expected, rtol=1e-5, atol=1e-5)
