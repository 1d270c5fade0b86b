"""vlkit: build and train vision-language models from swappable parts described by YAML recipes.

Public API::

    recipe = vlkit.load_recipe("recipes/demo/clip_mlp.yaml", ["stages.0.lr=5e-4"])
    model = vlkit.build_model(recipe)          # VLM: encoders -> fusion -> LLM
    summary = vlkit.fit(recipe, "runs/demo")   # all stages, resumable
"""

from vlkit.config import Recipe, load_recipe
from vlkit.model import VLM, build_model
from vlkit.registry import DATASETS, ENCODERS, FUSIONS, LLMS
from vlkit.training.fit import evaluate, fit, load_run

__all__ = ["DATASETS", "ENCODERS", "FUSIONS", "LLMS", "VLM", "Recipe", "build_model", "evaluate", "fit",
           "load_recipe", "load_run"]
__version__ = "0.1.0"
