"""The README's Python examples run as written, in order (the later ones use the earlier ones' names), and
give what their comments say."""

from __future__ import annotations

import io
import re
import shlex
import shutil
import sys
from pathlib import Path

import torch

from diffv2.cli import build_parser, main
from diffv2.data import default_corpus_documents

from .cli_flags import TINY_MODEL

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_examples_run_and_match_their_comments(capsys):
    blocks = _python_blocks()
    assert len(blocks) >= 2, "the README's Python examples went missing"
    torch.manual_seed(0)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)  # our own README
    assert scope["logits"].shape == (2, 63, 1000) and scope["loss"].ndim == 0
    assert torch.isfinite(scope["loss"])
    assert scope["baseline"].num_params()["total"] == scope["model"].num_params()["total"]
    outs = scope["outs"]
    assert len(outs) == 2 and all(len(o) == 20 for o in outs)
    assert capsys.readouterr().out.strip(), "the examples print what they show"


# What the README's shell commands need that a fresh checkout lacks, and the flags that shrink its GPU-sized
# runs to a few CPU steps (appended flags win over the README's own).
SHRINK_MODEL = ["--preset", "tiny", *TINY_MODEL]
SHRINK_RUN = [
    "--steps",
    "3",
    "--batch_size",
    "2",
    "--seq_len",
    "32",
    "--warmup_steps",
    "1",
    "--eval_every",
    "3",
    "--eval_batches",
    "1",
    "--diag_every",
    "0",
    "--sample_tokens",
    "0",
    "--no-tensorboard",
    "--no-progress",
]


def _shell_commands(text: str | None = None) -> list[list[str]]:
    """Every ``diffv2 ...`` (or ``torchrun ... -m diffv2 ...``) command of the README's bash blocks, as argv
    after ``diffv2``; comments dropped, continuation lines joined, placeholder commands (``...``) left out."""
    text = README.read_text(encoding="utf-8") if text is None else text
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "..." in words or not words:
                continue
            if words[0] == "diffv2":
                commands.append(words[1:])
            elif "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["diffv2"]:
                commands.append(words[words.index("-m") + 2 :])
    return commands


def test_readme_commands_parse():
    commands = _shell_commands()
    assert len(commands) >= 20, "the README's commands went missing"
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)  # an unknown flag or a bad choice exits here, naming the command


def test_readme_train_generate_commands_run(tmp_path, monkeypatch, capsys):
    """The "Train, generate, inspect" block, in order, in a fresh folder: training commands with SHRINK."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(README.parent / "configs", tmp_path / "configs")
    docs = default_corpus_documents()
    for folder, books in (("my_texts", docs[:3]), ("more_texts", docs[3:4])):
        (tmp_path / folder).mkdir()
        for i, book in enumerate(books):
            (tmp_path / folder / f"{i}.txt").write_text(book[:60_000], encoding="utf-8")
    (tmp_path / "prompt.txt").write_text("And God said\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text(docs[5][:2000], encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # the chat ends at once
    section = README.read_text(encoding="utf-8").split("## Train, generate, inspect", 1)[1].split("\n## ")[0]
    ran = []
    for argv in _shell_commands(section):
        shrink = []
        if argv[0] == "train" and "--resume" not in argv:  # with init_from the architecture is the checkpoint's
            shrink = SHRINK_RUN + (SHRINK_MODEL if "--init_from" not in argv else [])
        assert main([*argv, *shrink]) == 0, (argv, capsys.readouterr().err)
        ran.append(argv[0])
    assert ran.count("train") == 4 and ran.count("generate") == 4 and "perplexity" in ran
