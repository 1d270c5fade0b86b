"""``clip``: the image tower of an open_clip ViT, returning the hidden states of one transformer block.

Exactly one weight source::

    # a built-in open_clip architecture + a pretrained tag (downloaded once) or a weights file
    {name: clip, model: ViT-L-14-336, pretrained: openai, layer: -2}
    # a local folder in open_clip's hf-hub layout (open_clip_config.json + weights), or hf-hub:org/repo
    {name: clip, checkpoint: "local-dir:/models/my-clip"}
    # an inline architecture, randomly initialised (no files, no network)
    {name: clip, config: {embed_dim: 64, vision_cfg: {image_size: 32, patch_size: 8, width: 32,
                                                     layers: 2, heads: 2}}}

Only the image tower is kept (the text tower is dropped after loading), and blocks after ``layer`` plus the
pooling head are pruned, so every remaining parameter receives gradients when the tower trains.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from vlkit.encoders import check_one_source, resolve_layer
from vlkit.encoders._open_clip import NO_BASE_WEIGHTS, WEIGHT_SUFFIXES, create_named, mean_std
from vlkit.encoders.base import CLIP_MEAN, CLIP_STD, Preprocess, VisionEncoder
from vlkit.errors import CheckpointError, RecipeError
from vlkit.registry import ENCODERS
from vlkit.sources import load_error, resolve_source

logger = logging.getLogger(__name__)


@ENCODERS.register("clip")
class CLIPEncoder(VisionEncoder):
    """An open_clip ViT image tower. Stream ``tokens``: ``(B, grid**2 [+1 CLS], width)``."""

    libraries = ("open_clip_torch",)

    @dataclass
    class Args:
        model: str | None = None
        """open_clip model name, e.g. ``ViT-L-14-336`` (see ``open_clip.list_models()``)."""
        pretrained: str | None = None
        """With ``model``: an open_clip pretrained tag (e.g. ``openai``) or a path to a weights file.
        Unset: the named architecture is randomly initialised."""
        checkpoint: str | None = None
        """A folder in open_clip's hf-hub layout: ``local-dir:PATH`` (or a bare ``PATH``) holding
        ``open_clip_config.json`` and ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``;
        or ``hf-hub:org/repo``."""
        config: dict[str, Any] | None = None
        """Inline open_clip model config for random init: ``{embed_dim, vision_cfg: {image_size,
        patch_size, width, layers, head_width | heads, ...}, quick_gelu?}`` (``text_cfg`` is accepted and
        ignored), or a whole ``open_clip_config.json`` body ``{model_cfg: ..., preprocess_cfg: ...}``."""
        layer: int = -1
        """Which transformer block's output to return: -1 the last, -2 the penultimate (LLaVA), 0 the first."""
        keep_cls: bool = False
        """Prepend the CLS token to the stream (LLaVA drops it, SPHINX keeps it)."""
        image_size: int | None = None
        """Override the input size (the position embedding is interpolated when loading weights)."""
        key: str | None = None
        """Stream-name prefix the fusion sees (default: the registered name, ``clip``)."""
        gradient_checkpointing: bool = False
        """Recompute the transformer blocks' activations in the backward pass (less memory, slower)."""

        def __post_init__(self) -> None:
            check_one_source("clip", self.model, self.checkpoint, self.config,
                             "an open_clip name, with `pretrained` a tag or weights file")
            if self.pretrained is not None and self.model is None:
                raise RecipeError("clip encoder: `pretrained` applies only with `model` (the architecture it "
                                  "loads into); a `checkpoint` folder carries its own weights")
            if self.image_size is not None and self.image_size <= 0:
                raise RecipeError(f"clip encoder: `image_size` must be positive, got {self.image_size}")

    def __init__(self, args: Args) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        self.args = args
        if args.config is not None:
            visual, preprocess_cfg = _from_config(args.config, args.image_size)
        elif args.checkpoint is not None:
            visual, preprocess_cfg = _from_checkpoint(args.checkpoint, args.image_size)
        else:
            assert args.model is not None
            visual, preprocess_cfg = _from_name(args.model, args.pretrained, args.image_size)

        if not isinstance(visual, VisionTransformer):
            raise RecipeError(
                f"clip encoder: only open_clip ViT image towers are supported, this model's tower is a "
                f"{type(visual).__name__} (for timm towers use the `dinov2` encoder with the timm model name)"
            )
        depth = len(visual.transformer.resblocks)
        index = resolve_layer("clip", args.layer, depth)
        # Drop what the token stream never uses (later blocks, final norm, projection, pooling heads), so
        # memory is not wasted and every parameter left takes part in the forward pass (DDP-safe).
        visual.prune_intermediate_layers([index], prune_norm=True, prune_head=True)
        visual.attn_pool = None
        visual.attn_pool_contrastive = None
        self.visual = visual
        self.fsdp_wrap_block = type(visual.transformer.resblocks[0])
        visual.set_grad_checkpointing(args.gradient_checkpointing)  # open_clip's own per-block checkpoint
        self.layer_index = index
        """Absolute index (0-based) of the block whose output is returned."""

        height, width = visual.image_size
        grid_h, grid_w = visual.grid_size
        if height != width:
            raise RecipeError(f"clip encoder: non-square input {height}x{width} is not supported")
        self.num_tokens = grid_h * grid_w + int(args.keep_cls)
        self.stream_dims = {"tokens": visual.transformer.width}
        self.preprocess = Preprocess(
            size=height,
            mean=mean_std("clip", preprocess_cfg.get("mean"), CLIP_MEAN),
            std=mean_std("clip", preprocess_cfg.get("std"), CLIP_STD),
        )

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` normalised pixels -> ``{"tokens": (B, N, width)}``."""
        out = self.visual.forward_intermediates(
            pixel_values,
            indices=1,  # blocks after `layer` are pruned: the last remaining block is the one asked for
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.args.keep_cls,
        )
        tokens = out["image_intermediates"][0]
        if self.args.keep_cls:
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)
        return {"tokens": tokens}


# ------------------------------------------------------------------------------------------------ loading


def _visual_and_preprocess(model: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Keep the image tower only (the text tower is freed with ``model``)."""
    from open_clip.model import get_model_preprocess_cfg

    preprocess_cfg = dict(get_model_preprocess_cfg(model))
    return model.visual, preprocess_cfg


def _from_name(name: str, pretrained: str | None, image_size: int | None) -> tuple[torch.nn.Module, dict]:
    model = create_named("clip", name, pretrained, image_size, force_patch_dropout=0.0)  # fixed token count
    return _visual_and_preprocess(model)


def _from_checkpoint(checkpoint: str, image_size: int | None) -> tuple[torch.nn.Module, dict]:
    import open_clip

    src = resolve_source(checkpoint, "clip encoder `checkpoint`", what="clip checkpoint folder", expect="any")
    if src.is_local:
        folder = src.path
        if not folder.is_dir():
            raise CheckpointError(
                f"clip checkpoint {folder} is a file; `checkpoint` takes a folder holding "
                f"open_clip_config.json and the weights (for a bare weights file use `model` + `pretrained`)"
            )
        if not (folder / "open_clip_config.json").is_file():
            raise CheckpointError(f"clip checkpoint folder {folder} has no open_clip_config.json")
        if not any(next(folder.glob(f"*{suffix}"), None) for suffix in WEIGHT_SUFFIXES):
            raise CheckpointError(
                f"clip checkpoint folder {folder} has no weights file (expected open_clip_model.safetensors "
                f"or open_clip_pytorch_model.bin)"
            )
    try:
        model = open_clip.create_model(src.open_clip_name, force_image_size=image_size, force_patch_dropout=0.0,
                                       **NO_BASE_WEIGHTS)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise load_error(src, "clip encoder `checkpoint`", "open_clip model", exc) from exc
    return _visual_and_preprocess(model)


def _from_config(config: dict[str, Any], image_size: int | None) -> tuple[torch.nn.Module, dict]:
    from open_clip.model import CLIPVisionCfg, _build_vision_tower
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    if "model_cfg" in config:  # a whole open_clip_config.json body
        model_cfg = dict(config["model_cfg"])
        preprocess = dict(config.get("preprocess_cfg") or {})
    else:
        model_cfg = {k: v for k, v in config.items() if k != "preprocess_cfg"}
        preprocess = dict(config.get("preprocess_cfg") or {})
    vision = model_cfg.get("vision_cfg")
    if not isinstance(vision, dict):
        raise RecipeError("clip encoder: `config` needs a `vision_cfg` mapping "
                          "({image_size, patch_size, width, layers, heads or head_width})")
    vision = dict(vision)
    if "heads" in vision:  # convenience alias: open_clip counts heads as width // head_width
        heads = vision.pop("heads")
        width = vision.get("width", CLIPVisionCfg.width)
        if not isinstance(heads, int) or heads <= 0 or width % heads:
            raise RecipeError(f"clip encoder: config.vision_cfg.heads ({heads}) must divide width ({width})")
        if "head_width" in vision and vision["head_width"] != width // heads:
            raise RecipeError("clip encoder: config.vision_cfg sets both `heads` and `head_width` inconsistently")
        vision["head_width"] = width // heads
    valid = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
    unknown = sorted(set(vision) - valid)
    if unknown:
        raise RecipeError(f"clip encoder: unknown config.vision_cfg key(s) {unknown}; valid keys: heads, "
                          f"{', '.join(sorted(valid))}")
    if image_size is not None:
        vision["image_size"] = image_size
    vision["patch_dropout"] = 0.0
    embed_dim = model_cfg.get("embed_dim", vision.get("width", CLIPVisionCfg.width))
    visual = _build_vision_tower(embed_dim, vision, quick_gelu=bool(model_cfg.get("quick_gelu", False)))
    preprocess_cfg = merge_preprocess_dict(PreprocessCfg(), preprocess)
    return visual, preprocess_cfg
