"""``lm``: next-token prediction on conversations; validated by the loss on the answers and the answer
metrics of ``eval.metrics`` on generated answers (overall and per question type, next to the majority-answer
baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from vlkit.constants import IGNORE_INDEX
from vlkit.eval.metrics import build_metrics
from vlkit.model import VLM
from vlkit.objectives.base import Objective
from vlkit.registry import OBJECTIVES

LOSS_KEYS = ("input_ids", "attention_mask", "pixel_values", "labels")
LEGACY_KEY = {"exact_match": "accuracy"}
"""Metrics reported under another key: exact match is ``val/accuracy`` (progress, sweeps, older runs)."""


def metric_key(metric: str) -> str:
    """The ``val/`` key of a metric: ``val/accuracy`` for exact match, else ``val/<metric>``."""
    return f"val/{LEGACY_KEY.get(metric, metric)}"


def baseline_key(metric: str) -> str:
    """The key of a metric's majority baseline: ``val/baseline`` (exact match), else ``val/baseline_<metric>``."""
    return "val/baseline" if metric in LEGACY_KEY else f"val/baseline_{metric}"


@OBJECTIVES.register("lm")
class LanguageModeling(Objective):
    """The LLM's cross-entropy on the trained tokens. Validation batches hold prompts (``input_ids``,
    ``answer``, ``type``) and, when the dataset gives them, full conversations (``loss_batch``) for the loss.

    Metrics: ``val/loss`` (per trained token), ``val/count``, and for every metric of ``eval.metrics`` its
    score and the majority baseline's (:func:`metric_key`, :func:`baseline_key`: ``val/accuracy`` and
    ``val/baseline`` for exact match, ``val/anls`` and ``val/baseline_anls`` ...); the same per question
    type with the suffix ``/<type>`` (``val/accuracy/count``, ``val/anls/ocr``)."""

    progress_metrics: ClassVar[tuple[str, ...]] = ("val/accuracy", "val/loss")

    def __init__(self, args: Any, *, baseline: dict[str | None, str] | None = None, **context: Any) -> None:
        super().__init__(args, **context)
        self.baseline = baseline or {}
        if self.eval_cfg.max_new_tokens is None:
            raise ValueError("eval.max_new_tokens is unset: resolve it first (vlkit.eval.budget.with_answer_budget)")

    def training_step(self, model: VLM, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return model(**batch).loss, {}

    def reset_validation(self) -> None:
        self._answers: list[tuple[str, str, str | None]] = []  # (prediction, reference, question type)
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
        self._answers.extend(zip(preds, batch["answer"], types))

    def validation_state(self) -> Any:
        # Per-sample answers, not sums (e.g. torchmetrics' SumMetric): corpus metrics such as CIDEr (document
        # frequencies over all references) and the per-type tables need every rank's (prediction, reference).
        return self._answers, self._loss

    def validation_metrics(self, states: list[Any]) -> dict[str, float]:
        answers = [a for part, _ in states for a in part]
        loss_sum = sum(loss[0] for _, loss in states)
        loss_n = sum(loss[1] for _, loss in states)
        return answer_metrics(answers, self.eval_cfg.metrics, self.baseline, loss_sum / loss_n if loss_n else None)


def answer_metrics(answers: Sequence[tuple[str, str, str | None]], metrics: Sequence[str],
                   baseline: dict[str | None, str], loss: float | None = None) -> dict[str, float]:
    """``val/loss``, then per group (all answers, then each question type as suffix ``/<type>``) the sample
    count and each metric of the model's predictions and of the majority baseline (the type's most frequent
    training answer, else the overall one) on ``(prediction, reference, type)`` triples."""
    out: dict[str, float] = {}
    if loss is not None:
        out["val/loss"] = loss
    groups: dict[str, list[tuple[str, str, str | None]]] = {"": list(answers)}
    for a in answers:
        if a[2]:
            groups.setdefault(f"/{a[2]}", []).append(a)
    for suffix in sorted(groups):
        group = groups[suffix]
        if not group:
            continue
        out[f"val/count{suffix}"] = len(group)
        for name, model_metric, base_metric in zip(metrics, build_metrics(metrics), build_metrics(metrics)):
            for pred, ref, qtype in group:
                model_metric.update(pred, ref)
                base_metric.update(baseline.get(qtype, baseline.get(None, "")), ref)
            out[metric_key(name) + suffix] = model_metric.compute()
            out[baseline_key(name) + suffix] = base_metric.compute()
    return out
