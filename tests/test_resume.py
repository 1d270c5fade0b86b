"""Exact resume: a run SIGKILLed right after a mid-stage checkpoint and rerun with ``vlkit fit`` on the same
folder ends with bit-for-bit the weights of an uninterrupted run (RNG states and data position restored)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlkit.training.checkpoint import read_weights

pytestmark = pytest.mark.slow

# dropout in the LLM, so a restored-but-wrong RNG state changes the weights; 5 batches per loader epoch, so
# the kill at step 3 falls in the middle of an epoch (and, with 2 workers, mid-way through the round robin)
OVERRIDES = ["data.train.samples_per_epoch=40", "data.train.shuffle_buffer=50",
             "model.llm.config.attention_dropout=0.2", "trainer.checkpoint_every=3",
             "stages.1.max_steps=8", "eval.max_samples=8"]

KILLER = textwrap.dedent("""
    import os, signal, sys
    import lightning as L
    import vlkit
    from vlkit.training.fit import fit

    class KillAfterCheckpoint(L.Callback):
        # runs after vlkit's periodic checkpoint callback in the same hook
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.default_root_dir.endswith("stage1-tune") and trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    recipe = vlkit.load_recipe(sys.argv[1], sys.argv[3:])
    fit(recipe, sys.argv[2], callbacks=[KillAfterCheckpoint()])
""")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def _fit(recipe: Path, run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlkit.cli", "fit", str(recipe), *overrides, "--run-dir",
                           str(run_dir)], env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_mid_stage_then_resume_matches_uninterrupted(tiny_recipe: Path, tmp_path: Path,
                                                             workers: int) -> None:
    overrides = [*OVERRIDES, f"data.train.num_workers={workers}"]
    whole = _fit(tiny_recipe, tmp_path / "whole", overrides)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = subprocess.run([sys.executable, "-c", KILLER, str(tiny_recipe), str(tmp_path / "cut"), *overrides],
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    stage = tmp_path / "cut" / "stage1-tune"
    saved = torch.load(stage / "last" / "state.pt", weights_only=True)
    assert saved["global_step"] == 3 and not (stage / "done.json").exists()
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["done"] == 3  # mid-epoch position

    resumed = _fit(tiny_recipe, tmp_path / "cut", overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming stage 1 'tune'" in resumed.stdout

    for name in ("stage0-align", "stage1-tune"):
        a = read_weights(tmp_path / "whole" / name / "last")
        b = read_weights(tmp_path / "cut" / name / "last")
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
