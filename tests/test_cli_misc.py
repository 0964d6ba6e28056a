"""`diffv2 models` and `diffv2 --version`."""

from __future__ import annotations

import re

import pytest

from diffv2 import ModelConfig, __version__
from diffv2.cli import main
from diffv2.compare.grid import VARIANTS
from diffv2.sizing import baseline_1p5h, baseline_2h_matched, baseline_ffn_matched, total_params

from .cli_flags import QUIET_RUN, TINY_MODEL


def _rows(out: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w+)\*?\s+(.*)$", out, flags=re.M)}


def test_models_lists_every_comparison_variant_with_meta_device_counts(capsys):
    assert main(["models", "--preset", "125m", "--n-kv-heads", "6"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(VARIANTS) <= set(rows)
    cfg = ModelConfig.preset("125m", n_kv_heads=6, vocab_size=32768)
    for name, derived in (
        ("baseline_1p5h", baseline_1p5h(cfg)),
        ("baseline_matched", baseline_ffn_matched(cfg)),
        ("baseline_2h_matched", baseline_2h_matched(cfg)),
        ("diff_v2", cfg),
    ):
        assert int(rows[name].split()[0].replace(",", "")) == total_params(derived), name


def test_models_says_why_a_variant_cannot_be_built(capsys):
    assert main(["models", "--preset", "125m"]) == 0  # 1.5 x 12 = 18 heads cannot share 4 KV heads
    out = capsys.readouterr().out
    assert "cannot be built" in _rows(out)["baseline_1p5h"]
    assert re.search(r"^baseline_1p5h: .*n_kv_heads", out, flags=re.M)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"diffv2 {__version__}"


def test_datasets_and_checkpoints_are_written_with_the_usual_file_mode(tmp_path):
    import os

    from diffv2.data import prepare_dataset

    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 50, encoding="utf-8")
    prepare_dataset(text, tmp_path / "data", tokenizer="byte", progress=False)
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "data"),
                "--out_dir",
                str(tmp_path / "run"),
                "--steps",
                "1",
                "--warmup_steps",
                "0",
                "--batch_size",
                "2",
                "--seq_len",
                "16",
                *TINY_MODEL,
                *QUIET_RUN,
            ]
        )
        == 0
    )
    mask = os.umask(0o022)
    os.umask(mask)
    files = [*(tmp_path / "data").iterdir(), *(tmp_path / "run" / "checkpoints" / "step_00000001").iterdir()]
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o666 & ~mask for f in files}


def test_perplexity_scores_every_token_once_with_the_context_a_window_allows(tmp_path, capsys):
    import math

    import torch

    from diffv2 import Transformer
    from diffv2.eval.perplexity import perplexity, token_losses

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=300, n_layers=2, max_seq_len=64)).eval()
    ids = torch.randint(0, 300, (150,)).tolist()
    # a window holding the whole text: the ordinary causal loss of one forward
    short = ids[:60]
    logits = model(torch.tensor([short[:-1]]))[0]
    full = torch.nn.functional.cross_entropy(logits, torch.tensor(short[1:]), reduction="none").double()
    assert torch.allclose(token_losses(model, short, window=64, stride=32), full, atol=1e-5)
    # overlapping windows: token t is scored once, with the window that starts at the last stride boundary
    # at least 48 - 16 tokens before it (or 0)
    losses = token_losses(model, ids, window=48, stride=16)
    assert losses.shape == (149,)
    t = 100  # windows start at 0, 16, ..., 64; the one scoring position 100 is [64, 112)
    window = torch.tensor([ids[64:112]])
    expected = torch.nn.functional.cross_entropy(model(window[:, :-1])[0], window[0, 1:], reduction="none")
    assert math.isclose(losses[t - 1].item(), expected[t - 65].item(), rel_tol=1e-5)
    stats = perplexity(model, ids, 600, window=48, stride=16)
    assert math.isclose(stats["perplexity"], math.exp(losses.mean().item()), rel_tol=1e-9)
    assert math.isclose(stats["bits_per_byte"], losses.sum().item() / math.log(2) / 600, rel_tol=1e-9)


def test_perplexity_cli_reads_text_files(tmp_path, capsys):
    import json

    corpus, text = tmp_path / "corpus.txt", tmp_path / "t.txt"
    corpus.write_text("In the beginning God created the heaven and the earth. " * 400, encoding="utf-8")
    text.write_text("And the earth was without form, and void. " * 5, encoding="utf-8")
    assert (
        main(
            [
                "train",
                "--data",
                str(corpus),
                "--tokenizer",
                "byte",
                "--out_dir",
                str(tmp_path / "run"),
                "--steps",
                "2",
                "--warmup_steps",
                "0",
                "--batch_size",
                "2",
                "--seq_len",
                "32",
                *TINY_MODEL,
                *QUIET_RUN,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["perplexity", str(text), "--checkpoint", str(tmp_path / "run"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)[str(text)]
    assert result["window"] == 32 and result["stride"] == 16  # the run's training length
    assert result["tokens_scored"] == len(text.read_bytes()) - 1  # byte tokens, the first has no context
    assert main(["perplexity", str(tmp_path / "missing.txt"), "--checkpoint", str(tmp_path / "run")]) == 2
    assert "missing.txt" in capsys.readouterr().err
