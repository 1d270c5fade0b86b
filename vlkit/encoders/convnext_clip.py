"""``convnext_clip``: the ConvNeXt image tower of an open_clip CLIP model, its last feature map as tokens.

The spatial grid of one ConvNeXt stage (by default the last, after the trunk's final LayerNorm, as
SPHINX uses it) is flattened row-major into tokens ``(B, h*w, C)``; with ``mean_token: true`` the grid's
mean is prepended (SPHINX: ConvNeXt-XXL at 256 px -> 8x8x3072 + a mean token). Resampling to another
encoder's grid is the fusion's job (``sphinx_mix``).

Exactly one weight source::

    # an open_clip ConvNeXt architecture + a pretrained tag (downloaded once) or a weights file
    {name: convnext_clip, model: convnext_xxlarge, pretrained: laion2b_s34b_b82k_augreg_soup}
    # a local folder in open_clip's hf-hub layout (open_clip_config.json + weights), or hf-hub:org/repo
    {name: convnext_clip, checkpoint: "local-dir:/models/convnext-clip"}
    # an inline architecture, randomly initialised: an open_clip vision_cfg naming a timm ConvNeXt;
    # `timm_kwargs` (a vlkit extension) overrides the timm architecture, e.g. for tiny towers
    {name: convnext_clip, config: {vision_cfg: {timm_model_name: convnext_atto, image_size: 64,
                                                timm_kwargs: {depths: [1, 1, 1, 1], dims: [16, 32, 48, 64]}}}}

Only the timm trunk is kept (the text tower and the pooled projection head are dropped), and stages after
``stage`` are pruned, so every remaining parameter takes part in the forward pass. Stochastic depth of the
pretraining recipe (``timm_drop_path``) is not applied: the features are deterministic.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.encoders import check_one_source, resolve_layer
from vlkit.encoders._open_clip import NO_BASE_WEIGHTS, create_named, mean_std
from vlkit.encoders.base import CLIP_MEAN, CLIP_STD, Preprocess, VisionEncoder
from vlkit.errors import CheckpointError, RecipeError
from vlkit.registry import ENCODERS
from vlkit.sources import load_error, resolve_source

logger = logging.getLogger(__name__)

_NAME = "convnext_clip"
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                 "pytorch_model.bin")
_TRUNK_PREFIX = "visual.trunk."
# open_clip vision_cfg keys that concern the pooled/projected head or training, which this encoder drops
_IGNORED_VISION_KEYS = {"timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
                        "timm_drop_path", "embed_dim", "layers", "width", "patch_size", "head_width"}


@ENCODERS.register(_NAME)
class ConvNeXtCLIPEncoder(VisionEncoder):
    """An open_clip ConvNeXt image tower. Stream ``tokens``: ``(B, [1 mean +] h*w, channels)``."""

    libraries = ("open_clip_torch", "timm")

    @dataclass
    class Args:
        model: str | None = None
        """open_clip model name of a ConvNeXt CLIP, e.g. ``convnext_xxlarge`` (see ``open_clip.list_models()``)."""
        pretrained: str | None = None
        """With ``model``: an open_clip pretrained tag (e.g. ``laion2b_s34b_b82k_augreg_soup``) or a path to a
        weights file. Unset: the named architecture is randomly initialised."""
        checkpoint: str | None = None
        """A folder in open_clip's hf-hub layout: ``local-dir:PATH`` (or a bare ``PATH``) holding
        ``open_clip_config.json`` and ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``;
        or ``hf-hub:org/repo``."""
        config: dict[str, Any] | None = None
        """Inline architecture for random init: ``{vision_cfg: {timm_model_name, image_size, timm_kwargs?},
        preprocess_cfg?}`` (other open_clip keys such as ``embed_dim`` or ``text_cfg`` are accepted and
        ignored), or a whole ``open_clip_config.json`` body ``{model_cfg: ..., preprocess_cfg: ...}``."""
        stage: int = -1
        """Which ConvNeXt stage's feature map to return: -1 the last (stride 32), -2 the one before (16), ..."""
        norm: bool = True
        """Apply the trunk's final LayerNorm to the last stage's map (as SPHINX); ignored for earlier stages."""
        mean_token: bool = False
        """Prepend the mean of the grid as one extra token (SPHINX's ConvNeXt stream)."""
        image_size: int | None = None
        """Override the input size (default: the architecture's, 256 for convnext_xxlarge)."""
        key: str | None = None
        """Stream-name prefix the fusion sees (default: the registered name, ``convnext_clip``)."""
        gradient_checkpointing: bool = False
        """Recompute the ConvNeXt blocks' activations in the backward pass (less memory, slower)."""

        def __post_init__(self) -> None:
            check_one_source(_NAME, self.model, self.checkpoint, self.config,
                             "an open_clip ConvNeXt name, with `pretrained` a tag or weights file")
            if self.pretrained is not None and self.model is None:
                raise RecipeError(f"{_NAME} encoder: `pretrained` applies only with `model` (the architecture it "
                                  "loads into); a `checkpoint` folder carries its own weights")
            if self.image_size is not None and self.image_size <= 0:
                raise RecipeError(f"{_NAME} encoder: `image_size` must be positive, got {self.image_size}")
            if self.config is not None:
                _vision_cfg(self.config)  # validate the shape of the inline config before any build

    def __init__(self, args: Args) -> None:
        super().__init__()
        from timm.models import ConvNeXt

        self.args = args
        if args.config is not None:
            trunk, size, preprocess_cfg = _from_config(args.config, args.image_size)
        elif args.checkpoint is not None:
            trunk, size, preprocess_cfg = _from_checkpoint(args.checkpoint, args.image_size)
        else:
            assert args.model is not None
            trunk, size, preprocess_cfg = _from_name(args.model, args.pretrained, args.image_size)
        if not isinstance(trunk, ConvNeXt):
            raise RecipeError(f"{_NAME} encoder: the image tower's trunk is a {type(trunk).__name__}, not a timm "
                              f"ConvNeXt (for ViT CLIP towers use the `clip` encoder)")

        n_stages = len(trunk.stages)
        index = resolve_layer(_NAME, args.stage, n_stages)
        final_norm: nn.Module = nn.Identity()
        if args.norm and index == n_stages - 1:
            # default ConvNeXt: pool -> head.norm; head_norm_first variants: norm_pre before the head
            final_norm = trunk.norm_pre if not isinstance(trunk.norm_pre, nn.Identity) else trunk.head.norm
        info = trunk.feature_info[index]
        # keep stem + stages[:index + 1]; the pooled head, classifier and final norm go (norm kept above)
        trunk.prune_intermediate_layers([index], prune_norm=True, prune_head=True)
        self.trunk = trunk
        self.fsdp_wrap_block = type(trunk.stages[0].blocks[0])
        trunk.set_grad_checkpointing(args.gradient_checkpointing)  # timm's own per-block checkpoint
        self.norm = final_norm
        self.stage_index = index
        """Absolute index (0-based) of the stage whose map is returned."""

        self.grid = size // info["reduction"]
        """Side of the returned square grid (image size // the stage's stride)."""
        if self.grid < 1:
            raise RecipeError(f"{_NAME} encoder: image size {size} is smaller than stage {index}'s stride "
                              f"{info['reduction']}; raise `image_size` or pick an earlier `stage`")
        self.num_tokens = self.grid * self.grid + int(args.mean_token)
        self.stream_dims = {"tokens": int(info["num_chs"])}
        self.preprocess = Preprocess(
            size=size,
            mean=mean_std(_NAME, preprocess_cfg.get("mean"), CLIP_MEAN),
            std=mean_std(_NAME, preprocess_cfg.get("std"), CLIP_STD),
        )

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised pixels -> the stage's feature map ``(B, C, h, w)``."""
        x = self.trunk.stem(pixel_values)
        x = self.trunk.stages(x)
        return self.norm(x)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` normalised pixels -> ``{"tokens": (B, [1 +] h*w, C)}`` (row-major grid)."""
        fmap = self.feature_map(pixel_values)
        tokens = fmap.flatten(2).transpose(1, 2)
        if self.args.mean_token:
            tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        return {"tokens": tokens}


# ------------------------------------------------------------------------------------------------ loading


def _split_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_cfg, preprocess_cfg)`` of an inline config or an ``open_clip_config.json`` body."""
    if "model_cfg" in config:
        return dict(config["model_cfg"] or {}), dict(config.get("preprocess_cfg") or {})
    return {k: v for k, v in config.items() if k != "preprocess_cfg"}, dict(config.get("preprocess_cfg") or {})


def _vision_cfg(config: dict[str, Any]) -> dict[str, Any]:
    """The ``vision_cfg`` of a config, checked: it names a timm ConvNeXt; known keys only."""
    model_cfg, _ = _split_config(config)
    vision = model_cfg.get("vision_cfg")
    if not isinstance(vision, dict) or not isinstance(vision.get("timm_model_name"), str):
        raise RecipeError(f"{_NAME} encoder: `config` needs `vision_cfg: {{timm_model_name: <timm ConvNeXt, e.g. "
                          f"convnext_atto>, image_size: <px>, timm_kwargs: {{...}}}}`")
    unknown = sorted(set(vision) - _IGNORED_VISION_KEYS - {"timm_model_name", "image_size", "timm_kwargs"})
    if unknown:
        raise RecipeError(f"{_NAME} encoder: unknown config.vision_cfg key(s) {unknown}; valid keys: "
                          f"timm_model_name, image_size, timm_kwargs (and open_clip's timm_* head keys, ignored)")
    kwargs = vision.get("timm_kwargs", {})
    if not isinstance(kwargs, dict):
        raise RecipeError(f"{_NAME} encoder: config.vision_cfg.timm_kwargs must be a mapping of timm "
                          f"create_model arguments (e.g. {{depths: [1, 1, 1, 1], dims: [16, 32, 48, 64]}})")
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise RecipeError(f"{_NAME} encoder: non-square image_size {list(size)} is not supported")
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        raise RecipeError(f"{_NAME} encoder: config.vision_cfg.image_size must be a positive int, got {size!r}")
    return {**vision, "image_size": size}


def _build_trunk(vision: dict[str, Any]) -> nn.Module:
    """A randomly initialised timm trunk as open_clip builds it (classifier removed, no stochastic depth)."""
    import timm

    name = vision["timm_model_name"]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models("convnext*"), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RecipeError(f"{_NAME} encoder: unknown timm model {name!r}.{hint}")
    kwargs = {"drop_path_rate": 0.0, **dict(vision.get("timm_kwargs") or {})}
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, IndexError, AssertionError, ValueError) as exc:
        raise RecipeError(f"{_NAME} encoder: bad timm arguments {sorted(kwargs)} for {name!r}: "
                          f"{type(exc).__name__}: {exc}") from exc


def _from_config(config: dict[str, Any], image_size: int | None) -> tuple[nn.Module, int, dict[str, Any]]:
    vision = _vision_cfg(config)
    _, preprocess = _split_config(config)
    return _build_trunk(vision), image_size or vision["image_size"], preprocess


def _read_state(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle errors of many kinds: all mean an unreadable file
        raise CheckpointError(f"{_NAME} encoder: cannot read weights {file}: {type(exc).__name__}: {exc}") from exc


def _from_folder(folder: Path, image_size: int | None) -> tuple[nn.Module, int, dict[str, Any]]:
    """A folder in open_clip's hf-hub layout; only the image trunk's weights are read."""
    if not folder.is_dir():
        raise CheckpointError(f"{_NAME} checkpoint {folder} is a file; `checkpoint` takes a folder holding "
                              f"open_clip_config.json and the weights (for a weights file use `model` + `pretrained`)")
    cfg_file = folder / "open_clip_config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{_NAME} checkpoint folder {folder} has no open_clip_config.json")
    weights = next((folder / f for f in _WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{_NAME} checkpoint folder {folder} has no weights file (expected one of "
                              f"{', '.join(_WEIGHT_FILES)})")
    try:
        body = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from exc
    try:
        trunk, size, preprocess = _from_config(body if "model_cfg" in body else {"model_cfg": body}, image_size)
    except RecipeError as exc:
        raise CheckpointError(f"{cfg_file}: {exc.message}") from exc
    state = _read_state(weights)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    trunk_state = {k[len(_TRUNK_PREFIX):]: v for k, v in state.items() if k.startswith(_TRUNK_PREFIX)}
    if not trunk_state:
        raise CheckpointError(f"{_NAME} encoder: {weights} holds no '{_TRUNK_PREFIX}*' weights; is it an open_clip "
                              f"ConvNeXt CLIP checkpoint?")
    missing, unexpected = trunk.load_state_dict(trunk_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{_NAME} encoder: {weights} does not match the architecture in {cfg_file}: "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    return trunk, size, preprocess


def _from_checkpoint(checkpoint: str, image_size: int | None) -> tuple[nn.Module, int, dict[str, Any]]:
    src = resolve_source(checkpoint, f"{_NAME} encoder `checkpoint`", what=f"{_NAME} checkpoint folder",
                         expect="any")
    if src.is_local:
        return _from_folder(src.path, image_size)
    import open_clip

    try:
        model = open_clip.create_model(src.open_clip_name, force_image_size=image_size, **NO_BASE_WEIGHTS)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise load_error(src, f"{_NAME} encoder `checkpoint`", "open_clip model", exc) from exc
    return _visual_trunk(model, image_size)


def _visual_trunk(model: Any, image_size: int | None) -> tuple[nn.Module, int, dict[str, Any]]:
    from open_clip.model import get_model_preprocess_cfg

    preprocess = dict(get_model_preprocess_cfg(model))
    trunk = getattr(model.visual, "trunk", None)
    if trunk is None:
        raise RecipeError(f"{_NAME} encoder: this open_clip model's image tower is a {type(model.visual).__name__}, "
                          f"not a timm ConvNeXt (for ViT towers use the `clip` encoder)")
    from timm.layers import DropPath

    for module in trunk.modules():  # the pretraining recipe's stochastic depth: off, features are deterministic
        if isinstance(module, DropPath):
            module.drop_prob = 0.0
    size = image_size or model.visual.image_size[0]
    return trunk, int(size), preprocess


def _from_name(name: str, pretrained: str | None, image_size: int | None) -> tuple[nn.Module, int, dict]:
    return _visual_trunk(create_named(_NAME, name, pretrained, image_size, suggest="convnext"), image_size)
