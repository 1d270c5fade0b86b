"""Constants shared across vlkit's layers. This module imports nothing (of vlkit or otherwise), so every layer
can use it without an import cycle."""

IMAGE_TOKEN_ID = -200
"""Placeholder id in ``input_ids`` at every visual-token position (replaced by the model before the LLM)."""
IGNORE_INDEX = -100
"""Label of the tokens that do not train (torch's cross-entropy default ``ignore_index``)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of [0, 1] pixels that OpenAI CLIP normalises with."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel ImageNet mean of [0, 1] pixels (DINOv2, Florence-2, InternViT)."""
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["CLIP_MEAN", "CLIP_STD", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_TOKEN_ID"]
