"""``vlkit sweep``: validation up front, runs per cell x seed, reports, resume, failures, interruption."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from vlkit.cli import main
from vlkit.errors import RecipeError
from vlkit.sweep import format_value, load_sweep, run_sweep

# every run: one short stage and a small evaluation (seconds on CPU)
COMMON = {
    "stages": [{"name": "s", "trainable": ["fusion", "llm"], "max_steps": 2}],
    "eval.max_samples": 8,
    "eval.baseline_samples": 64,
}


def _write_sweep(path: Path, recipe: Path, **body) -> Path:
    body = {"recipe": os.path.relpath(recipe, path.parent), "overrides": COMMON, **body}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlkit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def _attempts(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]


def _md_cells(out: Path) -> dict[str, dict[str, str]]:
    """results.md's table as {cell: {column: text}}."""
    lines = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header, cells))
    return table


@pytest.mark.slow
def test_grid_sweep_reports_match_runs_and_rerun_completes_only_missing_runs(tiny_recipe: Path, tmp_path: Path):
    sweep_file = _write_sweep(tmp_path / "fusions.yaml", tiny_recipe,
                              grid={"model.fusion.projector": ["linear", "mlp2x_gelu"]}, seeds=[0, 1],
                              metrics=["val/accuracy", "val/loss"])
    out = tmp_path / "runs" / "fusions"  # default: runs/<sweep name>/ next to the sweep file
    res = _cli("sweep", str(sweep_file), "--jobs", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cells = ["projector=linear", "projector=mlp2x_gelu"]

    rows = _rows(out)
    assert [(r["cell"], r["seed"]) for r in rows] == [(c, s) for c in cells for s in ("0", "1")]
    summaries = {}
    for r in rows:
        assert r["status"] == "ok" and r["reused"] == "False" and r["error"] == ""
        assert r["overrides"] == f"model.fusion.projector={r['cell'].split('=')[1]}"
        run_dir = out / r["cell"] / f"seed{r['seed']}"
        summary = json.loads((run_dir / "summary.json").read_text())
        summaries[(r["cell"], r["seed"])] = summary["val"]
        assert float(r["val/loss"]) == summary["val"]["val/loss"] and math.isfinite(float(r["val/loss"]))
        assert float(r["val/accuracy"]) == summary["val"]["val/accuracy"]
        assert float(r["seconds"]) > 0
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        assert recipe["seed"] == int(r["seed"]) and recipe["model"]["fusion"]["projector"] == r["cell"].split("=")[1]
        assert recipe["eval"]["max_samples"] == 8 and [s["name"] for s in recipe["stages"]] == ["s"]
        assert (out / r["cell"] / f"seed{r['seed']}.log").read_text().startswith("=== vlkit sweep")
    # the two seeds really differ
    assert summaries[(cells[0], "0")]["val/loss"] != summaries[(cells[0], "1")]["val/loss"]

    table = _md_cells(out)
    assert set(table) == set(cells)
    for cell in cells:
        assert table[cell]["runs"] == "2/2"
        for metric in ("val/accuracy", "val/loss"):
            values = [summaries[(cell, s)][metric] for s in ("0", "1")]
            mean, std = (float(x) for x in re.fullmatch(r"(\S+) ± (\S+)", table[cell][metric]).groups())
            assert mean == pytest.approx(statistics.mean(values), abs=6e-4)
            assert std == pytest.approx(statistics.stdev(values), abs=6e-4)
    png = (out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000

    # rerun: nothing left to do, nothing is retrained
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")}
    assert len(mtimes) == 4
    report = run_sweep(load_sweep(sweep_file), console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
    assert report.ran == [] and not report.failed and all(r.reused for r in report.results)
    assert len(_attempts(out)) == 4

    # an interrupted sweep leaves runs without summary.json; the rerun trains exactly those
    shutil.rmtree(out / cells[1] / "seed0")
    report = run_sweep(load_sweep(sweep_file), console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
    assert [(r.cell.name, r.seed) for r in report.ran] == [(cells[1], 0)]
    assert [(a["cell"], a["seed"]) for a in _attempts(out)][4:] == [(cells[1], 0)]
    assert not report.failed
    for path, mtime in mtimes.items():
        if path.parent.name != "seed0" or path.parent.parent.name != cells[1]:
            assert path.stat().st_mtime_ns == mtime, f"{path} was retrained"
    rows = _rows(out)
    assert [r["reused"] for r in rows] == ["True", "True", "False", "True"]
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_interrupted_sweep_resumes_and_a_failing_cell_does_not_stop_the_others(tiny_recipe: Path, tmp_path: Path):
    sweep_file = _write_sweep(tmp_path / "cells.yaml", tiny_recipe, seeds=[0], out="results", cells=[
        {"name": "broken", "data.train.urls": str(tmp_path / "nowhere" / "train-{000000..000001}.tar")},
        {"name": "good", "model.fusion.projector": "linear"},
    ])
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "vlkit.cli", "sweep", str(sweep_file)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = out / "good" / "seed0" / "recipe.yaml"  # `broken` has failed and `good` is training
    deadline = time.time() + 300
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert started.exists(), proc.communicate()[0] if proc.poll() is not None else "timed out"
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert [(a["cell"], a["status"]) for a in _attempts(out)] == [("broken", "failed"), ("good", "interrupted")]
    assert not (out / "good" / "seed0" / "summary.json").exists()
    statuses = {r["cell"]: r["status"] for r in _rows(out)}  # partial reports are written on interruption
    assert statuses == {"broken": "failed", "good": "interrupted"}

    res = _cli("sweep", str(sweep_file), cwd=tmp_path)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]  # one run did not finish
    assert [(a["cell"], a["status"]) for a in _attempts(out)][2:] == [("broken", "failed"), ("good", "ok")]
    rows = {r["cell"]: r for r in _rows(out)}
    assert rows["good"]["status"] == "ok" and math.isfinite(float(rows["good"]["val/accuracy"]))
    assert rows["broken"]["status"] == "failed" and rows["broken"]["val/accuracy"] == ""
    assert "no shard files" in rows["broken"]["error"] and "nowhere" in rows["broken"]["error"]
    assert "no shard files" in (out / "broken" / "seed0.log").read_text()
    assert (out / "good" / "seed0.log").read_text().count("=== vlkit sweep") == 2
    table = _md_cells(out)
    assert table["good"]["runs"] == "1/1" and table["broken"]["runs"] == "0/1" and table["broken"]["val/accuracy"] == "—"
    summary = json.loads((out / "good" / "seed0" / "summary.json").read_text())
    assert table["good"]["val/accuracy"] == f"{summary['val']['val/accuracy']:.3f}"  # one seed: no ± std
    md = (out / "results.md").read_text()
    assert "`broken` seed 0: **failed**" in md and "no shard files" in md
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")


def test_bad_override_fails_validation_before_anything_runs(tiny_recipe: Path, tmp_path: Path, capsys):
    sweep_file = _write_sweep(tmp_path / "bad.yaml", tiny_recipe, seeds=[0, 1], cells=[
        {"name": "fine", "model.fusion.projector": "linear"},
        {"name": "typo", "model.fusion.projecter": "linear"},
    ])
    with pytest.raises(RecipeError, match=r"cell 'typo'.*model\.fusion\.projecter: unknown key\. Did you mean "
                                          r"'projector'"):
        load_sweep(sweep_file)
    assert main(["sweep", str(sweep_file)]) == 2
    assert "cell 'typo'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was written

    _write_sweep(sweep_file, tiny_recipe, grid={"eval.max_samples": [2, "many"]})
    with pytest.raises(RecipeError, match=r"cell 'max_samples=many'.*eval\.max_samples: expected int"):
        load_sweep(sweep_file)
    _write_sweep(sweep_file, tiny_recipe, grid={"model.fusion.projector": ["mlp2x_gelu", "mlp9y"]})
    with pytest.raises(RecipeError, match="cell 'projector=mlp9y'.*unknown projector"):
        load_sweep(sweep_file)


@pytest.mark.parametrize(("body", "match"), [
    ({"grid": {"seed": [1]}, "seed": [0]}, "seed: unknown key. Did you mean 'seeds'"),
    ({"grid": {"seed": [1]}, "cells": [{}]}, "exactly one of `grid`"),
    ({}, "exactly one of `grid`"),
    ({"grid": {"model.fusion.projector": []}}, r"grid\.model\.fusion\.projector: needs at least one value"),
    ({"grid": {"model.fusion.projector": "linear"}}, "expected a list"),
    ({"cells": [{"name": "a"}, {"name": "a", "seed": 3}]}, "both named 'a'"),
    ({"cells": [{"name": "a/b"}]}, "cell names become folder names"),
    ({"cells": [{"name": "a"}], "seeds": [1, 1]}, "distinct seeds"),
])
def test_malformed_sweep_files_are_rejected(tiny_recipe: Path, tmp_path: Path, body: dict, match: str):
    sweep_file = _write_sweep(tmp_path / "s.yaml", tiny_recipe, **body)
    with pytest.raises(RecipeError, match=match) as err:
        load_sweep(sweep_file)
    assert str(sweep_file) in str(err.value)


def test_cells_names_folders_and_dry_run(tiny_recipe: Path, tmp_path: Path, capsys):
    sweep_file = _write_sweep(tmp_path / "grid.yaml", tiny_recipe, overrides={}, grid={
        "model.fusion": [{"name": "linear"}, {"name": "token_concat", "projector": "linear"}],
        "stages.0.lr": [1.0e-3],
        "data.train.shuffle_buffer": [10],
    })
    sweep = load_sweep(sweep_file, out=tmp_path / "elsewhere")
    assert [c.name for c in sweep.cells] == ["fusion=linear,lr=0.001,shuffle_buffer=10",
                                             "fusion=token_concat+projector=linear,lr=0.001,shuffle_buffer=10"]
    assert sweep.cells[0].overrides == ['model.fusion={"name": "linear"}', "stages.0.lr=0.001",
                                        "data.train.shuffle_buffer=10"]
    run = sweep.runs[1]
    assert run.recipe.model.fusion["name"] == "token_concat" and run.recipe.stages[0].lr == 1e-3
    # no `seeds:`: one run per cell with the recipe's own seed
    assert run.seed == 0 and run.run_dir == tmp_path / "elsewhere" / sweep.cells[1].name / "seed0"
    assert run.log == run.run_dir.with_name("seed0.log")
    for value in ("linear", "1e-3", "yes", "", "a: b", "x{1..2}", [1, 2], {"name": "x"}, None, 3.5, True):
        assert yaml.safe_load(format_value(value)) == value
    assert main(["sweep", str(sweep_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("to run") == 2 and "fusion=linear" in out
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ ranking by any metric; lmms-eval scores


def _finish(run, val: dict, lmms: dict | None = None, spec: dict | None = None) -> None:
    """Make ``run`` look trained (summary.json) and, with ``lmms``, evaluated by ``vlkit eval``."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "summary.json").write_text(json.dumps({"val": val, "seconds": 1.0}))
    if lmms is not None:
        (run.run_dir / "lmms").mkdir()
        (run.run_dir / "lmms" / "results.json").write_text(json.dumps({"results": lmms}))
        (run.run_dir / "lmms" / "sweep_eval.json").write_text(json.dumps(spec))


def test_rank_by_orders_cells_by_a_val_metric_or_an_lmms_eval_score(tiny_recipe: Path, tmp_path: Path):
    import dataclasses

    from vlkit.sweep import collect_results, lmms_metrics, rank_cells, write_reports

    assert lmms_metrics({"t": {"alias": "t", "exact_match,none": 0.5, "exact_match_stderr,none": 0.1,
                               "acc,strict": 0.25}}) == {"lmms/t/exact_match": 0.5, "lmms/t/acc,strict": 0.25}
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    sweep_file = _write_sweep(tmp_path / "s.yaml", tiny_recipe, grid={"model.fusion.projector": ["linear", "mlp2x_gelu",
                                                                                                 "mlp3x_gelu"]},
                              rank_by="lmms/vqa/exact_match", eval={"tasks": ["vqa"], "limit": 8,
                                                                    "include_path": "tasks"})
    sweep = load_sweep(sweep_file)
    assert sweep.eval.include_path == str(tasks)
    spec = dataclasses.asdict(sweep.eval)
    scores = {"projector=linear": (0.2, 0.9, 1.5), "projector=mlp2x_gelu": (0.6, 0.4, 0.5)}
    for run in sweep.runs:
        if run.cell.name in scores:
            acc, em, loss = scores[run.cell.name]
            _finish(run, {"val/accuracy": acc, "val/anls": acc / 2, "val/baseline_anls": 0.1, "val/loss": loss},
                    {"vqa": {"exact_match,none": em}}, spec)
    _finish(sweep.runs[2], {"val/accuracy": 0.99})  # trained, but its lmms-eval scores are missing: not done
    results = collect_results(sweep)
    assert [r.status for r in results] == ["ok", "ok", "pending"]
    assert results[0].metrics["lmms/vqa/exact_match"] == 0.9
    assert [c.name for c, _ in rank_cells(sweep, results, "lmms/vqa/exact_match")] == [
        "projector=linear", "projector=mlp2x_gelu", "projector=mlp3x_gelu"]
    assert [c.name for c, _ in rank_cells(sweep, results, "val/anls")][:2] == ["projector=mlp2x_gelu",
                                                                               "projector=linear"]
    assert [c.name for c, _ in rank_cells(sweep, results, "val/loss")][:2] == ["projector=mlp2x_gelu",
                                                                               "projector=linear"]  # lower first
    write_reports(sweep, results)
    md = (sweep.out / "results.md").read_text()
    assert "ranked by `lmms/vqa/exact_match`" in md
    assert list(_md_cells(sweep.out))[:2] == ["projector=linear", "projector=mlp2x_gelu"]
    assert _md_cells(sweep.out)["projector=linear"]["lmms/vqa/exact_match"] == "0.900"
    assert _rows(sweep.out)[0]["lmms/vqa/exact_match"] == "0.9"
    (sweep.runs[0].run_dir / "lmms" / "sweep_eval.json").write_text(json.dumps({**spec, "limit": 4}))
    assert collect_results(sweep)[0].status == "pending"  # scored with another eval: block: evaluated again

    _write_sweep(sweep_file, tiny_recipe, grid={"model.fusion.projector": ["linear"]}, metrics=["val/anls"],
                 rank_by="val/anls", overrides={**COMMON, "eval.metrics": ["exact_match", "anls"]})
    ranked = load_sweep(sweep_file)
    _finish(ranked.runs[0], {"val/anls": 0.5, "val/baseline_anls": 0.125})
    write_reports(ranked, collect_results(ranked))
    assert "Majority-answer baseline (most frequent training answer per question type): val/anls 0.125" in \
        (ranked.out / "results.md").read_text()


@pytest.mark.parametrize(("body", "match"), [
    ({"rank_by": "lmms/vqa/exact_match"}, r"rank_by: 'lmms/vqa/exact_match': .*no eval: block"),
    ({"rank_by": "accuracy"}, r"rank_by: 'accuracy' is not a metric"),
    ({"eval": {"tasks": []}}, r"eval\.tasks: list one or more"),
    ({"eval": {"tasks": ["a"], "limit": 0}}, r"eval\.limit: must be positive"),
    ({"eval": {"tasks": ["a"], "include_path": "nowhere"}}, r"eval\.include_path: folder not found"),
    ({"eval": {"tasks": ["a"]}, "metrics": ["lmms/b/acc"]}, r"metrics\[0\]: 'lmms/b/acc'.*eval\.tasks \(a\)"),
])
def test_malformed_eval_blocks_are_rejected(tiny_recipe: Path, tmp_path: Path, body: dict, match: str):
    sweep_file = _write_sweep(tmp_path / "s.yaml", tiny_recipe, grid={"model.fusion.projector": ["linear"]}, **body)
    with pytest.raises(RecipeError, match=match):
        load_sweep(sweep_file)


@pytest.mark.slow
def test_sweep_eval_block_runs_vlkit_eval_on_each_cell_and_ranks_by_its_score(tiny_recipe: Path, demo_dir: Path,
                                                                              tmp_path: Path):
    pytest.importorskip("lmms_eval")
    datasets = pytest.importorskip("datasets")
    from test_lmms_eval import UTILS, VQA_TASK, demo_docs

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "type": datasets.Value("string")})
    datasets.DatasetDict({"test": datasets.Dataset.from_list(demo_docs(demo_dir, 8), features=features)}).save_to_disk(
        str(tasks / "vqa_data"))
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "vlkit_demo_vqa.yaml").write_text(VQA_TASK.format(data=tasks / "vqa_data"))
    sweep_file = _write_sweep(tmp_path / "lmms.yaml", tiny_recipe, grid={"stages.0.lr": [3.0e-3, 1.0e-5]},
                              overrides={**COMMON, "stages": [{"name": "s", "trainable": ["encoders", "fusion", "llm"],
                                                               "max_steps": 40}]},
                              rank_by="lmms/vlkit_demo_vqa/exact_match",
                              eval={"tasks": ["vlkit_demo_vqa"], "limit": 8, "include_path": "tasks"})
    res = _cli("sweep", str(sweep_file), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "runs" / "lmms"
    rows = {r["cell"]: r for r in _rows(out)}
    for cell, row in rows.items():
        results = json.loads((out / cell / "seed0" / "lmms" / "results.json").read_text())["results"]
        assert float(row["lmms/vlkit_demo_vqa/exact_match"]) == results["vlkit_demo_vqa"]["exact_match,none"]
    scores = {c: float(r["lmms/vlkit_demo_vqa/exact_match"]) for c, r in rows.items()}
    print(f"lmms-eval exact match per cell: {scores}")
    assert list(_md_cells(out)) == sorted(scores, key=lambda c: -scores[c])
    assert [a["phase"] for a in _attempts(out)] == ["fit", "eval", "fit", "eval"]
    res = _cli("sweep", str(sweep_file), cwd=tmp_path)  # everything finished and evaluated: nothing runs
    assert res.returncode == 0 and "2 finished already, 0 to run" in res.stdout
