"""Training console output: a progress bar that names the stage (not ``Epoch 0/-2``, no logger version), a
plain progress line every N steps when stdout is not a terminal (log files, batch jobs), and Lightning's
tips and known-harmless warnings silenced.

Lightning's own :class:`~lightning.pytorch.callbacks.RichProgressBar` is kept for terminals; the plain line is
a small callback because Lightning's ``TQDMProgressBar`` redraws a bar (carriage returns) that a log file
cannot show.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar

QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # lightning's own use of an old torch API
    r"Your `IterableDataset` has `__len__` defined",  # vlkit's streams know their exact epoch length
    r".*does not have many workers which may be a bottleneck",  # num_workers is the recipe's choice
    r"Found \d+ module\(s\) in eval mode at the start of training",  # frozen parts, on purpose (frozen.py)
)
"""Lightning warnings that are about Lightning itself, or about settings vlkit makes on purpose."""


def quiet_lightning() -> None:
    """Silence Lightning's informational messages (tips, "GPU available", "`Trainer.fit` stopped") and the
    :data:`QUIET_WARNINGS`; Lightning's real warnings still show."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


class StageProgressBar(RichProgressBar):
    """Lightning's rich bar, labelled with the stage (vlkit trains by steps, so Lightning's ``Epoch 0/-2``
    says nothing) and without the logger's ``v_num``."""

    def __init__(self, label: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label = label

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"{self.label} (loader epoch {current_epoch + 1})" if current_epoch else self.label
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def _format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class PlainProgress(Callback):
    """Print ``<label> step 120/3500 | loss 1.2345 | lr 1.00e-03 | 5,400 tokens/s | ETA 12:34`` every
    ``every`` optimizer steps (and at the last step), on rank 0. Tokens are the batches' attention-mask sums
    (text and visual tokens the model read), counted since this process started the stage."""

    def __init__(self, label: str, every: int, stream: Any = None) -> None:
        self.label = label
        self.every = max(1, every)
        self.stream = stream
        self._start = 0.0
        self._start_step = 0
        self._tokens = 0
        self._printed = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()
        self._start_step = trainer.global_step
        self._tokens = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if mask is not None:
            self._tokens += int(mask.sum())
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._printed:
            return
        if step % self.every and step != trainer.max_steps:
            return
        self._printed = step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        parts = [f"{self.label} step {step}/{trainer.max_steps}"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        elapsed = time.monotonic() - self._start
        done = step - self._start_step
        if elapsed > 0 and done > 0:
            parts.append(f"{self._tokens / elapsed:,.0f} tokens/s")
            parts.append(f"ETA {_format_seconds(elapsed / done * max(0, trainer.max_steps - step))}")
        print(" | ".join(parts), file=self.stream or sys.stdout, flush=True)


def progress_callbacks(label: str, enabled: bool, every: int, interactive: bool | None = None) -> list[Callback]:
    """The progress display of one stage: the rich bar on a terminal, plain lines every ``every`` steps
    otherwise; nothing when ``enabled`` is false (``trainer.progress_bar: false``)."""
    quiet_lightning()
    if not enabled:
        return []
    if interactive is None:
        interactive = sys.stdout.isatty()
    return [StageProgressBar(label, leave=True)] if interactive else [PlainProgress(label, every)]
