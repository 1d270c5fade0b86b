"""The objective interface, and the recipe-time check of a stage's objective.

An objective is an ``nn.Module`` (its own frozen helpers, e.g. a teacher, live in it, never in the model)
registered in :data:`vlkit.registry.OBJECTIVES`. It declares:

* ``Args``: a dataclass of its arguments, read from the stage key ``section`` (``objective_args:`` unless
  the objective names another key, e.g. ``distill:``);
* ``data_kind``: the batches it needs (a dataset's ``objective``: ``lm`` conversations, ``distill``, ...);
* ``validates_on_train_data``: validate on the training dataset's held-out part instead of ``data.val``;
* ``needs_pixels``: batches must carry pixels (the feature cache is not read in its stages).

and implements :meth:`Objective.training_step` (the loss), :meth:`Objective.validation_step` (accumulate)
and :meth:`Objective.validation_metrics` (reduce the accumulated states of all ranks).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vlkit.errors import RecipeError

if TYPE_CHECKING:
    from vlkit.config import EvalConfig, StageConfig
    from vlkit.model import VLM
    from vlkit.strategies.base import EmbeddingStrategy

SECTIONS = ("distill", "objective_args")
"""The stage keys that hold an objective's arguments."""


class Objective(nn.Module):
    """Base class of registered objectives; built as ``cls(args, model=, eval_cfg=, baseline=, seed=, key=)``
    (``key``: the recipe key of its arguments, for error messages)."""

    @dataclasses.dataclass
    class Args:
        """No arguments."""

    section: ClassVar[str] = "objective_args"
    """The stage key holding this objective's ``Args``."""
    data_kind: ClassVar[str] = "lm"
    """The kind of batches it trains on: the ``objective`` a dataset declares."""
    data_description: ClassVar[str] = "conversations"
    """What such a dataset is, for error messages."""
    validates_on_train_data: ClassVar[bool] = False
    """Validate on the training dataset's held-out part (``has_validation`` / ``val_loader``), not data.val."""
    needs_pixels: ClassVar[bool] = False
    """Its batches need pixels: stages with this objective never read the feature cache."""
    progress_metrics: ClassVar[tuple[str, ...]] = ("val/loss",)
    """Validation metrics shown in the progress bar."""

    def __init__(self, args: Any, *, model: VLM, eval_cfg: EvalConfig, baseline: dict[str | None, str] | None = None,
                 seed: int = 0, key: str = "") -> None:
        super().__init__()
        self.args = args
        self.eval_cfg = eval_cfg
        self.reset_validation()

    # ---------------------------------------------------------------------------------- recipe checks

    @classmethod
    def check_model(cls, strategy: type[EmbeddingStrategy], where: str) -> None:
        """Refuse a model this objective cannot train (RecipeError at ``where``, the stage's ``objective``)."""

    @classmethod
    def complete_args(cls, args: Any, where: str) -> Any:
        """Check ``args`` beyond their types and fill in nested sections; ``where`` is the section's key."""
        return args

    # --------------------------------------------------------------------------------------- training

    def training_step(self, model: VLM, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch and other values to log as ``train/<name>``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- validation

    def reset_validation(self) -> None:
        """Forget what earlier validation steps accumulated."""

    def validation_step(self, model: VLM, batch: dict[str, Any]) -> None:
        """Accumulate one validation batch."""
        raise NotImplementedError

    def validation_state(self) -> Any:
        """What this rank accumulated (picklable: gathered from every rank)."""
        raise NotImplementedError

    def validation_metrics(self, states: list[Any]) -> dict[str, float]:
        """The validation metrics (``val/...``) of the states of all ranks."""
        raise NotImplementedError


def check_stage(stage: StageConfig, where: str, strategy: type[EmbeddingStrategy], dataset_kind: str,
                dataset: str) -> None:
    """Validate a stage's ``objective`` (a registered name, did-you-mean otherwise), the model it needs, its
    dataset's kind and its arguments section; the section is replaced by its completed arguments."""
    from vlkit.registry import OBJECTIVES

    try:
        cls = OBJECTIVES.get(stage.objective)
    except RecipeError as exc:
        raise RecipeError(exc.message, f"{where}.objective") from None
    for section in SECTIONS:
        if section != cls.section and getattr(stage, section) is not None:
            message = (f"objective {stage.objective!r} takes its arguments under `{cls.section}:`"
                       if section == "objective_args" else f"only used by `objective: {section}` stages")
            raise RecipeError(message, f"{where}.{section}")
    cls.check_model(strategy, f"{where}.objective")
    if dataset_kind != cls.data_kind:
        raise RecipeError(f"dataset {dataset!r} gives {dataset_kind!r} batches but this stage's objective is "
                          f"{stage.objective!r}, which needs {cls.data_description}", f"{where}.data")
    raw = getattr(stage, cls.section)
    required = [f.name for f in dataclasses.fields(cls.Args)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if raw is None and required:
        raise RecipeError(f"missing: `objective: {stage.objective}` needs a `{cls.section}:` section "
                          f"({', '.join(required)})", f"{where}.{cls.section}")
    key = f"{where}.{cls.section}"
    args = OBJECTIVES.parse_args({"name": stage.objective, **(raw or {})}, key)
    args = cls.complete_args(args, key)
    if raw is not None:
        setattr(stage, cls.section, dataclasses.asdict(args))


def build_objective(stage: StageConfig, model: VLM, eval_cfg: EvalConfig,
                    baseline: dict[str | None, str] | None = None, seed: int = 0, where: str = "stages") -> Objective:
    """The objective of a (validated) stage, built for ``model``."""
    from vlkit.registry import OBJECTIVES

    cls = OBJECTIVES.get(stage.objective)
    section = getattr(stage, cls.section) or {}
    return OBJECTIVES.build({"name": stage.objective, **section}, f"{where}.{cls.section}", model=model,
                            eval_cfg=eval_cfg, baseline=baseline, seed=seed, key=f"{where}.{cls.section}")


__all__ = ["SECTIONS", "Objective", "build_objective", "check_stage"]
