"""Core model properties: float64 reference equivalence, backends, causality, pairing, function preservation,
gradients."""

from __future__ import annotations

import pytest
import torch

from diffv2 import ModelConfig, Transformer
from diffv2.attention import build_attention, lambda_init_fn, split_pairs
from diffv2.kernels import eager_attention, rope_cos_sin, sdpa_attention

from .models import VARIANT_PARAMS, VARIANTS, randomize, tiny


@pytest.mark.parametrize("variant", [VARIANTS[n] for n in ("baseline", "gated", "diff_v1", "diff_v2")])
def test_bf16_runs_close_to_fp32(variant):
    torch.manual_seed(2)
    model = Transformer(tiny(**variant))
    tokens = torch.randint(0, 97, (2, 16))
    ref = model(tokens)
    low = model.to(torch.bfloat16)(tokens)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_causality(variant):
    torch.manual_seed(3)
    model = randomize(Transformer(tiny(**variant)), seed=3)
    tokens = torch.randint(0, 97, (2, 20))
    changed = tokens.clone()
    t = 11
    changed[:, t + 1 :] = torch.randint(0, 97, changed[:, t + 1 :].shape)
    assert not torch.equal(changed, tokens)
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-3


def _kv_heads_read_by_output_head(cfg: ModelConfig) -> list[set[int]]:
    """For each output head, the KV heads whose values change its context (found by perturbing V rows)."""
    torch.manual_seed(4)
    attn = build_attention(cfg, 0).double()
    x = torch.randn(1, 6, cfg.d_model, dtype=torch.float64)
    t = x.shape[1]
    rope = (
        torch.ones(1, t, cfg.head_dim, dtype=torch.float64),
        torch.zeros(1, t, cfg.head_dim, dtype=torch.float64),
    )
    seen: list[torch.Tensor] = []
    attn.o_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    attn(x, rope)
    base = seen[-1].view(1, t, cfg.n_heads, cfg.head_dim)
    reads: list[set[int]] = [set() for _ in range(cfg.n_heads)]
    d = cfg.head_dim
    for kv in range(cfg.n_kv_heads):
        with torch.no_grad():
            attn.v_proj.weight[kv * d : (kv + 1) * d] += 1.0
            attn(x, rope)
            attn.v_proj.weight[kv * d : (kv + 1) * d] -= 1.0
        changed = (seen[-1].view(1, t, cfg.n_heads, d) - base).abs().amax(dim=(0, 1, 3)) > 1e-9
        for i in torch.nonzero(changed).flatten().tolist():
            reads[i].add(kv)
    return reads


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_pairing_stays_inside_a_gqa_group(n_kv_heads):
    cfg = tiny(n_heads=8, n_kv_heads=n_kv_heads, d_model=64, head_dim=8)
    group = cfg.n_heads // n_kv_heads
    # interleaved: heads 2i and 2i+1 both read KV head i // group, exactly the baseline's grouping
    assert _kv_heads_read_by_output_head(cfg) == [{i // group} for i in range(cfg.n_heads)]
    # the blog's wrong implementation mixes two KV heads in one differential head
    split = _kv_heads_read_by_output_head(cfg.replace(pairing="split"))
    assert any(len(kvs) == 2 for kvs in split)


def test_split_pairs_selects_heads():
    heads = torch.arange(8).view(1, 8)
    a, b = split_pairs(heads)
    assert a.tolist() == [[0, 2, 4, 6]] and b.tolist() == [[1, 3, 5, 7]]
    a, b = split_pairs(heads, interleaved=False)
    assert a.tolist() == [[0, 1, 2, 3]] and b.tolist() == [[4, 5, 6, 7]]


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_function_preserving_duplication(n_kv_heads):
    """DIFF V2 with Q2 := Q1, lambda_proj = 0 (σ = 0.5) and W_O × 2 equals the baseline layer."""
    torch.manual_seed(5)
    cfg = tiny(n_kv_heads=n_kv_heads)
    base = build_attention(cfg.replace(attention="baseline"), 0)
    v2 = build_attention(cfg, 0)
    d = cfg.head_dim
    with torch.no_grad():
        wq = base.q_proj.weight.view(cfg.n_heads, d, cfg.d_model)
        v2.q_proj.weight.copy_(wq.repeat_interleave(2, dim=0).reshape(-1, cfg.d_model))
        v2.k_proj.weight.copy_(base.k_proj.weight)
        v2.v_proj.weight.copy_(base.v_proj.weight)
        v2.o_proj.weight.copy_(2 * base.o_proj.weight)
        v2.lambda_proj.weight.zero_()
    x = torch.randn(2, 10, cfg.d_model)
    rope = rope_cos_sin(torch.arange(10)[None], d, cfg.rope_theta)
    torch.testing.assert_close(v2(x, rope), base(x, rope), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_every_parameter_gets_a_gradient(variant):
    torch.manual_seed(6)
    model = Transformer(tiny(**variant))
    tokens = torch.randint(0, 97, (2, 12))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_loss_is_mean_cross_entropy_with_ignore_index():
    torch.manual_seed(7)
    model = Transformer(tiny())
    tokens = torch.randint(0, 97, (2, 8))
    targets = torch.randint(0, 97, (2, 8))
    targets[0, :3] = -100
    logits, loss = model(tokens, targets)
    keep = targets != -100
    expected = -torch.log_softmax(logits, -1)[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, expected)


def test_lambda_init_depth_schedule():
    assert lambda_init_fn(0) == pytest.approx(0.2)
    assert lambda_init_fn(1) == pytest.approx(0.8 - 0.6 * 0.7408182206817179)
    model = Transformer(tiny(attention="diff_v1", n_layers=3))
    assert [layer.attn.lambda_init for layer in model.layers] == [pytest.approx(lambda_init_fn(i)) for i in range(3)]


@pytest.mark.parametrize(("attention", "name"), [("diff_v2", "lambda_proj"), ("gated", "gate_proj")])
def test_init_keeps_lambda_and_gate_proj_at_pytorch_default(attention, name):
    cfg = tiny(d_model=256, head_dim=64, attention=attention)
    model = Transformer(cfg)
    w = getattr(model.layers[0].attn, name).weight
    bound = 1 / cfg.d_model**0.5
    assert w.abs().max() <= bound and w.std() > 0.5 * bound / 3**0.5  # U(±1/√D), not N(0, 0.02)
    q = model.layers[0].attn.q_proj.weight
    assert abs(q.std().item() - 0.02) < 0.002
    o = model.layers[0].attn.o_proj.weight
    assert abs(o.std().item() - 0.02 / (2 * cfg.n_layers) ** 0.5) < 0.002


def test_zero_o_proj_init_starts_the_attention_branch_at_zero():
    model = Transformer(tiny(o_proj_init_scale=0.0))
    assert all(layer.attn.o_proj.weight.abs().max() == 0 for layer in model.layers)
    assert all(layer.mlp.down_proj.weight.abs().max() > 0 for layer in model.layers)


FINGERPRINTS = [("baseline", 2707.30246814), ("diff_v1", 5320.83698176), ("diff_v2", 2996.57168779)]


@pytest.mark.parametrize(("attention", "fingerprint"), FINGERPRINTS)
def test_a_seed_gives_the_weights_it_always_gave(attention, fingerprint):
    """Init draws in module order, so results and checkpoints stay comparable across versions: the fingerprint
    (Σᵢ (i+1)·Σ state_dict[i]) of seed 0 is the one the first release of the model produced."""
    torch.manual_seed(0)
    model = Transformer(tiny(attention=attention))
    got = sum((i + 1) * v.double().sum() for i, v in enumerate(model.state_dict().values()))
    assert float(got) == pytest.approx(fingerprint, abs=1e-6)


@pytest.mark.parametrize(
    "attend",
    [lambda q, k, v: sdpa_attention(q, k, v, None), lambda q, k, v: eager_attention(q, k, v)[0]],
    ids=["sdpa", "eager"],
)
def test_attention_with_fewer_queries_than_keys_aligns_bottom_right(attend):
    """A KV-cache step (T < S) must equal the last T rows of the full causal attention."""
    torch.manual_seed(8)
    q = torch.randn(2, 8, 12, 16)
    k, v = torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    full = attend(q, k, v)
    for t in (1, 3):
        torch.testing.assert_close(attend(q[:, :, -t:], k, v), full[:, :, -t:], rtol=1e-5, atol=1e-5)


def test_eager_attention_probabilities_are_causal_and_normalised():
    torch.manual_seed(9)
    q, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    _, probs, logits = eager_attention(q, k, v)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 7))
    upper = torch.ones(7, 7, dtype=torch.bool).triu(1)
    assert (probs[..., upper] == 0).all() and logits[..., upper].isinf().all()
    assert torch.isfinite(logits[..., ~upper]).all()
