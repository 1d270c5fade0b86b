"""``lm``: next-token prediction on conversations; validated by the loss on the answers and the exact-match
accuracy of generated answers (overall and per question type, next to the majority-answer baseline)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vlkit.constants import IGNORE_INDEX
from vlkit.eval.metrics import normalize_answer
from vlkit.model import VLM
from vlkit.objectives.base import Objective
from vlkit.registry import OBJECTIVES

LOSS_KEYS = ("input_ids", "attention_mask", "pixel_values", "labels")


@OBJECTIVES.register("lm")
class LanguageModeling(Objective):
    """The LLM's cross-entropy on the trained tokens. Validation batches hold prompts (``input_ids``,
    ``answer``, ``type``) and, when the dataset gives them, full conversations (``loss_batch``) for the loss.

    Metrics: ``val/loss`` (per trained token), ``val/accuracy``, ``val/baseline``, ``val/count``, and the
    same per question type (``val/accuracy/<type>`` ...)."""

    progress_metrics: ClassVar[tuple[str, ...]] = ("val/accuracy", "val/loss")

    def __init__(self, args: Any, *, baseline: dict[str | None, str] | None = None, **context: Any) -> None:
        super().__init__(args, **context)
        self.baseline = baseline or {}

    def training_step(self, model: VLM, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return model(**batch).loss, {}

    def reset_validation(self) -> None:
        self._stats: dict[str, list[float]] = {}  # key -> [correct, baseline correct, count]
        self._loss = [0.0, 0]  # summed token loss, trained tokens

    def validation_step(self, model: VLM, batch: dict[str, Any]) -> None:
        loss_batch = batch.get("loss_batch")
        if loss_batch is not None:
            out = model(**{k: v for k, v in loss_batch.items() if k in LOSS_KEYS})
            n = int((loss_batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            self._loss[0] += float(out.loss) * n
            self._loss[1] += n
        preds = model.generate(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                               max_new_tokens=self.eval_cfg.max_new_tokens)
        types = batch.get("type") or [None] * len(preds)
        for pred, answer, qtype in zip(preds, batch["answer"], types):
            gold = normalize_answer(answer)
            for key in ("all", f"type:{qtype}" if qtype else None):
                if key is None:
                    continue
                stats = self._stats.setdefault(key, [0.0, 0.0, 0.0])
                stats[0] += float(normalize_answer(pred) == gold)
                stats[1] += float(normalize_answer(self.baseline.get(qtype, self.baseline.get(None, ""))) == gold)
                stats[2] += 1

    def validation_state(self) -> Any:
        return self._stats, self._loss

    def validation_metrics(self, states: list[Any]) -> dict[str, float]:
        merged: dict[str, list[float]] = {}
        loss_sum, loss_n = 0.0, 0
        for part, (lsum, ln) in states:
            for key, stats in part.items():
                acc = merged.setdefault(key, [0.0, 0.0, 0.0])
                for i in range(3):
                    acc[i] += stats[i]
            loss_sum, loss_n = loss_sum + lsum, loss_n + ln
        return metrics_from(merged, loss_sum / loss_n if loss_n else None)


def metrics_from(stats: dict[str, list[float]], loss: float | None) -> dict[str, float]:
    """``val/loss``, then ``val/accuracy``, ``val/baseline``, ``val/count`` overall (key ``all``) and per
    question type (key ``type:<t>`` -> suffix ``/<t>``) from ``[correct, baseline correct, count]`` sums."""
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
