"""The LightningModule that trains one stage of a VLM and evaluates it (loss + exact-match accuracy)."""

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
from vlkit.training.distill import Distiller
from vlkit.training.stages import build_optimizer, print_param_table


def _gather(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


class VLMModule(L.LightningModule):
    """Trains ``model`` for one recipe stage. Freezing is applied by the caller before the Trainer starts.

    The data loaders come from ``train_data`` / ``val_data`` (registered datasets), built per rank once the
    (possibly distributed) run has started. ``baseline`` maps question type -> majority training answer.

    With a ``distiller`` (an ``objective: distill`` stage) the loss is the distillation loss, and validation
    runs on the training dataset's held-out part and reports ``val/loss``, ``val/cos_image``, ``val/cos_text``.
    """

    def __init__(self, model: VLM, stage: StageConfig, eval_cfg: EvalConfig, train_data: Any,
                 val_data: Any | None = None, baseline: dict[str | None, str] | None = None,
                 seed: int = 0, distiller: Distiller | None = None) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.eval_cfg = eval_cfg
        self.train_data = train_data
        self.val_data = val_data
        self.baseline = baseline or {}
        self.seed = seed
        self.distiller = distiller
        self.shards_seen: Counter[str] = Counter()
        self._skipped = 0
        self._reset_val()

    # ---------------------------------------------------------------------------------------------- data

    def _processor(self):
        args = self.train_data.processor_args
        return self.model.processor(max_length=args.max_length, train_on=args.train_on)

    def train_dataloader(self):
        from vlkit.data.base import stage_data_seed  # each stage streams its own order

        return self.train_data.train_loader(self._processor(), seed=stage_data_seed(self.seed, self.stage.name),
                                            rank=self.global_rank, world_size=self.trainer.world_size)

    @property
    def can_validate(self) -> bool:
        """Whether this stage has a validation set (a distillation dataset's held-out part, or data.val)."""
        if self.distiller is not None:
            return self.train_data.has_validation()
        return self.val_data is not None

    def val_dataloader(self):
        if not self.can_validate:
            return []
        data = self.train_data if self.distiller is not None else self.val_data
        return data.val_loader(self._processor(), rank=self.global_rank, world_size=self.trainer.world_size,
                               max_samples=self.eval_cfg.max_samples)

    # ------------------------------------------------------------------------------------------ training

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model, self.stage)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        if self.trainer.is_global_zero:
            print_param_table(self.model, self.stage, Console())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._skipped += int(batch.get("skipped", 0) or 0)
        self.shards_seen.update(batch.get("__url__") or [])
        if self.distiller is not None:
            out = self.distiller(self.model, batch)
            loss = out.loss
            for name, value in (("image_loss", out.image_loss), ("text_loss", out.text_loss)):
                self.log(f"train/{name}", value.detach(), batch_size=batch["input_ids"].shape[0])
        else:
            loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
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

    def _reset_val(self) -> None:
        self._val: dict[str, list[float]] = {}
        self._val_loss = [0.0, 0]
        self._val_skipped = 0
        self._val_cos = [0.0, 0, 0.0, 0]  # distillation: cosine sum and count, image then text

    def on_validation_epoch_start(self) -> None:
        self._reset_val()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._val_skipped += int(batch.get("skipped", 0) or 0)
        if self.distiller is not None:
            out = self.distiller(self.model, batch)
            n = batch["input_ids"].shape[0]
            self._val_loss[0] += float(out.loss) * n
            self._val_loss[1] += n
            for i, value in enumerate((out.cos_image, out.n_image, out.cos_text, out.n_text)):
                self._val_cos[i] += value
            return
        loss_batch = batch.get("loss_batch")
        if loss_batch is not None:
            out = self.model(**{k: v for k, v in loss_batch.items() if k in
                                ("input_ids", "attention_mask", "pixel_values", "labels")})
            n = int((loss_batch["labels"][:, 1:] != -100).sum())
            self._val_loss[0] += float(out.loss) * n
            self._val_loss[1] += n
        preds = self.model.generate(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                                    max_new_tokens=self.eval_cfg.max_new_tokens)
        types = batch.get("type") or [None] * len(preds)
        for pred, answer, qtype in zip(preds, batch["answer"], types):
            gold = normalize_answer(answer)
            for key in ("all", f"type:{qtype}" if qtype else None):
                if key is None:
                    continue
                stats = self._val.setdefault(key, [0.0, 0.0, 0.0])
                stats[0] += float(normalize_answer(pred) == gold)
                stats[1] += float(normalize_answer(self.baseline.get(qtype, self.baseline.get(None, ""))) == gold)
                stats[2] += 1

    def on_validation_epoch_end(self) -> None:
        if self.distiller is not None:
            self._distill_epoch_end()
            return
        merged: dict[str, list[float]] = {}
        loss_sum, loss_n, skipped = 0.0, 0, 0
        for part, (lsum, ln), sk in _gather((self._val, self._val_loss, self._val_skipped)):
            for key, stats in part.items():
                acc = merged.setdefault(key, [0.0, 0.0, 0.0])
                for i in range(3):
                    acc[i] += stats[i]
            loss_sum, loss_n, skipped = loss_sum + lsum, loss_n + ln, skipped + sk
        metrics = self.metrics_from(merged, loss_sum / loss_n if loss_n else None)
        metrics["val/skipped"] = float(skipped)
        for key, value in metrics.items():
            self.log(key, value, rank_zero_only=True, prog_bar=key in ("val/accuracy", "val/loss"))
        self.last_val_metrics = metrics

    def _distill_epoch_end(self) -> None:
        loss_sum, loss_n, cos, skipped = 0.0, 0, [0.0, 0, 0.0, 0], 0
        for (lsum, ln), part, sk in _gather((self._val_loss, self._val_cos, self._val_skipped)):
            loss_sum, loss_n, skipped = loss_sum + lsum, loss_n + ln, skipped + sk
            cos = [a + b for a, b in zip(cos, part)]
        metrics = {"val/skipped": float(skipped)}
        if loss_n:
            metrics["val/loss"] = loss_sum / loss_n
        if cos[1]:
            metrics["val/cos_image"] = cos[0] / cos[1]
        if cos[3]:
            metrics["val/cos_text"] = cos[2] / cos[3]
        for key, value in metrics.items():
            self.log(key, value, rank_zero_only=True, prog_bar=key != "val/skipped")
        self.last_val_metrics = metrics

    @staticmethod
    def metrics_from(stats: dict[str, list[float]], loss: float | None) -> dict[str, float]:
        out: dict[str, float] = {}
        if loss is not None:
            out["val/loss"] = loss
        for key, (correct, base, n) in sorted(stats.items()):
            if not n:
                continue
            suffix = "" if key == "all" else "/" + key.removeprefix("type:")
            out[f"val/accuracy{suffix}"] = correct / n
            out[f"val/baseline{suffix}"] = base / n
            out[f"val/count{suffix}"] = n
        return out
