"""Objectives: `objective:` on a stage names a registered objective, which owns the loss, the validation
metrics and the data it needs; a third-party objective trains from a recipe with no edit inside vlkit."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from vlkit import load_recipe
from vlkit.errors import RecipeError
from vlkit.registry import OBJECTIVES
from vlkit.training.fit import fit

PLUGIN = '''
"""An image-text contrastive objective (CLIP's InfoNCE) on the model's own embeddings: each sample's visual
tokens (mean) against its answer's token embeddings (mean), the other samples of the batch as negatives."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlkit.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from vlkit.objectives.base import Objective


class ImageTextContrastive(Objective):
    @dataclass
    class Args:
        temperature: float = 0.1

    def _loss(self, model, batch):
        ids, labels = batch["input_ids"], batch["labels"]
        embeds = model.embed(ids, batch.get("pixel_values"), batch["attention_mask"])
        image = (ids == IMAGE_TOKEN_ID).unsqueeze(-1).float()
        text = (labels != IGNORE_INDEX).unsqueeze(-1).float()
        keep = (image.sum((1, 2)) > 0) & (text.sum((1, 2)) > 0)
        img = F.normalize(((embeds * image).sum(1) / image.sum(1).clamp(min=1))[keep].float(), dim=-1)
        txt = F.normalize(((embeds * text).sum(1) / text.sum(1).clamp(min=1))[keep].float(), dim=-1)
        logits = img @ txt.T / self.args.temperature
        target = torch.arange(len(logits), device=logits.device)
        return F.cross_entropy(logits, target), int((logits.argmax(-1) == target).sum()), len(logits)

    def training_step(self, model, batch):
        loss, correct, n = self._loss(model, batch)
        return loss, {"itc_accuracy": torch.tensor(correct / max(n, 1))}

    def reset_validation(self):
        self._sums = [0.0, 0, 0]

    def validation_step(self, model, batch):
        loss, correct, n = self._loss(model, batch["loss_batch"])
        self._sums = [self._sums[0] + float(loss) * n, self._sums[1] + correct, self._sums[2] + n]

    def validation_state(self):
        return self._sums

    def validation_metrics(self, states):
        loss, correct, n = (sum(s[i] for s in states) for i in range(3))
        return {"val/itc_loss": loss / n, "val/itc_accuracy": correct / n} if n else {}
'''

STAGE = ("stages=[{name: itc, objective: 'itc_objective:ImageTextContrastive', objective_args: {temperature: 0.07}, "
         "trainable: [fusion, llm], lr: 3.0e-3, warmup: 0, schedule: constant, max_steps: 24, val_every: 12}]")


@pytest.fixture()
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The objective as a module of its own (outside vlkit), importable as `itc_objective:ImageTextContrastive`."""
    (tmp_path / "itc_objective.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "itc_objective:ImageTextContrastive"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_builtin_objectives_are_registered():
    assert {"lm", "distill"} <= set(OBJECTIVES.names())
    assert OBJECTIVES.get("distill").validates_on_train_data and not OBJECTIVES.get("lm").validates_on_train_data


def test_stage_objective_is_validated_against_the_registry(tiny_recipe: Path, plugin: str):
    with pytest.raises(RecipeError, match=r"stages\[0\]\.objective: unknown objective 'lmm'. Did you mean 'lm'"):
        load_recipe(tiny_recipe, ["stages.0.objective=lmm"])
    with pytest.raises(RecipeError, match="only used by `objective: distill` stages"):
        load_recipe(tiny_recipe, ["stages.0.distill={teacher: {name: clip}}"])
    with pytest.raises(RecipeError, match=r"stages\[0\]\.objective_args\.temprature: unknown key. Did you mean "
                                          "'temperature'"):
        load_recipe(tiny_recipe, [f"stages.0.objective='{plugin}'", "stages.0.objective_args={temprature: 1}"])
    recipe = load_recipe(tiny_recipe, [f"stages.0.objective='{plugin}'"])  # arguments default
    assert recipe.stages[0].objective == plugin and recipe.stages[0].objective_args is None
    recipe = load_recipe(tiny_recipe, [f"stages.0.objective='{plugin}'", "stages.0.objective_args={temperature: 1}"])
    assert recipe.stages[0].objective_args == {"temperature": 1.0}  # completed, converted


@pytest.mark.slow
def test_a_plugin_objective_trains_from_a_recipe(tiny_recipe: Path, tmp_path: Path, plugin: str):
    summary = fit(load_recipe(tiny_recipe, [STAGE]), tmp_path / "run")
    rows = _rows(tmp_path / "run" / "stage0-itc" / "metrics.csv")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 24
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.7 * first, losses  # the contrastive loss decreases
    print(f"itc loss: first 6 steps {first:.3f}, last 6 steps {last:.3f}")
    assert any(r.get("train/itc_accuracy") for r in rows)  # the objective's own training values are logged
    val = [r for r in rows if r.get("val/itc_loss")]
    assert len(val) == 3  # the objective's validation metrics: at steps 12 and 24, and the stage's final one
    assert float(val[-1]["val/itc_loss"]) < float(val[0]["val/itc_loss"])
    assert set(summary["val"]) == {"val/itc_loss", "val/itc_accuracy", "val/skipped"}  # none of lm's
