"""The Hugging Face remote-code file restates diffv2's blocks (it must load without the diffv2 package); every
restated block is marked ``# Copied from diffv2.<module>.<name>`` (optionally ``with A->B, C->D``: whole-word
renames applied to the source) on the line above its ``def``/``class``, and must stay identical to its source.

Identical means: the same text after dedenting, the documented renames, dropping trailing whitespace and blank
lines. Comments and docstrings count, so a fix in one place that the other lacks fails here.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import diffv2.hf.modeling_diffv2 as modeling

MARKER = re.compile(r"^(?P<indent>\s*)# Copied from (?P<name>diffv2(?:\.\w+)+)(?: with (?P<renames>.+))?\s*$")
RENAME = re.compile(r"^\s*(\w+)->(\w+)\s*$")
# the blocks that carry DIFF V2's and DIFF V1's math: each must stay marked, so dropping a marker fails too
REQUIRED = {
    "diffv2.attention.variants.subtract_pairs",
    "diffv2.attention.variants.DiffV2Attention.weight",
    "diffv2.attention.variants.DiffV2Attention.combine",
    "diffv2.attention.common.split_pairs",
    "diffv2.attention.diff_v1.DiffV1Attention.combine",
    "diffv2.attention.diff_v1.DiffV1Attention.lambda_full",
    "diffv2.kernels.rope.apply_rope",
    "diffv2.kernels.rope.rope_cos_sin",
}


@dataclass
class Copy:
    name: str  # the dotted source, e.g. diffv2.attention.variants.subtract_pairs
    renames: list[tuple[str, str]]
    line: int  # 1-based line of the marker
    text: str  # the marked block as written in the copy


def resolve(dotted: str) -> object:
    """The object a dotted name points at: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def normalise(code: str) -> str:
    lines = (line.rstrip() for line in textwrap.dedent(code).splitlines())
    return "\n".join(line for line in lines if line)


def apply_renames(code: str, renames: list[tuple[str, str]]) -> str:
    for old, new in renames:
        code = re.sub(rf"\b{re.escape(old)}\b", new, code)
    return code


def find_copies(source: str) -> list[Copy]:
    """Every marker in ``source`` with the block below it; a marker that precedes no def/class is an error."""
    lines = source.splitlines()
    blocks = {
        node.lineno: node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    copies = []
    for i, line in enumerate(lines, start=1):
        match = MARKER.match(line)
        if not match:
            if line.lstrip().startswith("# Copied from"):
                raise ValueError(f"line {i}: malformed marker {line.strip()!r}")
            continue
        node = blocks.get(i + 1)
        if node is None or node.decorator_list:
            raise ValueError(f"line {i}: a Copied-from marker must sit right above an undecorated def or class")
        renames = []
        for item in (match["renames"] or "").split(",") if match["renames"] else []:
            pair = RENAME.match(item)
            if not pair:
                raise ValueError(f"line {i}: rename {item.strip()!r} is not of the form Old->New")
            renames.append((pair[1], pair[2]))
        text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
        copies.append(Copy(match["name"], renames, i, text))
    return copies


def drift(copy: Copy) -> str | None:
    """None if the copy equals its source (after renames and whitespace), else a unified diff source → copy."""
    expected = normalise(apply_renames(inspect.getsource(resolve(copy.name)), copy.renames))
    got = normalise(copy.text)
    if got == expected:
        return None
    diff = difflib.unified_diff(
        expected.splitlines(), got.splitlines(), copy.name, f"copy at line {copy.line}", lineterm=""
    )
    return "\n".join(diff)


def check(source: str) -> list[str]:
    """One message per copy in ``source`` that differs from its source."""
    return [f"line {c.line}: {c.name}\n{d}" for c in find_copies(source) if (d := drift(c)) is not None]


MODELING = Path(modeling.__file__).read_text(encoding="utf-8")


def test_every_copy_matches_its_source():
    copies = find_copies(MODELING)
    assert {c.name for c in copies} >= REQUIRED, f"unmarked: {sorted(REQUIRED - {c.name for c in copies})}"
    problems = check(MODELING)
    assert not problems, "the HF remote code drifted from diffv2 (fix the copy or its marker):\n" + "\n".join(problems)


def test_a_drifted_copy_fails():
    """The checker itself: one changed operator inside a marked block, or a changed comment, is caught and named."""
    body = MODELING.index("# Copied from diffv2.attention.variants.subtract_pairs")
    sign = MODELING.index("upcast(o1) - weight", body)
    altered = MODELING[:sign] + "upcast(o1) + weight" + MODELING[sign + len("upcast(o1) - weight") :]
    problems = check(altered)
    assert len(problems) == 1 and "diffv2.attention.variants.subtract_pairs" in problems[0]
    assert "+    return (upcast(o1) + weight" in problems[0]
    comment = MODELING.replace("# (B, h/2, T, 2d)", "# (B, h, T, d)", 1)
    assert comment != MODELING and len(check(comment)) == 1


def test_renames_and_whitespace():
    """``with A->B`` renames whole words of the source; blank lines and indentation do not count; a marker that
    points at nothing, or at no block, is an error rather than a pass."""
    source = inspect.getsource(resolve("diffv2.attention.common.upcast"))
    renamed = source.replace("def upcast", "def widen")
    marked = "# Copied from diffv2.attention.common.upcast with upcast->widen\n" + renamed
    assert check(marked) == []
    assert len(check(marked.replace(" with upcast->widen", ""))) == 1  # the rename is needed
    indented = "class A:\n    # Copied from diffv2.attention.common.upcast\n" + textwrap.indent(source, "    ") + "\n\n"
    assert check(indented.replace('are."""\n', 'are."""\n   \n', 1)) == []  # a blank line with spaces
    with pytest.raises(ValueError, match="right above"):
        find_copies("# Copied from diffv2.attention.common.upcast\nx = 1\n")
    with pytest.raises(ValueError, match="Old->New"):
        find_copies("# Copied from diffv2.attention.common.upcast with upcast=>widen\n" + renamed)
    with pytest.raises(AttributeError):
        check("# Copied from diffv2.attention.common.no_such_function\n" + source)
