"""Layering: reading a checkpoint needs none of the training stack, and diffv2's parts import one way only."""

from __future__ import annotations

import ast
import graphlib
import json
import os
import subprocess
import sys
from pathlib import Path

import diffv2

SRC = Path(diffv2.__file__).parent

# Each part of diffv2 (a subpackage or a top-level module; "diffv2" is the package's own __init__) and the parts
# it may import, lazily or not: kernels -> attention -> model -> checkpoint -> {train, generate, serve, eval, hf}
# -> compare -> cli.
MODEL_LAYER = {"errors", "config", "kernels", "attention", "model", "sizing", "metrics", "diagnostics"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "kernels": {"config", "errors"},
    "attention": {"config", "errors", "kernels"},
    "model": {"attention", "config", "errors", "kernels"},
    "sizing": {"attention", "config", "errors", "model"},
    "metrics": set(),
    "diagnostics": {"attention", "config", "errors", "kernels", "metrics", "model"},
    "diffv2": {"config", "errors", "model", "sizing"},
    "data": {"config", "errors"},
    "checkpoint": {"config", "data", "errors", "model"},
    "generate": MODEL_LAYER | {"checkpoint", "data"},
    "train": MODEL_LAYER | {"checkpoint", "data", "diffv2", "generate"},
    "hf": MODEL_LAYER | {"checkpoint", "data", "diffv2", "generate"},
    "serve": MODEL_LAYER | {"checkpoint", "data", "generate"},
    "eval": MODEL_LAYER | {"checkpoint", "data", "diffv2", "generate", "hf", "train"},
    "compare": MODEL_LAYER | {"checkpoint", "data", "diffv2", "eval", "generate", "hf", "train"},
    "cli": MODEL_LAYER | {"checkpoint", "compare", "data", "diffv2", "eval", "generate", "hf", "serve", "train"},
    "__main__": {"cli"},
}
# What training alone needs: none of it may be loaded to read, sample from or export a checkpoint.
TRAINING_STACK = (
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint",
    "diffv2.train.trainer",
    "diffv2.train.setup",
    "diffv2.train.distributed",
)


def parts() -> set[str]:
    found = {p.stem for p in SRC.glob("*.py")} | {p.parent.name for p in SRC.glob("*/__init__.py")}
    return {"diffv2" if name == "__init__" else name for name in found}


def imported_parts(source: str, rel: tuple[str, ...]) -> set[str]:
    """The diffv2 parts that the file ``rel`` (path parts below src/diffv2) with text ``source`` imports anywhere."""
    package = ["diffv2", *rel[:-1]]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # ``from .. import x`` may name a part (a module) or an attribute of the package
            modules = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in modules:
            dotted = name.split(".")
            if dotted[0] == "diffv2":
                found.add(dotted[1] if len(dotted) > 1 and dotted[1] in parts() else "diffv2")
    return found


def test_parts_import_only_downward_and_the_layers_have_no_cycle():
    assert parts() <= ALLOWED.keys(), f"new parts {sorted(parts() - ALLOWED.keys())}: add them to ALLOWED"
    upward = []
    for file in sorted(SRC.rglob("*.py")):
        rel = file.relative_to(SRC)
        source = "diffv2" if rel.name == "__init__.py" and len(rel.parts) == 1 else rel.parts[0].removesuffix(".py")
        found = imported_parts(file.read_text(encoding="utf-8"), rel.parts)
        upward += [f"{rel} imports diffv2.{dst}" for dst in found - ALLOWED[source] - {source}]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)
    list(graphlib.TopologicalSorter(ALLOWED).static_order())  # raises CycleError if the table itself loops


def test_the_scan_sees_relative_absolute_and_lazy_imports():
    """The scanner itself: an upward import written any of the usual ways is found."""
    source = "from ..train import config\nimport diffv2.compare.grid\n\ndef f():\n    from .. import hf, Transformer\n"
    assert imported_parts(source, ("checkpoint", "probe.py")) == {"train", "compare", "hf", "diffv2"}
    assert imported_parts("from .model import Transformer\nfrom . import errors\n", ("x.py",)) == {"model", "errors"}


CHILD = r"""
import json, sys

import torch

import diffv2.cli
import diffv2.eval
import diffv2.generate
import diffv2.serve
from diffv2 import ModelConfig, Transformer
from diffv2.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from diffv2.data import Tokenizer

run_dir, seed, stack, report = sys.argv[1], int(sys.argv[2]), tuple(sys.argv[3].split(",")), sys.argv[4]


def loaded():
    return sorted(m for m in sys.modules if m.startswith(stack))


def same(a, b):
    return a.keys() == b.keys() and all(
        same(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a)


torch.manual_seed(seed)
tok = Tokenizer.byte_level()
cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                         head_dim=16, ffn_hidden=64, max_seq_len=64)
model = Transformer(cfg)
save_checkpoint(run_dir, 1, model=model, state={"step": 1}, config={"model": cfg.to_dict(), "train": {}},
                tokenizer_json=tok.to_json_str())
pretrained = load_pretrained(run_dir)
result = {"io_only": loaded(), "same_weights": same(pretrained.model.state_dict(), model.state_dict()),
          "same_tokenizer": pretrained.tokenizer.sha256() == tok.sha256()}

# Phase 2, optimizers and running the model: torch imports torch._dynamo when an optimizer is built or a custom
# op runs, transformers imports its generation utilities, and both import torch's FSDP themselves; diffv2 must
# add nothing to what they load.
import torch._dynamo
from transformers import GenerationMixin, PreTrainedModel

result["baseline"] = loaded()
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
for p in model.parameters():
    p.grad = torch.randn_like(p)
opt.step()
save_checkpoint(run_dir, 2, model=model, optimizer=opt, state={"step": 2},
                config={"model": cfg.to_dict(), "train": {}}, tokenizer_json=tok.to_json_str())
resumed = Transformer(cfg)
resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
load_checkpoint(run_dir, model=resumed, optimizer=resumed_opt)
result["same_state"] = same(resumed.state_dict(), model.state_dict()) and same(
    resumed_opt.state_dict()["state"], opt.state_dict()["state"])
x = torch.randint(0, cfg.vocab_size, (2, 12))
with torch.no_grad():
    logits = model.eval()(x)
    result["same_logits"] = torch.equal(load_pretrained(run_dir).model(x), logits)  # step 2 now
    result["cli_status"] = diffv2.cli.main(["generate", "--checkpoint", run_dir, "--prompt", "ab",
                                            "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"])
    import diffv2.hf

    hf_logits = diffv2.hf.to_hf(diffv2.hf.load_native(run_dir)[0])(x).logits
    result["hf_matches"] = torch.allclose(hf_logits, logits, atol=1e-5)
result["running"] = loaded()
with open(report, "w") as f:
    json.dump(result, f)
"""


def test_reading_a_checkpoint_loads_none_of_the_training_stack(tmp_path):
    """In a fresh process: save a tiny model and load it for inference with no trainer, FSDP or DCP module
    imported; then save and resume one with its optimizer, sample from it through ``diffv2 generate`` and export
    it through diffv2.hf, which import no more of them than torch (for optimizers and custom ops) and transformers
    themselves do."""
    seed, report = int.from_bytes(os.urandom(4), "little"), tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "run"), str(seed), ",".join(TRAINING_STACK), str(report)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(report.read_text(encoding="utf-8"))
    assert result["io_only"] == [], "saving or loading a checkpoint imported the training stack"
    assert result["same_weights"] and result["same_tokenizer"] and result["same_state"]
    assert result["same_logits"] and result["hf_matches"] and result["cli_status"] == 0
    assert not [m for m in result["baseline"] if not m.startswith("torch.distributed.fsdp")]
    assert result["running"] == result["baseline"], "sampling or exporting imported more than torch/transformers do"
