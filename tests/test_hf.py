"""Hugging Face integration: native ↔ HF equality, generation, caches, save/load, remote code, convert, upcycling."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, StaticCache

import diffv2.hf as H
from diffv2 import CheckpointError, ConfigError, ModelConfig, Transformer
from diffv2.checkpoint import save_checkpoint
from diffv2.cli import convert as convert_cli
from diffv2.data.tokenizer import Tokenizer
from diffv2.generate import generate

TINY = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=96, max_seq_len=64)
VARIANTS = {
    "diff_v2": {},
    "diff_v2-split": {"pairing": "split"},
    "diff_v2-lambda_none": {"lambda_mode": "none"},
    "diff_v2-lambda_linear": {"lambda_mode": "linear"},
    "diff_v1": {"attention": "diff_v1"},
    "baseline": {"attention": "baseline"},
    "diff_v2-tied-mha": {"tie_embeddings": True, "n_kv_heads": 4},
}


def native(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # norm gains start at 1: make them random so a wrong norm mapping shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "subln" in name:
                p.uniform_(0.5, 1.5)
    return model


def tokens(n: int = 2, t: int = 24, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_native(variant: str, impl: str) -> None:
    model = native(**VARIANTS[variant])
    hf = H.to_hf(model).eval()
    hf.set_attn_implementation(impl)
    assert set(hf.state_dict()) == set(model.state_dict())  # the weight names map 1:1
    x = tokens()
    with torch.no_grad():
        ref, got = model(x), hf(x).logits
    # sdpa runs the very same kernel call as the native model; eager differs only in summation order
    torch.testing.assert_close(got, ref, atol=0 if impl == "sdpa" else 2e-5, rtol=0 if impl == "sdpa" else 1e-5)
    back = H.to_native(hf)
    assert back.cfg == model.cfg.replace(backend=impl)  # the attention implementation is the native backend
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def test_float64_eager_matches_native_eager() -> None:
    model = native(attention="diff_v1", backend="eager").double()
    hf = H.to_hf(model)
    assert hf.config._attn_implementation == "eager"
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-12, rtol=1e-12)


def test_config_round_trip_and_aliases() -> None:
    cfg = ModelConfig(**{**TINY, "rope_theta": 500.0, "norm_eps": 1e-6, "tie_embeddings": True, "backend": "eager"})
    config = H.to_hf_config(cfg)
    assert H.from_hf_config(config) == cfg
    assert (config.d_model, config.n_layers, config.n_kv_heads, config.max_seq_len) == (64, 2, 2, 64)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    assert AutoConfig.for_model("diffv2", d_model=32, n_heads=2).hidden_size == 32  # registered, aliases accepted
    with pytest.raises(ValueError, match="pairing"):
        H.DiffV2Config(attention="baseline", pairing="split")
    with pytest.raises(ConfigError, match="rope_type"):
        H.from_hf_config({**config.to_dict(), "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("variant", ["diff_v2", "diff_v1", "baseline"])
def test_greedy_generate_matches_native(variant: str, cache: str) -> None:
    model = native(**VARIANTS[variant])
    prompt = [5, 17, 3, 44, 9, 2]
    ref = list(generate(model, prompt, 16, temperature=0))
    hf = H.to_hf(model).eval()
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    for impl in ("sdpa", "eager"):
        hf.set_attn_implementation(impl)
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, **kwargs)
        assert out[0, len(prompt) :].tolist() == ref, impl


def test_left_padded_batch_generate() -> None:
    model = native()
    prompts = [[5, 17, 3, 44, 9], [7, 8]]
    refs = [list(generate(model, p, 8, temperature=0)) for p in prompts]
    hf = H.to_hf(model).eval()
    ids = torch.tensor([prompts[0], [0, 0, 0, *prompts[1]]])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    for kwargs in ({}, {"cache_implementation": "static"}):
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)
        assert [out[i, 5:].tolist() for i in range(2)] == refs


@pytest.mark.parametrize("cache_cls", [DynamicCache, StaticCache])
def test_cache_holds_only_kv_heads(cache_cls) -> None:
    model = native()
    hf = H.to_hf(model).eval()
    x = tokens(1, 10)
    cache = DynamicCache(config=hf.config) if cache_cls is DynamicCache else StaticCache(hf.config, max_cache_len=32)
    with torch.no_grad():
        step1 = hf(x[:, :6], use_cache=True, past_key_values=cache).logits
        step2 = hf(x[:, 6:], use_cache=True, past_key_values=cache).logits
        full = model(x)
    torch.testing.assert_close(torch.cat((step1, step2), 1), full, atol=2e-5, rtol=1e-5)
    keys = cache.layers[0].keys
    assert keys.shape[1] == TINY["n_kv_heads"]  # DIFF V2 caches what the baseline caches: h_kv heads


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = native(attention="diff_v1")
    hf = H.to_hf(model)
    hf.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_diffv2.py", "configuration_diffv2.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_diffv2.DiffV2ForCausalLM"
    x = tokens()
    for loaded in (H.DiffV2ForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert type(loaded) is H.DiffV2ForCausalLM
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x).logits, model(x), atol=0, rtol=0)


def test_trust_remote_code_without_diffv2(tmp_path: Path) -> None:
    model = native(tie_embeddings=True)
    folder = tmp_path / "hf"
    H.save_hf(H.to_hf(model), folder, H.hf_tokenizer(Tokenizer.byte_level()))
    x = tokens(1, 12)
    with torch.no_grad():
        torch.save(model(x), tmp_path / "ref.pt")
    torch.save(x, tmp_path / "x.pt")
    import huggingface_hub
    import transformers

    # the same transformers as this process (it may come from PYTHONPATH, which -I drops), but never diffv2
    paths = [str(Path(m.__file__).parents[1]) for m in (transformers, huggingface_hub)]
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = {paths!r}
        sys.modules["diffv2"] = None  # an installed diffv2 must not be what makes this work
        try:
            import diffv2
            raise SystemExit("diffv2 is importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        x, ref = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, ref, atol=0, rtol=0)
        out = model.generate(x, max_new_tokens=4, do_sample=False, cache_implementation="static")
        assert out.shape == (1, 16)
        tok = AutoTokenizer.from_pretrained({str(folder)!r})
        assert tok.eos_token == "<|endoftext|>"
        import transformers
        print("remote-ok", transformers.__version__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-I", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and f"remote-ok {transformers.__version__}" in run.stdout, run.stderr[-3000:]


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    convert_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["convert", *argv])
    return args.func(args)


def test_convert_native_to_hf_and_back(tmp_path: Path) -> None:
    tok = Tokenizer.byte_level()
    model = native(vocab_size=tok.vocab_size, attention="diff_v2")
    state = {"step": 7, "tokenizer_sha256": tok.sha256()}
    config = {"train": {}, "model": model.cfg.to_dict()}
    save_checkpoint(tmp_path / "run", 7, model=model, state=state, config=config, tokenizer_json=tok.to_json_str())
    assert cli(str(tmp_path / "run"), "--out", str(tmp_path / "hf")) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "In the beginning <|endoftext|> God"
    assert hf_tok(text)["input_ids"] == tok.encode(text)  # literal special text stays text, as in our data
    assert hf_tok.eos_token_id == tok.eot_id == hf.generation_config.eos_token_id
    x = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="not empty"):
        cli(str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    assert cli(str(tmp_path / "hf"), "--out", str(tmp_path / "back")) == 0
    back, back_tok, _ = H.load_native(tmp_path / "back")
    assert back.cfg == model.cfg and back_tok.sha256() == tok.sha256()
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


# ---------------------------------------------------------------------- upcycling
def tiny_llama(tie: bool = False, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        tie_word_embeddings=tie,
        **overrides,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_upcycle_llama_preserves_function(tmp_path: Path, tie: bool) -> None:
    llama = tiny_llama(tie)
    model, _ = H.upcycle(llama)
    assert model.cfg.attention == "diff_v2" and model.cfg.n_heads == 4 and model.cfg.tie_embeddings == tie
    x = tokens(2, 32)
    with torch.no_grad():
        ref = llama(x).logits
        torch.testing.assert_close(model(x), ref, atol=2e-5, rtol=1e-5)
    llama.save_pretrained(tmp_path / "llama")
    assert cli("--from-llama", str(tmp_path / "llama"), "--out", str(tmp_path / "hf")) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ref, atol=2e-5, rtol=1e-5)
    assert cli("--from-llama", str(tmp_path / "llama"), "--out", str(tmp_path / "run"), "--to", "native") == 0
    back, _, _ = H.load_native(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref, atol=2e-5, rtol=1e-5)


def test_upcycle_baseline_copy_and_cli_errors(tmp_path: Path) -> None:
    llama = tiny_llama()
    model, _ = H.upcycle(llama, attention="baseline")
    x = tokens(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), llama(x).logits, atol=2e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="exactly one"):
        cli("somewhere", "--from-llama", "elsewhere", "--out", str(tmp_path / "x"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        cli(str(tmp_path / "missing"), "--out", str(tmp_path / "x"))


def test_upcycled_model_trains() -> None:
    model, _ = H.upcycle(tiny_llama())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = tokens(4, 33)
    losses = []
    for _ in range(8):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    lam = model.layers[0].attn.lambda_proj.weight
    assert lam.abs().max() > 0  # λ left 0: the two heads of a pair are free to differ


def test_upcycle_refusals() -> None:
    base = tiny_llama().config.to_dict()
    with pytest.raises(ConfigError, match="attention_bias"):
        H.llama_model_config({**base, "attention_bias": True})
    with pytest.raises(ConfigError, match="rope_type='llama3'"):
        H.llama_model_config({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}})
    with pytest.raises(ConfigError, match="rope_type='linear'"):  # the transformers 4 spelling
        H.llama_model_config({**base, "rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ConfigError, match="model_type='gemma'"):
        H.llama_model_config({**base, "model_type": "gemma"})
    with pytest.raises(ConfigError, match="hidden_act"):
        H.llama_model_config({**base, "hidden_act": "gelu"})
    mistral = {**base, "model_type": "mistral", "sliding_window": 32}
    with pytest.raises(ConfigError, match="sliding_window=32"):
        H.llama_model_config(mistral)
    assert H.llama_model_config(mistral, max_seq_len=32).max_seq_len == 32  # the window never binds: exact
    assert H.llama_model_config({**base, "model_type": "qwen2", "sliding_window": 8, "use_sliding_window": False})


def test_upcycle_refuses_qwen2_biases() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    with pytest.raises(
        CheckpointError, match=r"self_attn\.[qkv]_proj\.bias \(\+\d+ more\): the native projections are bias-free"
    ):
        H.upcycle(Qwen2ForCausalLM(config))
