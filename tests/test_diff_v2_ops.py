"""DIFF V2's memory-lean training implementations (``diffv2.attention.diff_v2_ops``): exact gradients, the layout
SDPA's backward wants, compiled helpers, and what each keeps for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffv2 import ModelConfig
from diffv2.attention import build_attention
from diffv2.kernels import rope_cos_sin

from .models import tiny


def test_pair_subtract_gradients_match_autograd():
    from diffv2.attention.diff_v2_ops import PairSubtract

    torch.manual_seed(11)
    out = torch.randn(2, 8, 5, 4, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 4, 5, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o, w: PairSubtract.apply(o[:, 0::2], o[:, 1::2], w), (out, s))


def _plain_pair_project(out, s, weight, interleaved):
    h = out.shape[1] // 2
    o1, o2 = (out[:, 0::2], out[:, 1::2]) if interleaved else (out[:, :h], out[:, h:])
    return F.linear((o1 - s * o2).transpose(1, 2).flatten(2), weight)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "split"])
def test_pair_subtract_project_gradients_match_autograd(interleaved):
    from diffv2.attention.diff_v2_ops import pair_subtract_project

    torch.manual_seed(12)
    # the attention output in SDPA's memory layout, (B, T, 2h, d) seen as (B, 2h, T, d)
    out = torch.randn(2, 5, 8, 3, dtype=torch.float64).transpose(1, 2).requires_grad_()
    s = torch.rand(2, 4, 5, 1, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4 * 3, dtype=torch.float64, requires_grad=True)

    def fused(o, w, wo):
        return pair_subtract_project(o, w, wo, interleaved)

    torch.testing.assert_close(fused(out, s, weight), _plain_pair_project(out, s, weight, interleaved))
    assert torch.autograd.gradcheck(fused, (out, s, weight))


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "split"])
def test_pair_subtract_project_returns_the_gradient_in_sdpas_output_layout(interleaved):
    """PyTorch's cuDNN SDPA backward copies a gradient whose strides differ from its output's (cuDNN < 9.5.1):
    the op's gradient for the attention output comes back with the strides SDPA gave that output."""
    from diffv2.attention.diff_v2_ops import pair_subtract_project

    torch.manual_seed(15)
    q = torch.randn(2, 7, 8, 16).transpose(1, 2)  # as the model projects them: (B, T, heads, d) in memory
    k, v = (torch.randn(2, 7, 4, 16).transpose(1, 2) for _ in range(2))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).detach().requires_grad_()
    s = torch.rand(2, 7, 4).transpose(1, 2)[..., None].requires_grad_()
    weight = torch.randn(24, 4 * 16, requires_grad=True)
    y = pair_subtract_project(out, s, weight, interleaved)
    grad_out, grad_s = torch.autograd.grad(y, (out, s), torch.randn_like(y))
    assert out.transpose(1, 2).is_contiguous() and grad_out.stride() == out.stride()
    assert grad_s.shape == s.shape


def test_pair_subtract_project_compiled_helpers_match(monkeypatch):
    """On CUDA the op's elementwise parts run through torch.compile: forced here, they give the values and
    gradients of the eager helpers (checked against float64 above) on bf16 inputs, as training gives them."""
    import diffv2.attention.diff_v2_ops as ps

    torch.manual_seed(13)
    out = torch.randn(2, 7, 8, 16).to(torch.bfloat16).transpose(1, 2).requires_grad_()
    s = torch.rand(2, 4, 7, 1, requires_grad=True)
    weight = torch.randn(24, 4 * 16, requires_grad=True)
    grad_y = torch.randn(2, 7, 24).to(torch.bfloat16)

    def run():
        y = ps.pair_subtract_project(out, s, weight, True)
        return (y, *torch.autograd.grad(y, (out, s, weight), grad_y))

    eager = run()
    monkeypatch.setattr(ps, "_fused", lambda fn, x: torch.compile(fn, dynamic=True))
    compiled = run()
    assert [t.dtype for t in compiled] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(
            got,
            want,
            rtol=1e-4 if got.dtype == torch.float32 else None,
            atol=1e-4 if got.dtype == torch.float32 else None,
        )


def test_pair_subtract_project_inside_torch_compile_traces_its_helpers_inline(monkeypatch):
    """Under an outer torch.compile, AOTAutograd traces the op's backward with fake tensors: the helpers must be
    traced inline, not called as compiled functions (which cannot be traced: the op warned and fell back to its
    eager helpers). The GPU branch is forced here on the CPU; no warning, the eager values."""
    import warnings

    import diffv2.attention.diff_v2_ops as ps

    monkeypatch.setattr(ps, "_FUSED", {})
    monkeypatch.setattr(ps, "_on_gpu", lambda x: True)
    torch.manual_seed(14)
    out = torch.randn(2, 6, 8, 16).transpose(1, 2).requires_grad_()
    s = torch.rand(2, 4, 6, 1, requires_grad=True)
    weight = torch.randn(24, 4 * 16, requires_grad=True)

    def loss(out, s, weight):
        return ps.pair_subtract_project(out, s, weight, True).square().sum()

    def step(fn):
        value = fn(out, s, weight)
        return (value, *torch.autograd.grad(value, (out, s, weight)))

    want = step(loss)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="diffv2")
        got = step(torch.compile(loss))
    assert not ps._FUSED.get("failed")
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_pair_subtract_helpers_fall_back_when_compiling_fails(monkeypatch):
    """A compiler failure on the GPU costs speed, not the run: one warning, then the eager helpers."""
    from types import SimpleNamespace

    import diffv2.attention.diff_v2_ops as ps

    def broken_compile(fn, dynamic):
        def run(*args):
            raise RuntimeError("no working compiler here")

        return run

    monkeypatch.setattr(ps, "_FUSED", {})
    monkeypatch.setattr(ps.torch, "compile", broken_compile)
    out, s = torch.randn(2, 8, 5, 4), torch.rand(2, 4, 5, 1)
    on_gpu = SimpleNamespace(is_cuda=True)
    with pytest.warns(UserWarning, match="_context failed .*no working compiler"):
        got = ps._fused(ps._context, on_gpu)(out, s, True)
    torch.testing.assert_close(got, ps._context(out, s, True))
    assert ps._fused(ps._context, on_gpu) is ps._context  # no second attempt


def test_diff_v2_keeps_no_fp32_copy_of_the_attention_output_for_backward():
    """Saved activations: the 2h-head output in bf16 (SDPA's own), never an fp32 copy of half of it."""
    cfg = tiny(d_model=64, n_heads=4, head_dim=16)
    attn = build_attention(cfg, 0)
    x = torch.randn(2, 32, cfg.d_model, requires_grad=True)
    rope = rope_cos_sin(torch.arange(32)[None], cfg.head_dim, cfg.rope_theta)
    saved: list[torch.Tensor] = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x, rope).float().sum().backward()
    params = {p.data_ptr() for p in attn.parameters()}
    big_fp32 = [
        t.shape
        for t in saved
        if t.dtype == torch.float32 and t.numel() >= 2 * 32 * cfg.head_dim and t.data_ptr() not in params
    ]
    assert not big_fp32, big_fp32


def _saved_activation_bytes(cfg: ModelConfig, batch: int, t: int, compile: bool = False) -> int:
    """Bytes one attention layer keeps for its backward, parameters and shared storages counted once;
    ``compile``: what the compiled layer keeps (the partitioner, not the eager code, decides)."""
    attn = build_attention(cfg, 0)
    x = torch.randn(batch, t, cfg.d_model, requires_grad=True)
    rope = rope_cos_sin(torch.arange(t)[None], cfg.head_dim, cfg.rope_theta)
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in attn.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    layer = torch.compile(attn) if compile else attn
    layer(x, rope)  # compiles outside the hooks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, rope).sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_recompute_pair_difference_false_keeps_the_difference_and_changes_nothing_else(compile):
    """``recompute_pair_difference=False`` trades memory for the recompute: the layer keeps one (B, T, h·d) unit
    more, and its outputs and gradients are the recomputing layer's."""
    cfg = tiny(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16)
    batch, t = 2, 48
    lean = _saved_activation_bytes(cfg, batch, t, compile)
    keep = _saved_activation_bytes(cfg.replace(recompute_pair_difference=False), batch, t, compile)
    unit = batch * t * cfg.n_heads * cfg.head_dim * 4  # one fp32 (B, T, h·d) tensor
    assert unit // 2 < keep - lean < 3 * unit // 2, (keep, lean, unit)

    torch.manual_seed(16)
    x = torch.randn(batch, t, cfg.d_model, dtype=torch.float64, requires_grad=True)
    rope = rope_cos_sin(torch.arange(t)[None], cfg.head_dim, cfg.rope_theta)
    results = []
    for recompute in (True, False):
        torch.manual_seed(17)
        attn = build_attention(cfg.replace(recompute_pair_difference=recompute), 0).double()
        y = attn(x, rope)
        results.append((y, *torch.autograd.grad(y.square().sum(), (x, *attn.parameters()))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_diff_v2_keeps_no_more_for_backward_than_a_2h_head_baseline(compile):
    """The h·d pair difference that o_proj reads is recomputed in the backward, not kept: DIFF V2 saves what a
    baseline with its 2h query heads saves, plus σ(λ) (B, T, h). Kept, it would add B·T·h·d more, as it did
    under torch.compile while the fusion was an autograd.Function (the partitioner chose to keep it)."""
    cfg = tiny(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16)
    batch, t = 2, 48
    v2 = _saved_activation_bytes(cfg, batch, t, compile)
    wide = _saved_activation_bytes(cfg.replace(attention="baseline", n_heads=2 * cfg.n_heads), batch, t, compile)
    unit = batch * t * cfg.n_heads * cfg.head_dim * 4  # one fp32 (B, T, h·d) tensor
    assert v2 - wide < unit // 2, (v2, wide, unit)
