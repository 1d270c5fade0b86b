"""The shipped demo recipes train end to end through the CLI (a few steps per stage, on the small test demo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import vlkit
from vlkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMOS = sorted(p.name for p in (ROOT / "recipes" / "demo").glob("*.yaml"))
EXTRA = {"hovle.yaml": ["stages.0.data.batch_size=4", "stages.0.data.val_samples=8"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", DEMOS)
def test_demo_recipe_trains_every_stage(name: str, demo_dir: Path, tmp_path: Path, monkeypatch, capsys):
    # the recipes name ${recipe_dir}/../../data/demo: a copy of recipes/demo/ next to data/demo -> the test data
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_dir)
    shutil.copytree(ROOT / "recipes" / "demo", tmp_path / "recipes" / "demo")
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipes" / "demo" / name
    stages = len(vlkit.load_recipe(recipe).stages)
    overrides = [*(f"stages.{i}.max_steps=2" for i in range(stages)), "data.train.batch_size=4",
                 "data.train.num_workers=0", "data.val.num_workers=0", "eval.max_samples=8",
                 "trainer.progress_bar=false", *EXTRA.get(name, [])]
    assert main(["fit", str(recipe), *overrides, "--run-dir", "run"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["steps"] for s in summary["stages"]] == [2] * stages
    val = summary["val"]
    assert val["val/count"] == 8
    # the per-type table adds up to the overall accuracy over the same 8 held-out samples
    types = [k.removeprefix("val/count/") for k in val if k.startswith("val/count/")]
    assert sum(val[f"val/count/{t}"] for t in types) == 8
    assert sum(val[f"val/accuracy/{t}"] * val[f"val/count/{t}"] for t in types) == pytest.approx(
        val["val/accuracy"] * 8)
    assert "final validation" in capsys.readouterr().out
