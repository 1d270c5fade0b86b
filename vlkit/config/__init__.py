"""Recipes: OmegaConf YAML with ``base:`` inheritance and dotted overrides, validated before anything loads.

A recipe is validated in full (top-level schema below, plus each part's ``Args`` dataclass from its
registry) before any weight is read, and every error names the file that set the offending key (or the
command-line override) and the key path, e.g.::

    recipes/demo/clip_mlp.yaml: model.fusion.projector: expected str, got int (2)
"""

from vlkit.config.loading import RECIPE_DIR, load_recipe
from vlkit.config.sections import (
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    Recipe,
    StageConfig,
    TrainerConfig,
    ViewsConfig,
)

__all__ = ["RECIPE_DIR", "DataConfig", "EvalConfig", "LoraConfig", "ModelConfig", "Recipe", "StageConfig",
           "TrainerConfig", "ViewsConfig", "load_recipe"]
