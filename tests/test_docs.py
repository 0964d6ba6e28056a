"""The docs stay attached to the code: every ``docs/<page>.md#anchor`` that code, configs or docs cite exists, and
every source file the topic pages name exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CITING = ("src", "tests", "bench", "scripts", "configs", "docs")
CITATION = re.compile(r"\b(\w+)\.md#([\w-]+)")
ANCHOR = re.compile(r'<a id="([\w-]+)"></a>')
PATH = re.compile(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|sh|toml))`")


def anchors() -> dict[str, set[str]]:
    return {page.name: set(ANCHOR.findall(page.read_text(encoding="utf-8"))) for page in DOCS.glob("*.md")}


def broken_citations(text: str, known: dict[str, set[str]]) -> list[str]:
    """``page.md#anchor`` citations in ``text`` whose page is a docs page and whose anchor it lacks."""
    return [
        f"{page}.md#{a}" for page, a in CITATION.findall(text) if f"{page}.md" in known and a not in known[page + ".md"]
    ]


def test_cited_anchors_exist():
    known = anchors()
    assert {"architecture.md", "design.md", "benchmarks.md"} <= known.keys()
    files = [ROOT / "README.md"] + [
        f for d in CITING for f in (ROOT / d).rglob("*") if f.suffix in {".py", ".md", ".sh", ".toml"}
    ]
    broken = {
        str(f.relative_to(ROOT)): bad for f in files if (bad := broken_citations(f.read_text(encoding="utf-8"), known))
    }
    assert not broken, f"citations of missing anchors: {broken}"


def test_the_checker_sees_a_missing_anchor():
    known = {"design.md": {"pairing"}}
    typo = "design.md#" + "pairng"  # spelled apart, so this file cites no missing anchor itself
    assert broken_citations(f"see docs/design.md#pairing and {typo}", known) == [typo]
    assert broken_citations("elsewhere.md#anything", known) == []


def test_named_source_files_exist():
    """A path in backticks on a topic page names a file of this repository (as written, or below src/diffv2/)."""
    missing = []
    for page in ("architecture.md", "design.md", "benchmarks.md"):
        text = re.sub(r"```.*?```", "", (DOCS / page).read_text(encoding="utf-8"), flags=re.S)
        for path in PATH.findall(text):
            if path.startswith("Diff-Transformer/"):  # Microsoft's repository, cited as a source
                continue
            if not any((base / path).exists() for base in (ROOT, ROOT / "src", ROOT / "src" / "diffv2")):
                missing.append(f"{page}: {path}")
    assert not missing, missing
