"""The benchmark scripts' CPU modes, so a script broken here is not first found on a lent GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_train_bench_on_cpu(tmp_path):
    out = run_script(
        "bench/train.py",
        "--device",
        "cpu",
        "--shapes",
        "tiny",
        "--seqs",
        "64",
        "--batch-tokens",
        "256",
        "--steps",
        "1",
        "--modes",
        "eager",
        "--variants",
        "baseline,baseline_2h,diff_v2,diff_v2_keep",
        "--micro-batches",
        "2",
        "--out",
        str(tmp_path),
    )
    rows = json.loads((tmp_path / "train_bench.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["baseline", "baseline_2h", "diff_v2", "diff_v2_keep"]
    assert all(r["batch"] == 4 and r["micro_batches"] == 2 for r in rows)  # 4 rows a step, in 2 passes
    assert all(r["tokens_per_s"] > 0 and r["params"] > 0 for r in rows)
    assert rows[1]["flops_per_token"] > rows[0]["flops_per_token"]  # 2h query heads
    assert rows[3]["params"] == rows[2]["params"] and rows[3]["flops_per_token"] == rows[2]["flops_per_token"]
    assert "diff_v2 / baseline_2h (tiny, 64, eager)" in out


@pytest.mark.slow
def test_scaling_bench_on_cpu(tmp_path):
    """One process, then DDP and FSDP2 (default and ZeRO-2 resharding) on two gloo ranks, then the FSDP
    checkpoint resumed in one process: in fp32 on the CPU the losses agree."""
    out = run_script(
        "bench/scaling.py",
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--tokenizer",
        "byte",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--grad-accum",
        "2",
        "--log-every",
        "2",
        "--modes",
        "ddp,fsdp,fsdp-never",
        "--no-one-rank",
        "--out",
        str(tmp_path),
    )
    rows = {r["run"]: r for r in json.loads((tmp_path / "scaling.json").read_text())}
    assert set(rows) == {"1 GPU", "ddp x2", "fsdp x2", "fsdp-never x2", "fsdp x2 -> 1"}
    assert "--fsdp_reshard_after_forward never" in out
    for name in ("ddp x2", "fsdp x2", "fsdp-never x2", "fsdp x2 -> 1"):
        assert rows[name]["max_abs_dloss"] < 1e-4, name
    assert rows["ddp x2"]["scaling_efficiency"] > 0
    assert "fsdp x2 -> 1" in out


def test_train_bench_variants_name_the_configs_they_build(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import importlib

    bench_train = importlib.import_module("train")
    build = bench_train.model_config
    v2, keep, wide = (build("tiny", name, 64, 256) for name in ("diff_v2", "diff_v2_keep", "baseline_2h"))
    assert v2.recompute_pair_difference and not keep.recompute_pair_difference
    assert keep.replace(recompute_pair_difference=True) == v2
    assert wide.attention == "baseline" and wide.n_heads == 2 * v2.n_heads
    assert build("tiny", "diff_v2+triton", 64, 256).backend == "triton"


@pytest.mark.slow
def test_serve_bench_quick_on_cpu(tmp_path):
    pytest.importorskip("fastapi")
    out = run_script("bench/serve.py", "--quick", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "serve_bench.json").read_text())["rows"]
    phases = ["offline", "serve uniform", "serve", "serve", "serve", "offline static", "hf static", "hf uniform"]
    for variant in ("diff_v2", "baseline"):
        mine = [r for r in rows if r["variant"] == variant]
        assert [r["phase"] for r in mine] == phases and [r["clients"] for r in mine[2:5]] == [1, 4, 8]
        served = [r for r in mine if r["phase"].startswith("serve")]
        assert all(r["failed"] == 0 and r["tokens"] > 0 and r["ttft_p50_ms"] > 0 for r in served)
        # every request prefilled at least once, and the loop's host time was spent in each part
        assert all(r["prefill_calls"] >= r["requests"] and r["steps"] > 0 for r in served)
        assert all(r["prefill_s"] > 0 and r["launch_s"] > 0 and r["collect_s"] > 0 for r in served)
        assert all(r["tokens_per_s"] > 0 for r in mine)
    assert "diff_v2: serve / offline generate_batch, 8 requests at once:" in out
    assert "diff_v2 / baseline tokens/s, serve (8):" in out
