"""diffv2 compare: grid expansion and parameter matching, resumable grid runs, the report, attention maps, inspect."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import shutil
import statistics
import struct
from pathlib import Path

import pytest
import torch

import diffv2.train
from diffv2 import ModelConfig, Transformer, baseline_ffn_matched
from diffv2.cli import compare as compare_cli
from diffv2.cli import inspect as inspect_cli
from diffv2.compare import OPT_IN, VARIANTS, CompareConfig, capture_maps, expand_grid, run_grid, run_state, write_report
from diffv2.compare.loading import checkpoint_dir
from diffv2.compare.probe import probe_run
from diffv2.compare.results import load_grid
from diffv2.compare.stats import betainc, t_sf
from diffv2.data import default_corpus_documents
from diffv2.errors import ConfigError
from diffv2.train import TrainingError, train

TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_hidden=64)
BASE = dict(
    tokenizer="byte",
    steps=6,
    batch_size=4,
    seq_len=32,
    warmup_steps=1,
    eval_every=3,
    eval_batches=0,
    log_every=2,
    diag_every=3,
    save_every=3,
    tensorboard=False,
    sample_tokens=0,
    val_fraction=0.34,
)


def make_config(data: Path | str, out: Path, **compare) -> CompareConfig:
    return CompareConfig.from_dict(
        {**BASE, "data": str(data), "model": dict(TINY), "compare": {"out_dir": str(out), **compare}}
    )


def total_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return Transformer(cfg).num_params()["total"]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def cli(*argv: str) -> int:
    """The two new subcommands on a parser of their own (the package's cli/__init__ registers them separately)."""
    parser = argparse.ArgumentParser(prog="diffv2")
    sub = parser.add_subparsers(required=True)
    compare_cli.add_parser(sub)
    inspect_cli.add_parser(sub)
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared machine OpenMP's spinning threads make
    every small op wait for a core; one thread keeps this file fast and steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    for i, doc in enumerate(default_corpus_documents()[:3]):
        for part in range(4):  # 12 documents: a third of them validation, so both halves get some
            (root / f"book{i}_{part}.txt").write_text(doc[1000 * part : 1000 * (part + 1)], encoding="utf-8")
    return root


# ---------------------------------------------------------------------- grid expansion
def test_grid_has_every_variant_lr_and_seed_with_unique_dirs(tmp_path):
    cfg = make_config("unused", tmp_path / "out", lrs=[1e-3, 3e-3], seeds=[0, 1, 2])
    specs = expand_grid(cfg, data_dir=tmp_path / "data")
    default = [v for v in VARIANTS if v not in OPT_IN]  # controls for a question run only when named
    assert cfg.variants == default and len(default) == 7
    assert len(specs) == 7 * 2 * 3
    assert {(s.variant, s.lr, s.seed) for s in specs} == {
        (v, lr, s) for v in default for lr in (1e-3, 3e-3) for s in (0, 1, 2)
    }
    assert len({s.run_dir for s in specs}) == len(specs)
    assert specs[0].run_dir == tmp_path / "out" / "baseline_matched" / "lr0.001" / "seed0"
    shared = {(s.train.data, s.train.steps, s.train.batch_size, s.train.seq_len, s.train.schedule) for s in specs}
    assert shared == {(str(tmp_path / "data"), 6, 4, 32, "cosine")}  # identical data, budget and schedule
    assert all(s.train.lr == s.lr and s.train.seed == s.seed and s.train.out_dir == str(s.run_dir) for s in specs)
    kinds = {
        s.variant: (s.train.model["attention"], s.train.model["pairing"], s.train.model["lambda_mode"]) for s in specs
    }
    assert kinds["v2_split"] == ("diff_v2", "split", "sigmoid") and kinds["v2_linear"][2] == "linear"
    assert kinds["v2_no_lambda"][2] == "none" and kinds["diff_v1"][0] == "diff_v1"


@pytest.mark.parametrize("preset", ["tiny", "small", "1b"])
def test_parameter_matching(tmp_path, preset):
    cfg = CompareConfig.from_dict({"preset": preset, "compare": {"out_dir": str(tmp_path)}})
    specs = {s.variant: s for s in expand_grid(cfg, data_dir=tmp_path)}
    models = {v: s.train.model_config(vocab_size=1000) for v, s in specs.items()}
    v2 = models["diff_v2"]
    n = {v: total_params(m) for v, m in models.items()}
    assert models["baseline_matched"] == baseline_ffn_matched(v2)
    # widening the SwiGLU by whole units matches to within half a unit (3·D weights) per layer
    assert abs(n["baseline_matched"] - n["diff_v2"]) <= 1.5 * v2.d_model * v2.n_layers
    assert abs(n["diff_v1"] - n["diff_v2"]) <= 1.5 * v2.d_model * v2.n_layers
    lambda_proj = v2.n_layers * v2.n_heads * v2.d_model
    assert n["baseline_1p5h"] == n["diff_v2"] - lambda_proj == n["v2_no_lambda"]
    assert n["v2_split"] == n["v2_linear"] == n["diff_v2"]


def test_small_output_baseline_differs_from_the_matched_baseline_only_in_o_proj_init(tmp_path):
    """The control for "is DIFF V2's gain its smaller attention output at init": the matched baseline, its o_proj
    initialised at half the scale (σ(λ) ≈ 0.5 halves DIFF V2's output at init), nothing else changed."""
    cfg = make_config("unused", tmp_path / "out", variants=["baseline_matched", "baseline_small_out"])
    specs = {s.variant: s.train.model_config(vocab_size=64) for s in expand_grid(cfg, data_dir=tmp_path)}
    small, matched = specs["baseline_small_out"], specs["baseline_matched"]
    assert small.replace(o_proj_init_scale=1.0) == matched and small.o_proj_init_scale == 0.5
    stds = {}
    for name, model_cfg in (("small", small), ("matched", matched)):
        torch.manual_seed(0)
        layer = Transformer(model_cfg).layers[0]
        stds[name] = (layer.attn.o_proj.weight.std().item(), layer.mlp.down_proj.weight.std().item())
    assert stds["small"][0] == pytest.approx(0.5 * stds["matched"][0], rel=0.05)
    assert stds["small"][1] == pytest.approx(stds["matched"][1], rel=0.05)  # the MLP's output init is unchanged


def test_control_variants(tmp_path):
    """The controls of the "what is DIFF V2's gain made of" grids: a zero-init o_proj pair, a per-head gated
    baseline and a 2h-head baseline matched to DIFF V2's parameters, and DIFF V2 with a constant σ."""
    names = [
        "diff_v2",
        "baseline_matched",
        "baseline_zero_out",
        "diff_v2_zero_out",
        "baseline_gated",
        "diff_v2_const",
        "baseline_2h_matched",
    ]
    cfg = CompareConfig.from_dict({"preset": "small", "compare": {"out_dir": str(tmp_path), "variants": names}})
    models = {s.variant: s.train.model_config(vocab_size=1000) for s in expand_grid(cfg, data_dir=tmp_path)}
    v2 = models["diff_v2"]
    n = {v: total_params(m) for v, m in models.items()}
    layers, d = v2.n_layers, v2.d_model
    assert models["baseline_zero_out"] == models["baseline_matched"].replace(o_proj_init_scale=0.0)
    assert models["diff_v2_zero_out"] == v2.replace(o_proj_init_scale=0.0)
    gated, wide = models["baseline_gated"], models["baseline_2h_matched"]
    assert gated.attention == "gated" and abs(n["baseline_gated"] - n["diff_v2"]) <= 1.5 * d * layers
    assert (wide.attention, wide.n_heads, wide.head_dim) == ("baseline", 2 * v2.n_heads, v2.head_dim)
    assert wide.ffn_hidden < v2.ffn_hidden and abs(n["baseline_2h_matched"] - n["diff_v2"]) <= 1.5 * d * layers
    assert models["diff_v2_const"].lambda_mode == "const"
    assert n["diff_v2_const"] == n["diff_v2"] - layers * v2.n_heads * d  # no lambda_proj
    tokens = torch.randint(0, 64, (2, 16))
    for name in ("baseline_zero_out", "diff_v2_zero_out", "baseline_gated", "diff_v2_const"):
        torch.manual_seed(0)
        model = Transformer(models[name].replace(**TINY, vocab_size=64))
        if name.endswith("zero_out"):  # the attention branch starts silent; the MLP's does not
            assert all(
                not layer.attn.o_proj.weight.any() and layer.mlp.down_proj.weight.any() for layer in model.layers
            )
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_bad_compare_configs_fail_early(tmp_path):
    with pytest.raises(ConfigError, match="choose from"):
        make_config("x", tmp_path, variants=["diff_v3"])
    with pytest.raises(ConfigError, match=r"unknown \[compare\] field"):
        make_config("x", tmp_path, sedes=[1])
    # 125m: 1.5·12 = 18 heads cannot share 4 KV heads; the default grid leaves the variant out, a list cannot
    cfg = CompareConfig.from_dict({"preset": "125m"})
    assert "baseline_1p5h" not in cfg.variants and "not divisible" in cfg.skipped["baseline_1p5h"]
    assert len(cfg.variants) == 6
    with pytest.raises(ConfigError, match=r"baseline_1p5h.*cannot be built"):
        CompareConfig.from_dict({"preset": "125m", "compare": {"variants": ["baseline_1p5h", "baseline_matched"]}})


# ---------------------------------------------------------------------- statistics
def test_the_t_distribution_without_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for t, df in [(0.5, 2.0), (2.1, 3.7), (-1.3, 10.0), (4.0, 1.0)]:
        tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
        assert math.isclose(tail if t >= 0 else 1 - tail, scipy_stats.t.sf(t, df), rel_tol=1e-9)
        assert math.isclose(t_sf(t, df), scipy_stats.t.sf(t, df), rel_tol=1e-9)


# ---------------------------------------------------------------------- running a grid
@pytest.fixture(scope="module")
def grid(text_dir, tmp_path_factory) -> CompareConfig:
    """The full default grid at 2 lrs × 2 seeds, run interrupted at step 3, then resumed to the end."""
    cfg = make_config(text_dir, tmp_path_factory.mktemp("grid") / "out", lrs=[3e-3, 1e-2], seeds=[0, 1])
    first = run_grid(cfg, stop_after=3, log=lambda _: None)
    assert [(o.before, o.after) for o in first] == [("new", "stopped")] * 28
    assert all(run_state(s.run_dir) == "resume" for s in expand_grid(cfg))
    second = run_grid(cfg, log=lambda _: None)
    assert [(o.before, o.after) for o in second] == [("resume", "done")] * 28
    return cfg


def test_finished_runs_are_never_redone_and_resumed_runs_match_straight_ones(grid, tmp_path):
    specs = expand_grid(grid)
    stamps = {s.key: (s.run_dir / "summary.json").stat().st_mtime_ns for s in specs}
    again = run_grid(grid, log=lambda _: None)
    assert not any(o.trained for o in again) and {o.before for o in again} == {"done"}
    assert stamps == {s.key: (s.run_dir / "summary.json").stat().st_mtime_ns for s in specs}
    # an interrupted + resumed run is the run trained in one go
    spec = next(s for s in specs if s.variant == "diff_v2")
    train(spec.train.replace(out_dir=str(tmp_path / "straight")), progress=False)
    resumed, straight = (
        [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (spec.run_dir, tmp_path / "straight")
    )
    losses = [[r["loss"] for r in recs if r["kind"] == "train"] for recs in (resumed, straight)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_the_data_is_prepared_once_and_shared(grid):
    specs = expand_grid(grid)
    assert {s.train.data for s in specs} == {str(Path(grid.out_dir) / "data")}
    configs = [json.loads((s.run_dir / "config.json").read_text()) for s in specs]
    assert len({c["data"]["manifest"]["splits"]["train"]["shards"][0]["sha256"] for c in configs}) == 1


def test_report_has_every_variant_and_readable_figures(grid):
    pytest.importorskip("matplotlib")
    report = write_report(grid.out_dir)
    text = report.read_text(encoding="utf-8")
    assert "## Decision rules and verdicts" in text and "no `[compare.rules]`" in text
    for variant in grid.variants:
        rows = [line for line in text.splitlines() if line.startswith(f"| {variant} |")]
        # parameters, final loss, loss against lr, sinks, outliers, stability at each lr
        assert len(rows) == 5 + len(grid.lrs), variant
    loaded = load_grid(grid.out_dir)
    assert all(r.has_halves for r in loaded.runs)
    lr_table = text.split("## Loss against learning rate")[1].split("\n## ")[0]
    final = text.split("## Final loss at")[1].split("\n## ")[0]
    for variant in grid.variants:
        runs = [r for r in loaded.runs if r.variant == variant and r.status == "finished"]
        means = {lr: statistics.mean(r.final_loss("select") for r in runs if r.lr == lr) for lr in grid.lrs}
        best_lr = min(means, key=means.get)
        row = next(line for line in lr_table.splitlines() if line.startswith(f"| {variant} |"))
        assert f"**{means[best_lr]:.4f}" in row, row  # the chosen lr is the best on the select half
        test = [r.final_loss("test") for r in runs if r.lr == best_lr]
        row = next(line for line in final.splitlines() if line.startswith(f"| {variant} |"))
        assert float(row.split("|")[2]) == best_lr and f"{statistics.mean(test):.4f}" in row, row
    assert "## The blog's claims, measured" in text and "Holm-adjusted together" in text
    assert re.search(r"each run reads \d+\.\d\d epochs of the train split", text)
    assert "What a seed fixes**: the batch order" in text and "`diff_v2`: embedding" in text
    assert "no speed comparison" not in text  # one run at a time: its tokens/s stand
    figures = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", text, flags=re.M)
    assert len(figures) >= 10
    for name in figures:
        path = report.parent / name
        width, height = png_size(path)
        assert path.stat().st_size > 5_000 and 500 <= width <= 4000 and 300 <= height <= 4000, (name, width, height)
    rows = (report.parent / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 28
    raw = json.loads((report.parent / "results.json").read_text())
    assert len(raw["runs"]) == 28 and raw["runs"][0]["curves"]["val_loss"]["step"] == [3, 6]
    assert raw["runs"][0]["val_by_group"]["test"]
    probes = list(Path(grid.out_dir).glob("*/lr*/seed*/lambda_probe.json"))
    assert {p.parts[-4] for p in probes} == {"diff_v2", "v2_split", "v2_linear"}  # the variants with a σ(λ)


def test_a_probe_survives_copying_a_run_without_its_weights(grid, tmp_path):
    """Runs trained on a GPU machine come back without checkpoints; the report must still show their σ(λ)."""
    run = next(s.run_dir for s in expand_grid(grid) if s.variant == "diff_v2")
    made = probe_run(run)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(ValueError):
        checkpoint_dir(copy)
    assert made is not None and probe_run(copy) == made
    assert probe_run(copy, batches=2) is None  # a different probe cannot be made without the weights


def test_a_diverged_run_is_recorded_not_retried(text_dir, tmp_path, monkeypatch):
    cfg = make_config(text_dir, tmp_path / "out", variants=["baseline_matched", "diff_v2"], seeds=[0])

    def diverge(train_cfg, **kw):
        if "diff_v2" in train_cfg.out_dir:
            raise TrainingError("5 non-finite steps in a row")
        return train(train_cfg, **kw)

    monkeypatch.setattr(diffv2.train, "train", diverge)  # what the runner calls
    outcomes = run_grid(cfg, log=lambda _: None)
    assert [o.after for o in outcomes] == ["done", "failed"]
    assert [o.before for o in run_grid(cfg, log=lambda _: None)] == ["done", "failed"]
    grid = load_grid(cfg.out_dir)
    assert [r.status for r in grid.runs] == ["finished", "diverged"]
    pytest.importorskip("matplotlib")
    text = write_report(cfg.out_dir, probe=False).read_text(encoding="utf-8")
    assert "| diff_v2 | – | 0 / 1 / 1 | no finished run |" in text and "non-finite steps in a row" in text


def test_subprocess_jobs(text_dir, tmp_path):
    cfg = make_config(text_dir, tmp_path / "out", variants=["baseline_matched", "diff_v2"], seeds=[0])
    outcomes = run_grid(cfg, jobs=2, log=lambda _: None)
    assert [(o.before, o.after) for o in outcomes] == [("new", "done")] * 2
    assert all((s.run_dir / "summary.json").is_file() for s in expand_grid(cfg))
    # two runs shared the CPU: each records it, and the report says its tokens/s is no speed comparison
    envs = [json.loads((s.run_dir / "environment.json").read_text()) for s in expand_grid(cfg)]
    assert [e["runs_per_device"] for e in envs] == [2, 2]
    pytest.importorskip("matplotlib")
    assert "they are no speed comparison" in write_report(cfg.out_dir, probe=False).read_text()


def test_every_finished_run_is_scored_on_the_eval_tasks_and_the_report_compares_them(text_dir, tmp_path, monkeypatch):
    """``eval_tasks`` score each finished run once (in the worker too); a task added later scores only the
    missing results; a failed evaluation is an outcome, not the grid's end; the report's section and the claims
    table read the headline scores, and name an eval.json they cannot read."""
    evals = dict(eval_tasks=["ar_hit"], eval_quick=True, eval_options={"ar_hit_windows": 2})
    variants = ["baseline_matched", "diff_v2"]
    cfg = make_config(text_dir, tmp_path / "out", variants=variants, seeds=[0, 1], **evals)
    nothing = run_grid(cfg, log=lambda _: None, train=False)  # `compare --eval-only`: scores, never trains
    assert [(o.before, o.after) for o in nothing] == [("new", "new")] * 4
    outcomes = run_grid(cfg, jobs=2, log=lambda _: None)
    assert [(o.before, o.after) for o in outcomes] == [("new", "done")] * 4
    results = {s.key: json.loads((s.run_dir / "eval" / "eval.json").read_text()) for s in expand_grid(cfg)}
    assert all(set(r["tasks"]) == {"ar_hit"} and r["tasks"]["ar_hit"]["windows"] == 2 for r in results.values())
    assert {r["settings"]["seed"] for r in results.values()} == {0}  # the same samples for every run
    stamps = {s.key: (s.run_dir / "eval" / "eval.json").stat().st_mtime_ns for s in expand_grid(cfg)}
    assert not any(o.trained for o in run_grid(cfg, log=lambda _: None))
    assert stamps == {s.key: (s.run_dir / "eval" / "eval.json").stat().st_mtime_ns for s in expand_grid(cfg)}
    more = make_config(text_dir, tmp_path / "out", variants=variants, seeds=[0, 1], **evals)
    more.eval_tasks = ["ar_hit", "passkey"]
    logs: list[str] = []
    again = run_grid(more, log=logs.append)
    assert "0 to train, 4 to evaluate" in logs[0] and {(o.before, o.after) for o in again} == {("done", "done")}
    merged = {s.key: json.loads((s.run_dir / "eval" / "eval.json").read_text()) for s in expand_grid(cfg)}
    assert all(list(m["tasks"]) == ["ar_hit", "passkey"] for m in merged.values())
    assert all(merged[k]["tasks"]["ar_hit"] == results[k]["tasks"]["ar_hit"] for k in results)  # kept, not redone
    # in-process (jobs=1) an evaluation that fails is reported with its run, and the grid goes on
    from diffv2.compare.evaluation import EvalSpec

    monkeypatch.setattr(EvalSpec, "run", lambda self, run_dir: (_ for _ in ()).throw(RuntimeError("CUDA oom")))
    more.eval_tasks = ["ar_hit", "passkey", "icl"]
    failed = run_grid(more, log=lambda _: None)
    assert all("evaluation failed: RuntimeError: CUDA oom" in o.message for o in failed)
    monkeypatch.undo()
    # a run copied without its checkpoints cannot be scored on a task added later: said, not an error
    shutil.rmtree(expand_grid(cfg)[0].run_dir / "checkpoints")
    more.eval_tasks = ["ar_hit", "passkey", "distractor"]
    logs.clear()
    run_grid(more, log=logs.append)
    assert "3 to evaluate; 1 finished without eval results cannot be scored (no checkpoint)" in logs[0]
    grid = load_grid(cfg.out_dir)
    scores = {r.key: r.scores for r in grid.runs}
    assert all({"ar_hit_loss", "ar_other_loss", "passkey_rank_top1"} <= set(s) for s in scores.values())
    hit = [s["ar_hit_loss"].value for s in scores.values()]
    assert all(math.isfinite(h) and h > 0 for h in hit)
    report = write_report(cfg.out_dir, probe=False).read_text()
    assert "## Evaluation tasks" in report and "`passkey_rank_top1` ↑" in report
    assert "DIFF V2 finds a pass key in filler better than a Transformer" in report  # a row of the claims table
    broken = expand_grid(cfg)[1].run_dir / "eval" / "eval.json"
    broken.write_text('{"settings": {"quick": true, "seed": 0}, "tasks": {"ar_hit": {"hit": 1}}}')
    report = write_report(cfg.out_dir, probe=False).read_text()
    assert f"- not read: {broken}" in report and "## Evaluation tasks" in report


def test_eval_tasks_that_train_their_own_models_or_unknown_options_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="mqar"):
        make_config("x", tmp_path, eval_tasks=["mqar"])
    with pytest.raises(ConfigError, match="unknown task"):
        make_config("x", tmp_path, eval_tasks=["nope"])
    with pytest.raises(ConfigError, match="eval_options: unknown 'needles'"):
        make_config("x", tmp_path, eval_tasks=["needle"], eval_options={"needles": 3})
    with pytest.raises(ConfigError, match=r"eval_options\.needle_samples"):
        make_config("x", tmp_path, eval_tasks=["needle"], eval_options={"needle_samples": 0})


def test_compare_cli_dry_run_and_report_only(text_dir, tmp_path, capsys):
    config = tmp_path / "grid.toml"
    config.write_text(
        f'data = "{text_dir}"\ntokenizer = "byte"\nsteps = 4\nbatch_size = 4\nseq_len = 32\neval_every = 2\n'
        "eval_batches = 1\ndiag_every = 2\ntensorboard = false\nsample_tokens = 0\n"
        "[model]\nd_model = 32\nn_layers = 1\nn_heads = 4\nn_kv_heads = 2\nhead_dim = 8\n"
        f'[compare]\nvariants = ["baseline_1p5h", "diff_v2"]\nout_dir = "{tmp_path / "out"}"\n'
    )
    assert cli("compare", str(config), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "2 runs" in out and "baseline_1p5h/lr0.003/seed0" in out
    assert not (tmp_path / "out").exists()
    assert cli("compare", str(config), "--no-report") == 0
    config.write_text(config.read_text().replace("steps = 4", "steps = 5"))
    with pytest.raises(ConfigError, match=r"another config \(steps: 4 there, 5 now\)"):
        cli("compare", str(config), "--no-report")
    config.write_text(config.read_text().replace("steps = 5", "steps = 4"))
    pytest.importorskip("matplotlib")
    assert cli("compare", str(config), "--report-only", "--no-probe") == 0
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    # a second grid over some of the same runs reports exactly its own runs, wherever it is told to
    subset = tmp_path / "subset.toml"
    subset.write_text(config.read_text().replace('["baseline_1p5h", "diff_v2"]', '["diff_v2"]'))
    assert cli("compare", str(subset), "--report-only", "--no-probe", "--report-dir", str(tmp_path / "r2")) == 0
    text = (tmp_path / "r2" / "report.md").read_text(encoding="utf-8")
    assert "1 variants × 1 learning rates × 1 seeds = 1 runs; 1 finished" in text and "| baseline_1p5h |" not in text


# ---------------------------------------------------------------------- attention maps and inspect
@pytest.mark.parametrize(
    "overrides",
    [dict(attention="baseline"), dict(attention="diff_v1"), dict(), dict(pairing="split"), dict(lambda_mode="linear")],
)
def test_captured_maps_are_the_ones_the_forward_used(overrides):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, **TINY, **overrides)).eval()
    tokens = torch.randint(0, 64, (1, 10))
    maps = capture_maps(model, tokens)
    for layer in maps:
        assert layer.effective.shape[-2:] == (10, 10)
        # the module's own sink diagnostic is computed from the same effective map
        assert torch.allclose(layer.effective[:, 1:, 0].mean(-1), torch.tensor(layer.stats["sink_mass"]), atol=1e-6)
        if layer.a2 is not None:
            assert torch.allclose(layer.a1.sum(-1), torch.ones(layer.a1.shape[:2]), atol=1e-5)
    assert all(not block.attn._forward_hooks for block in model.layers)  # the model is left as it was
    assert torch.equal(model(tokens), model(tokens))


def test_inspect_draws_maps_for_each_kind_of_checkpoint(grid, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for variant, expected in [("diff_v2", 3), ("diff_v1", 2), ("baseline_matched", 2)]:
        run_dir = Path(grid.out_dir) / variant / "lr0.003" / "seed0"
        out = tmp_path / variant
        assert (
            cli(
                "inspect",
                "--checkpoint",
                str(run_dir),
                "--prompt",
                "In the beginning",
                "--layer",
                "1",
                "--head",
                "1",
                "--out",
                str(out),
            )
            == 0
        )
        pngs = sorted(out.glob("*.png"))
        assert len(pngs) == expected and (out / "attention_L1_H1.png") in pngs
        assert all(png_size(p)[0] >= 400 for p in pngs)
        assert json.loads((out / "inspect.json").read_text())["tokens"] == len("In the beginning")
    with pytest.raises(ConfigError, match="layers"):
        cli("inspect", "--checkpoint", str(run_dir), "--layer", "7", "--out", str(tmp_path / "bad"))


# ---------------------------------------------------------------------- scripts/build_corpus.py helpers
@pytest.fixture(scope="module")
def corpus_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "build_corpus.py"
    spec = importlib.util.spec_from_file_location("build_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corpus_cleaning_and_dedupe(corpus_script):
    raw = "Cafe\u0301 <hi rend='i'>open</hi>\r\n\r\n\r\n\r\nline   two \x07\t\n"
    assert corpus_script.clean_text(raw, strip_tags=True) == "Café open\n\nline two"
    para = "In the beginning God created the heaven and the earth. " * 5
    dedupe = corpus_script.Deduper(min_paragraph=100)
    assert dedupe(f"{para}\n\nAmen.") == f"{para}\n\nAmen."
    assert dedupe(f"{para.upper()}\n\nAmen.") is None  # the same document up to case and spacing
    assert dedupe(f"Preface.\n\n{para}\n\nAmen.") == "Preface.\n\nAmen."  # the long paragraph was seen already
    assert (dedupe.dropped_docs, dedupe.dropped_paragraphs) == (1, 1)
    assert [len(c) for c in corpus_script.chunk(["a" * 60] * 5, size=100)] == [122, 122, 60]


def test_corpus_format_readers(corpus_script):
    assert corpus_script.detag_brown("The/at jury/nn said/vbd ,/, ``/`` no/at ''/'' ./.") == 'The jury said, "no".'
    assert corpus_script.dictd_number("B") == 1 and corpus_script.dictd_number("BA") == 64
    data = b"apple\nA fruit.\nbanana\nYellow.\n"
    index = "00-database-info\tA\tB\napple\tA\tP\nbanana\tP\tP\n"  # offset, length in base 64
    assert list(corpus_script.dictd_entries(index, data)) == [
        ("apple", "apple\nA fruit.\n"),
        ("banana", "banana\nYellow.\n"),
    ]
    imp = "$$$Psalms 1:1\nBlessed is the man\n$$$Psalms 1:2\nBut his delight\n"
    assert list(corpus_script.imp_entries(imp)) == [
        ("Psalms 1:1", "Blessed is the man"),
        ("Psalms 1:2", "But his delight"),
    ]
