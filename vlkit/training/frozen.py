"""Frozen parts run in eval mode: a module whose parameters are all frozen in a stage does not update batch-norm
statistics or apply dropout, so it computes the same features as at inference (and as the feature cache)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn


def set_frozen_eval(model: nn.Module) -> list[str]:
    """Put every submodule whose parameters are all frozen (and that has some) in eval mode; return their
    paths (outermost only). Every other module is put in train mode, so a part frozen in an earlier stage
    trains with its dropout on when a later stage unfreezes it (as a resumed process would)."""
    frozen: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
            frozen.append(path)
            return
        module.training = True  # this module only; its children are visited below
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return frozen


class FrozenPartsEval(Callback):
    """Keep frozen parts in eval mode during training (Lightning puts the whole module in train mode at the
    start of fit and after each validation)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_frozen_eval(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_frozen_eval(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:
            set_frozen_eval(pl_module)
