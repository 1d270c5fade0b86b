"""Validating a recipe beyond its schema: every part section against its registered ``Args`` (defaults filled in),
the model's parts against each other, packing, precision and dtypes of trained parts, LoRA targets."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from vlkit.config.sections import LoraConfig, ModelConfig, Recipe
from vlkit.errors import RecipeError


def _complete(registry: Any, section: Mapping[str, Any], where: str) -> dict[str, Any]:
    return registry.complete(section, where)


def validate_parts(recipe: Recipe, with_model: bool = True) -> None:
    """Validate every part section against its registered ``Args`` and fill in defaults (``with_model``
    False: all but the model's parts and what depends on them, objectives and LoRA; see ``vlkit config``)."""
    from vlkit.objectives.base import check_stage
    from vlkit.registry import DATASETS

    strategy = _validate_model(recipe.model) if with_model else None
    recipe.data.train = _complete(DATASETS, recipe.data.train, "data.train")
    if recipe.data.val is not None:
        recipe.data.val = _complete(DATASETS, recipe.data.val, "data.val")
    if not recipe.stages:
        raise RecipeError("at least one stage is required", "stages")
    names = [s.name for s in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}]"
        if names.count(stage.name) > 1:
            raise RecipeError(f"duplicate stage name {stage.name!r}; stage names must be unique", f"{where}.name")
        if stage.max_steps <= 0:
            raise RecipeError("must be positive", f"{where}.max_steps")
        if not stage.trainable and not isinstance(stage.lora, LoraConfig):
            raise RecipeError("name at least one part to train (encoders, fusion, llm or a module path)",
                              f"{where}.trainable")
        train_name = recipe.data.train["name"]
        if stage.data and stage.data.get("name", train_name) != train_name:  # its own dataset replaces data.train
            stage.data = _complete(DATASETS, stage.data, f"{where}.data")
        elif stage.data:
            _complete(DATASETS, {**recipe.data.train, **stage.data}, f"{where}.data")
        dataset = stage.data.get("name", train_name)
        if strategy is not None:
            check_stage(stage, where, strategy, DATASETS.get(dataset).objective, dataset)  # the objective's checks
    if with_model:
        _validate_lora(recipe)
    from vlkit.training.strategy import check_strategy

    check_strategy(recipe.trainer.strategy)
    if strategy is not None:
        _validate_packing(recipe, strategy)
    _validate_precision(recipe)
    from vlkit.eval.metrics import check_metric_names

    check_metric_names(recipe.eval.metrics, "eval.metrics", generated=True)
    if recipe.eval.max_new_tokens is not None and recipe.eval.max_new_tokens < 1:
        raise RecipeError(f"must be at least 1 (or left out: enough for the longest validation answer), got "
                          f"{recipe.eval.max_new_tokens}", "eval.max_new_tokens")


def _validate_packing(recipe: Recipe, strategy: Any) -> None:
    """``packing`` packs training batches (data.train and stages' data), for strategies that allow it."""
    if recipe.data.val is not None and recipe.data.val.get("packing") is not None:
        raise RecipeError("packing applies to training batches; validation batches are prompts, padded for "
                          "generation. Remove it here (set data.train.packing)", "data.val.packing")
    sections = [("data.train", recipe.data.train)] + [(f"stages[{i}].data", s.data) for i, s in
                                                       enumerate(recipe.stages)]
    for where, section in sections:
        if section.get("packing") is not None and strategy.packing_refusal is not None:
            raise RecipeError(strategy.packing_refusal, f"{where}.packing")


HALF_DTYPES = ("bfloat16", "float16")
"""Part ``dtype`` values that store weights in half precision: only for parts frozen in every stage."""
HALF_TRUE_PRECISIONS = ("bf16-true", "16-true")
"""Lightning precisions that store every weight in half precision (the trained ones included)."""


def _validate_precision(recipe: Recipe) -> None:
    """Trained weights stay float32 (AdamW's small updates round away in bf16/fp16: at 1.0 bf16 resolves
    7.8e-3): no ``*-true`` half precision, and a part whose ``dtype`` is half precision trains in no stage
    (its LoRA adapters may: they are kept in float32). ``bf16-mixed`` computes in bf16 on fp32 weights."""
    keys = [e.get("key") or e["name"].rpartition(":")[2] for e in recipe.model.encoders]
    parts = [(f"encoders.{k}", f"model.encoders[{i}]", e)
             for i, (k, e) in enumerate(zip(keys, recipe.model.encoders))]
    parts += [("fusion", "model.fusion", recipe.model.fusion), ("llm", "model.llm", recipe.model.llm)]
    for i, stage in enumerate(recipe.stages):
        precision = stage.precision or recipe.trainer.precision
        if precision in HALF_TRUE_PRECISIONS:
            raise RecipeError(f"precision {precision} stores the weights stage {stage.name!r} trains in half "
                              "precision, where AdamW's updates round away; use bf16-mixed (float32 weights, "
                              "bf16 compute)", f"stages[{i}].precision" if stage.precision else "trainer.precision")
        for part, where, section in parts:
            dtype = (section or {}).get("dtype")
            if dtype not in HALF_DTYPES:
                continue
            for path in stage.trainable:
                if path == part or part.startswith(path + ".") or path.startswith(part + "."):
                    raise RecipeError(
                        f"stage {stage.name!r} trains {path!r}, but `dtype: {dtype}` stores {part} in {dtype}, "
                        "where AdamW's updates round away. Remove `dtype` (float32 weights) and use "
                        "`trainer.precision: bf16-mixed` for bf16 compute; a half-precision `dtype` is for "
                        "parts frozen in every stage (LoRA adapters on them train in float32)", f"{where}.dtype")


def _validate_model(m: ModelConfig) -> Any:
    """Validate the model's part sections (filling in defaults); returns the model's embedding strategy."""
    from vlkit.registry import ENCODERS, FUSIONS, LLMS
    from vlkit.strategies import strategy_for

    if not m.encoders:
        raise RecipeError("at least one encoder is required", "model.encoders")
    if m.views is not None:
        if not 1 <= m.views.grid <= 8:
            raise RecipeError(f"must be between 1 and 8 (sub-images per side), got {m.views.grid}",
                              "model.views.grid")
        if m.views.size <= 0:
            raise RecipeError(f"must be a positive number of pixels, got {m.views.size}", "model.views.size")
    m.encoders = [_complete(ENCODERS, e, f"model.encoders[{i}]") for i, e in enumerate(m.encoders)]
    strategy = strategy_for([ENCODERS.get(e["name"]) for e in m.encoders])  # from the encoders' interfaces
    strategy.check_model(m, "model")
    if strategy.uses_fusion:
        m.fusion = _complete(FUSIONS, m.fusion, "model.fusion")
    m.llm = _complete(LLMS, m.llm, "model.llm")
    return strategy


def _validate_lora(recipe: Recipe) -> None:
    """LoRA sections: known parts, sane sizes, no part both fully trained and adapted, ``merge`` only after
    adapters, the same settings when a later stage keeps training a part's adapters, quantized LLMs only
    under adapters."""
    encoder_keys = [e.get("key") or e["name"].rpartition(":")[2] for e in recipe.model.encoders]
    valid = ["llm", "fusion", *(f"encoders.{k}" for k in encoder_keys)]
    adapted: dict[str, tuple[int, LoraConfig]] = {}
    quantized = recipe.model.llm.get("load_in") is not None
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}].lora"
        if stage.lora == "merge":
            if not adapted:
                raise RecipeError("`lora: merge` but no earlier stage trains LoRA adapters", where)
            if quantized:
                raise RecipeError("cannot merge adapters into a quantized (`load_in`) LLM; keep them as they are "
                                  "(vlkit merge-lora writes them in peft format)", where)
            adapted = {}
        elif isinstance(stage.lora, LoraConfig):
            lora = stage.lora
            if lora.r <= 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
                raise RecipeError(f"need r > 0, alpha > 0 and 0 <= dropout < 1 (got r={lora.r}, "
                                  f"alpha={lora.alpha:g}, dropout={lora.dropout:g})", where)
            if not lora.parts:
                raise RecipeError(f"name the parts to adapt (one of {', '.join(valid)})", f"{where}.parts")
            if isinstance(lora.targets, str) and lora.targets != "all-linear":
                raise RecipeError(f"expected `all-linear` or a list of module names, got {lora.targets!r}",
                                  f"{where}.targets")
            for j, part in enumerate(lora.parts):
                if part not in valid:
                    close = difflib.get_close_matches(part, valid, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise RecipeError(f"{part!r} is not a part of this model.{hint} Parts: {', '.join(valid)}",
                                      f"{where}.parts[{j}]")
                for k, path in enumerate(stage.trainable):
                    if part == path or part.startswith(path + "."):
                        raise RecipeError(f"{path!r} trains all of {part!r}, which also gets LoRA adapters; "
                                          f"drop it from `trainable` (its base weights freeze under LoRA)",
                                          f"stages[{i}].trainable[{k}]")
                if part in adapted and adapted[part][1] != lora:
                    raise RecipeError(f"{part!r} already has adapters from stage {adapted[part][0]} with other "
                                      "settings; restate them unchanged to keep training, or `lora: merge` first",
                                      where)
                adapted.setdefault(part, (i, lora))
        if quantized and "llm" not in adapted:
            for k, path in enumerate(stage.trainable):
                if path == "llm" or path.startswith("llm."):
                    raise RecipeError("the LLM is quantized (`load_in`): its weights cannot train; put LoRA "
                                      "adapters on it (`lora: {parts: [llm]}`) instead",
                                      f"stages[{i}].trainable[{k}]")
