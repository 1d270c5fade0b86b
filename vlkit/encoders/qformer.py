"""``qformer``: a BLIP-2 Q-Former and its vision tower, returning a fixed number of query tokens.

Learned query tokens cross-attend to the features of BLIP-2's own ViT (transformers' ``Blip2VisionModel``
+ ``Blip2QFormerModel``); the stream ``queries`` is the Q-Former's last hidden state, ``(B,
num_query_tokens, qformer hidden)``: ``(B, 32, 768)`` for the released BLIP-2 checkpoints (SPHINX's
fourth encoder). Weight sources::

    # a hub id or local folder of any BLIP-2 model (Blip2Model, Blip2ForConditionalGeneration, ...);
    # only vision_model.*, query_tokens and qformer.* are read, the language model is never loaded
    {name: qformer, checkpoint: Salesforce/blip2-opt-2.7b}
    # an inline Blip2Config for random init (text_config is not needed)
    {name: qformer, config: {num_query_tokens: 4,
                             vision_config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
                                             num_attention_heads: 2, image_size: 32, patch_size: 8},
                             qformer_config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
                                              num_attention_heads: 2}}}

Dropout of the pretrained config is switched off (the features are deterministic, also in train mode).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Blip2Config
from transformers.models.blip_2.modeling_blip_2 import (
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    Blip2VisionModel,
)

from vlkit.encoders.base import CLIP_MEAN, CLIP_STD, Preprocess, VisionEncoder
from vlkit.errors import CheckpointError, RecipeError
from vlkit.registry import ENCODERS
from vlkit.sources import Source, load_error, resolve_source

_NAME = "qformer"
_KEY = "qformer encoder `checkpoint`"
_CONFIG_KEYS = {"vision_config", "qformer_config", "text_config", "num_query_tokens", "initializer_range",
                "initializer_factor", "image_text_hidden_size", "image_token_index"}


class Blip2QFormerTower(Blip2PreTrainedModel):
    """BLIP-2's image side: ``vision_model`` -> ``query_tokens`` cross-attending in ``qformer``.

    Parameter names match ``Blip2Model`` / ``Blip2ForConditionalGeneration``, so ``from_pretrained`` on
    any BLIP-2 checkpoint loads exactly these parts and skips the language model.
    """

    config: Blip2Config
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _keep_in_fp32_modules = ["query_tokens", "qformer"]
    # everything outside the image side (language model, projections, ITM heads) is skipped silently
    _keys_to_ignore_on_load_unexpected = [r"^(?!vision_model\.|qformer\.|query_tokens)"]

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised pixels -> Q-Former last hidden state ``(B, num_query_tokens, hidden)``
        (as ``Blip2Model.get_qformer_features``)."""
        image_embeds = self.vision_model(pixel_values=pixel_values,
                                         interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask)
        return out.last_hidden_state


@ENCODERS.register(_NAME)
class QFormerEncoder(VisionEncoder):
    """A BLIP-2 Q-Former over its own ViT. Stream ``queries``: ``(B, num_query_tokens, qformer hidden)``."""

    libraries = ("transformers",)

    @dataclass
    class Args:
        checkpoint: str | None = None
        """Hub id (e.g. ``Salesforce/blip2-opt-2.7b``) or local folder (``save_pretrained`` of a BLIP-2 model);
        only the vision tower, query tokens and Q-Former are loaded."""
        config: dict[str, Any] | None = None
        """Inline ``Blip2Config`` arguments for random init: ``{vision_config: {...}, qformer_config: {...},
        num_query_tokens}`` (the Q-Former's cross-attention width follows ``vision_config.hidden_size``)."""
        image_size: int | None = None
        """Override the input size (the vision tower's position embedding is interpolated)."""
        key: str | None = None
        """Stream-name prefix the fusion sees (default: the registered name, ``qformer``)."""
        gradient_checkpointing: bool = False
        """Recompute the ViT and Q-Former layers' activations in the backward pass (less memory, slower)."""

        def __post_init__(self) -> None:
            if (self.checkpoint is None) == (self.config is None):
                got = "both" if self.checkpoint is not None else "neither"
                raise RecipeError(f"{_NAME} encoder: set exactly one of `checkpoint` (hub id or local folder of a "
                                  f"BLIP-2 model) or `config` (inline Blip2Config for random init); got {got}")
            if self.config is not None:
                unknown = sorted(set(self.config) - _CONFIG_KEYS)
                if unknown:
                    raise RecipeError(f"{_NAME} encoder: unknown config key(s) {unknown}; valid keys: "
                                      f"{', '.join(sorted(_CONFIG_KEYS))}")
                for sub in ("vision_config", "qformer_config"):
                    if not isinstance(self.config.get(sub, {}), dict):
                        raise RecipeError(f"{_NAME} encoder: config.{sub} must be a mapping")
            if self.image_size is not None and self.image_size <= 0:
                raise RecipeError(f"{_NAME} encoder: `image_size` must be positive, got {self.image_size}")

    def __init__(self, args: Args) -> None:
        super().__init__()
        self.args = args
        mean, std = CLIP_MEAN, CLIP_STD  # BLIP-2 normalises with the OpenAI CLIP statistics
        if args.config is not None:
            config = _no_dropout(_config_from_dict(args.config))
            self.tower = Blip2QFormerTower(config)
            with torch.no_grad():  # BLIP-2 initialises its queries with N(0, 0.02); zeros would make them equal
                self.tower.query_tokens.normal_(0.0, config.initializer_range)
        else:
            assert args.checkpoint is not None
            self.tower = _load(args.checkpoint)
            mean, std = _image_stats(args.checkpoint, mean, std)
        self.tower.eval()
        config = self.tower.config
        native = int(config.vision_config.image_size)
        size = args.image_size or native
        patch = int(config.vision_config.patch_size)
        if size % patch:
            raise RecipeError(f"{_NAME} encoder: image size {size} is not a multiple of the patch size {patch}")
        self.interpolate = size != native
        self.num_tokens = int(config.num_query_tokens)
        self.stream_dims = {"queries": int(config.qformer_config.hidden_size)}
        self.preprocess = Preprocess(size=size, mean=mean, std=std)
        self.fsdp_wrap_block = type(self.tower.vision_model.encoder.layers[0])
        if args.gradient_checkpointing:  # transformers' own switch (its layers recompute themselves)
            self.tower.activation_checkpointing_enable({"use_reentrant": False})

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` normalised pixels -> ``{"queries": (B, num_query_tokens, hidden)}``."""
        return {"queries": self.tower(pixel_values, interpolate_pos_encoding=self.interpolate)}


# ------------------------------------------------------------------------------------------------ loading


def _config_from_dict(config: dict[str, Any]) -> Blip2Config:
    """A ``Blip2Config`` from inline arguments (its Q-Former's ``encoder_hidden_size`` follows the vision
    tower's ``hidden_size``, as transformers sets it)."""
    body = {**config, "vision_config": dict(config.get("vision_config") or {}),
            "qformer_config": dict(config.get("qformer_config") or {})}
    try:
        return Blip2Config(**body)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{_NAME} encoder: bad `config`: {exc}") from exc


def _no_dropout(config: Blip2Config) -> Blip2Config:
    config.qformer_config.attention_probs_dropout_prob = 0.0
    config.qformer_config.hidden_dropout_prob = 0.0
    config.vision_config.attention_dropout = 0.0
    return config


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _source(checkpoint: str) -> Source:
    """Where a ``checkpoint:`` value points (hub id, ``hf-hub:ID``, folder, ``local-dir:``; :mod:`vlkit.sources`)."""
    src = resolve_source(checkpoint, _KEY, what="checkpoint folder")
    if src.is_local and not (src.path / "config.json").is_file():
        raise CheckpointError(f"{_NAME} checkpoint folder {src.path} has no config.json (write it with "
                              f"save_pretrained of a BLIP-2 model)")
    return src


def _load(checkpoint: str) -> Blip2QFormerTower:
    src = _source(checkpoint)
    try:
        with _quiet_transformers():
            config = Blip2Config.from_pretrained(src.target)
            tower, info = Blip2QFormerTower.from_pretrained(src.target, config=_no_dropout(config),
                                                           output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise load_error(src, _KEY, "BLIP-2 checkpoint", exc) from exc
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise CheckpointError(f"{_NAME} encoder: {checkpoint!r} is not a complete BLIP-2 image side: missing "
                              f"{missing[:4]}{' ...' if len(missing) > 4 else ''}, mismatched {mismatched[:4]}")
    return tower.float()


def _image_stats(checkpoint: str, mean: tuple[float, float, float], std: tuple[float, float, float]
                 ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``image_mean`` / ``image_std`` from a local folder's preprocessor_config.json, if it has one."""
    path = Path(checkpoint.removeprefix("local-dir:")).expanduser() / "preprocessor_config.json"
    if not path.is_file():
        return mean, std
    try:
        cfg = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    m, s = cfg.get("image_mean", mean), cfg.get("image_std", std)
    return tuple(float(v) for v in m), tuple(float(v) for v in s)  # type: ignore[return-value]
