"""vlkit: build and train vision-language models from swappable parts described by YAML recipes.

Public API::

    recipe = vlkit.load_recipe("recipes/demo/clip_mlp.yaml", ["stages.0.lr=5e-4"])
    model = vlkit.build_model(recipe)          # VLM: encoders -> fusion -> LLM
    summary = vlkit.fit(recipe, "runs/demo")   # all stages, resumable

The names are imported on first use (PEP 562), so ``import vlkit`` (and ``vlkit --help``) loads neither
torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlkit.config import Recipe, load_recipe
    from vlkit.io.pretrained import from_pretrained
    from vlkit.model import VLM, build_model
    from vlkit.registry import DATASETS, ENCODERS, FUSIONS, LLMS
    from vlkit.training.fit import evaluate, fit, load_run

_EXPORTS = {
    "Recipe": "vlkit.config", "load_recipe": "vlkit.config",
    "VLM": "vlkit.model", "build_model": "vlkit.model",
    "DATASETS": "vlkit.registry", "ENCODERS": "vlkit.registry", "FUSIONS": "vlkit.registry",
    "LLMS": "vlkit.registry",
    "evaluate": "vlkit.training.fit", "fit": "vlkit.training.fit", "load_run": "vlkit.training.fit",
    "from_pretrained": "vlkit.io.pretrained",
}
_SUBMODULES = {"cli", "config", "contracts", "data", "encoders", "errors", "eval", "fusions", "llms", "model",
               "module", "registry", "sweep", "training"}

__all__ = ["DATASETS", "ENCODERS", "FUSIONS", "LLMS", "VLM", "Recipe", "build_model", "evaluate", "fit",
           "from_pretrained", "load_recipe", "load_run"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"vlkit.{name}")
    else:
        raise AttributeError(f"module 'vlkit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
