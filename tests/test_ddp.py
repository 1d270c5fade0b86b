"""Data-parallel training on CPU: two gloo processes launched by ``vlkit fit``, as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlkit


@pytest.mark.slow
def test_ddp_two_ranks_train_on_different_shards_and_the_checkpoint_loads(tiny_recipe: Path, tmp_path: Path):
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vlkit.cli", "fit", str(tiny_recipe), "--run-dir", str(run),
           "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    for stage in ("stage0-align", "stage1-tune"):
        ranks = [json.loads((run / stage / f"data-rank{r}.json").read_text()) for r in (0, 1)]
        shards = [set(r["samples_by_shard"]) for r in ranks]
        assert all(shards) and not shards[0] & shards[1], shards  # each rank read its own shards
        assert all(r["samples"] > 0 for r in ranks)
        assert json.loads((run / stage / "done.json").read_text())["steps"] == (3 if stage == "stage0-align" else 4)

    # one checkpoint for the run (rank 0 writes), loadable through the public path
    recipe, model = vlkit.load_run(run)
    assert recipe.trainer.strategy == "ddp"
    state = vlkit.training.checkpoint.read_weights(run / "stage1-tune" / "last")
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[k.removeprefix("model.")], v) for k, v in state.items()
               if k.removeprefix("model.") in loaded)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val"]["val/count"] == 32  # validation samples of both ranks gathered
