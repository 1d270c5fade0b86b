"""Exact resume: a run killed mid-stage and resumed from its last checkpoint ends with the same weights.

Two things decide what a training step computes besides the weights and the optimizer (which Lightning
restores): the random number generators (dropout, drop-path) and the data (which samples come next).
:class:`ResumeState` saves the generators' states in the checkpoint and restores them when training
resumes; at the start of a fresh stage it seeds them from the stage's own seed, so a stage does not depend
on how the previous one ran in this process. The data position is the training loader's state
(:class:`vlkit.data.base.TrainStream`: the next sample of every loader worker), which Lightning saves and
restores through its stateful-loader interface; this callback tells the stream which batches were
actually trained on (the loader runs ahead of training by its prefetched batches).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from vlkit.data.base import POSITION_KEY, TrainStream


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) global generators, as plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """Python's generator state with its nested tuples (a checkpoint may store them as lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ResumeState(Callback):
    """Saves the generators' states in every checkpoint and restores them on resume (see the module);
    ``seed`` seeds them when a stage starts fresh."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._restore: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the training loader's iterator exists (Lightning creates it first), before the first step
        if self._restore is not None:
            set_rng_state(self._restore)
            self._restore = None
        else:
            seed_all(self.seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        position = batch.get(POSITION_KEY) if isinstance(batch, dict) else None
        stream = getattr(trainer.train_dataloader, "dataset", None)
        if position is not None and isinstance(stream, TrainStream):
            stream.consumed(position)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = state_dict["rng"]


__all__ = ["ResumeState", "rng_state", "seed_all", "set_rng_state"]
