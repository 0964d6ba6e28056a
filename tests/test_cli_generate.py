"""`diffv2 generate` as a user drives it: a random seed that is printed and repeats the sample, top-k 0, several
samples streamed in order, prompts from stdin and files, and the chat REPL."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from diffv2.checkpoint import load_pretrained
from diffv2.cli import main
from diffv2.generate import generate_batch, plain_chat_text

from .cli_flags import QUIET_RUN, TINY_MODEL


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    text = root / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. And the earth was without form. " * 300)
    args = [
        "train",
        "--data",
        str(text),
        "--tokenizer",
        "byte",
        "--out_dir",
        str(root / "run"),
        "--steps",
        "30",
        "--batch_size",
        "4",
        "--seq_len",
        "32",
        "--warmup_steps",
        "3",
        *TINY_MODEL,
        *QUIET_RUN,
    ]
    assert main(args) == 0
    return root / "run"


def gen(capsys, run: Path, *flags: str) -> tuple[str, str]:
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), *flags]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_the_default_seed_is_random_printed_and_repeats_the_sample(run, capsys):
    outs, seeds = [], []
    for _ in range(2):
        out, err = gen(capsys, run, "--prompt", "In the", "--max-new-tokens", "40", "--temperature", "1")
        seeds.append(int(re.fullmatch(r"seed (\d+) \(--seed \1 repeats this\)", err.strip()).group(1)))
        outs.append(out)
    assert seeds[0] != seeds[1] and outs[0] != outs[1]  # 40 tokens at T=1: equal by chance is negligible
    again, err = gen(
        capsys, run, "--prompt", "In the", "--max-new-tokens", "40", "--temperature", "1", "--seed", str(seeds[0])
    )
    assert again == outs[0] and err == ""
    _, err = gen(capsys, run, "--prompt", "In the", "--max-new-tokens", "5", "--temperature", "0")
    assert err == ""  # greedy decoding draws nothing: no seed to report


def test_top_k_zero_disables_top_k(run, capsys):
    common = ["--prompt", "And", "--max-new-tokens", "30", "--temperature", "1.5", "--seed", "5"]
    off, _ = gen(capsys, run, *common, "--top-k", "0")
    vocab, _ = gen(capsys, run, *common, "--top-k", "257")  # k = the whole (byte) vocabulary: no limit either
    limited, _ = gen(capsys, run, *common, "--top-k", "1")
    greedy, _ = gen(capsys, run, "--prompt", "And", "--max-new-tokens", "30", "--temperature", "0")
    assert off == vocab and limited == greedy and off != greedy


def test_several_samples_stream_in_order_and_equal_the_batch(run, capsys):
    out, _ = gen(
        capsys,
        run,
        "--prompt",
        "In the",
        "--prompt",
        "And",
        "--num-samples",
        "3",
        "--max-new-tokens",
        "12",
        "--seed",
        "7",
        "--temperature",
        "1",
        "--no-stop",
    )
    blocks = re.split(r"^--- sample (\d)/3 of '(.*?)'\n", out, flags=re.M)[1:]
    got = [(int(blocks[i]), blocks[i + 1], blocks[i + 2].removesuffix("\n")) for i in range(0, len(blocks), 3)]
    assert [(n, p) for n, p, _ in got] == [
        (1, "In the"),
        (2, "In the"),
        (3, "In the"),
        (1, "And"),
        (2, "And"),
        (3, "And"),
    ]
    loaded = load_pretrained(run)
    tok = loaded.tokenizer
    prompts = [tok.encode(p) for p in ("In the",) * 3 + ("And",) * 3]
    rows = generate_batch(loaded.model, prompts, 12, temperature=1.0, top_k=50, seed=7)
    texts = [p + tok.decode(r) for p, r in zip(("In the",) * 3 + ("And",) * 3, rows, strict=True)]
    assert [text for _, _, text in got] == texts
    assert len({text for _, _, text in got[:3]}) == 3  # three draws, not one repeated


def test_prompts_from_stdin_and_files(run, capsys, monkeypatch, tmp_path):
    file = tmp_path / "p.txt"
    file.write_text("And God\n", encoding="utf-8")
    flags = ["--max-new-tokens", "8", "--temperature", "0"]
    direct, _ = gen(capsys, run, "--prompt", "And God", *flags)
    from_file, _ = gen(capsys, run, "--prompt-file", str(file), *flags)
    monkeypatch.setattr(sys, "stdin", io.StringIO("And God\n"))
    from_stdin, _ = gen(capsys, run, "--prompt", "-", *flags)
    assert direct == from_file == from_stdin and direct.startswith("And God")


def test_chat_streams_replies_until_end_of_input(run, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nWho made the earth?\n"))
    out, _ = gen(capsys, run, "--chat", "--max-new-tokens", "16", "--temperature", "0", "--no-stop")
    replies = out.split("\n")
    loaded = load_pretrained(run)
    prompt = loaded.tokenizer.encode(plain_chat_text([{"role": "user", "content": "Hello"}]))
    first = loaded.tokenizer.decode(generate_batch(loaded.model, [prompt], 16, temperature=0)[0])
    # the first reply is greedy decoding of the plain template, cut where the model starts a "User:" turn
    assert out.startswith(first.split("\nUser:")[0])
    assert len([r for r in replies if r]) >= 2


def test_errors_come_before_any_output(run, capsys):
    capsys.readouterr()
    for flags, field in (
        (["--max-new-tokens", "100000"], "max_new_tokens"),
        (["--top-k", "-1"], "top-k"),
        (["--num-samples", "0"], "num-samples"),
    ):
        assert main(["generate", "--checkpoint", str(run), "--prompt", "In", "--seed", "1", *flags]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and field in captured.err and len(captured.err.strip().splitlines()) == 1
    assert main(["generate", "--checkpoint", str(run)]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_generate_help_shows_its_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag, default in (
        ("max-new-tokens", "200"),
        ("temperature", "0.8"),
        ("top-k", "50"),
        ("top-p", "1.0"),
        ("num-samples", "1"),
        ("kv-cache-dtype", "auto"),
    ):
        entry = text[text.index(f"  --{flag}") :].split("\n  -")[0]
        assert f"(default: {default})" in " ".join(entry.split()), flag
    from diffv2.generate.cache import KV_DTYPES

    assert f"--kv-cache-dtype {{{','.join(KV_DTYPES)}}}" in text  # the flag's choices are the cache's formats
    assert "random" in text
