"""``dinov2``: a timm ViT (DINOv2 by default), returning the hidden states of one transformer block.

Weight sources::

    # a timm model name (+ tag); pretrained weights come from timm's usual source (the HF cache offline)
    {name: dinov2, model: vit_large_patch14_dinov2.lvd142m}
    # a local folder in timm's hf-hub layout (config.json + model.safetensors / pytorch_model.bin),
    # e.g. written by timm.models.save_for_hf(model, PATH, safe_serialization=True); or hf-hub:org/repo
    {name: dinov2, checkpoint: "local-dir:/models/my-dinov2"}
    # a bare weights file, with the architecture from `model` or `config`
    {name: dinov2, model: vit_large_patch14_dinov2, checkpoint: /models/dinov2_vitl14.safetensors}
    # an inline architecture for random init: `model` is the timm architecture, the rest are its kwargs
    {name: dinov2, config: {model: vit_small_patch14_dinov2, img_size: 56, patch_size: 14,
                            embed_dim: 64, depth: 2, num_heads: 2}}

Blocks after ``layer``, the final norm and the classifier head are pruned; outputs are raw block outputs
(like Hugging Face ``hidden_states``). Register tokens, if the model has any, are always dropped.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlkit.encoders import check_one_source, resolve_layer
from vlkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, VisionEncoder
from vlkit.errors import CheckpointError, RecipeError
from vlkit.registry import ENCODERS
from vlkit.sources import resolve_source

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".tar", ".ckpt")


def _is_weights_file(checkpoint: str) -> bool:
    return not checkpoint.startswith("hf-hub:") and Path(checkpoint.removeprefix("local-dir:")).suffix in _WEIGHT_SUFFIXES


@ENCODERS.register("dinov2")
class DINOv2Encoder(VisionEncoder):
    """A timm ViT. Stream ``tokens``: ``(B, [1 CLS +] grid**2, embed_dim)`` (register tokens dropped)."""

    libraries = ("timm",)

    @dataclass
    class Args:
        model: str | None = None
        """timm model name, optionally with a pretrained tag: ``vit_large_patch14_dinov2.lvd142m``."""
        pretrained: bool = True
        """With ``model`` alone: load timm's pretrained weights (False: random init of that architecture)."""
        checkpoint: str | None = None
        """A folder in timm's hf-hub layout (``local-dir:PATH`` or a bare ``PATH``: ``config.json`` +
        ``model.safetensors`` / ``pytorch_model.bin``), ``hf-hub:org/repo``, or a weights file
        (``.safetensors``, ``.pth``, ``.bin``) whose architecture ``model`` or ``config`` names."""
        config: dict[str, Any] | None = None
        """Inline architecture for random init: ``{model: <timm architecture>, **create_model kwargs}``,
        e.g. ``{model: vit_small_patch14_dinov2, img_size: 56, embed_dim: 64, depth: 2, num_heads: 2}``."""
        layer: int = -1
        """Which transformer block's output to return: -1 the last, -2 the penultimate, 0 the first."""
        keep_cls: bool = True
        """Prepend the CLS token to the stream."""
        image_size: int | None = None
        """Override the input size (the position embedding is interpolated when loading weights)."""
        key: str | None = None
        """Stream-name prefix the fusion sees (default: the registered name, ``dinov2``)."""
        gradient_checkpointing: bool = False
        """Recompute the transformer blocks' activations in the backward pass (less memory, slower)."""

        def __post_init__(self) -> None:
            if self.checkpoint is not None and _is_weights_file(self.checkpoint):
                if (self.model is None) == (self.config is None):
                    raise RecipeError(
                        "dinov2 encoder: a weights-file `checkpoint` needs exactly one of `model` (a timm name) "
                        "or `config` to give its architecture; a checkpoint folder (config.json + weights) "
                        "needs neither"
                    )
            else:
                check_one_source("dinov2", self.model, self.checkpoint, self.config, "a timm model name")
            if self.config is not None and not isinstance(self.config.get("model"), str):
                raise RecipeError("dinov2 encoder: `config` needs `model: <timm architecture>` "
                                  "(e.g. vit_small_patch14_dinov2) next to the architecture kwargs")
            if self.image_size is not None and self.image_size <= 0:
                raise RecipeError(f"dinov2 encoder: `image_size` must be positive, got {self.image_size}")

    def __init__(self, args: Args) -> None:
        super().__init__()
        from timm.data import resolve_model_data_config
        from timm.models import VisionTransformer

        self.args = args
        model = _create(args)
        if not isinstance(model, VisionTransformer):
            raise RecipeError(f"dinov2 encoder: only timm VisionTransformer models are supported, got "
                              f"{type(model).__name__}")
        if args.keep_cls and not model.has_class_token:
            raise RecipeError("dinov2 encoder: `keep_cls: true` but this model has no class token")
        data_config = resolve_model_data_config(model)
        depth = len(model.blocks)
        index = resolve_layer("dinov2", args.layer, depth)
        model.prune_intermediate_layers([index], prune_norm=True, prune_head=True)
        self.model = model
        self.fsdp_wrap_block = type(model.blocks[0])
        model.set_grad_checkpointing(args.gradient_checkpointing)  # timm's own per-block checkpoint
        self.layer_index = index
        """Absolute index (0-based) of the block whose output is returned."""

        height, width = model.patch_embed.img_size
        if height != width:
            raise RecipeError(f"dinov2 encoder: non-square input {height}x{width} is not supported")
        grid_h, grid_w = model.patch_embed.grid_size
        self.num_tokens = grid_h * grid_w + int(args.keep_cls)
        self.stream_dims = {"tokens": model.embed_dim}
        self.preprocess = Preprocess(
            size=height,
            mean=tuple(float(v) for v in data_config.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data_config.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
        )

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` normalised pixels -> ``{"tokens": (B, N, embed_dim)}``."""
        out = self.model.forward_intermediates(
            pixel_values,
            indices=1,  # blocks after `layer` are pruned: the last remaining block is the one asked for
            return_prefix_tokens=self.args.keep_cls,
            output_fmt="NLC",
            intermediates_only=True,
            output_dict=True,
        )
        tokens = out["image_intermediates"][0]
        if self.args.keep_cls:
            cls = out["image_intermediates_prefix"][0][:, :1]  # prefix = [CLS, registers...]
            tokens = torch.cat([cls, tokens], dim=1)
        return {"tokens": tokens}


# ------------------------------------------------------------------------------------------------ loading


def _check_name(name: str) -> None:
    import timm

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RecipeError(f"dinov2 encoder: unknown timm model {name!r}.{hint} "
                          f"For a local folder use `checkpoint: local-dir:PATH`")


def _create(args: DINOv2Encoder.Args) -> torch.nn.Module:
    """Build the timm model from the one weight source in ``args``."""
    import timm

    size_kwargs: dict[str, Any] = {"img_size": args.image_size} if args.image_size is not None else {}
    if args.config is not None:
        kwargs = dict(args.config)
        name = kwargs.pop("model")
        kwargs.update(size_kwargs)
    else:
        name, kwargs = args.model, size_kwargs

    file_overlay: dict[str, Any] | None = None
    if args.checkpoint is not None:
        src = resolve_source(args.checkpoint, "dinov2 encoder `checkpoint`", what="dinov2 checkpoint", expect="any")
        if not src.is_local:
            name, pretrained = src.open_clip_name, True
        else:
            path = src.path
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise CheckpointError(f"dinov2 checkpoint folder {path} has no config.json (timm's layout: "
                                          f"config.json + model.safetensors, as timm.models.save_for_hf writes)")
                if args.model is not None or args.config is not None:
                    raise RecipeError("dinov2 encoder: a checkpoint folder brings its own architecture "
                                      "(config.json); drop `model` / `config`")
                name, pretrained = f"local-dir:{path}", True
            else:
                if name is None:
                    raise RecipeError(f"dinov2 encoder: checkpoint {str(path)!r} is a weights file; name its "
                                      f"architecture with `model` (a timm name) or `config`")
                pretrained = True
                file_overlay = {"file": str(path)}
    else:
        pretrained = args.pretrained and args.config is None

    assert name is not None
    if not name.startswith(("local-dir:", "hf-hub:")):
        _check_name(name)
    try:
        if file_overlay is not None:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=file_overlay, **kwargs)
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise RecipeError(f"dinov2 encoder: bad timm arguments {sorted(kwargs)} for {name!r}: {exc}") from exc
    except (RuntimeError, OSError, ValueError, KeyError, AssertionError) as exc:
        source = args.checkpoint or name
        raise CheckpointError(
            f"dinov2 encoder: cannot load weights for {source!r}: {type(exc).__name__}: {exc}. Without network "
            f"access, pretrained weights must already be in the Hugging Face cache (or use `checkpoint:`)."
        ) from exc
