"""The README's Python examples run as written, in order (the later ones use the earlier ones' names), and
give what their comments say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

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
