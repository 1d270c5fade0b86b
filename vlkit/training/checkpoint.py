"""Checkpoint I/O: weights as safetensors, training state with ``torch.load(weights_only=True)``, atomic writes.

A vlkit checkpoint is a folder::

    model.safetensors   every weight of the model (tied tensors stored once, aliases in the metadata)
    state.pt            optimizer, scheduler, loop progress and RNG state (for resume); no pickled objects

Folders are written to a temporary sibling and renamed into place, so a crash never leaves a
half-written checkpoint under the real name.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from vlkit.atomic import atomic_dir
from vlkit.errors import CheckpointError
from vlkit.weights import WEIGHTS, read_weights, write_weights  # re-exported: their home is vlkit.weights

STATE = "state.pt"


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO writing checkpoint folders (weights as safetensors + training state)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        checkpoint = dict(checkpoint)
        state_dict = checkpoint.pop("state_dict")
        with atomic_dir(path) as tmp:
            write_weights(state_dict, tmp / WEIGHTS)
            torch.save(checkpoint, tmp / STATE)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        path = Path(path)
        if not (path / STATE).is_file():
            raise CheckpointError(f"{path} is not a vlkit checkpoint folder (missing {STATE})")
        try:
            checkpoint = torch.load(path / STATE, map_location=map_location or "cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read training state {path / STATE}: {exc}") from exc
        checkpoint["state_dict"] = read_weights(path)
        return checkpoint

    def remove_checkpoint(self, path: str | Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint folder of the latest stage that has one in a run folder."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("stage*-*/last") if (p / WEIGHTS).exists()]
    if not found:
        raise CheckpointError(f"no stage checkpoint in {run_dir}: is it a vlkit run folder that has trained?")
    return max(found, key=lambda p: int(p.parent.name[len("stage"):].split("-", 1)[0]))
