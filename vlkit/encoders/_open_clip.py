"""Loading code shared by the open_clip encoders (``clip``, ``convnext_clip``): named models with pretrained
tags or weight files, and the preprocessing mean/std of a model config."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from vlkit.errors import CheckpointError, RecipeError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
NO_BASE_WEIGHTS = {"pretrained_text": False, "pretrained_image": False}
"""``create_model`` arguments: never fetch base weights for towers that the checkpoint replaces or we drop."""


def mean_std(encoder: str, value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    """A preprocessing mean or std as 3 floats (one value is repeated; None gives ``default``)."""
    if value is None:
        return default
    values = tuple(float(v) for v in value)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise RecipeError(f"{encoder} encoder: preprocess mean/std must have 3 values, got {list(value)}")
    return values  # type: ignore[return-value]


def create_named(encoder: str, name: str, pretrained: str | None, image_size: int | None,
                 suggest: str = "", **kwargs: Any) -> Any:
    """``open_clip.create_model(name, pretrained)`` with recipe errors naming ``encoder``: an unknown model
    (close matches among the models whose name contains ``suggest``), an unknown pretrained tag, a missing
    weights file, or weights that cannot be loaded (e.g. not in the cache when offline)."""
    import open_clip

    cleaned = name.replace("/", "-")
    models = open_clip.list_models()
    if cleaned not in models:
        close = difflib.get_close_matches(cleaned, [m for m in models if suggest in m], n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RecipeError(f"{encoder} encoder: unknown open_clip model {name!r}.{hint} See "
                          "open_clip.list_models(); for a local folder use `checkpoint: local-dir:PATH`")
    if pretrained is not None:
        tags = open_clip.list_pretrained_tags_by_model(cleaned)
        if pretrained not in tags:
            path = Path(pretrained).expanduser()
            looks_like_path = "/" in pretrained or "\\" in pretrained or path.suffix in WEIGHT_SUFFIXES
            if looks_like_path and not path.is_file():
                raise CheckpointError(f"{encoder} encoder: weights file not found: {path} (from `pretrained`)")
            if not looks_like_path:
                raise RecipeError(f"{encoder} encoder: {pretrained!r} is neither a pretrained tag of {cleaned!r} "
                                  f"(tags: {', '.join(tags) or 'none'}) nor a weights file")
            pretrained = str(path)
    try:
        return open_clip.create_model(cleaned, pretrained=pretrained, force_image_size=image_size,
                                      **NO_BASE_WEIGHTS, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{encoder} encoder: cannot load {cleaned!r} with pretrained={pretrained!r}: {exc}. Without network "
            "access, pretrained tags must already be in the Hugging Face cache."
        ) from exc
