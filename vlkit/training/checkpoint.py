"""Checkpoint I/O: weights as safetensors, training state with ``torch.load(weights_only=True)``, atomic writes.

A vlkit checkpoint is a folder::

    model.safetensors   every weight of the model (tied tensors stored once, aliases in the metadata)
    state.pt            optimizer, scheduler, loop progress and RNG state (for resume); no pickled objects

Folders are written to a temporary sibling and renamed into place, so a crash never leaves a
half-written checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlkit.errors import CheckpointError

WEIGHTS = "model.safetensors"
STATE = "state.pt"


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only once the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_weights(state: dict[str, torch.Tensor], file: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors; tensors sharing storage (tied weights) are stored once."""
    seen: dict[tuple[int, torch.dtype, tuple[int, ...]], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state.items():
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = tensor.detach().contiguous().cpu()
    meta = dict(metadata or {})
    meta["vlkit_aliases"] = json.dumps(aliases)
    save_file(tensors, str(file), metadata=meta)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights saved by :func:`write_weights` (a ``.safetensors`` file or a folder with model.safetensors)."""
    path = Path(path)
    file = path / WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no weights at {file}: expected a {WEIGHTS} written by vlkit")
    try:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); it may be truncated") from exc
    for key, target in json.loads(meta.get("vlkit_aliases", "{}")).items():
        state[key] = state[target]
    return state


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
