"""The LightningModule that trains one stage of a VLM; what it optimises and reports is the stage's objective."""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from rich.console import Console

from vlkit.config import EvalConfig, StageConfig
from vlkit.errors import RecipeError
from vlkit.eval.metrics import normalize_answer  # re-exported: vlkit.module.normalize_answer
from vlkit.model import VLM
from vlkit.objectives.base import Objective, build_objective
from vlkit.training.stages import build_optimizer, print_param_table

__all__ = ["PADDING_KEY", "VLMModule", "normalize_answer"]

PADDING_KEY = "__padding__"
"""Marks a validation batch that only keeps the ranks in step (:class:`_SameBatchCount`): not counted."""
MAX_NAMES = 8


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank: the one way validation states and counters cross ranks (objective states hold
    per-sample answers, which corpus metrics such as CIDEr need whole, so not tensor sums)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


class _SameBatchCount:
    """A rank's validation batches, then copies of its last one marked :data:`PADDING_KEY` until every rank has
    run out, so all ranks run the same number of validation steps (a rank that stopped early would leave the
    others waiting in a collective: DDP's buffer broadcast, a sharded model's parameter gathering in
    ``generate``). Each round the ranks exchange one flag; a rank without any batch of its own receives the
    first batch of the lowest rank that has one. Padding batches run like real ones and are not counted
    (:meth:`VLMModule.validation_step`), so each sample counts exactly once."""

    def __init__(self, loader: Iterable[dict[str, Any]], module: L.LightningModule) -> None:
        self.loader = loader
        self.module = module

    def __iter__(self) -> Iterator[dict[str, Any]]:
        strategy = self.module.trainer.strategy
        it = iter(self.loader)
        last: dict[str, Any] | None = None
        while True:
            batch = next(it, None)
            flags = self.module.all_gather(torch.tensor(int(batch is not None), device=self.module.device))
            have = [bool(f) for f in flags.reshape(-1).tolist()]
            if not any(have):
                return
            if last is None and not all(have):  # first round: some rank has no batch at all
                src = have.index(True)
                received = strategy.broadcast(batch if self.module.global_rank == src else None, src=src)
                last = batch if batch is not None else received
            if batch is None:
                yield {**last, PADDING_KEY: True}
            else:
                last = batch
                yield batch


class VLMModule(L.LightningModule):
    """Trains ``model`` for one recipe stage. Freezing is applied by the caller before the Trainer starts.

    The loss and the validation metrics are the ``objective``'s (default: built from ``stage.objective``;
    see :mod:`vlkit.objectives`), which also says which data it validates on: ``val_data`` or the training
    dataset's held-out part. The data loaders come from ``train_data`` / ``val_data`` (registered datasets),
    built per rank once the (possibly distributed) run has started. ``baseline`` maps question type ->
    majority training answer.

    Frozen parts run in eval mode while training (:meth:`vlkit.model.VLM.train`): applied at the start of
    the stage and again after every validation.

    Distributed runs: the first training step reports trainable parameters that got no gradient, by name
    (an error under DDP, which would fail or hang at the next step; a warning otherwise); every rank runs
    the same number of validation steps (:class:`_SameBatchCount`). ``where`` is the stage's recipe key.
    """

    def __init__(self, model: VLM, stage: StageConfig, eval_cfg: EvalConfig, train_data: Any,
                 val_data: Any | None = None, baseline: dict[str | None, str] | None = None,
                 seed: int = 0, objective: Objective | None = None, where: str = "stages") -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.eval_cfg = eval_cfg
        self.train_data = train_data
        self.val_data = val_data
        self.seed = seed
        self.objective = objective if objective is not None else build_objective(
            stage, model, eval_cfg, baseline, seed=seed)
        self.where = where
        self.shards_seen: Counter[str] = Counter()
        self._skipped = 0
        self._val_skipped = 0
        self._model_was_training = True
        self._grads_checked = False
        self._counted_state: Any = None  # the objective's state before the first padding batch
        self.val_batches = 0
        """Validation steps of the last validation on this rank, padding batches included."""
        self.val_padding = 0
        """Of those, padding batches (not counted in the metrics)."""

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
        loader = self._validation_data.val_loader(self._processor(), rank=self.global_rank,
                                                  world_size=self.trainer.world_size,
                                                  max_samples=self.eval_cfg.max_samples)
        return _SameBatchCount(loader, self) if self.trainer.world_size > 1 else loader

    # ------------------------------------------------------------------------------------------ training

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model, self.stage, str(self.trainer.precision))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        self.train()  # this stage's modes: trainable parts train, frozen ones eval (VLM.train)
        self._grads_checked = False
        if self.trainer.is_global_zero:
            print_param_table(self.model, self.stage, Console())

    def on_after_backward(self) -> None:
        if not self._grads_checked:  # the first backward of this fit, before any optimizer step
            self._grads_checked = True
            self._check_unused_parameters()

    def _check_unused_parameters(self) -> None:
        """Name the trainable parameters that got no gradient in the first backward pass (of any rank).

        An error when DDP runs without ``find_unused_parameters`` (the next step would fail, or hang when
        ranks differ); a warning otherwise (they would silently not train)."""
        unused = [name.removeprefix("model.") for name, p in self.named_parameters()
                  if p.requires_grad and p.grad is None]
        per_rank = _gather(unused)
        names = sorted({name for names in per_rank for name in names})
        if not names:
            return
        ranks = [r for r, found in enumerate(per_rank) if found]
        shown = ", ".join(names[:MAX_NAMES]) + (f" (and {len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES
                                                else "")
        on = f" on rank(s) {', '.join(map(str, ranks))}" if len(per_rank) > 1 else ""
        message = (f"{len(names)} trainable parameter(s) got no gradient in stage {self.stage.name!r}'s first "
                   f"training step{on}: {shown}. The loss does not use them; freeze them (remove their part or "
                   "module from `trainable`), or, if they are used on some batches only, set "
                   "`trainer.strategy: ddp_find_unused_parameters_true`")
        if getattr(self.trainer.model, "find_unused_parameters", None) is False:  # DDP, which needs them all
            raise RecipeError(message, f"{self.where}.trainable")
        if self.trainer.is_global_zero:
            warnings.warn(message, RuntimeWarning, stacklevel=2)

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
        self._counted_state = None
        self.val_batches = self.val_padding = 0
        self.objective.reset_validation()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_batches += 1
        if batch.get(PADDING_KEY):
            # padding batches come last: keep what the real ones accumulated, run it like them, count nothing
            if self._counted_state is None:
                self._counted_state = copy.deepcopy(self.objective.validation_state())
            self.val_padding += 1
            self.objective.validation_step(self.model, batch)
            return
        if self._counted_state is not None:
            raise RuntimeError("a validation batch came after the padding batches")
        self._val_skipped += int(batch.get("skipped", 0) or 0)
        self.objective.validation_step(self.model, batch)

    def on_validation_epoch_end(self) -> None:
        state = self._counted_state if self._counted_state is not None else self.objective.validation_state()
        gathered = _gather((state, self._val_skipped))
        metrics = self.objective.validation_metrics([state for state, _ in gathered])
        metrics["val/skipped"] = float(sum(skipped for _, skipped in gathered))
        for key, value in metrics.items():
            self.log(key, value, rank_zero_only=True, prog_bar=key in self.objective.progress_metrics)
        self.last_val_metrics = metrics
