"""The LightningModule that trains one stage of a VLM; what it optimises and reports is the stage's objective."""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from rich.console import Console

from vlkit.config import EvalConfig, StageConfig
from vlkit.eval.metrics import normalize_answer  # re-exported: vlkit.module.normalize_answer
from vlkit.model import VLM
from vlkit.objectives.base import Objective, build_objective
from vlkit.training.stages import build_optimizer, print_param_table

__all__ = ["VLMModule", "normalize_answer"]


def _gather(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


class VLMModule(L.LightningModule):
    """Trains ``model`` for one recipe stage. Freezing is applied by the caller before the Trainer starts.

    The loss and the validation metrics are the ``objective``'s (default: built from ``stage.objective``;
    see :mod:`vlkit.objectives`), which also says which data it validates on: ``val_data`` or the training
    dataset's held-out part. The data loaders come from ``train_data`` / ``val_data`` (registered datasets),
    built per rank once the (possibly distributed) run has started. ``baseline`` maps question type ->
    majority training answer.

    Frozen parts run in eval mode while training (:meth:`vlkit.model.VLM.train`): applied at the start of
    the stage and again after every validation.
    """

    def __init__(self, model: VLM, stage: StageConfig, eval_cfg: EvalConfig, train_data: Any,
                 val_data: Any | None = None, baseline: dict[str | None, str] | None = None,
                 seed: int = 0, objective: Objective | None = None) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.eval_cfg = eval_cfg
        self.train_data = train_data
        self.val_data = val_data
        self.seed = seed
        self.objective = objective if objective is not None else build_objective(
            stage, model, eval_cfg, baseline, seed=seed)
        self.shards_seen: Counter[str] = Counter()
        self._skipped = 0
        self._val_skipped = 0
        self._model_was_training = True

    # ---------------------------------------------------------------------------------------------- data

    def _processor(self):
        args = self.train_data.processor_args
        return self.model.processor(max_length=args.max_length, train_on=args.train_on)

    def train_dataloader(self):
        from vlkit.data.base import stage_data_seed  # each stage streams its own order

        return self.train_data.train_loader(self._processor(), seed=stage_data_seed(self.seed, self.stage.name),
                                            rank=self.global_rank, world_size=self.trainer.world_size)

    @property
    def _validation_data(self) -> Any | None:
        return self.train_data if self.objective.validates_on_train_data else self.val_data

    @property
    def can_validate(self) -> bool:
        """Whether this stage has a validation set (data.val, or the training dataset's held-out part when
        the objective validates there)."""
        if self.objective.validates_on_train_data:
            return self.train_data.has_validation()
        return self.val_data is not None

    def val_dataloader(self):
        if not self.can_validate:
            return []
        return self._validation_data.val_loader(self._processor(), rank=self.global_rank,
                                                world_size=self.trainer.world_size,
                                                max_samples=self.eval_cfg.max_samples)

    # ------------------------------------------------------------------------------------------ training

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model, self.stage)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        self.train()  # this stage's modes: trainable parts train, frozen ones eval (VLM.train)
        if self.trainer.is_global_zero:
            print_param_table(self.model, self.stage, Console())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._skipped += int(batch.get("skipped", 0) or 0)
        self.shards_seen.update(batch.get("__url__") or [])
        n = batch["input_ids"].shape[0]
        loss, logs = self.objective.training_step(self.model, batch)
        for name, value in logs.items():
            self.log(f"train/{name}", value, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        return loss

    def on_train_epoch_end(self) -> None:
        skipped = sum(_gather(self._skipped))
        self._skipped = 0
        self.log("data/skipped", float(skipped), rank_zero_only=True)
        if skipped and self.trainer.is_global_zero:
            Console(stderr=True).print(f"[yellow]skipped {skipped} corrupt or invalid training sample(s) this epoch "
                                       "(set strict: true in the dataset to fail on the first one)[/]")

    # ---------------------------------------------------------------------------------------- validation

    def on_validation_model_eval(self) -> None:
        self._model_was_training = self.model.training
        super().on_validation_model_eval()

    def on_validation_model_train(self) -> None:
        """After validation: back to the mode before it; in train mode the frozen parts are in eval again
        (re-applied from the stage's freezing, :meth:`vlkit.model.VLM.train`)."""
        self.train(self._model_was_training)

    def on_validation_epoch_start(self) -> None:
        self._val_skipped = 0
        self.objective.reset_validation()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._val_skipped += int(batch.get("skipped", 0) or 0)
        self.objective.validation_step(self.model, batch)

    def on_validation_epoch_end(self) -> None:
        gathered = _gather((self.objective.validation_state(), self._val_skipped))
        metrics = self.objective.validation_metrics([state for state, _ in gathered])
        metrics["val/skipped"] = float(sum(skipped for _, skipped in gathered))
        for key, value in metrics.items():
            self.log(key, value, rank_zero_only=True, prog_bar=key in self.objective.progress_metrics)
        self.last_val_metrics = metrics

    @staticmethod
    def metrics_from(stats: dict[str, list[float]], loss: float | None) -> dict[str, float]:
        """The ``lm`` objective's metrics from summed ``[correct, baseline correct, count]`` per key."""
        from vlkit.objectives.lm import metrics_from

        return metrics_from(stats, loss)
