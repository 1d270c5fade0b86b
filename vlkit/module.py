"""The LightningModule that trains one stage of a VLM and evaluates it (loss + exact-match accuracy)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from rich.console import Console

from vlkit.config import EvalConfig, StageConfig
from vlkit.model import VLM
from vlkit.training.stages import build_optimizer, print_param_table


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, drop surrounding punctuation (exact match after this)."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?,;:\"'")


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
    """

    def __init__(self, model: VLM, stage: StageConfig, eval_cfg: EvalConfig, train_data: Any,
                 val_data: Any | None = None, baseline: dict[str | None, str] | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.eval_cfg = eval_cfg
        self.train_data = train_data
        self.val_data = val_data
        self.baseline = baseline or {}
        self.seed = seed
        self.shards_seen: Counter[str] = Counter()
        self._skipped = 0
        self._reset_val()

    # ---------------------------------------------------------------------------------------------- data

    def _processor(self):
        args = self.train_data.args
        return self.model.processor(max_length=args.max_length, train_on=args.train_on)

    def train_dataloader(self):
        return self.train_data.train_loader(self._processor(), seed=self.seed + self.trainer.global_step,
                                            rank=self.global_rank, world_size=self.trainer.world_size)

    def val_dataloader(self):
        if self.val_data is None:
            return []
        return self.val_data.val_loader(self._processor(), rank=self.global_rank,
                                        world_size=self.trainer.world_size, max_samples=self.eval_cfg.max_samples)

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

    def on_validation_epoch_start(self) -> None:
        self._reset_val()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._val_skipped += int(batch.get("skipped", 0) or 0)
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
