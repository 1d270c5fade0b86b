"""``florence2``: Florence-2 as a vision encoder with depth and breadth streams (Florence-VL).

Built on transformers' native Florence-2 (``Florence2ForConditionalGeneration``, no remote code). Only
the DaViT vision tower, the image projection and the text encoder are kept; the decoder and LM head are
dropped after loading. Streams, each ``(B, N, C)``:

* ``depth``: the projected DaViT features V (``get_image_features``), before the text encoder.
* ``stage<i>`` (optional, ``stages: [i, ...]``): raw output of DaViT stage ``i``, average-pooled to the
  final grid so every stream has the same N.
* one stream per prompt (``prompts:``): the Florence-2 text encoder's last hidden state at the image
  positions for the input ``[V ; embed(<s> prompt </s>)]``, exactly what transformers computes for the
  processor's ``<image>... <s> prompt </s>`` input. Task names (``detailed_caption``, ``ocr``,
  ``dense_region_caption``, ...) become the task tokens (``<DETAILED_CAPTION>``, ...) that the Florence-2
  processor expands ("Describe in detail what is shown in the image."); free text is used as is.

DaViT runs once per image; all prompts run through the text encoder as one batched call (``B * P``
sequences). Exactly one weight source::

    # a hub id (transformers-native layout, e.g. the florence-community conversions) or a local folder
    # written by save_pretrained (model + processor)
    {name: florence2, checkpoint: florence-community/Florence-2-large,
     prompts: [detailed_caption, ocr, dense_region_caption]}
    # an inline Florence2Config for random init; vlkit builds a matching word-level tokenizer offline
    {name: florence2, image_size: 64,
     config: {vision_config: {embed_dim: [32, 64], depths: [1, 1], ...},
              text_config: {d_model: 64, encoder_layers: 1, vocab_size: 64, ...}}}

Prompts are tokenized once, when the encoder is built, with the checkpoint's ``Florence2Processor`` (or
the offline one for ``config:``), and kept as buffers. Nothing runs under ``no_grad``: when a stage trains
the encoder, gradients reach DaViT, the projection and the text encoder.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.encoders._florence2.prompts import DEFAULT_PROMPTS, PromptSpec, error, parse_prompt
from vlkit.encoders._florence2.tokenizer import build_processor, build_tokenizer, tokenize_prompts
from vlkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, VisionEncoder, run_block
from vlkit.errors import CheckpointError
from vlkit.registry import ENCODERS
from vlkit.sources import load_error, resolve_source

logger = logging.getLogger(__name__)

_KEY = "florence2 encoder `checkpoint`"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ config


def _check_keys(section: Any, schema: type, key: str, extra: Sequence[str] = ()) -> None:
    if not isinstance(section, dict):
        raise error(f"expected a mapping, got {type(section).__name__} ({section!r})", key)
    valid = [f.name for f in dataclasses.fields(schema)] + list(extra)
    for name in section:
        if name not in valid:
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise error(f"unknown {schema.__name__} key {name!r}.{hint}", f"{key}.{name}")


def make_config(config: dict[str, Any]) -> Any:
    """Validate an inline ``config:`` (keys checked against transformers' schemas) and build a Florence2Config."""
    from transformers import CONFIG_MAPPING, Florence2Config, Florence2VisionConfig

    _check_keys(config, Florence2Config, "config")
    if not isinstance(config.get("vision_config"), dict) or not isinstance(config.get("text_config"), dict):
        raise error("needs `vision_config` and `text_config` mappings "
                     "(Florence2VisionConfig and BartConfig fields)", "config")
    _check_keys(config["vision_config"], Florence2VisionConfig, "config.vision_config", ["model_type"])
    text_type = config["text_config"].get("model_type", "bart")
    if text_type not in CONFIG_MAPPING:
        raise error(f"unknown text model_type {text_type!r}", "config.text_config.model_type")
    _check_keys(config["text_config"], CONFIG_MAPPING[text_type], "config.text_config", ["model_type"])
    vision = config["vision_config"]
    lengths = {k: len(vision[k]) for k in ("depths", "embed_dim", "num_heads", "num_groups", "patch_size",
                                            "patch_stride", "patch_padding", "patch_prenorm")
               if isinstance(vision.get(k), (list, tuple))}
    if len(set(lengths.values())) > 1:
        raise error(f"the per-stage lists of vision_config differ in length: {lengths}",
                     "config.vision_config")
    try:
        return Florence2Config(**config)
    except (TypeError, ValueError) as exc:
        raise error(f"invalid Florence2Config: {exc}", "config") from exc


# --------------------------------------------------------------------------------------------- encoder


@ENCODERS.register("florence2")
class Florence2Encoder(VisionEncoder):
    """Florence-2 (transformers-native) as an encoder: stream ``depth``, optional ``stage<i>``, one per prompt.

    Attributes: ``vision_tower`` (DaViT), ``projector`` (Florence-2's multi-modal projector: 2-D learned
    + 1-D temporal position embedding, pooled token, Linear, LayerNorm), ``embed_tokens`` and
    ``text_encoder`` (absent when there are no prompts), ``processor`` (the Florence2Processor used to
    tokenize the prompts), ``prompt_specs``.
    """

    libraries = ("transformers", "tokenizers")  # prompt token ids come from the tokenizer

    @dataclass
    class Args:
        checkpoint: str | None = None
        """Hub id (``florence-community/Florence-2-large``; ``hf-hub:ID`` forces the hub) or a local folder
        written by ``save_pretrained`` (``local-dir:PATH`` or a bare path) holding the model and its
        processor. The checkpoint must be in transformers' native Florence-2 layout."""
        config: dict[str, Any] | None = None
        """Inline ``Florence2Config`` for random init: ``{vision_config: {...}, text_config: {...}}`` (the text
        config is a BartConfig). vlkit builds a matching word-level tokenizer offline; the text config's
        ``vocab_size`` must hold it."""
        processor: str | None = None
        """Folder or hub id of the Florence-2 processor/tokenizer (default: the checkpoint's; for ``config``:
        the offline tokenizer)."""
        prompts: list[str | dict[str, str]] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
        """Breadth prompts, one stream each: task names (``detailed_caption``, ``ocr``, ``dense_region_caption``,
        ``caption``, ``od``, ...), task tokens (``<OCR>``), free text, or ``{stream_name: text}``. ``[]``:
        depth only (the text encoder is dropped)."""
        stages: list[int] = field(default_factory=list)
        """DaViT stages (0-based; -1 the last) whose raw outputs become extra streams ``stage<i>``,
        average-pooled to the final grid."""
        keep_pooled: bool = False
        """Keep the average-pooled token Florence-2 prepends to the image features (N = grid**2 + 1, e.g. 577)
        or drop it (N = grid**2, 576 as in Florence-VL). The text encoder always sees it."""
        image_size: int | None = None
        """Input size (default: the processor's, 768 for Florence-2; 768 for ``config``)."""
        dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
        """Parameter dtype (``auto``: the checkpoint's own). ``bfloat16``/``float16`` only when the encoder is
        frozen in every stage (memory); a trained encoder stays float32, bf16 compute comes from
        ``trainer.precision: bf16-mixed``."""
        key: str | None = None
        """Stream-name prefix the fusion sees (default: the registered name, ``florence2``)."""
        gradient_checkpointing: bool = False
        """Recompute the DaViT blocks' and the text encoder layers' activations in the backward pass."""

        def __post_init__(self) -> None:
            given = [k for k, v in (("checkpoint", self.checkpoint), ("config", self.config)) if v is not None]
            if len(given) != 1:
                got = f"got {', '.join(f'`{g}`' for g in given)}" if given else "got none of them"
                raise error(
                    "set exactly one of `checkpoint` (a hub id such as "
                    "florence-community/Florence-2-large, or a local folder written by save_pretrained) or "
                    f"`config` (an inline Florence2Config for random init); {got}")
            specs = [parse_prompt(p, i) for i, p in enumerate(self.prompts)]
            names = [s.name for s in specs]
            for i, spec in enumerate(specs):
                if names.count(spec.name) > 1:
                    raise error(f"two prompts make the stream {spec.name!r}; name them "
                                 f"with {{name: text}}", f"prompts[{i}]")
                if spec.name == "depth" or re.fullmatch(r"stage\d+", spec.name):
                    raise error(f"prompt stream name {spec.name!r} is reserved",
                                 f"prompts[{i}]")
            if len(set(self.stages)) != len(self.stages):
                raise error(f"lists a stage twice: {self.stages}", "stages")
            if self.image_size is not None and self.image_size <= 0:
                raise error(f"must be positive, got {self.image_size}",
                             "image_size")
            if self.config is not None:
                make_config(self.config)

        @property
        def prompt_specs(self) -> list[PromptSpec]:
            return [parse_prompt(p, i) for i, p in enumerate(self.prompts)]

    def __init__(self, args: Args) -> None:
        super().__init__()
        self.args = args
        self.prompt_specs = args.prompt_specs
        if args.config is not None:
            model, processor = _from_config(args)
        else:
            assert args.checkpoint is not None
            model, processor = _from_checkpoint(args)
        if args.gradient_checkpointing:  # the text encoder's layers, through transformers' own switch
            model.activation_checkpointing_enable({"use_reentrant": False})
        core = model.model
        vision = core.config.vision_config
        text = core.config.text_config
        self.vision_tower = core.vision_tower
        self.fsdp_wrap_block = type(core.vision_tower.blocks[0][0])
        self.projector = core.multi_modal_projector
        self.embed_tokens: nn.Module | None = None
        self.text_encoder: nn.Module | None = None
        if self.prompt_specs:
            if vision.projection_dim != text.d_model:
                raise error(f"vision_config.projection_dim ({vision.projection_dim}) must "
                             f"equal text_config.d_model ({text.d_model}) for the text encoder to read the "
                             f"image features")
            self.embed_tokens = core.get_input_embeddings()
            self.text_encoder = core.language_model.get_encoder()
        del model, core  # the decoder and LM head go with it

        # ---- geometry
        num_stages = len(vision.embed_dim)
        size = args.image_size or _processor_size(processor) or 768
        grids = []
        g = size
        for k, s, p in zip(vision.patch_size, vision.patch_stride, vision.patch_padding):
            g = (g + 2 * p - k) // s + 1
            grids.append(g)
        self.grid = grids[-1]
        """Side of the final DaViT feature map (24 for Florence-2 at 768 px)."""
        if self.grid < 1:
            raise error(f"{size} px is too small for DaViT's strides", "image_size")
        if self.grid > vision.max_position_embeddings:
            raise error(f"{size} px gives a {self.grid}x{self.grid} grid, more than "
                         f"the {vision.max_position_embeddings} learned positions per axis", "image_size")
        stages = []
        for i, st in enumerate(args.stages):
            if not -num_stages <= st < num_stages:
                raise error(f"stage {st} is out of range for a DaViT with {num_stages} "
                             f"stages (0..{num_stages - 1}, or -1 for the last)", f"stages[{i}]")
            stages.append(st % num_stages)
        if len(set(stages)) != len(stages):
            raise error(f"names a stage twice: {args.stages}", "stages")
        self.stage_indices = stages
        """Absolute DaViT stage indices exposed as ``stage<i>`` streams."""
        self.num_tokens = self.grid * self.grid + int(args.keep_pooled)
        self.stream_dims = {"depth": vision.projection_dim}
        for st in stages:
            self.stream_dims[f"stage{st}"] = vision.embed_dim[st]
        for spec in self.prompt_specs:
            self.stream_dims[spec.name] = text.d_model
        mean, std = _processor_norm(processor)
        self.preprocess = Preprocess(size=size, mean=mean, std=std)
        self.processor = processor

        # ---- prompts, tokenized once
        ids = tokenize_prompts(processor, [s.text for s in self.prompt_specs], strict_vocab=args.config is not None)
        length = max((len(x) for x in ids), default=0)
        pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
        prompt_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        prompt_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, row in enumerate(ids):
            prompt_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            prompt_mask[i, : len(row)] = 1
        if ids and length > text.max_position_embeddings - self.grid * self.grid - 1:
            raise error(f"{self.grid ** 2 + 1} image tokens + {length} prompt tokens exceed "
                         f"the text encoder's {text.max_position_embeddings} positions")
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        self.register_buffer("prompt_mask", prompt_mask, persistent=False)
        self.train()  # from_pretrained returns eval mode; a part starts in training mode like any nn.Module

    # ------------------------------------------------------------------------------------------ compute

    def image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """DaViT + projection: ``(B, grid**2 + 1, D)`` (pooled token first, as ``get_image_features``) and the
        raw feature maps ``(B, C_i, H_i, W_i)`` of the stages in :attr:`stage_indices`."""
        tower = self.vision_tower
        # the loop of Florence2VisionBackbone.forward, keeping the stage outputs asked for
        hidden = pixel_values.to(dtype=tower.convs[0].conv.weight.dtype)
        maps: dict[int, torch.Tensor] = {}
        for i, (conv, blocks) in enumerate(zip(tower.convs, tower.blocks)):
            hidden = conv(hidden)
            for block in blocks:  # vlkit's loop: its blocks are checkpointed here
                hidden = run_block(block, hidden, checkpoint=self.args.gradient_checkpointing)
            if i in self.stage_indices:
                maps[i] = hidden
        return self.projector(hidden), maps

    def encode_prompts(self, visual: torch.Tensor, which: Sequence[int] | None = None) -> torch.Tensor:
        """The text encoder on ``[visual ; prompt]`` for every image and prompt in ONE batched call.

        ``visual``: ``(B, M, D)`` image features (pooled token included); ``which``: prompt indices (default
        all). Returns the last hidden state at the image positions, ``(B, P, M, D)``.
        """
        if self.text_encoder is None or self.embed_tokens is None:
            raise RuntimeError("this florence2 encoder has no prompts (and no text encoder)")
        ids, mask = self.prompt_ids, self.prompt_mask
        if which is not None:
            index = torch.as_tensor(list(which), dtype=torch.long, device=ids.device)
            ids, mask = ids[index], mask[index]
            keep = int(mask.sum(0).nonzero().max()) + 1  # drop columns that are padding for all chosen prompts
            ids, mask = ids[:, :keep], mask[:, :keep]
        batch, tokens, width = visual.shape
        prompts, length = ids.shape
        text = self.embed_tokens(ids)  # (P, L, D), as Florence2Model embeds input_ids
        visual = visual.to(text.dtype)  # transformers casts image features to the embeddings' dtype
        inputs = torch.cat([visual.unsqueeze(1).expand(batch, prompts, tokens, width),
                            text.unsqueeze(0).expand(batch, prompts, length, width)], dim=2)
        inputs = inputs.reshape(batch * prompts, tokens + length, width)
        attention = None
        if bool((mask == 0).any()):
            attention = torch.cat([mask.new_ones(prompts, tokens), mask], dim=1)
            attention = attention.unsqueeze(0).expand(batch, -1, -1).reshape(batch * prompts, tokens + length)
        hidden = self.text_encoder(inputs_embeds=inputs, attention_mask=attention).last_hidden_state
        return hidden[:, :tokens].reshape(batch, prompts, tokens, width)

    def _tokens(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.args.keep_pooled else features[:, 1:]

    def _stage_stream(self, fmap: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(fmap, self.grid) if fmap.shape[-1] != self.grid else fmap
        tokens = pooled.flatten(2).transpose(1, 2)
        if self.args.keep_pooled:
            tokens = torch.cat([fmap.mean(dim=(2, 3)).unsqueeze(1), tokens], dim=1)
        return tokens

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` normalised pixels -> ``{"depth", "stage<i>"..., <prompt>...: (B, N, C)}``."""
        visual, maps = self.image_features(pixel_values)
        streams = {"depth": self._tokens(visual)}
        for st in self.stage_indices:
            streams[f"stage{st}"] = self._stage_stream(maps[st])
        if self.prompt_specs:
            hidden = self.encode_prompts(visual)
            for j, spec in enumerate(self.prompt_specs):
                streams[spec.name] = self._tokens(hidden[:, j])
        return streams


# ------------------------------------------------------------------------------------------------ loading


def _processor_size(processor: Any) -> int | None:
    size = getattr(processor.image_processor, "size", None)
    if size is None:
        return None
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    height, width = get("height"), get("width")
    if height and width:
        if height != width:
            raise CheckpointError(f"florence2 encoder: the processor resizes to {height}x{width}; only square inputs "
                                  f"are supported (set `image_size`)")
        return int(height)
    return int(get("shortest_edge")) if get("shortest_edge") else None


def _processor_norm(processor: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    ip = processor.image_processor
    mean = getattr(ip, "image_mean", None) or IMAGENET_MEAN
    std = getattr(ip, "image_std", None) or IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]


def _dtype(args: Florence2Encoder.Args) -> Any:
    return "auto" if args.dtype == "auto" else _DTYPES[args.dtype]


def _processor_source(value: str) -> str:
    """The ``processor:`` folder or hub id (:mod:`vlkit.sources`)."""
    return resolve_source(value, "florence2 encoder `processor`", what="florence2 processor folder").target


def _load_processor(source: str, checkpoint: str) -> Any:
    from transformers import AutoProcessor, Florence2Processor

    try:
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"florence2 encoder: cannot load a Florence-2 processor from {source!r} ({type(exc).__name__}: {exc}). "
            f"Save one next to the model with processor.save_pretrained(folder), or point `processor:` at a "
            f"folder or hub id that has one") from exc
    if not isinstance(processor, Florence2Processor):
        raise CheckpointError(f"florence2 encoder: {source!r} holds a {type(processor).__name__}, not a "
                              f"Florence2Processor (needed to expand task prompts; from `{checkpoint}`)")
    return processor


def _from_checkpoint(args: Florence2Encoder.Args) -> tuple[Any, Any]:
    from transformers import Florence2ForConditionalGeneration, PretrainedConfig

    assert args.checkpoint is not None
    src = resolve_source(args.checkpoint, _KEY, what="florence2 checkpoint folder")
    source = src.target
    try:
        raw, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError) as exc:
        raise load_error(src, _KEY, "config.json", exc) from exc
    vision_type = (raw.get("vision_config") or {}).get("model_type")
    if "auto_map" in raw or raw.get("model_type") != "florence2" or vision_type not in (None, "florence_vision"):
        raise CheckpointError(
            f"florence2 encoder: {args.checkpoint!r} is not a transformers-native Florence-2 checkpoint "
            f"(model_type {raw.get('model_type')!r}, vision model_type {vision_type!r}"
            f"{', remote code' if 'auto_map' in raw else ''}). microsoft/Florence-2-* hold the original "
            f"remote-code layout; use the converted florence-community/Florence-2-* checkpoints")
    try:
        model, info = Florence2ForConditionalGeneration.from_pretrained(source, dtype=_dtype(args),
                                                                        output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise load_error(src, _KEY, "Florence-2 model", exc) from exc
    used = ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.encoder.",
            "model.language_model.shared.")
    missing = [k for k in info.get("missing_keys", []) if k.startswith(used)]
    if missing:
        raise CheckpointError(f"florence2 encoder: {args.checkpoint!r} lacks {len(missing)} weights vlkit uses "
                              f"(e.g. {sorted(missing)[:3]}); it is not a complete native Florence-2 checkpoint")
    processor = _load_processor(_processor_source(args.processor) if args.processor
                                else source, args.checkpoint)
    return model, processor


def _from_config(args: Florence2Encoder.Args) -> tuple[Any, Any]:
    from transformers import Florence2ForConditionalGeneration

    assert args.config is not None
    config = dict(args.config)
    if args.processor is not None:
        processor = _load_processor(_processor_source(args.processor), args.processor)
        tokenizer = processor.tokenizer
    else:
        processor = None
        tokenizer = build_tokenizer([s.text for s in args.prompt_specs])
    config.setdefault("image_token_id", tokenizer.image_token_id)
    text_cfg = dict(config["text_config"])
    for name in ("bos", "pad", "eos"):
        text_cfg.setdefault(f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    config["text_config"] = text_cfg
    florence_config = make_config(config)
    vocab = florence_config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise error(f"the tokenizer has {len(tokenizer)} tokens but "
                     f"text_config.vocab_size is {vocab}; raise vocab_size", "config.text_config.vocab_size")
    model = Florence2ForConditionalGeneration(florence_config)
    if args.dtype not in ("float32", "auto"):
        model = model.to(_DTYPES[args.dtype])
    if processor is None:
        size = args.image_size or 768
        grid = size
        vision = florence_config.vision_config
        for k, s, p in zip(vision.patch_size, vision.patch_stride, vision.patch_padding):
            grid = (grid + 2 * p - k) // s + 1
        processor = build_processor(tokenizer, size, max(grid, 0) ** 2 + 1)
    return model, processor
