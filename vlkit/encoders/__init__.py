"""Vision encoders: pixels in, named feature streams ``(B, N, C)`` out.

Built-in encoders (registered in :data:`vlkit.registry.ENCODERS`, imported lazily by the registry so that
``import vlkit.encoders`` does not pull in open_clip or timm):

* ``clip`` (:mod:`vlkit.encoders.clip`): an open_clip ViT image tower.
* ``dinov2`` (:mod:`vlkit.encoders.dinov2`): a timm ViT (DINOv2 by default).

Both load weights from exactly one source: a named model (``model:`` [+ ``pretrained:``]), a local
checkpoint folder (``checkpoint:``) or an inline architecture for random init (``config:``).
"""

from __future__ import annotations

from vlkit.encoders.base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocess, VisionEncoder
from vlkit.errors import RecipeError

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocess", "VisionEncoder"]


def check_one_source(encoder: str, model: str | None, checkpoint: str | None, config: object | None,
                     model_hint: str) -> None:
    """Raise RecipeError unless exactly one of ``model`` / ``checkpoint`` / ``config`` is set."""
    given = [k for k, v in (("model", model), ("checkpoint", checkpoint), ("config", config)) if v is not None]
    if len(given) != 1:
        got = f"got {', '.join(f'`{g}`' for g in given)}" if given else "got none of them"
        raise RecipeError(
            f"{encoder} encoder: set exactly one of `model` ({model_hint}), `checkpoint` (a local folder, "
            f"'local-dir:PATH') or `config` (an inline architecture for random init); {got}"
        )


def resolve_layer(encoder: str, layer: int, depth: int) -> int:
    """Turn a recipe ``layer`` (-1 = last block, -2 = penultimate, 0 = first) into an absolute block index."""
    if not -depth <= layer < depth:
        raise RecipeError(
            f"{encoder} encoder: `layer` {layer} is out of range for a tower with {depth} blocks "
            f"(use 0..{depth - 1}, or -1 for the last block, -2 for the penultimate, ...)"
        )
    return layer % depth
